"""Entry point of one pipeline rank, started by torchrun (or by `spdecode ... --distributed`).

    torchrun --nproc-per-node 2 -m spdecode.distributed.worker --stages 16,14 --prompt "def fib(n):"

Every rank loads only its own layers (rank 0 also the embedding, the final norm and the PDM; the
last rank the norm and the head). Rank 0 runs the requests: one --prompt, or every line of
--requests (JSON lists of prompt token ids) for `spdecode bench --distributed`, and writes results
to --json-out. A rank that fails prints `error: rank R: ...` (an unexpected exception also its
type and traceback) and exits at once, non-zero; torchrun then stops the others.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
import warnings
from datetime import timedelta

import torch
import torch.distributed as dist

from ..runtime.errors import SpdError
from .launch import TRACE_PREFIX


def parse(argv=None):
    ap = argparse.ArgumentParser(prog="spdecode.distributed.worker")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--stages", required=True, help="comma-separated stage sizes, one per rank")
    ap.add_argument("--draft", default=None)
    ap.add_argument("--method", default="spd", choices=["spd", "speed"])
    ap.add_argument("--speed-depth", type=int, default=None, help="SPEED's early-exit depth (default: stage 0's end)")
    ap.add_argument("--prompt", default=None)
    ap.add_argument("--chat", action="store_true")
    ap.add_argument("--requests", default=None, help="file of JSON token-id lists, one request per line")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--json", action="store_true", help="print one JSON result instead of streaming text")
    ap.add_argument("--json-out", default=None)
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds a rank waits for a peer (default 120)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads per rank (default: its share of the usable cores)")
    ap.add_argument("--tree-budget", type=int, default=1,
                    help="draft-tree nodes per slot (default 1: one token; `spdecode` passes spd's tuned tree)")
    ap.add_argument("--tree-depth", type=int, default=1)
    ap.add_argument("--tree-topk", type=int, default=1)
    ap.add_argument("--fingerprint", default=None, help="serve: the responses' system_fingerprint")
    ap.add_argument("--serve", default=None, metavar="HOST:PORT",
                    help="rank 0 serves OpenAI's API here (spdecode serve) instead of running --prompt/--requests")
    ap.add_argument("--max-queue", type=int, default=32)
    ap.add_argument("--trace", default=None, help="rank 0 writes every rank's timeline here (Chrome trace JSON)")
    return ap.parse_args(argv)


def run(args) -> int:
    from ..methods.spd_core import TreeShape
    from ..runtime.machine import threads_per_rank
    from ..runtime.models import files_fingerprint, load_partial_model, resolve_model
    from ..runtime.sampling import SamplingParams
    from ..runtime.staged import StagedTarget
    from .comm import Link
    from .root import RootRank
    from .stage import serve_stage

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    shape = TreeShape(args.tree_budget, args.tree_depth, args.tree_topk)  # a bad shape fails before any rank waits
    sizes = [int(x) for x in args.stages.split(",")]
    if len(sizes) != world:
        raise SpdError(f"{len(sizes)} stages given but {world} processes started: one process per stage")
    if world < 2:
        raise SpdError("distributed SPD needs at least 2 stages (use the single-process decoder for 1)")
    cuda = args.device.startswith("cuda")
    device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(device)
    torch.set_num_threads(args.threads or threads_per_rank(world))
    if args.trace:
        from ..runtime import trace

        trace.start(rank, f"rank {rank}")
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=args.timeout))
    lo = sum(sizes[:rank])
    model, _ = load_partial_model(args.model, range(lo, lo + sizes[rank]), embed=rank == 0,
                                  head=rank == world - 1, dtype=args.dtype, device=device)
    target = StagedTarget(model, sizes)
    link = Link(rank, world, device, target.dtype)
    if rank > 0:
        serve_stage(target, link, rank)
        return 0

    from transformers import AutoTokenizer

    from ..drafting.build import make_pipeline_drafter
    from ..runtime.generation import eos_ids

    source = resolve_model(args.model)
    try:
        tok = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError):  # a bare model directory: fine for --requests (token ids in, ids out)
        if not args.requests:
            raise SpdError(f"{source} has no tokenizer; use --requests with token ids") from None
        tok = None
    fingerprint = files_fingerprint(source) if args.method == "spd" else ""
    drafter = make_pipeline_drafter(args.method, target, args.model, fingerprint, args.draft, args.speed_depth,
                                    shape.tree)
    root = RootRank(target, drafter, link)
    sampling = SamplingParams(args.temperature, args.top_k, args.top_p, args.seed)
    eos = eos_ids(model, tok)
    if args.serve:
        return serve_pipeline(args, root, target, tok, eos, shape, sizes)
    done = False
    try:
        if args.requests:
            with open(args.requests) as f:
                requests = [json.loads(line) for line in f if line.strip()]
            root.generate(requests[0], 4, sampling, eos, shape=shape)  # warm-up
            records = []
            for ids in requests:
                gen = root.generate(ids, args.max_new_tokens, sampling, eos, shape=shape)
                records.append({"tokens": gen.tokens, "metrics": gen.metrics.as_dict(), "rank_stats": root.rank_stats})
            with open(args.json_out, "w") as f:
                json.dump(records, f)
        else:
            from ..runtime.prompts import encode_prompt

            ids = encode_prompt(tok, args.prompt or "", args.chat)
            streamer = None
            if not args.json:
                from transformers import TextStreamer

                streamer = TextStreamer(tok, skip_special_tokens=True)
            on_token = (lambda t: streamer.put(torch.tensor([t]))) if streamer else None
            gen = root.generate(ids, args.max_new_tokens, sampling, eos, on_token, shape=shape)
            result = {"model": args.model, "method": args.method, "distributed": True, "stages": sizes,
                      "backend": args.dtype, "threads_per_rank": torch.get_num_threads(),
                      "prompt_tokens": len(ids), "tokens": gen.tokens,
                      "text": tok.decode(gen.tokens, skip_special_tokens=True), "metrics": gen.metrics.as_dict(),
                      "rank_stats": {f"rank{s + 1}": rank_stats_dict(st) for s, st in enumerate(root.rank_stats)}}
            if streamer:
                streamer.end()
                # One line: the launcher passes on the ranks' summary lines only.
                print(f"{gen.metrics.summary()}; backend {args.dtype}, {world} processes of "
                      f"{torch.get_num_threads()} thread(s)", file=sys.stderr)
            else:
                print(json.dumps(result))
            if args.json_out:
                with open(args.json_out, "w") as f:
                    json.dump(result, f)
        if args.trace:
            from ..runtime import trace

            trace.write(args.trace)
        done = True
    finally:
        if done:  # a graceful SHUTDOWN only after success: after a failure a peer may be dead (see main)
            root.shutdown()
    return 0


def serve_pipeline(args, root, target, tok, eos, shape, sizes) -> int:
    """Rank 0 of `spdecode serve --distributed`: the same ranks decode every request; the engine
    thread drives them (every message from one thread), a heartbeat keeps them up between requests."""
    from ..runtime.errors import require_extra

    require_extra("serve", "spdecode serve --distributed")
    from ..methods.spd import lookahead_rows
    from ..serve.engine import Decoder
    from ..serve.run import EXIT_PIPELINE_FAILED, serve

    if tok is None:
        raise SpdError("serving needs the model's tokenizer")
    host, _, port = args.serve.rpartition(":")
    root.generate(list(tok("Hello").input_ids), 4, eos=eos, shape=shape)  # warm-up, off the first request

    def generate(ids, k, s, e, on_token=None, halt=None):
        return root.generate(ids, k, s, e, on_token, shape=shape, halt=halt)

    what = (f"{args.method} over {len(sizes)} processes, stages {sizes}, "
            f"tree {shape.budget}/{shape.depth}/{shape.topk}, {args.dtype}")
    # The heartbeat is due heartbeat_s after rank 0's last message, whatever the requests do.
    decoder = Decoder(generate, lookahead_rows(len(sizes), shape), fatal=lambda exc: root.in_request,
                      heartbeat=root.heartbeat, heartbeat_s=max(1.0, args.timeout / 4),
                      last_contact=lambda: root.link.last_send, on_close=root.shutdown)
    code = serve(decoder, tok, eos, args.model, target.context_length, host, int(port), args.max_queue,
                 description=what,
                 fingerprint=args.fingerprint or f"spdecode-{args.method}-{args.dtype}-{len(sizes)}proc")
    if code == EXIT_PIPELINE_FAILED:
        raise SpdError("the server stopped: a pipeline rank failed")
    return code


def rank_stats_dict(stats: list[float]) -> dict:
    """A stage rank's END report by name: seconds per phase (`X_s`), slots run and their rows."""
    from .stage import STAGE_STATS

    return {(k if k in ("slots", "rows") else f"{k}_s"): v for k, v in zip(STAGE_STATS, stats, strict=True)}


def report_failure(rank, exc: Exception) -> None:
    """`error: rank R: ...` on stderr; for anything but an SpdError also its type and traceback, each
    line prefixed so that the launcher passes it on (one write per line: ranks share the stream)."""
    if isinstance(exc, SpdError):
        lines = [f"error: rank {rank}: {exc}"]
    else:
        first = (str(exc).splitlines() or [""])[0][:500]
        lines = [f"error: rank {rank}: unexpected {type(exc).__name__}: {first}"]
        lines += [TRACE_PREFIX.format(rank=rank) + line
                  for line in "".join(traceback.format_exception(exc)).splitlines()]
    sys.stdout.flush()
    for line in lines:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()


def main(argv=None) -> int:
    args = parse(argv)
    rank = os.environ.get("RANK", "?")
    warnings.showwarning = lambda message, *a, **k: print(f"warning: rank {rank}: {message}", file=sys.stderr)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        code = run(args)
    except KeyboardInterrupt:  # Ctrl-C reaches every rank; the launcher reports it once
        os._exit(130)
    except Exception as exc:
        report_failure(rank, exc)
        # Exit at once: flushing sends or tearing the process group down could wait on a dead peer
        # for the whole --timeout (and then report that instead); torchrun stops the other ranks.
        os._exit(2)
    if dist.is_initialized():
        dist.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main())
