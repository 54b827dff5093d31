"""`spdecode bench`: decoding methods side by side on the same prompts, in one process and one run.

Per dataset and overall it reports pooled (token-weighted) numbers: alpha = accepted / verified
drafts, tokens per cycle, tau = n * tokens per cycle, decode tok/s = (new tokens - 1) / decode
time, and, when AR runs in the same invocation, the wall-clock speedup over it. Greedy runs are
also checked token for token against AR (`mismatches` must be 0).
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
from tqdm import tqdm

from ..data import load_prompt_set
from ..distributed.split import method_split, worker_args
from ..generators import DRAFTED, MethodOptions, base_method, make_generator, parse_method_spec, split_specs
from ..runtime.errors import SpdError
from ..runtime.generation import eos_ids
from ..runtime.models import DEFAULT_MODEL
from ..runtime.prompts import encode_prompt
from ..runtime.sampling import SamplingParams
from .report import plot_speedups, pooled, print_table, rank_breakdown, summarise


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
    ar_sweep: bool = False  # AR in both dtypes (float32, bfloat16) with 1 and 2 threads: the best is the baseline
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
    ar_sweep, a plain `ar` becomes AR in float32 and bfloat16 with 1 and 2 threads."""
    specs = split_specs(cfg.method)
    if not specs:
        raise SpdError("no method to run: give --method, e.g. ar,eagle")
    if len(set(specs)) < len(specs):
        raise SpdError(f"--method {cfg.method} lists a method spec twice")
    if cfg.ar_sweep:
        if "ar" not in specs:
            raise SpdError("--ar-sweep replaces a plain `ar` in --method by every AR configuration: list ar")
        dtypes = list(dict.fromkeys([cfg.dtype, "float32", "bfloat16"]))
        specs.remove("ar")
        specs[:0] = [f"ar:threads={t}" + ("" if d == cfg.dtype else f":dtype={d}") for d in dtypes for t in (1, 2)]
    out = {spec: parse_method_spec(spec, cfg.options) for spec in specs}
    return dict(sorted(out.items(), key=lambda kv: kv[1][0] != "ar"))


def make_runners(specs: dict[str, tuple[str, MethodOptions]], models: dict, model_name: str, stack=None):
    """spec -> callable(prompt_ids, max_new_tokens, sampling, eos) -> Generation, built by the one
    builder `generate` uses; `models`: (dtype, device) -> the model loaded so. Processes a method
    starts (PipeSpec's chain) are closed by `stack` (a contextlib.ExitStack)."""
    return {spec: make_generator(method, models[opts.dtype, opts.device], model_name, opts, stack)[0]
            for spec, (method, opts) in specs.items()}


def run_distributed_spd(cfg, model, tok, sets, eos) -> list[dict]:
    """SPD with one process per stage (torchrun) over every prompt; records like the in-process ones."""
    import tempfile

    from ..distributed.launch import run_distributed

    sizes = method_split(cfg.method, model, cfg.model, cfg.stages, cfg.draft, distributed=True)
    order = [(name, row) for name, rows in sets.items() for row in rows]
    with tempfile.TemporaryDirectory() as tmp:
        req, out = Path(tmp) / "requests.jsonl", Path(tmp) / "out.json"
        req.write_text("".join(json.dumps(encode_prompt(tok, row["turns"][0])) + "\n" for _, row in order))
        worker = worker_args(cfg.model, sizes, cfg.max_new_tokens, cfg.sampling, cfg.dtype, cfg.device, cfg.timeout,
                             cfg.draft, cfg.method, cfg.speed_depth, cfg.threads)
        worker += ["--requests", str(req), "--json-out", str(out)]
        print(f"distributed {cfg.method}: {len(sizes)} processes, stages {sizes}", flush=True)
        code = run_distributed(len(sizes), worker, cfg.master_port, cfg.rdzv_endpoint)
        if code != 0:
            raise SpdError(f"the distributed run failed (exit code {code})")
        results = json.loads(out.read_text())
    records = []
    for (name, row), res in zip(order, results, strict=True):
        rec = {"dataset": name, "question_id": row["question_id"], "stage_sizes": sizes,
               **res["metrics"], "method": f"{cfg.method}-dist", "rank_stats": res["rank_stats"],
               "tokens": res["tokens"]}
        records.append(rec)
    return records


def run_bench(cfg) -> int:
    from ..runtime.models import load_model

    distributed = cfg.distributed
    if distributed:
        if cfg.draft and "spd" not in distributed_methods(cfg):
            raise SpdError(f"--draft is a PDM checkpoint, used only by spd, which --method {cfg.method} does not "
                           "run (add spd or drop --draft)")
        return run_bench_distributed(cfg)
    specs = method_specs(cfg)
    if cfg.draft and not any(m in DRAFTED for m, _ in specs.values()):
        raise SpdError(f"--draft is a trained draft for spd or eagle, which --method {cfg.method} does not run "
                       "(add one or drop --draft)")
    if cfg.draft and set(DRAFTED) <= {m for m, _ in specs.values()}:
        raise SpdError("--draft names one draft, but spd (a PDM) and eagle (a head) both run: give each its "
                       "own with spd:draft=DIR and eagle:draft=DIR")
    sets = load_sets(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    models, tok = {}, None
    for _, opts in specs.values():
        if (opts.dtype, opts.device) not in models:
            models[opts.dtype, opts.device], tok = load_model(cfg.model, opts.dtype, opts.device)
    dtypes = {spec: opts.dtype for spec, (_, opts) in specs.items()}
    with contextlib.ExitStack() as stack:
        runners = make_runners(specs, models, cfg.model, stack)
        records = run_prompts(cfg, runners, dtypes, tok, sets, eos_ids(next(iter(models.values())), tok))
    methods = list(specs)
    gammas = {spec: opts.gamma for spec, (_, opts) in specs.items()}
    summary = summarise(records, methods, list(sets), gammas)
    print_table(summary)
    for m in (m for m in methods if "rho_measured" in summary[m]["overall"]):
        o = summary[m]["overall"]
        print(f"{m}: share of target steps that verify: measured {o['rho_measured']:.2f}, model "
              f"{o['rho_model']:.2f}; tokens per target step: measured {o['tokens_per_cycle']:.2f}, model "
              f"{o['model_tokens_per_step']:.2f}, model with the measured share "
              f"{o['tokens_per_step_with_measured_rho']:.2f}")
    if cfg.plot:
        plot_speedups(summary, cfg.plot)
    if cfg.json_out:
        config = asdict(cfg)
        Path(cfg.json_out).write_text(json.dumps({"config": config, "summary": summary, "records": records},
                                                  indent=1, default=str))
    return check_identity(cfg, {m: summary[m]["overall"] for m in methods}, dtypes)


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


def run_prompts(cfg, runners, dtypes: dict[str, str], tok, sets, eos) -> list[dict]:
    """Every method on every prompt, methods interleaved per prompt (same conditions for each).
    Greedy outputs are checked against the first AR of the same dtype."""
    first = encode_prompt(tok, next(iter(sets.values()))[0]["turns"][0])
    for run in runners.values():  # warm-up: first calls pay for allocation and lazy init
        run(first, 4, SamplingParams(), eos)
    records = []
    total = sum(len(v) for v in sets.values()) * len(runners)
    with tqdm(total=total, desc="bench", unit="run", dynamic_ncols=True) as bar:
        for name, rows in sets.items():
            for row in rows:
                ids = encode_prompt(tok, row["turns"][0])
                ar_tokens = {}
                for m, run in runners.items():
                    # Same seed for every method: sampled runs are comparable draws, greedy runs identical.
                    gen = run(ids, cfg.max_new_tokens, cfg.sampling, eos)
                    # The bench's method spec wins over the name the metrics carry (e.g. sd-tree).
                    rec = {"dataset": name, "question_id": row["question_id"], "prompt_tokens": len(ids),
                           **gen.metrics.as_dict(), "method": m, "dtype": dtypes[m]}
                    if base_method(m) == "ar" and dtypes[m] not in ar_tokens:
                        ar_tokens[dtypes[m]] = gen.tokens
                    elif dtypes[m] in ar_tokens and cfg.temperature == 0:
                        rec["matches_ar"] = gen.tokens == ar_tokens[dtypes[m]]
                    records.append(rec)
                    bar.update(1)
    return records


def distributed_methods(cfg) -> list[str]:
    """The methods `bench --distributed` runs across processes: the listed spd/speed, else spd."""
    return [m.strip() for m in cfg.method.split(",") if m.strip() in ("spd", "speed")] or ["spd"]


def run_bench_distributed(cfg) -> int:
    """Distributed SPD against the best in-process AR (1 and 2 threads), same prompts, one invocation."""
    from ..methods.ar import generate_ar
    from ..runtime.models import load_model
    from ..runtime.staged import StagedTarget

    sets = load_sets(cfg)
    model, tok = load_model(cfg.model, cfg.dtype, cfg.device)
    eos = eos_ids(model, tok)
    target = StagedTarget(model)
    sampling = cfg.sampling
    records = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        first = encode_prompt(tok, next(iter(sets.values()))[0]["turns"][0])
        generate_ar(target, first, 4, sampling, eos)
        for name, rows in tqdm(sets.items(), desc=f"AR {threads} thread(s)"):
            for row in rows:
                gen = generate_ar(target, encode_prompt(tok, row["turns"][0]), cfg.max_new_tokens, sampling, eos)
                records.append({"dataset": name, "question_id": row["question_id"], "tokens": gen.tokens,
                                **gen.metrics.as_dict(), "method": f"ar-{threads}t"})
    dist_methods = distributed_methods(cfg)
    dist_records = []
    for dm in dist_methods:  # SPD's PDM and SPEED's early exit on the same process pipeline
        dist_records += run_distributed_spd(replace(cfg, method=dm), model, tok, sets, eos)
    ar_best = max(("ar-1t", "ar-2t"), key=lambda m: pooled([r for r in records if r["method"] == m])["decode_tok_s"])
    ar_tokens = {(r["dataset"], r["question_id"]): r["tokens"] for r in records if r["method"] == ar_best}
    for r in dist_records:
        if cfg.temperature == 0:
            r["matches_ar"] = r["tokens"] == ar_tokens[(r["dataset"], r["question_id"])]
    records += dist_records
    methods = ["ar-1t", "ar-2t"] + [f"{m}-dist" for m in dist_methods]
    summary = summarise(records, methods, list(sets), cfg.gamma)
    for row in summary.values():  # the baseline is the best AR configuration
        for d, r in row.items():
            base = summary[ar_best][d]["decode_tok_s"]
            r["speedup_vs_ar"] = r["decode_tok_s"] / base if base and r["decode_tok_s"] else None
    print_table(summary)
    ar_step = 1e3 / summary[ar_best]["overall"]["decode_tok_s"]
    breakdowns = {}
    for dm in dist_methods:
        name = f"{dm}-dist"
        breakdown = breakdowns[name] = rank_breakdown([r for r in dist_records if r["method"] == name])
        print(f"{name} per-cycle time by rank (ms): " + "; ".join(
            f"{rank}: " + ", ".join(f"{k} {v:.2f}" for k, v in phases.items()) for rank, phases in breakdown.items()))
        o = summary[name]["overall"]
        busiest = max(breakdown["rank0"].get("draft", 0) + breakdown["rank0"].get("stage0", 0),
                      *(p["compute"] for k, p in breakdown.items() if k != "rank0"))
        ideal = o["tokens_per_cycle"] * ar_step / busiest
        o["ideal_speedup"], o["efficiency"] = ideal, o["speedup_vs_ar"] / ideal
        print(f"best AR: {ar_best} ({ar_step:.1f} ms/token). {name}: {o['speedup_vs_ar']:.2f}x wall clock, "
              f"tau {o['tau']:.2f} (speedup/tau {o['speedup_vs_ar'] / o['tau']:.2f}); ideal given tokens/cycle and "
              f"the busiest rank's compute ({busiest:.1f} ms/cycle): {ideal:.2f}x, efficiency {o['efficiency']:.2f}")
    if cfg.plot:
        plot_speedups({m: summary[m] for m in methods if m != ar_best}, cfg.plot)
    if cfg.json_out:
        config = asdict(cfg)
        Path(cfg.json_out).write_text(json.dumps({"config": config, "summary": summary, "rank_ms_per_cycle":
                                                   breakdowns, "records": records}, indent=1, default=str))
    return check_identity(cfg, {f"{dm}-dist": summary[f"{dm}-dist"]["overall"] for dm in dist_methods})


