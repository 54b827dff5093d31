"""One builder for every in-process decoding method: from a method's options to a generate function.

`spdecode generate` and `spdecode bench` both build their methods here, so a method runs the
same way in both. A method spec names the method and, after colons, options that override the
shared ones for that method alone (`eagle:budget=16:depth=5`, `ar:threads=1`, `ar:dtype=bfloat16`):
bench runs each method at its own best settings in one invocation.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, fields, replace

import torch

from .runtime.errors import SpdError
from .runtime.generation import Generation

METHODS = ("ar", "sd", "eagle", "pipespec", "speed", "spd")

# eagle's and spd's trees when none is given: chosen by the sweeps recorded in src/spdecode/drafts/README.md.
EAGLE_TREE = {"tree_budget": 8, "tree_depth": 3, "tree_topk": 4}
SPD_TREE = {"tree_budget": 8, "tree_depth": 2, "tree_topk": 4}


@dataclass(frozen=True)
class MethodOptions:
    """How a method runs (the `generate`/`bench` options of the same names). The tree options
    left at None take the method's default: sd a chain (no tree), eagle EAGLE_TREE."""

    stages: int | list[int] = 1
    draft: str | None = None  # spd's PDM or eagle's head (default: the bundled one)
    drafter: str = "early-exit:8"  # sd's candidates (drafting.build.make_candidates)
    gamma: int = 4
    adaptive_gamma: bool = False
    tree_budget: int | None = None
    tree_depth: int | None = None
    tree_topk: int | None = None
    chain: str = "early-exit:8"  # pipespec's models before the target
    speed_depth: int | None = None
    dtype: str = "float32"
    device: str = "cpu"
    threads: int | None = None  # torch threads while this method runs (None: as the process has them)
    # --method auto's online guard (methods/guard.py): the tokens per cycle below which a drafting
    # method hands the request to AR (None: no guard).
    guard: float | None = None

    def tree(self, method: str) -> tuple[int, int, int]:
        """(budget, depth, top-k) of the method's draft tree: eagle's and spd's tuned defaults,
        sd's chain (budget 0), SPEED's single node."""
        base = {"eagle": EAGLE_TREE, "spd": SPD_TREE}.get(method, {"tree_budget": 0, "tree_depth": 4, "tree_topk": 4})
        if method == "speed":
            base = {"tree_budget": 1, "tree_depth": 1, "tree_topk": 1}
        out = tuple(base[k] if getattr(self, k) is None else getattr(self, k) for k in base)
        if method in PIPELINED and out[0] == 1:  # one node per slot: SPD as published
            return 1, 1, 1
        return out


# Short names for per-method options in a method spec.
ALIASES = {"budget": "tree_budget", "depth": "tree_depth", "topk": "tree_topk", "adaptive": "adaptive_gamma",
           "backend": "dtype"}


DRAFTED = ("spd", "eagle")  # the methods that take a trained draft (--draft)
PIPELINED = ("spd", "speed")  # the methods that run a pipeline of --stages


def base_method(spec: str) -> str:
    """The method a spec runs: "eagle:budget=16" -> "eagle"."""
    return spec.strip().split(":")[0]


def check_draft(method: str, draft: str | None) -> None:
    """A trained draft is for spd (a PDM) or eagle (a head); refuse it for any other method
    (callers check before loading a model, so the error comes at once)."""
    if draft and method not in DRAFTED:
        raise SpdError(f"--draft is a trained draft for spd (a PDM) or eagle (a head); --method {method} takes "
                       "none (drop --draft)")


def split_specs(text: str) -> list[str]:
    """Method specs from a comma-separated list; a comma inside a spec's value (pipespec's
    chain=a,b) stays with it: a piece that does not start with a method name continues a spec
    whose last option has a value."""
    specs: list[str] = []
    for piece in text.split(","):
        if specs and "=" in specs[-1] and base_method(piece) not in (*METHODS, "auto"):
            specs[-1] += "," + piece
        elif piece.strip():
            specs.append(piece.strip())
    return specs


def parse_method_spec(spec: str, base: MethodOptions) -> tuple[str, MethodOptions]:
    """"eagle:budget=16:depth=5" -> ("eagle", base with those two options). A value may hold a
    colon (sd:drafter=early-exit:8): a piece without "=" continues the previous value. A shared
    --draft applies to the methods that take one only."""
    name, *pieces = spec.strip().split(":")
    if name not in METHODS:
        raise SpdError(f"unknown method {name}; choose from {', '.join(METHODS)}")
    pairs: list[str] = []
    for piece in pieces:
        if pairs and "=" not in piece:
            pairs[-1] += ":" + piece
        else:
            pairs.append(piece)
    types = {f.name: f.type for f in fields(MethodOptions)}
    changes = {} if name in DRAFTED else {"draft": None}
    if name not in PIPELINED:  # a shared --stages is the pipeline's; ar and the others run one stage
        changes["stages"] = 1
    for pair in pairs:
        key, eq, value = pair.partition("=")
        key = ALIASES.get(key, key).replace("-", "_")
        if not eq or key not in types:
            raise SpdError(f"method option {pair!r} in {spec!r}: expected KEY=VALUE with KEY one of "
                           f"{', '.join(sorted(set(types) | set(ALIASES)))}")
        changes[key] = _convert(key, value, types[key], spec)
    if "dtype" in changes:
        from .runtime.backends import measured

        changes["dtype"] = measured(changes["dtype"], f"method spec {spec!r}")
    if changes.get("threads") is not None and changes["threads"] < 1:
        raise SpdError(f"threads must be at least 1 in {spec!r}")
    if "guard" in changes:
        if name not in ("sd", "eagle", "spd", "speed"):
            raise SpdError(f"guard= hands a drafting method's request to AR: {name} takes none ({spec!r})")
        if not 0.0 < changes["guard"] < float("inf"):
            raise SpdError(f"guard= is the tokens per cycle of break-even, a positive number ({spec!r})")
    return name, replace(base, **changes)


def _convert(key: str, value: str, kind: str, spec: str):
    try:
        if key == "stages":
            return [int(x) for x in value.split(",")] if "," in value else int(value)
        if "bool" in kind:
            return value.lower() in ("1", "true", "yes")
        if "float" in kind:
            return float(value)
        if "int" in kind:
            return int(value)
    except ValueError as exc:
        raise SpdError(f"method option {key}={value!r} in {spec!r} is not a number") from exc
    return value


def split_for(method: str, model, model_name: str, opts: MethodOptions) -> list[int]:
    """The target's stage sizes: SPD's and SPEED's pipeline split (`distributed.split`), AR's
    --stages split evenly (the same tokens, staged); sd and eagle verify in one pass through every
    layer, but a --stages no model could have is refused for them too."""
    from .distributed.split import method_split
    from .runtime.staged import split_layers

    sizes = method_split(method, model, model_name, opts.stages, opts.draft, tree=opts.tree(method)[0] > 1)
    return sizes if method in (*PIPELINED, "ar") else split_layers(model.config.num_hidden_layers, 1)


def positions_in_flight(method: str, opts: MethodOptions, n_stages: int) -> int:
    """Positions past a request's last token that `method` writes while it decodes (its drafts in
    flight), which the model's context must hold too: what a server admits is the context less this."""
    from .methods.pipespec import lookahead as chain_lookahead
    from .methods.spd import lookahead_rows
    from .methods.spd_core import TreeShape

    if method == "ar":
        return 0
    if method == "pipespec":
        return chain_lookahead(len(opts.chain.split(",")) + 1, opts.gamma)
    budget, depth, topk = opts.tree(method)
    if budget == 0:
        return opts.gamma  # sd's chain of gamma drafts per pass
    return lookahead_rows(n_stages if method in PIPELINED else 1, TreeShape(budget, depth, topk))


def with_threads(run: Callable[..., Generation], threads: int | None) -> Callable[..., Generation]:
    """`run` with torch's intra-op threads set to `threads` while it runs (restored afterwards)."""
    if not threads:
        return run

    def wrapped(*args, **kwargs):
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return run(*args, **kwargs)
        finally:
            torch.set_num_threads(before)

    return wrapped


def make_generator(method: str, model, model_name: str, opts: MethodOptions,
                   stack: contextlib.ExitStack | None = None) -> tuple[Callable[..., Generation], list]:
    """(generate(prompt_ids, max_new_tokens, sampling, eos, on_token=None, halt=None) -> Generation, stages):
    `method` with `opts` on `model` (loaded in opts.dtype on opts.device). `stages`: the layer split,
    or pipespec's chain of models. Processes a method starts (PipeSpec's chain) close with `stack`."""
    from .drafting.build import make_candidates, make_eagle_drafter, make_pipeline_drafter
    from .methods.ar import generate_ar
    from .methods.sd import sd_generator
    from .methods.spd import generate_spd
    from .methods.spd_core import TreeShape
    from .runtime.models import weights_fingerprint
    from .runtime.staged import StagedTarget

    check_draft(method, opts.draft)
    if method == "pipespec":
        from .methods.pipespec import PipeSpecChain

        if stack is None:
            raise ValueError("pipespec starts processes: pass an ExitStack to close them")
        models = opts.chain.split(",")
        chain = stack.enter_context(PipeSpecChain(model_name, models, opts.gamma, opts.dtype, opts.threads or 1,
                                                  device=opts.device))
        return chain.generate, models + ["target"]
    target = StagedTarget(model, split_for(method, model, model_name, opts))
    ar = lambda ids, k, s, e, on_token=None, halt=None: generate_ar(target, ids, k, s, e, on_token, halt)  # noqa: E731
    if method == "ar":
        run = ar
    elif method in PIPELINED:
        shape = TreeShape(*opts.tree(method))
        drafter = make_pipeline_drafter(method, target, model_name, weights_fingerprint(model), opts.draft,
                                        opts.speed_depth, shape.tree)
        run = lambda ids, k, s, e, on_token=None, halt=None: generate_spd(  # noqa: E731
            target, drafter, ids, k, s, e, on_token, shape=shape, halt=halt)
    elif method in ("sd", "eagle"):
        drafter = (make_eagle_drafter(target, model_name, weights_fingerprint(model), opts.draft) if method == "eagle"
                   else make_candidates(opts.drafter, model, opts.dtype, opts.device))
        budget, depth, topk = opts.tree(method)
        run = sd_generator(target, drafter, opts.gamma, opts.adaptive_gamma, budget, depth, topk,
                           "eagle" if method == "eagle" else "sd-tree")
    else:
        raise SpdError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    if opts.guard is not None and method != "ar":
        from .methods.guard import guarded

        run = guarded(run, ar, opts.guard)  # AR on the same target finishes what the guard stops
    return with_threads(run, opts.threads), target.stage_sizes
