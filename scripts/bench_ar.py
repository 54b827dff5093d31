"""Benchmark: spdecode's autoregressive decoder vs HF `generate`, same model, dtype, prompts and threads.

Runs the two side by side (alternating per prompt, after a warm-up) and prints median tok/s and
the median of the per-prompt ratios. Greedy outputs are also checked to be identical.

    .venv/bin/python scripts/bench_ar.py --dtype float32 bfloat16 --threads 1 2 --limit 8
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from spdecode.methods.ar import generate_ar
from spdecode.runtime.generation import eos_ids
from spdecode.runtime.models import load_model
from spdecode.runtime.staged import StagedTarget

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "eval_data" / "mt_bench" / "question.jsonl"
FALLBACK_PROMPTS = ["Explain speculative decoding in two sentences.", "Write a Python function that reverses a list.",
                    "What causes the seasons on Earth?", "Give three tips for writing clear emails."]


def load_prompts(path: Path, limit: int) -> list[str]:
    if not path.exists():
        return FALLBACK_PROMPTS[:limit]
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r["turns"][0] for r in rows[:limit]]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--limit", type=int, default=6)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    args = ap.parse_args()

    prompts = load_prompts(args.data, args.limit)
    print(f"{len(prompts)} prompts from {args.data if args.data.exists() else 'built-in list'}, "
          f"max_new_tokens={args.max_new_tokens}")
    for dtype in args.dtype:
        model, tok = load_model(args.model, dtype)
        target = StagedTarget(model)
        eos = eos_ids(model, tok)
        encoded = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                           return_dict=True)["input_ids"] for p in prompts]
        for threads in args.threads:
            torch.set_num_threads(threads)
            ours, hf, ratios, same = [], [], [], 0
            generate_ar(target, encoded[0], 8, eos=eos)  # warm-up both paths
            model.generate(torch.tensor([encoded[0]]), max_new_tokens=8, do_sample=False)
            for ids in encoded:
                t0 = time.perf_counter()
                gen = generate_ar(target, ids, args.max_new_tokens, eos=eos)
                t_ours = time.perf_counter() - t0
                t0 = time.perf_counter()
                with torch.inference_mode():
                    out = model.generate(torch.tensor([ids]), max_new_tokens=args.max_new_tokens, do_sample=False)
                t_hf = time.perf_counter() - t0
                ref = out[0, len(ids):].tolist()
                same += ref == gen.tokens
                ours.append(len(gen.tokens) / t_ours)
                hf.append(len(ref) / t_hf)
                ratios.append(ours[-1] / hf[-1])
            print(f"{dtype:>9} threads={threads}: spdecode AR {statistics.median(ours):6.1f} tok/s | "
                  f"HF generate {statistics.median(hf):6.1f} tok/s | median ratio {statistics.median(ratios):.2f}x "
                  f"| identical outputs {same}/{len(encoded)}")


if __name__ == "__main__":
    main()
