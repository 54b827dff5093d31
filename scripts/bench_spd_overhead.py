"""Benchmark: cost of one single-process SPD cycle vs one AR step, same model, same process.

In one process the n stages run one after another, so a full-pipeline SPD cycle does the work of
one AR step (all L layers + LM head) plus the PDM and the bookkeeping. This measures that
overhead. To keep the pipeline full (every stage busy every cycle) the PDM is run for its cost but
the proposed token comes from the AR reference (an oracle), so every draft is accepted.

    .venv/bin/python scripts/bench_spd_overhead.py --stages 2 4 --draft-vocab 0 16384
"""

from __future__ import annotations

import argparse
import statistics

import torch

from spdecode.drafting.pdm import new_pdm
from spdecode.drafting.pdm_tree import PdmTreeDrafter
from spdecode.methods.ar import generate_ar
from spdecode.methods.spd import generate_spd
from spdecode.runtime.generation import eos_ids
from spdecode.runtime.models import load_model
from spdecode.runtime.staged import StagedTarget

PROMPTS = ["Explain how a bicycle stays upright.", "Write a short story about a lighthouse keeper.",
           "List five uses of a paperclip.", "Why is the sky blue?"]


class PDMCostOracle:
    """Runs the PDM every cycle (its real cost: the rows in flight and the head at the newest) but
    drafts the AR reference's token, so every draft is accepted (a draft past the reference's end
    is never verified)."""

    method = "spd"
    after_stage0 = False

    def __init__(self, pdm_drafter: PdmTreeDrafter, prompt: list[int], reference: list[int]):
        self.pdm, self.expected = pdm_drafter, list(prompt) + list(reference)
        self.anchors = pdm_drafter.anchors

    def reset(self, run):
        self.pdm.reset(run)

    def grow(self, run, now):
        sched = run.sched
        out = self.pdm._in_flight(run, sched.live())
        self.pdm.pdm.head(out[-1:])
        leaf = sched.leaves(now)[-1]
        sched.add(self.expected[min(sched.nodes[leaf].position + 1, len(self.expected) - 1)], leaf, now=now)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--stages", nargs="+", type=int, default=[2, 4])
    ap.add_argument("--draft-vocab", nargs="+", type=int, default=[0, 16384], help="0 = full vocabulary")
    ap.add_argument("--layers", type=int, default=1, help="PDM decoder layers")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tok = load_model(args.model, args.dtype)
    eos = eos_ids(model, tok)
    prompts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                       return_dict=True)["input_ids"] for p in PROMPTS]
    ar_target = StagedTarget(model)
    refs = [generate_ar(ar_target, p, args.max_new_tokens, eos=eos).tokens for p in prompts]  # also warm-up
    print(f"torch threads {torch.get_num_threads()}, {args.dtype}, {len(prompts)} prompts x "
          f"{args.max_new_tokens} tokens, PDM layers {args.layers}")
    for n in args.stages:
        target = StagedTarget(model, n)
        for vd in args.draft_vocab:
            vocab = torch.arange(vd) if vd else None
            pdm = new_pdm(target, args.model, "bench", num_layers=args.layers, draft_vocab=vocab).eval()
            ar_step, spd_cycle, phases = [], [], {}
            for p, ref in zip(prompts, refs, strict=True):
                ar = generate_ar(ar_target, p, args.max_new_tokens, eos=eos)
                drafter = PDMCostOracle(PdmTreeDrafter(pdm), p, ref)
                spd = generate_spd(target, drafter, p, args.max_new_tokens, eos=eos)
                assert spd.tokens == ar.tokens, "SPD must equal AR"
                ar_step.append(ar.metrics.decode_s / ar.metrics.cycles)
                spd_cycle.append(spd.metrics.decode_s / spd.metrics.cycles)
                for k, v in spd.metrics.phase_s.items():
                    phases.setdefault(k, []).append(v / spd.metrics.cycles)
            ar_ms, spd_ms = statistics.median(ar_step) * 1e3, statistics.median(spd_cycle) * 1e3
            parts = ", ".join(f"{k} {statistics.median(v) * 1e3:.2f}" for k, v in phases.items())
            print(f"n={n} draft vocab {vd or 'full':>6}: AR step {ar_ms:6.2f} ms | SPD cycle {spd_ms:6.2f} ms "
                  f"| ratio {spd_ms / ar_ms:.3f} | SPD phases (ms/cycle): {parts}")


if __name__ == "__main__":
    main()
