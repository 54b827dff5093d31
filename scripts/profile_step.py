"""Where one decode step's time goes: matrix work against everything else, per decoder layer.

For the target's layers, its head (final norm + LM head), and the bundled drafts' passes (SPD's
PDM, eagle's head), at 1 and 9 rows after a 128-token context, on each backend asked for:

    wall        median seconds of the part, unprofiled, divided by its decoder layers
    matrix      the same Linears (MKL/oneDNN GEMMs, FBGEMM's fp16 GEMM, aten's int4/int8
                weight-only kernels) on the same inputs, called back to back, unprofiled
    non-matrix  wall - matrix: attention, norms, rotary, cache writes, masks, HF's layer plumbing
                and Python; split in the proportions torch.profiler gives them: attention, the
                other ops' self time, and the rest (in no aten op: Python and dispatch)

    .venv/bin/python scripts/profile_step.py --backend fp16w int4w --threads 2 --json out.json
"""

from __future__ import annotations

import argparse
import json

import torch
from torch.profiler import ProfilerActivity, profile

from spdecode.drafting.pdm import CONFIG_FILE, bundled_drafts, load_pdm
from spdecode.plan.costs import median_time
from spdecode.runtime.machine import describe_cpu
from spdecode.runtime.models import load_model, weights_fingerprint
from spdecode.runtime.staged import StagedTarget

MATRIX = ("linear_dynamic_fp16", "aten::mm", "aten::addmm", "aten::bmm", "_weight_int4pack_mm", "_weight_int8pack_mm")
ATTENTION = ("scaled_dot_product", "_flash_attention", "aten::softmax", "aten::_softmax")


def kind(name: str) -> str:
    if any(k in name for k in MATRIX):
        return "matrix"
    if any(k in name for k in ATTENTION):
        return "attention"
    return "ops"


def linear_calls(fn, modules) -> list:
    """(Linear, its input) for every Linear call `fn` makes, in order."""
    calls = []
    hooks = [m.register_forward_hook(lambda m, args, out: calls.append((m, args[0].clone())))
             for mod in modules for m in mod.modules() if isinstance(m, torch.nn.Linear)]
    try:
        fn()
    finally:
        for h in hooks:
            h.remove()
    return calls


def breakdown(fn, reps: int, layers: int, modules) -> dict:
    """ms per layer: wall, matrix, non-matrix and its parts, and the non-matrix ops taking most."""
    w = median_time(fn, reps)
    calls = linear_calls(fn, modules)
    matrix = median_time(lambda: [m(x) for m, x in calls], reps)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(reps):
            fn()
    by_kind = {"matrix": 0.0, "attention": 0.0, "ops": 0.0}
    top = {}
    for ev in prof.key_averages():
        k = kind(ev.key)
        by_kind[k] += ev.self_cpu_time_total
        if k != "matrix":
            top[ev.key] = ev.self_cpu_time_total / reps / layers
    per, matrix_ms = 1e3 * w / layers, 1e3 * matrix / layers
    rest = max(per - matrix_ms, 0.0)
    # The non-matrix ops' profiled self time (capped by what the wall leaves: the profiler adds a
    # little to every op), split between attention and the rest in the profiler's proportion; the
    # time in no op at all (Python, dispatch) is what remains.
    profiled = by_kind["attention"] + by_kind["ops"]
    op_ms = min(rest, profiled / reps / layers / 1e3)
    attention = op_ms * by_kind["attention"] / max(profiled, 1e-9)
    ops = op_ms - attention
    return {"wall_ms": per, "matrix_ms": matrix_ms, "non_matrix_ms": rest, "attention_ms": attention,
            "other_ops_ms": ops, "python_dispatch_ms": rest - op_ms,
            "top_non_matrix_us": dict(sorted(top.items(), key=lambda kv: -kv[1])[:8])}


@torch.inference_mode()
def profile_backend(model_name: str, backend: str, rows_list, context: int, reps: int, hf_layers: bool) -> dict:
    model, _ = load_model(model_name, backend, tokenizer=False)
    target = StagedTarget(model)
    if hf_layers:  # the layers as HF runs them (before runtime/compact_layer.py)
        target.step_layers = list(target.layers)
    L, H = target.n_layers, target.config.hidden_size
    target.reserve(context + max(rows_list) + 1)
    ids = torch.randint(0, target.config.vocab_size, (1, context))
    target.run_layers(0, L, target.embed(ids), 0)
    out = {}
    for rows in rows_list:
        x = torch.randn(1, rows, H, dtype=target.dtype)

        def layers(x=x):
            target.rollback(context)
            target.run_layers(0, L, x, context)

        parts = {"target layers": breakdown(layers, reps, L, [model]),
                 "target head": breakdown(lambda x=x: target.logits(x), reps, 1, [model])}
        for d in bundled_drafts(model_name):
            if d.name.endswith(("-eagle", "-n2-tree")):
                split = StagedTarget(model, json.loads((d / CONFIG_FILE).read_text())["stage_sizes"])
                pdm = load_pdm(d, split, weights_fingerprint(model))
                if hf_layers:
                    pdm.step_layers = list(pdm.layers)

                def draft_pass(x=x, pdm=pdm):
                    pdm.cache.reset()
                    pdm.head(pdm.run(x, 0))

                parts[f"{d.name.removeprefix(model_name + '-')} pass (layers + head)"] = \
                    breakdown(draft_pass, reps, 1, [pdm])
        out[str(rows)] = parts
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--backend", nargs="+", default=["float32", "bfloat16", "fp16w", "int4w"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", nargs="+", type=int, default=[1, 9])
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--hf-layers", action="store_true", help="run HF's decoder layers, not the compact ones")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cpu = describe_cpu()
    result = {"machine": {k: cpu[k] for k in ("cpu", "flags", "capability", "usable_cores")},
              "threads": args.threads, "context": args.context, "layers": "hf" if args.hf_layers else "compact",
              "backends": {}}
    print(f"{cpu['cpu']} ({cpu['capability']}; {' '.join(cpu['flags'])}), {args.threads} thread(s), "
          f"context {args.context}, {result['layers']} layers; ms per decoder layer (heads, draft passes: per pass)")
    print(f"{'backend':9s} {'rows':>4s} {'part':34s} {'wall':>6s} {'matrix':>6s} {'other':>6s} "
          f"{'attn':>6s} {'ops':>6s} {'python':>6s}")
    for backend in args.backend:
        got = profile_backend(args.model, backend, args.rows, args.context, args.reps, args.hf_layers)
        result["backends"][backend] = got
        for rows, parts in got.items():
            for part, b in parts.items():
                print(f"{backend:9s} {rows:>4s} {part:34s} {b['wall_ms']:6.3f} {b['matrix_ms']:6.3f} "
                      f"{b['non_matrix_ms']:6.3f} {b['attention_ms']:6.3f} {b['other_ops_ms']:6.3f} "
                      f"{b['python_dispatch_ms']:6.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
