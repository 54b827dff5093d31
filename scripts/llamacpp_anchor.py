"""Helper of scripts/bench_llamacpp.sh: the same prompts, token ids and threads for llama.cpp and spdecode.

    prompts  (our venv)        encode a {question_id, turns} set with our tokenizer and chat
                               template; record the GGUF's path and the bytes of weights one
                               decode step reads (every tensor but the embedding rows, plus the
                               tied LM head, which reads the whole embedding)
    decode   (llama.cpp venv)  greedy decode of those ids with llama-cpp-python: prefill, then one
                               token per `eval`, timed decode only, stopping at EOS as bench does
    summary  (our venv)        medians over rounds beside spdecode bench's best AR and eagle

Only the standard library (and llama_cpp in `decode`) is imported at module level, so the
llama.cpp venv needs nothing of ours.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path


def cmd_prompts(args) -> None:
    import platform

    import torch
    from transformers import AutoTokenizer

    from spdecode.bench.run import load_sets
    from spdecode.runtime.models import ALIASES, resolve_model
    from spdecode.runtime.prompts import encode_prompt

    gguf_path = ALIASES[args.model].gguf()
    tok = AutoTokenizer.from_pretrained(resolve_model(args.model))
    sets = load_sets(argparse.Namespace(data=args.data, limit=args.limit))
    prompts = [{"id": f"{name}/{row['question_id']}", "ids": encode_prompt(tok, row["turns"][0])}
               for name, rows in sets.items() for row in rows]
    from transformers import GenerationConfig

    from spdecode.runtime.generation import eos_ids

    try:  # the ids bench stops on: the generation config's EOS, else the tokenizer's
        holder = argparse.Namespace(generation_config=GenerationConfig.from_pretrained(resolve_model(args.model)))
    except OSError:
        holder = None
    eos = sorted(eos_ids(holder, tok))
    Path(args.out).write_text(json.dumps({
        "gguf": str(gguf_path), "eos": eos, "prompts": prompts,
        "bytes_per_token": gguf_bytes_per_token(gguf_path), "ours_bytes_per_token": our_bytes_per_token(args.model),
        "machine": {"cpu": platform.processor() or platform.machine(),
                    "capability": torch.backends.cpu.get_cpu_capability()},
    }))
    print(f"{len(prompts)} prompts -> {args.out}")


def gguf_bytes_per_token(path: Path) -> dict:
    """Bytes of weights a one-token decode step reads: every tensor in full, except the token
    embedding, of which one row is gathered (but which a tied LM head reads whole)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    sizes = {t.name: int(t.n_bytes) for t in reader.tensors}
    emb = sizes.get("token_embd.weight", 0)
    tied = "output.weight" not in sizes
    rows = int(reader.tensors[[t.name for t in reader.tensors].index("token_embd.weight")].shape[-1]) \
        if emb else 1
    per_token = sum(sizes.values()) - emb + emb // max(rows, 1) + (emb if tied else 0)
    return {"total_tensor_bytes": sum(sizes.values()), "per_token": per_token, "tied_head": tied}


def our_bytes_per_token(model_name: str) -> dict:
    """Bytes of weights one of our one-row steps reads per backend: every Linear (a tied LM head
    reads the embedding whole) at the backend's width, scales and zeros included."""
    import torch

    from spdecode.runtime.models import load_model
    from spdecode.runtime.quantized import INT4_GROUP, int4_fits

    model, _ = load_model(model_name, "float32", tokenizer=False)
    head = model.get_output_embeddings()
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]

    def int4w(m):
        if m is head:
            return m.weight.numel() + 2 * m.out_features  # int8 per row, a bf16 scale each
        if not int4_fits(m):
            return 2 * m.weight.numel()
        return m.weight.numel() // 2 + 2 * 2 * m.weight.numel() // INT4_GROUP  # bf16 scale and zero a group

    return {"float32": sum(4 * m.weight.numel() for m in linears),
            "fp16w/bf16": sum(2 * m.weight.numel() for m in linears),
            "int4w": sum(int4w(m) for m in linears)}


def cmd_decode(args) -> None:
    import numpy as np
    from llama_cpp import Llama

    spec = json.loads(Path(args.prompts).read_text())
    llm = Llama(model_path=spec["gguf"], n_threads=args.threads, n_threads_batch=args.threads, n_ctx=2048,
                n_batch=512, verbose=False)
    eos = set(spec["eos"]) | {llm.token_eos()}

    def run(ids, new):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        t1 = time.perf_counter()
        out = []
        while len(out) < new:
            nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            out.append(nxt)
            if nxt in eos or len(out) == new:
                break
            llm.eval([nxt])
        return out, t1 - t0, time.perf_counter() - t1

    run(spec["prompts"][0]["ids"], 8)  # warm-up
    records = []
    for p in spec["prompts"]:
        out, prefill, decode = run(p["ids"], args.max_new_tokens)
        # The first token comes from the prefill's logits; every later one costs one eval (an
        # answer that ends at its first token has no decode rate).
        steps = len(out) - 1
        records.append({"id": p["id"], "new_tokens": len(out), "prefill_s": prefill, "decode_s": decode,
                        "decode_tok_s": steps / decode if steps > 0 else None, "tokens": out})
    rates = [r["decode_tok_s"] for r in records if r["decode_tok_s"]]
    decode_s = max(sum(r["decode_s"] for r in records), 1e-9)
    summary = {"threads": args.threads, "median_prompt_tok_s": statistics.median(rates),
               "decode_tok_s": sum(r["new_tokens"] - 1 for r in records) / decode_s}
    Path(args.out).write_text(json.dumps({"summary": summary, "records": records}))
    print(f"llama.cpp threads={args.threads}: {summary['median_prompt_tok_s']:.1f} tok/s (median over prompts)")


def cmd_summary(args) -> None:
    root = Path(args.dir)
    spec = json.loads((root / "prompts.json").read_text())
    lcpp: dict[int, list[float]] = {}
    lcpp_tokens: dict[str, list[int]] = {}
    for f in sorted(root.glob("llamacpp-t*-r*.json")):
        d = json.loads(f.read_text())
        lcpp.setdefault(d["summary"]["threads"], []).append(d["summary"]["median_prompt_tok_s"])
        for r in d["records"]:
            lcpp_tokens[r["id"]] = r["tokens"]
    ours: dict[str, list[float]] = {}
    our_tokens: dict[str, dict[str, list[int]]] = {}  # AR backend -> prompt -> tokens
    for f in sorted(root.glob("spdecode-r*.json")):
        d = json.loads(f.read_text())
        backend = {r["method"]: r["dtype"] for r in d["records"]}
        for label, per_set in d["summary"].items():
            # One prompt set is one number; several: the median over them ("overall" pools them).
            rates = [s["median_prompt_tok_s"] for name, s in per_set.items() if name != "overall"]
            named = label if ("dtype=" in label or "backend=" in label) else f"{label} ({backend.get(label, '?')})"
            ours.setdefault(named, []).append(statistics.median(rates))
        for r in d["records"]:
            if r["method"].startswith("ar"):
                our_tokens.setdefault(r["dtype"], {}).setdefault(f"{r['dataset']}/{r['question_id']}", r["tokens"])
    med = {f"llama.cpp threads={t}": statistics.median(v) for t, v in sorted(lcpp.items())}
    med.update({label: statistics.median(v) for label, v in ours.items()})
    best_lcpp = max(v for k, v in med.items() if k.startswith("llama.cpp"))
    if not any(k.startswith("ar") for k in med):
        raise SystemExit("spdecode bench ran no AR: put ar in METHOD")
    best_ar = max((v, k) for k, v in med.items() if k.startswith("ar"))
    best_any = max((v, k) for k, v in med.items() if not k.startswith("llama.cpp"))
    print(f"medians over {len(next(iter(lcpp.values())))} rounds (tok/s, median over prompts):")
    for label, v in sorted(med.items(), key=lambda kv: -kv[1]):
        print(f"  {label:60s} {v:7.1f}  {v / best_lcpp:5.2f}x llama.cpp")
    print(f"best AR {best_ar[1]}: llama.cpp is {best_lcpp / best_ar[0]:.2f}x ahead")
    print(f"best spdecode {best_any[1]}: {best_any[0] / best_lcpp:.2f}x llama.cpp")
    b = spec["bytes_per_token"]
    print(f"weights read per token: llama.cpp {b['per_token'] / 1e6:.0f} MB (Q4_1 GGUF); ours " + ", ".join(
        f"{k} {v / 1e6:.0f} MB" for k, v in spec.get("ours_bytes_per_token", {}).items()))
    identical = {}
    for backend, tokens in sorted(our_tokens.items()):
        same = [lcpp_tokens[k] == tokens[k] for k in lcpp_tokens if k in tokens]
        identical[backend] = [sum(same), len(same)]
    print("llama.cpp greedy outputs identical to our AR's (it quantizes activations to 8 bits inside its dot "
          "products): " + ", ".join(f"{k} {a}/{n}" for k, (a, n) in identical.items()))
    (root / "summary.json").write_text(json.dumps({"medians": med, "bytes_per_token": b,
                                                   "ours_bytes_per_token": spec.get("ours_bytes_per_token"),
                                                   "identical_to_ar": identical}, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prompts")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data", required=True)
    p.add_argument("--limit", type=int, default=12)
    p.add_argument("--out", required=True)
    d = sub.add_parser("decode")
    d.add_argument("--prompts", required=True)
    d.add_argument("--threads", type=int, default=2)
    d.add_argument("--max-new-tokens", type=int, default=128)
    d.add_argument("--out", required=True)
    s = sub.add_parser("summary")
    s.add_argument("--dir", required=True)
    args = ap.parse_args()
    {"prompts": cmd_prompts, "decode": cmd_decode, "summary": cmd_summary}[args.cmd](args)


if __name__ == "__main__":
    main()
