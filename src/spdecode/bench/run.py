"""`spdecode bench`: decoding methods side by side on the same prompts, in one process and one run.

Per dataset and overall it reports pooled (token-weighted) numbers: alpha = accepted / verified
drafts, tokens per cycle, tau = n * tokens per cycle, decode tok/s = (new tokens - 1) / decode
time, and, when AR runs in the same invocation, the wall-clock speedup over it. Greedy runs are
also checked token for token against AR (`mismatches` must be 0).
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from tqdm import tqdm

from ..data import load_prompt_set
from ..distributed.split import method_split, pdm_split, speed_split, worker_args
from ..drafting.build import make_candidates, make_pipeline_drafter
from ..runtime.errors import SpdError
from ..runtime.generation import eos_ids
from ..runtime.models import DEFAULT_MODEL
from ..runtime.prompts import encode_prompt
from ..runtime.sampling import SamplingParams
from .report import plot_speedups, pooled, print_table, rank_breakdown, summarise

METHODS = ("ar", "sd", "pipespec", "speed", "spd")


@dataclass(frozen=True)
class BenchConfig:
    """What a bench run compares and how (the `spdecode bench` options, with their defaults)."""

    model: str = DEFAULT_MODEL
    dtype: str = "float32"
    device: str = "cpu"
    threads: int | None = None
    method: str = "ar,spd"  # comma-separated, from METHODS
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
    tree_budget: int = 0  # sd with prompt lookup: draft-tree nodes per target pass (0: a chain)
    tree_depth: int = 4
    tree_topk: int = 4  # sd's tree from a draft model: children per expanded node
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


def load_sets(cfg) -> dict[str, list[dict]]:
    datasets = [d.strip() for d in cfg.data.split(",") if d.strip()]
    return {Path(d).stem if d.endswith(".jsonl") else d: load_prompt_set(d, cfg.limit) for d in datasets}


def make_runners(methods, model, model_name: str, stages, draft, cfg: BenchConfig, stack=None):
    """method -> callable(prompt_ids, max_new_tokens, sampling, eos) -> Generation. `stages`: SPD's
    split; SPEED's is `distributed.split.speed_split` (the same as in `generate`). Processes a method starts
    (PipeSpec's chain) are closed by `stack` (a contextlib.ExitStack)."""
    from ..methods.ar import generate_ar
    from ..methods.spd import generate_spd
    from ..runtime.models import weights_fingerprint
    from ..runtime.staged import StagedTarget

    runners = {}
    for m in methods:
        if m == "ar":
            ar_target = StagedTarget(model)
            runners[m] = lambda ids, k, s, e, t=ar_target: generate_ar(t, ids, k, s, e)
        elif m == "spd":
            spd_target = StagedTarget(model, stages)
            drafter = make_pipeline_drafter("spd", spd_target, model_name, weights_fingerprint(model), draft)
            runners[m] = lambda ids, k, s, e, t=spd_target, d=drafter: generate_spd(t, d, ids, k, s, e)
        elif m == "speed":  # the SPD pipeline with SPEED's early-exit drafter, on SPEED's split (speed_split)
            speed_target = StagedTarget(model, speed_split(model, cfg.stages))
            drafter = make_pipeline_drafter("speed", speed_target, model_name, "", speed_depth=cfg.speed_depth)
            runners[m] = lambda ids, k, s, e, t=speed_target, d=drafter: generate_spd(t, d, ids, k, s, e)
        elif m == "sd":
            from ..methods.sd import sd_generator

            cands = make_candidates(cfg.drafter, model, cfg.dtype, cfg.device)
            runners[m] = sd_generator(StagedTarget(model), cands, cfg.gamma, cfg.adaptive_gamma, cfg.tree_budget,
                                      cfg.tree_depth, cfg.tree_topk)
        elif m == "pipespec":
            from ..methods.pipespec import PipeSpecChain

            chain = stack.enter_context(PipeSpecChain(model_name, cfg.chain.split(","), cfg.gamma, cfg.dtype,
                                                      device=cfg.device))
            runners[m] = lambda ids, k, s, e, c=chain: c.generate(ids, k, s, e)
        else:
            raise SpdError(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
    return runners


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

    methods = [m.strip() for m in cfg.method.split(",") if m.strip()]
    distributed = cfg.distributed
    # What runs: in one process the listed methods; distributed, its spd/speed ones (spd if none).
    runs = (distributed_methods(cfg) if distributed else methods)
    if cfg.draft and "spd" not in runs:
        raise SpdError(f"--draft is a PDM checkpoint, used only by spd, which --method {cfg.method} does not "
                       "run (add spd or drop --draft)")
    if distributed:
        return run_bench_distributed(cfg)
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise SpdError(f"unknown method {', '.join(unknown) or '(none)'}; choose from {', '.join(METHODS)}")
    methods.sort(key=lambda m: m != "ar")  # AR first: the others are checked against its tokens
    sets = load_sets(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model, tok = load_model(cfg.model, cfg.dtype, cfg.device)
    # SPD's split (speed has its own rule, see distributed.split)
    stages = pdm_split(model, cfg.model, cfg.stages, cfg.draft) if "spd" in methods else None
    with contextlib.ExitStack() as stack:
        runners = make_runners(methods, model, cfg.model, stages, cfg.draft, cfg, stack)
        records = run_prompts(cfg, runners, tok, sets, eos_ids(model, tok))
    summary = summarise(records, methods, list(sets), cfg.gamma)
    print_table(summary)
    if "pipespec" in summary and "rho_measured" in summary["pipespec"]["overall"]:
        o = summary["pipespec"]["overall"]
        print(f"pipespec: share of target steps that verify: measured {o['rho_measured']:.2f}, model "
              f"{o['rho_model']:.2f}; tokens per target step: measured {o['tokens_per_cycle']:.2f}, model "
              f"{o['model_tokens_per_step']:.2f}, model with the measured share "
              f"{o['tokens_per_step_with_measured_rho']:.2f}")
    if cfg.plot:
        plot_speedups(summary, cfg.plot)
    if cfg.json_out:
        config = asdict(cfg)
        Path(cfg.json_out).write_text(json.dumps({"config": config, "summary": summary, "records": records},
                                                  indent=1, default=str))
    return check_identity(cfg, [r["overall"] for r in summary.values()])


def check_identity(cfg: BenchConfig, rows: list[dict]) -> int:
    """Exit code of a greedy run: in fp32 every output must be AR's (1 otherwise). In reduced
    precision a batched verification pass rounds differently from one-row AR, so outputs may
    legitimately depart: the share identical to AR is reported instead."""
    bad = sum(r["mismatches"] for r in rows)
    if bad and cfg.dtype == "float32":
        print(f"error: {bad} greedy outputs differ from AR", flush=True)
        return 1
    if cfg.temperature == 0 and cfg.dtype != "float32":
        checked = sum(r["checked_against_ar"] for r in rows)
        print(f"{cfg.dtype}: {checked - bad} of {checked} greedy outputs identical to AR (batched verification rounds "
              "differently from one-row AR in reduced precision; exact identity is checked in float32)", flush=True)
    return 0


def run_prompts(cfg, runners, tok, sets, eos) -> list[dict]:
    """Every method on every prompt, methods interleaved per prompt (same conditions for each)."""
    first = encode_prompt(tok, next(iter(sets.values()))[0]["turns"][0])
    for run in runners.values():  # warm-up: first calls pay for allocation and lazy init
        run(first, 4, SamplingParams(), eos)
    records = []
    total = sum(len(v) for v in sets.values()) * len(runners)
    with tqdm(total=total, desc="bench", unit="run", dynamic_ncols=True) as bar:
        for name, rows in sets.items():
            for row in rows:
                ids = encode_prompt(tok, row["turns"][0])
                ar_tokens = None
                for m, run in runners.items():
                    # Same seed for every method: sampled runs are comparable draws, greedy runs identical.
                    sampling = cfg.sampling
                    gen = run(ids, cfg.max_new_tokens, sampling, eos)
                    # The bench's method name wins over the one the metrics carry (e.g. sd-tree).
                    rec = {"dataset": name, "question_id": row["question_id"], "prompt_tokens": len(ids),
                           **gen.metrics.as_dict(), "method": m}
                    if m == "ar":
                        ar_tokens = gen.tokens
                    elif ar_tokens is not None and cfg.temperature == 0:
                        rec["matches_ar"] = gen.tokens == ar_tokens
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
    return check_identity(cfg, [summary[f"{dm}-dist"]["overall"] for dm in dist_methods])


