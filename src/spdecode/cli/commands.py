"""What each `spdecode` command does with its parsed options."""

from __future__ import annotations

import json
import sys

from ..runtime.errors import SpdError
from .options import check_request, config_from, method_options, pipeline_worker_args


def check_method(args) -> None:
    """What a decoding command checks before it loads anything: the draft and the stage count."""
    from ..generators import check_draft

    check_draft(args.method, args.draft)
    if isinstance(args.stages, int) and args.stages < 1:
        raise SpdError(f"the number of stages must be at least 1 (got {args.stages})")


def load_for_method(args):
    """(model, tokenizer) of a one-process run, torch's threads set as asked (default: every usable
    core). PipeSpec's stage processes load their own models on --device; its copy here only gives
    the tokenizer and the EOS ids, so it stays on the CPU."""
    import torch

    from ..runtime.machine import usable_cores
    from ..runtime.models import load_model

    torch.set_num_threads(args.threads or usable_cores())
    return load_model(args.model, args.dtype, "cpu" if args.method == "pipespec" else args.device)


def cmd_generate(args) -> int:
    import contextlib

    import torch
    from transformers import TextStreamer

    from ..generators import make_generator
    from ..runtime.generation import eos_ids
    from ..runtime.prompts import encode_prompt

    sampling = check_request(args)
    check_method(args)
    if args.distributed:
        return generate_distributed(args)
    model, tok = load_for_method(args)
    prompt_ids = encode_prompt(tok, args.prompt, args.chat)
    streamer = None
    if not args.json:
        streamer = TextStreamer(tok, skip_special_tokens=True)
    on_token = (lambda t: streamer.put(torch.tensor([t]))) if streamer else None
    with contextlib.ExitStack() as stack:
        run, stages = make_generator(args.method, model, args.model, method_options(args), stack)
        if args.trace:
            from ..runtime import trace

            trace.start(0, f"{args.method} (one process)")
        gen = run(prompt_ids, args.max_new_tokens, sampling, eos_ids(model, tok), on_token=on_token)
        if args.trace:
            trace.write(args.trace)
    if streamer:
        streamer.end()
        print(f"{gen.metrics.summary()}; backend {args.dtype}, {torch.get_num_threads()} thread(s)", file=sys.stderr)
    else:
        print(json.dumps({
            "model": args.model, "method": args.method, "stages": stages, "backend": args.dtype,
            "threads": torch.get_num_threads(),
            "prompt_tokens": len(prompt_ids), "tokens": gen.tokens,
            "text": tok.decode(gen.tokens, skip_special_tokens=True),
            "metrics": gen.metrics.as_dict(), "auto": getattr(args, "auto", None),
        }))
    return 0


def generate_distributed(args) -> int:
    from ..distributed.launch import run_distributed

    ranks, worker = pipeline_worker_args(args)
    worker += ["--prompt", args.prompt]
    worker += ["--chat"] if args.chat else []
    worker += ["--json"] if args.json else []
    worker += ["--trace", args.trace] if args.trace else []
    return run_distributed(ranks, worker, args.master_port, args.rdzv_endpoint)


def cmd_serve(args) -> int:
    """`spdecode serve`: one process, or rank 0 of the pipeline (distributed/worker.py) serving."""
    import contextlib
    from dataclasses import replace

    from ..generators import make_generator, positions_in_flight
    from ..runtime.errors import require_extra
    from ..runtime.generation import eos_ids
    from ..runtime.sampling import GREEDY
    from ..runtime.staged import context_length

    require_extra("serve", "spdecode serve")
    from ..methods.pipespec import CHAIN_WATCH_S, PipeSpecChain
    from ..serve.engine import Decoder
    from ..serve.run import serve

    check_method(args)
    if args.max_queue < 1:
        raise SpdError(f"--max-queue must be at least 1 (got {args.max_queue})")
    if not 0 <= args.port < 65536:
        raise SpdError(f"--port must be in 0..65535 (got {args.port})")
    if args.distributed:
        return serve_distributed(args)
    model, tok = load_for_method(args)
    eos = eos_ids(model, tok)
    with contextlib.ExitStack() as stack:
        opts = method_options(args)
        run, stages = make_generator(args.method, model, args.model, opts, stack)
        run(list(tok("Hello").input_ids), 4, GREEDY, eos)  # warm-up, off the first request
        what = f"{args.method}, stages {stages}, {args.dtype}, one process"
        decoder = Decoder(run, positions_in_flight(args.method, opts, len(stages)))
        chain = getattr(run, "__self__", None)  # PipeSpec's chain: its stage processes need watching
        if isinstance(chain, PipeSpecChain):
            decoder = replace(decoder, recover=chain.restart, problem=chain.problem, heartbeat=chain.watch,
                              heartbeat_s=CHAIN_WATCH_S)
        return serve(decoder, tok, eos, args.model, context_length(model.config), args.host, args.port,
                     args.max_queue, description=what, fingerprint=system_fingerprint(args))


def system_fingerprint(args) -> str:
    """What the OpenAI responses' system_fingerprint says: the configuration that serves them
    (with --method auto, what auto chose)."""
    threads = f"-{args.threads}t" if args.threads else ""
    tree = f"-tree{args.tree_budget}" if getattr(args, "tree_budget", None) else ""
    how = "auto-" if getattr(args, "auto", None) else ""
    dist = f"-{args.stages}proc" if args.distributed else ""
    return f"spdecode-{how}{args.method}-{args.dtype}{threads}{tree}{dist}"


def serve_distributed(args) -> int:
    from ..distributed.launch import run_distributed

    ranks, worker = pipeline_worker_args(args)
    worker += ["--serve", f"{args.host}:{args.port}", "--max-queue", str(args.max_queue),
               "--fingerprint", system_fingerprint(args)]
    return run_distributed(ranks, worker, args.master_port, args.rdzv_endpoint)


def cmd_train(args) -> int:
    from ..training.commands import TrainConfig, run_train

    return run_train(config_from(TrainConfig, args))


def cmd_regenerate(args) -> int:
    from ..training.commands import run_regenerate

    return run_regenerate(args.out, args.model, args.data, args.limit, args.max_new_tokens, args.batch_size,
                          args.time_limit, args.dtype, args.device, args.threads, args.temperature, args.top_p,
                          args.seed)


def cmd_data_synth(args) -> int:
    from ..training.commands import run_synth

    return run_synth(args.out, args.model, args.count, args.topics, args.temperature, args.top_p,
                     args.answer_temperature, args.max_new_tokens, args.batch_size, args.seed, args.time_limit,
                     args.dtype, args.device, args.threads, args.prompt_tokens)


def cmd_data_clean(args) -> int:
    from ..runtime.errors import require_extra
    from ..training.commands import run_clean

    require_extra("data", "spdecode data clean")
    return run_clean(args.data, args.out, args.eval, args.threshold, args.ngram)


def cmd_bench(args) -> int:
    from ..bench.run import BenchConfig, run_bench

    resolve_auto_spec(args)
    return run_bench(config_from(BenchConfig, args))


def resolve_auto_spec(args) -> None:
    """bench's `auto` (or `auto:backend=X`) in --method: the configuration --method auto chooses
    here, as a method spec with its online guard (a pipeline choice runs with --distributed)."""
    from ..auto.candidates import Candidate
    from ..auto.choose import choose
    from ..generators import split_specs

    specs = split_specs(args.method)
    autos = [s for s in specs if s.split(":")[0] == "auto"]
    if not autos:
        return
    if len(autos) > 1:
        raise SpdError("--method lists auto twice")
    from ..runtime.backends import measured

    _, *opts = autos[0].split(":")
    backend = None
    for o in opts:
        key, _, value = o.partition("=")
        if key not in ("backend", "dtype"):
            raise SpdError(f"auto takes only backend=...: {autos[0]!r}")
        backend = measured(value, f"method spec {autos[0]!r}")
    verdict = choose(args.model, args.device, backend)
    c = Candidate.from_dict(verdict["choice"])
    spec = verdict["spec"] + (f":guard={verdict['guard']:.4f}" if verdict["guard"] else "")
    if c.distributed:
        args.distributed = True
    if spec in specs:  # auto chose a configuration listed beside it: run it once
        specs.remove(autos[0])
    else:
        specs[specs.index(autos[0])] = spec
    print(f"auto -> {spec}", file=sys.stderr, flush=True)
    args.method = ",".join(specs)


def cmd_eval(args) -> int:
    from ..bench.replay import EvalConfig, run_eval

    return run_eval(config_from(EvalConfig, args))


def cmd_vocab(args) -> int:
    from ..training.commands import run_vocab

    return run_vocab(args.out, args.model, args.data, args.limit, args.max_len, args.size)


def cmd_plan(args) -> int:
    if args.measure and (args.validate or args.replay):
        raise SpdError("--validate times its own cost file between its runs (or checks --costs): drop --measure")
    if args.out and (args.replay or (args.validate and args.costs)):
        raise SpdError("--out writes the cost file --validate times between its runs; with --costs or --replay it "
                       "times none")
    if args.reps < 1 and (args.measure or (args.validate and not args.replay)):  # both time a cost file
        raise SpdError(f"--reps must be at least 1 (got {args.reps})")
    if args.validate or args.replay:
        return validate_plan(args)
    if not args.measure:
        from ..plan.planner import load_costs, load_measured, load_walks, plan, plot_plan, print_plan

        data, source = load_costs(args.costs, args.model, args.dtype)
        walks = load_walks(args.traces) if args.traces else None
        measured = load_measured(args.measured) if args.measured else []
        rows = plan(data, args.devices, args.alpha, args.link, walks=walks, traces=args.traces or "",
                    timeline=args.trace)
        print_plan(rows, source, args.link, measured)
        if args.json_out:
            with open(args.json_out, "w") as f:
                json.dump({"costs": source, "link": args.link, "rows": rows, "measured": measured}, f, indent=1)
        if args.plot:
            plot_plan(rows, args.plot, measured)
        return 0
    return measure_costs(args)


def measure_costs(args) -> int:
    """plan --measure: one cost file per backend of --backends (default --backend)."""
    from pathlib import Path

    from ..plan.measure import measure
    from ..runtime.backends import measured
    from ..runtime.machine import thread_sweep
    from ..runtime.models import model_backends

    if not args.out:
        raise SpdError("--measure needs --out FILE.json")
    try:
        threads = tuple(int(x) for x in args.threads.split(",")) if args.threads else tuple(thread_sweep())
    except ValueError:
        raise SpdError(f"--threads: expected comma-separated integers, got {args.threads!r}") from None
    if not args.backends:
        backends = [args.dtype]
    elif args.backends == "all":
        backends = model_backends(args.model, args.device)
    else:
        backends = [measured(b.strip(), "plan --measure") for b in args.backends.split(",") if b.strip()]
    for backend in backends:
        out = Path(args.out)
        if "{backend}" in args.out:
            out = Path(args.out.replace("{backend}", backend))
        elif len(backends) > 1:
            out = out.with_name(f"{out.stem}-{backend}{out.suffix}")
        costs = measure(args.model, backend, args.device, threads, reps=args.reps,
                        log=lambda m, b=backend: print(f"{b}: {m}", file=sys.stderr))
        with open(out, "w") as f:
            json.dump(costs, f, indent=1)
        print(out)
    return 0


def validate_plan(args) -> int:
    from ..plan.validate import IN_PROCESS, ONE_PROCESS_PER_STAGE, ValidateConfig, repredict, validate
    from ..plan.validation_report import print_validation

    if args.replay:
        print_validation(repredict(args.replay, args.costs, args.json_out))
        return 0

    cfg = ValidateConfig(model=args.model, dtype=args.dtype, device=args.device, costs=args.costs,
                         costs_out=args.out, reps=args.reps,
                         methods=IN_PROCESS if args.methods is None else args.methods,
                         distributed=ONE_PROCESS_PER_STAGE if args.distributed_methods is None
                         else args.distributed_methods, stages=args.stages, data=args.data, limit=args.limit,
                         max_new_tokens=args.max_new_tokens, runs=args.runs, json_out=args.json_out,
                         master_port=args.master_port, timeout=args.timeout, steady_wait_s=args.steady_wait,
                         steady_budget_s=args.steady_budget)
    print_validation(validate(cfg, log=lambda m: print(m, file=sys.stderr, flush=True)))
    return 0


def cmd_plot_trace(args) -> int:
    from ..bench.timeline import plot_trace

    print(plot_trace(args.trace, args.out, args.cycles))
    return 0


def cmd_prepare(args) -> int:
    from ..runtime.models import resolve_model

    print(resolve_model(args.model))
    return 0


def cmd_tune(args) -> int:
    """`spdecode tune`: measure the machine profile now (replacing any), and optionally decide."""
    from ..auto.choose import choose, ensure_profile
    from ..auto.profile import path_of
    from ..runtime.machine import cpu_line

    print(f"tune: {args.model} on {args.device}, {cpu_line()}", file=sys.stderr)
    profile = ensure_profile(args.model, args.device, full=args.full,
                             why="spdecode tune" + (" --full" if args.full else ""))
    print(f"tune: {profile['tune_s']:.0f} s; profile {path_of(profile)}", file=sys.stderr)
    if args.choose:
        choose(args.model, args.device)
    return 0
