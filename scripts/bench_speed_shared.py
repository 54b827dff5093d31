"""Benchmark SPEED's original regime: k tokens in flight at different depths of ONE shared block,
advanced with one weight read (a batch of k rows) against k separate applications.

The block is a real decoder layer of the default model (SmolLM2-135M: hidden 576) applied
`--depth` times, as in a cyclically parameter-shared decoder. Both orders are checked to give the
same states, then timed (medians over repeats). On CPU at this size the weights stay in cache, so
the gain is bounded by per-call overhead, not memory bandwidth; on a GPU it is the weight reads.

    .venv/bin/python scripts/bench_speed_shared.py --depth 30 --tokens 64 --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from speed_shared import SharedWeightsDecoder  # scripts/, beside this script

from spdecode.runtime.models import load_model


def timed(fn, repeats: int) -> float:
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--layer", type=int, default=0, help="which layer of the model is the shared block")
    ap.add_argument("--depth", type=int, nargs="+", default=[2, 4, 8, 30])
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, _ = load_model(args.model, args.dtype, args.device, tokenizer=False)
    block, rotary = model.model.layers[args.layer], model.model.rotary_emb
    g = torch.Generator().manual_seed(0)
    dtype = block.mlp.up_proj.weight.dtype
    seq = (torch.randn(args.tokens, model.config.hidden_size, generator=g) * 0.5).to(args.device, dtype)
    print(f"{args.model} layer {args.layer} shared, {args.dtype} on {args.device}, {torch.get_num_threads()} "
          f"thread(s), {args.tokens} tokens; time per token through all applications (median of {args.repeats})")
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    print(f"{'depth':>5} {'sequential ms':>14} {'pipelined ms':>13} {'speedup':>8} {'max |diff|':>11}")
    for depth in args.depth:
        dec = SharedWeightsDecoder(block, rotary, depth, capacity=args.tokens)
        diff = float((dec.run_sequential(seq) - dec.run_pipelined(seq)).abs().max())
        seq_s = timed(lambda d=dec: (d.run_sequential(seq), sync()), args.repeats) / args.tokens
        pipe_s = timed(lambda d=dec: (d.run_pipelined(seq), sync()), args.repeats) / args.tokens
        print(f"{depth:>5} {1e3 * seq_s:>14.2f} {1e3 * pipe_s:>13.2f} {seq_s / pipe_s:>7.2f}x {diff:>11.2e}")


if __name__ == "__main__":
    main()
