"""`spdecode bench`: decoding methods side by side on the same prompts, in one process and one run.

Per dataset and overall it reports pooled (token-weighted) numbers: alpha = accepted / verified
drafts, tokens per cycle, tau = n * tokens per cycle, decode tok/s = (new tokens - 1) / decode
time, and, when AR runs in the same invocation, the wall-clock speedup over it. Greedy runs are
also checked token for token against AR (`mismatches` must be 0).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
from pathlib import Path

import torch
from tqdm import tqdm

from .data import load_prompt_set
from .errors import SpdError
from .generation import eos_ids
from .sampling import SamplingParams

METHODS = ("ar", "sd", "pipespec", "speed", "spd")


def encode_first_turn(tok, text: str) -> list[int]:
    if tok.chat_template:
        return list(tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            return_dict=True)["input_ids"])
    return list(tok(text).input_ids)


def load_sets(args) -> dict[str, list[dict]]:
    datasets = [d.strip() for d in args.data.split(",") if d.strip()]
    return {Path(d).stem if d.endswith(".jsonl") else d: load_prompt_set(d, args.limit) for d in datasets}


def make_runners(methods, model, model_name: str, stages, draft, args=None, stack=None):
    """method -> callable(prompt_ids, max_new_tokens, sampling, eos) -> Generation. `stages`: SPD's
    split; SPEED's is `cli.speed_split` (the same as in `generate`). Processes a method starts
    (PipeSpec's chain) are closed by `stack` (a contextlib.ExitStack)."""
    from .ar import generate_ar
    from .drafters import PDMDrafter, SpeedDrafter
    from .models import weights_fingerprint
    from .pdm import pdm_for
    from .spd import generate_spd
    from .staged import StagedTarget

    runners = {}
    for m in methods:
        if m == "ar":
            ar_target = StagedTarget(model)
            runners[m] = lambda ids, k, s, e, t=ar_target: generate_ar(t, ids, k, s, e)
        elif m == "spd":
            spd_target = StagedTarget(model, stages)
            drafter = PDMDrafter(pdm_for(spd_target, model_name, weights_fingerprint(model), draft))
            runners[m] = lambda ids, k, s, e, t=spd_target, d=drafter: generate_spd(t, d, ids, k, s, e)
        elif m == "speed":  # the SPD pipeline with SPEED's early-exit drafter, on SPEED's split (speed_split)
            from .cli import speed_split

            speed_target = StagedTarget(model, speed_split(args, model))
            drafter = SpeedDrafter(speed_target, args.speed_depth or speed_target.stage_sizes[0])
            runners[m] = lambda ids, k, s, e, t=speed_target, d=drafter: generate_spd(t, d, ids, k, s, e)
        elif m == "sd":
            from .cli import make_candidates
            from .sd import generate_sd

            sd_target, cands = StagedTarget(model), make_candidates(args.drafter, model, args.dtype, args.device)
            runners[m] = lambda ids, k, s, e, t=sd_target, c=cands: generate_sd(
                t, c, ids, k, s, e, gamma=args.gamma, adaptive=args.adaptive_gamma)
        elif m == "pipespec":
            from .pipespec import PipeSpecChain

            chain = stack.enter_context(PipeSpecChain(model_name, args.chain.split(","), args.gamma, args.dtype,
                                                      device=args.device))
            runners[m] = lambda ids, k, s, e, c=chain: c.generate(ids, k, s, e)
        else:
            raise SpdError(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
    return runners


def predicted_tokens_per_cycle(method: str, alpha: float | None, n: int, gamma: int) -> float | None:
    """What each method's analytic model predicts from the measured alpha, to set beside the
    measured tokens per cycle (SPD/SPEED: a pipeline cycle; SD and PipeSpec: a target pass)."""
    from .pipespec import expected_tokens_per_step
    from .schedule import tau

    if method == "ar":
        return 1.0
    if alpha is None:
        return None
    if method.startswith(("spd", "speed")):
        return tau(alpha, n) / n
    if method == "sd":  # Leviathan et al.: expected tokens per target pass with gamma drafts
        return float(gamma + 1) if alpha >= 1 else (1 - alpha ** (gamma + 1)) / (1 - alpha)
    if method == "pipespec":
        return expected_tokens_per_step(alpha, gamma)
    return None


def pooled(records: list[dict]) -> dict:
    new = sum(r["new_tokens"] - 1 for r in records)
    cycles = sum(r["cycles"] for r in records)
    verified = sum(r["drafts_verified"] for r in records)
    n = records[0]["n_stages"]
    decode_s = sum(r["decode_s"] for r in records)
    tpc = new / cycles if cycles else None
    return {
        "prompts": len(records),
        "new_tokens": sum(r["new_tokens"] for r in records),
        "alpha": sum(r["drafts_accepted"] for r in records) / verified if verified else None,
        "tokens_per_cycle": tpc,
        "tau": n * tpc if tpc is not None else None,
        "decode_tok_s": new / decode_s if decode_s else None,
        "median_prompt_tok_s": statistics.median(r["decode_tok_s"] or 0 for r in records),
        "mismatches": sum(1 for r in records if r.get("matches_ar") is False),
    }


def pipespec_rho(records: list[dict], alpha: float, gamma: int) -> dict:
    """PipeSpec's share of verification steps at the target, measured and as the paper's model has
    it, and E[N] with the measured share (the model's other half, the accepted run length)."""
    from .pipespec import expected_tokens_per_step, rho

    steps = sum(r["chain"][-1]["steps"] for r in records)
    measured = sum(r["chain"][-1]["verify_steps"] for r in records) / steps if steps else 0.0
    block = gamma + 1 if alpha >= 1 else (1 - alpha ** (gamma + 1)) / (1 - alpha)
    return {"rho_measured": measured, "rho_model": rho(alpha, gamma),
            "model_tokens_per_step": expected_tokens_per_step(alpha, gamma),
            "tokens_per_step_with_measured_rho": (1 - measured) + measured * block}


def summarise(records: list[dict], methods, datasets, gamma: int = 4) -> dict:
    summary = {}
    for m in methods:
        mine = [r for r in records if r["method"] == m]
        summary[m] = {d: pooled([r for r in mine if r["dataset"] == d]) for d in datasets}
        summary[m]["overall"] = pooled(mine)
        for d, row in summary[m].items():
            row["predicted_tokens_per_cycle"] = predicted_tokens_per_cycle(m, row["alpha"], mine[0]["n_stages"],
                                                                           gamma)
            if m == "pipespec" and row["alpha"] is not None:
                row.update(pipespec_rho(mine if d == "overall" else [r for r in mine if r["dataset"] == d],
                                        row["alpha"], gamma))
    if "ar" in summary:
        for m in methods:
            for d, row in summary[m].items():
                base = summary["ar"][d]["decode_tok_s"]
                row["speedup_vs_ar"] = row["decode_tok_s"] / base if base and row["decode_tok_s"] else None
    return summary


def fmt(x, spec=".2f"):
    return "-" if x is None else format(x, spec)


def print_table(summary: dict) -> None:
    """tok/cyc: measured tokens per cycle (SPD, SPEED: pipeline cycle; SD, PipeSpec: target pass);
    model: the method's analytic prediction of it from the measured alpha."""
    head = f"{'method':<8} {'dataset':<10} {'prompts':>7} {'tokens':>7} {'alpha':>6} {'tok/cyc':>7} {'model':>6} " \
           f"{'tau':>5} {'tok/s':>7} {'vs AR':>6}"
    print(head)
    print("-" * len(head))
    for m, rows in summary.items():
        for d, r in rows.items():
            print(f"{m:<8} {d:<10} {r['prompts']:>7} {r['new_tokens']:>7} {fmt(r['alpha']):>6} "
                  f"{fmt(r['tokens_per_cycle']):>7} {fmt(r.get('predicted_tokens_per_cycle')):>6} "
                  f"{fmt(r['tau']):>5} {fmt(r['decode_tok_s'], '.1f'):>7} "
                  f"{fmt(r.get('speedup_vs_ar')):>6}" + (f"  MISMATCHES {r['mismatches']}" if r["mismatches"] else ""))


def run_distributed_spd(args, model, tok, sets, eos) -> list[dict]:
    """SPD with one process per stage (torchrun) over every prompt; records like the in-process ones."""
    import tempfile

    from .cli import distributed_split, worker_args
    from .launch import run_distributed

    sizes = distributed_split(args, model)
    order = [(name, row) for name, rows in sets.items() for row in rows]
    with tempfile.TemporaryDirectory() as tmp:
        req, out = Path(tmp) / "requests.jsonl", Path(tmp) / "out.json"
        req.write_text("".join(json.dumps(encode_first_turn(tok, row["turns"][0])) + "\n" for _, row in order))
        worker = worker_args(args, sizes) + ["--requests", str(req), "--json-out", str(out)]
        print(f"distributed {args.method}: {len(sizes)} processes, stages {sizes}", flush=True)
        code = run_distributed(len(sizes), worker, args.master_port, args.rdzv_endpoint)
        if code != 0:
            raise SpdError(f"the distributed run failed (exit code {code})")
        results = json.loads(out.read_text())
    records = []
    for (name, row), res in zip(order, results, strict=True):
        rec = {"dataset": name, "question_id": row["question_id"], "stage_sizes": sizes,
               **res["metrics"], "method": f"{args.method}-dist", "rank_stats": res["rank_stats"],
               "tokens": res["tokens"]}
        records.append(rec)
    return records


def rank_breakdown(records: list[dict]) -> dict:
    """Milliseconds per cycle by rank and phase, pooled over the prompts."""
    cycles = sum(r["cycles"] for r in records) or 1
    out = {"rank0": {k: 1e3 * sum(r["phase_s"].get(k, 0.0) for r in records) / cycles
                     for k in records[0]["phase_s"]}}
    for s in range(len(records[0]["rank_stats"])):
        out[f"rank{s + 1}"] = {k: 1e3 * sum(r["rank_stats"][s][i] for r in records) / cycles
                               for i, k in enumerate(("compute", "wait", "send"))}
    return out


def run_bench(args) -> int:
    from .models import load_model

    methods = [m.strip() for m in args.method.split(",") if m.strip()]
    distributed = getattr(args, "distributed", False)
    # What runs: in one process the listed methods; distributed, its spd/speed ones (spd if none).
    runs = (distributed_methods(args) if distributed else methods)
    if args.draft and "spd" not in runs:
        raise SpdError(f"--draft is a PDM checkpoint, used only by spd, which --method {args.method} does not "
                       "run (add spd or drop --draft)")
    if distributed:
        return run_bench_distributed(args)
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise SpdError(f"unknown method {', '.join(unknown) or '(none)'}; choose from {', '.join(METHODS)}")
    methods.sort(key=lambda m: m != "ar")  # AR first: the others are checked against its tokens
    sets = load_sets(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_model(args.model, args.dtype, args.device)
    from .cli import resolve_split

    stages = resolve_split(args, model) if "spd" in methods else None  # SPD's split (speed has its own rule)
    with contextlib.ExitStack() as stack:
        runners = make_runners(methods, model, args.model, stages, args.draft, args, stack)
        records = run_prompts(args, runners, tok, sets, eos_ids(model, tok))
    summary = summarise(records, methods, list(sets), args.gamma)
    print_table(summary)
    if "pipespec" in summary and "rho_measured" in summary["pipespec"]["overall"]:
        o = summary["pipespec"]["overall"]
        print(f"pipespec: share of target steps that verify: measured {o['rho_measured']:.2f}, model "
              f"{o['rho_model']:.2f}; tokens per target step: measured {o['tokens_per_cycle']:.2f}, model "
              f"{o['model_tokens_per_step']:.2f}, model with the measured share "
              f"{o['tokens_per_step_with_measured_rho']:.2f}")
    if args.plot:
        plot_speedups(summary, args.plot)
    if args.json_out:
        config = {k: v for k, v in vars(args).items() if k != "func"}
        Path(args.json_out).write_text(json.dumps({"config": config, "summary": summary, "records": records},
                                                  indent=1, default=str))
    bad = sum(r["overall"]["mismatches"] for r in summary.values())
    if bad:
        print(f"error: {bad} greedy outputs differ from AR", flush=True)
        return 1
    return 0


def run_prompts(args, runners, tok, sets, eos) -> list[dict]:
    """Every method on every prompt, methods interleaved per prompt (same conditions for each)."""
    first = encode_first_turn(tok, next(iter(sets.values()))[0]["turns"][0])
    for run in runners.values():  # warm-up: first calls pay for allocation and lazy init
        run(first, 4, SamplingParams(), eos)
    records = []
    total = sum(len(v) for v in sets.values()) * len(runners)
    with tqdm(total=total, desc="bench", unit="run", dynamic_ncols=True) as bar:
        for name, rows in sets.items():
            for row in rows:
                ids = encode_first_turn(tok, row["turns"][0])
                ar_tokens = None
                for m, run in runners.items():
                    # Same seed for every method: sampled runs are comparable draws, greedy runs identical.
                    sampling = SamplingParams(args.temperature, args.top_k, args.top_p, args.seed)
                    gen = run(ids, args.max_new_tokens, sampling, eos)
                    rec = {"dataset": name, "question_id": row["question_id"], "method": m,
                           "prompt_tokens": len(ids), **gen.metrics.as_dict()}
                    if m == "ar":
                        ar_tokens = gen.tokens
                    elif ar_tokens is not None and args.temperature == 0:
                        rec["matches_ar"] = gen.tokens == ar_tokens
                    records.append(rec)
                    bar.update(1)
    return records


def distributed_methods(args) -> list[str]:
    """The methods `bench --distributed` runs across processes: the listed spd/speed, else spd."""
    return [m.strip() for m in args.method.split(",") if m.strip() in ("spd", "speed")] or ["spd"]


def run_bench_distributed(args) -> int:
    """Distributed SPD against the best in-process AR (1 and 2 threads), same prompts, one invocation."""
    from .ar import generate_ar
    from .models import load_model
    from .staged import StagedTarget

    sets = load_sets(args)
    model, tok = load_model(args.model, args.dtype, args.device)
    eos = eos_ids(model, tok)
    target = StagedTarget(model)
    sampling = SamplingParams(args.temperature, args.top_k, args.top_p, args.seed)
    records = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        first = encode_first_turn(tok, next(iter(sets.values()))[0]["turns"][0])
        generate_ar(target, first, 4, sampling, eos)
        for name, rows in tqdm(sets.items(), desc=f"AR {threads} thread(s)"):
            for row in rows:
                gen = generate_ar(target, encode_first_turn(tok, row["turns"][0]), args.max_new_tokens, sampling, eos)
                records.append({"dataset": name, "question_id": row["question_id"], "tokens": gen.tokens,
                                **gen.metrics.as_dict(), "method": f"ar-{threads}t"})
    dist_methods = distributed_methods(args)
    dist_records = []
    for dm in dist_methods:  # SPD's PDM and SPEED's early exit on the same process pipeline
        dist_records += run_distributed_spd(argparse.Namespace(**{**vars(args), "method": dm}), model, tok, sets, eos)
    ar_best = max(("ar-1t", "ar-2t"), key=lambda m: pooled([r for r in records if r["method"] == m])["decode_tok_s"])
    ar_tokens = {(r["dataset"], r["question_id"]): r["tokens"] for r in records if r["method"] == ar_best}
    for r in dist_records:
        if args.temperature == 0:
            r["matches_ar"] = r["tokens"] == ar_tokens[(r["dataset"], r["question_id"])]
    records += dist_records
    methods = ["ar-1t", "ar-2t"] + [f"{m}-dist" for m in dist_methods]
    summary = summarise(records, methods, list(sets), args.gamma)
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
    if args.plot:
        plot_speedups({m: summary[m] for m in methods if m != ar_best}, args.plot)
    if args.json_out:
        config = {k: v for k, v in vars(args).items() if k != "func"}
        Path(args.json_out).write_text(json.dumps({"config": config, "summary": summary, "rank_ms_per_cycle":
                                                   breakdowns, "records": records}, indent=1, default=str))
    bad = sum(summary[f"{dm}-dist"]["overall"]["mismatches"] for dm in dist_methods)
    if bad:
        print(f"error: {bad} greedy outputs differ from AR", flush=True)
        return 1
    return 0


def plot_speedups(summary: dict, path: str) -> None:
    """Grouped bars: wall-clock speedup over AR per dataset (and overall), one bar per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for m in summary if m != "ar"]
    datasets = list(next(iter(summary.values())))
    width = 0.8 / max(len(methods), 1)
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(datasets), 3.6))
    for i, m in enumerate(methods):
        xs = [j + (i - (len(methods) - 1) / 2) * width for j in range(len(datasets))]
        ys = [summary[m][d].get("speedup_vs_ar") or 0.0 for d in datasets]
        bars = ax.bar(xs, ys, width, label=m)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    ax.set_xticks(range(len(datasets)), datasets)
    ax.set_ylabel("decode speedup vs AR (same run)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"plot written to {path}")
