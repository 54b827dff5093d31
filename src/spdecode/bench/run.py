"""`spdecode bench`: decoding methods side by side on the same prompts, in one process and one run.

Per dataset and overall it reports pooled (token-weighted) numbers: alpha = accepted / verified
drafts, tokens per cycle, tau = n * tokens per cycle, decode tok/s = (new tokens - 1) / decode
time, and, when AR runs in the same invocation, the wall-clock speedup over it. Greedy runs are
also checked token for token against AR (`mismatches` must be 0).
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from tqdm import tqdm

from ..data import load_prompt_set
from ..distributed.split import method_split, worker_args
from ..generators import (
    ALIASES,
    DRAFTED,
    PIPELINED,
    MethodOptions,
    base_method,
    make_generator,
    parse_method_spec,
    split_specs,
)
from ..plan.steady import steadily as gated
from ..runtime.errors import SpdError
from ..runtime.generation import eos_ids
from ..runtime.machine import cpu_line, describe_cpu, thread_sweep, usable_cores
from ..runtime.models import DEFAULT_MODEL, model_backends
from ..runtime.prompts import encode_prompt
from ..runtime.sampling import SamplingParams
from .divergence import divergences, print_divergences, reference_model, rowcount_noise
from .report import plot_speedups, print_table, rank_breakdown, summarise


@dataclass(frozen=True)
class BenchConfig:
    """What a bench run compares and how (the `spdecode bench` options, with their defaults)."""

    model: str = DEFAULT_MODEL
    dtype: str = "float32"
    device: str = "cpu"
    threads: int | None = None
    # Comma-separated method specs (generators.parse_method_spec): a method from generators.METHODS, each with
    # its own options after colons, e.g. "ar,eagle:budget=16,spd:stages=2".
    method: str = "ar,spd"
    ar_sweep: bool = False  # AR on every backend with 1 up to all usable cores: the best is the baseline
    data: str = "mt_bench,gsm8k,humaneval"  # comma-separated prompt sets (see data.load_prompt_set)
    limit: int | None = None  # prompts per set
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stages: int | list[int] = 4
    draft: str | None = None  # spd's PDM (default: the bundled draft)
    drafter: str = "early-exit:8"  # sd's candidates (drafting.build.make_candidates)
    gamma: int = 4
    adaptive_gamma: bool = False
    tree_budget: int | None = None  # sd and eagle: draft-tree nodes per target pass (None: the method's default)
    tree_depth: int | None = None
    tree_topk: int | None = None  # trees grown from a model's distributions: children per expanded node
    chain: str = "early-exit:8"  # pipespec's models before the target
    speed_depth: int | None = None
    plot: str | None = None
    json_out: str | None = None
    distributed: bool = False  # spd/speed with one process per stage, against AR with 1 and 2 threads
    master_port: int | None = None
    rdzv_endpoint: str | None = None
    timeout: float = 120.0

    @property
    def sampling(self) -> SamplingParams:
        return SamplingParams(self.temperature, self.top_k, self.top_p, self.seed)

    @property
    def options(self) -> MethodOptions:
        """The options every method shares unless its spec overrides them."""
        shared = {f.name: getattr(self, f.name) for f in fields(MethodOptions) if hasattr(self, f.name)}
        return MethodOptions(**{**shared, "threads": None})


def load_sets(cfg) -> dict[str, list[dict]]:
    datasets = [d.strip() for d in cfg.data.split(",") if d.strip()]
    return {Path(d).stem if d.endswith(".jsonl") else d: load_prompt_set(d, cfg.limit) for d in datasets}


def method_specs(cfg: BenchConfig) -> dict[str, tuple[str, MethodOptions]]:
    """spec -> (method, its options), AR first (the others are checked against its tokens); with
    ar_sweep, a plain `ar` becomes AR on every backend (cfg.dtype's first) with every thread count of
    `machine.thread_sweep` (1 up to all usable cores)."""
    specs = split_specs(cfg.method)
    if not specs:
        raise SpdError("no method to run: give --method, e.g. ar,eagle")
    if len(set(specs)) < len(specs):
        raise SpdError(f"--method {cfg.method} lists a method spec twice")
    if cfg.distributed and not any(base_method(s) in PIPELINED for s in specs):
        specs.append("spd")  # --distributed runs a pipeline with one process per stage: spd unless one is listed
    if cfg.ar_sweep or (cfg.distributed and "ar" in specs):
        if "ar" not in specs:
            raise SpdError("--ar-sweep replaces a plain `ar` in --method by every AR configuration: list ar")
        # --distributed: a pipeline's processes share the cores; AR may take them all.
        swept = model_backends(cfg.model, cfg.device) if cfg.ar_sweep else []
        dtypes = list(dict.fromkeys([cfg.dtype, *swept]))
        specs.remove("ar")
        specs[:0] = [f"ar:threads={t}" + ("" if d == cfg.dtype else f":dtype={d}") for d in dtypes
                     for t in thread_sweep()]
    out = {spec: parse_method_spec(spec, cfg.options) for spec in specs}
    return dict(sorted(out.items(), key=lambda kv: kv[1][0] != "ar"))


def make_runners(specs: dict[str, tuple[str, MethodOptions]], models: dict, model_name: str, stack=None):
    """spec -> callable(prompt_ids, max_new_tokens, sampling, eos) -> Generation, built by the one
    builder `generate` uses; `models`: (dtype, device) -> the model loaded so. Processes a method
    starts (PipeSpec's chain) are closed by `stack` (a contextlib.ExitStack)."""
    return {spec: make_generator(method, models[opts.dtype, opts.device], model_name, opts, stack)[0]
            for spec, (method, opts) in specs.items()}


def distributed_key(spec: str, method: str, opts: MethodOptions) -> str:
    """The JSON key of a pipeline method run with one process per stage: `spd-dist` at its defaults,
    `spd-dist-b1` for spd:budget=1 (one node per slot), `spd-dist-b16-d4` and so on."""
    options = spec.split(":")[1:]
    if not options:
        return f"{method}-dist"
    short = {"tree_budget": "b", "tree_depth": "d", "tree_topk": "k"}
    parts = []
    for o in options:
        key, _, value = o.partition("=")
        key = ALIASES.get(key, key).replace("-", "_")
        parts.append(f"{short.get(key, key)}{value}")
    return f"{method}-dist-" + "-".join(parts)


def run_distributed_spd(cfg, method: str, opts: MethodOptions, key: str, model, tok, sets,
                        trace: str | None = None) -> list[dict]:
    """A pipeline method with one process per stage (torchrun) over every prompt; records like the
    in-process ones, under `key`; `trace`: rank 0 writes every rank's timeline there."""
    import tempfile

    from ..distributed.launch import run_distributed

    sizes = method_split(method, model, cfg.model, opts.stages, opts.draft, distributed=True,
                         tree=opts.tree(method)[0] > 1)
    order = [(name, row) for name, rows in sets.items() for row in rows]
    with tempfile.TemporaryDirectory() as tmp:
        req, out = Path(tmp) / "requests.jsonl", Path(tmp) / "out.json"
        req.write_text("".join(json.dumps(encode_prompt(tok, row["turns"][0])) + "\n" for _, row in order))
        worker = worker_args(cfg.model, sizes, cfg.max_new_tokens, cfg.sampling, opts.dtype, opts.device, cfg.timeout,
                             opts.draft, method, opts.speed_depth, opts.threads, opts.tree(method))
        worker += ["--requests", str(req), "--json-out", str(out)] + (["--trace", str(trace)] if trace else [])
        print(f"{key}: {len(sizes)} processes, stages {sizes}, tree {opts.tree(method)}", flush=True)
        code = run_distributed(len(sizes), worker, cfg.master_port, cfg.rdzv_endpoint)
        if code != 0:
            raise SpdError(f"the distributed run failed (exit code {code})")
        results = json.loads(out.read_text())
    records = []
    for (name, row), res in zip(order, results, strict=True):
        rec = {"dataset": name, "question_id": row["question_id"], "stage_sizes": sizes,
               **res["metrics"], "method": key, "dtype": opts.dtype, "rank_stats": res["rank_stats"],
               "tokens": res["tokens"]}
        records.append(rec)
    return records


def run_bench(cfg) -> int:
    """Every method on the same prompts in one invocation. With `distributed`, spd and speed run
    with one process per stage (torchrun) and the other methods in this process, AR with 1 and 2
    threads at least: the fastest configuration of each is compared side by side."""
    from ..runtime.models import load_model

    specs = method_specs(cfg)
    if cfg.draft and not any(m in DRAFTED for m, _ in specs.values()):
        raise SpdError(f"--draft is a trained draft for spd or eagle, which --method {cfg.method} does not run "
                       "(add one or drop --draft)")
    if cfg.draft and set(DRAFTED) <= {m for m, _ in specs.values()}:
        raise SpdError("--draft names one draft, but spd (a PDM) and eagle (a head) both run: give each its "
                       "own with spd:draft=DIR and eagle:draft=DIR")
    piped = {spec: mo for spec, mo in specs.items() if cfg.distributed and mo[0] in PIPELINED}
    local = {spec: mo for spec, mo in specs.items() if spec not in piped}
    sets = load_sets(cfg)
    torch.set_num_threads(cfg.threads or usable_cores())  # a spec's threads= overrides it while that method runs
    models, tok = {}, None
    for _, opts in specs.values():
        if (opts.dtype, opts.device) not in models:
            models[opts.dtype, opts.device], tok = load_model(cfg.model, opts.dtype, opts.device)
    dtypes = {spec: opts.dtype for spec, (_, opts) in local.items()}
    eos = eos_ids(next(iter(models.values())), tok)
    with contextlib.ExitStack() as stack:
        runners = make_runners(local, models, cfg.model, stack)
        records = run_prompts(cfg, runners, dtypes, tok, sets, eos)
    keys = {spec: distributed_key(spec, *mo) for spec, mo in piped.items()}
    ar_tokens = {(r["dtype"], r["dataset"], r["question_id"]): r["tokens"] for r in records
                 if base_method(r["method"]) == "ar"}
    for spec, (method, opts) in piped.items():
        recs = run_distributed_spd(cfg, method, opts, keys[spec], models[opts.dtype, opts.device], tok, sets)
        for r in recs:
            ref = ar_tokens.get((opts.dtype, r["dataset"], r["question_id"]))
            if ref is not None and cfg.temperature == 0:
                r["matches_ar"] = r["tokens"] == ref
        records += recs
        dtypes[keys[spec]] = opts.dtype
    methods = [keys.get(spec, spec) for spec in specs]
    gammas = {keys.get(spec, spec): opts.gamma for spec, (_, opts) in specs.items()}
    summary = summarise(records, methods, list(sets), gammas)
    print_table(summary)
    for m in (m for m in methods if "rho_measured" in summary[m]["overall"]):
        o = summary[m]["overall"]
        print(f"{m}: share of target steps that verify: measured {o['rho_measured']:.2f}, model "
              f"{o['rho_model']:.2f}; tokens per target step: measured {o['tokens_per_cycle']:.2f}, model "
              f"{o['model_tokens_per_step']:.2f}, model with the measured share "
              f"{o['tokens_per_step_with_measured_rho']:.2f}")
    breakdowns = report_pipelines(summary, records, list(keys.values()))
    print(f"machine: {cpu_line()}")
    departed, noise = report_divergences(cfg, records, tok, sets, models) if cfg.temperature == 0 else ({}, {})
    if cfg.plot:
        plot_speedups({m: summary[m] for m in methods if m != summary[methods[0]]["overall"].get("baseline")},
                      cfg.plot)
    if cfg.json_out:
        Path(cfg.json_out).write_text(json.dumps({"config": asdict(cfg), "machine": describe_cpu(), "summary": summary,
                                                  "divergences": departed, "rowcount_noise": noise,
                                                  "rank_ms_per_cycle": breakdowns, "records": records},
                                                 indent=1, default=str))
    failed = check_identity(cfg, {m: summary[m]["overall"] for m in methods}, dtypes)
    return failed or print_divergences(departed, dtypes, noise)


def report_divergences(cfg, records: list[dict], tok, sets, models: dict) -> tuple[dict, dict]:
    """(method -> every greedy output that departs from AR of its backend, with the float32
    reference's top-2 margin where it parts; backend -> how far its logits move between one row and
    nine on the first prompt): bench.divergence. A reference model per backend, loaded when needed."""
    prompts = {(name, row["question_id"]): encode_prompt(tok, row["turns"][0]) for name, rows in sets.items()
               for row in rows}
    references = {}

    def reference(backend: str):
        if backend not in references:
            plain = models.get(("float32", "cpu")) if backend == "float32" else None
            references[backend] = plain or reference_model(cfg.model, backend)
        return references[backend]

    departed = divergences(records, prompts, reference)
    first = next(iter(prompts.values())) + list(range(100, 109))  # nine rows after a real prompt
    backends = {r["dtype"] for r in records if r["method"] in departed}
    return departed, {b: rowcount_noise(models[b, cfg.device], first) for b in backends if (b, cfg.device) in models}


def report_pipelines(summary: dict, records: list[dict], keys: list[str]) -> dict:
    """Per distributed method: ms per cycle by rank and phase, and how close tok/s comes to what its
    tokens per cycle and the busiest rank's compute allow."""
    base = summary[keys[0]]["overall"].get("baseline") if keys else None
    if not keys or base is None:
        return {}
    ar_step = 1e3 / summary[base]["overall"]["decode_tok_s"]
    out = {}
    for name in keys:
        breakdown = out[name] = rank_breakdown([r for r in records if r["method"] == name])
        print(f"{name} per-cycle time by rank (ms): " + "; ".join(
            f"{rank}: " + ", ".join(f"{k} {v:.2f}" for k, v in phases.items()) for rank, phases in breakdown.items()))
        o = summary[name]["overall"]
        r0 = breakdown["rank0"]
        busiest = max(r0.get("draft", 0) + r0.get("stage0", 0), *(p["compute"] for k, p in breakdown.items()
                                                                    if k != "rank0"))
        cycle_ms = 1e3 * sum(r["decode_s"] for r in records if r["method"] == name) / max(
            1, sum(r["cycles"] for r in records if r["method"] == name))
        ideal = o["tokens_per_cycle"] * ar_step / busiest
        o["ideal_speedup"], o["efficiency"] = ideal, o["speedup_vs_ar"] / ideal
        print(f"best AR: {base} ({ar_step:.1f} ms/token). {name}: {o['speedup_vs_ar']:.2f}x wall clock, "
              f"{o['tokens_per_cycle']:.2f} tokens per cycle of {cycle_ms:.1f} ms; the busiest rank computes "
              f"{busiest:.1f} ms per cycle, which allows {ideal:.2f}x: efficiency {o['efficiency']:.2f}")
    return out


def check_identity(cfg: BenchConfig, rows: dict[str, dict], dtypes: dict[str, str] | None = None) -> int:
    """Exit code of a greedy run: in fp32 every output must be AR's (1 otherwise). In reduced
    precision a batched verification pass rounds differently from one-row AR, so outputs may
    legitimately depart: the share identical to AR is reported instead, per method."""
    dtypes = dtypes or {}
    failed = 0
    for m, r in rows.items():
        dtype, bad, checked = dtypes.get(m, cfg.dtype), r["mismatches"], r["checked_against_ar"]
        if cfg.temperature != 0 or base_method(m) == "ar":
            continue
        if not checked:
            print(f"{m}: not checked against AR (no AR in {dtype} ran)", flush=True)
            continue
        if dtype == "float32" and bad:
            print(f"error: {bad} greedy outputs of {m} differ from AR", flush=True)
            failed = 1
        elif dtype != "float32":
            print(f"{m} ({dtype}): {checked - bad} of {checked} greedy outputs identical to AR in {dtype} (batched "
                  "verification rounds differently from one-row AR in reduced precision; exact identity is checked "
                  "in float32)", flush=True)
    return failed


def run_prompts(cfg, runners, dtypes: dict[str, str], tok, sets, eos, gate=None, label: str = "") -> list[dict]:
    """Every method on every prompt, methods interleaved per prompt (same conditions for each).
    Greedy outputs are checked against the first AR of the same dtype. `gate` (plan/steady.py's
    SteadyGate): each method's run on each prompt between a wait for the machine's usual speed and
    a check, and again where the check finds it slowed (plan --validate), each named after `label`
    (e.g. the run: "run 2: "), the set, the prompt and the method."""
    first = encode_prompt(tok, next(iter(sets.values()))[0]["turns"][0])
    for run in runners.values():  # warm-up: first calls pay for allocation and lazy init
        run(first, 4, SamplingParams(), eos)
    records = []
    total = sum(len(v) for v in sets.values()) * len(runners)
    # One method on one prompt at a time: a few seconds, shorter than the slow state's episodes
    # (8 s and more), so one that overlaps it is seen by the wait before or the check after. Gated
    # per prompt (all methods, ~40 s), an episode could begin and end inside unseen.
    steadily = gated(gate)
    with tqdm(total=total, desc="bench", unit="run", dynamic_ncols=True) as bar:
        for name, rows in sets.items():
            for row in rows:
                ids = encode_prompt(tok, row["turns"][0])
                ar_tokens = {}
                for m, run in runners.items():
                    # Same seed for every method: sampled runs are comparable draws, greedy runs identical.
                    gen = steadily(f"{label}{name} prompt {row['question_id']}: {m}",
                                   lambda run=run, ids=ids: run(ids, cfg.max_new_tokens, cfg.sampling, eos))
                    # The bench's method spec wins over the name the metrics carry (e.g. sd-tree).
                    rec = {"dataset": name, "question_id": row["question_id"], "prompt_tokens": len(ids),
                           **gen.metrics.as_dict(), "method": m, "dtype": dtypes[m], "tokens": gen.tokens}
                    if gate is not None:
                        rec["steady"] = gate.last_steady
                    if base_method(m) == "ar" and dtypes[m] not in ar_tokens:
                        ar_tokens[dtypes[m]] = gen.tokens
                    elif dtypes[m] in ar_tokens and cfg.temperature == 0:
                        rec["matches_ar"] = gen.tokens == ar_tokens[dtypes[m]]
                    records.append(rec)
                    bar.update(1)
    return records
