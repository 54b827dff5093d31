"""`spdecode plan --validate`: the simulator's predictions side by side with measurements, here.

Every configuration measurable on this machine (by default AR with 1 and 2 threads, sd, eagle,
one-process SPD at n = 2 and 4, and SPD with one process per stage, one node per slot and over
trees) decodes the same prompts `runs` times, the way `spdecode bench` runs them (its runners,
methods interleaved per prompt; run by run, the pipelines in each); the measurement is the median
of the runs' pooled decode tok/s.
Each is predicted twice from the cost file: replaying the exact accept/reject sequence of every
generation of the first run (its walks, and the scores its drafter grew trees from), and from
that run's acceptance per depth alone, each verification drawn on its own (what a user without
traces has; one node per slot has one depth, its alpha), both over each generation's own prompt
and token counts.

The cost file is the one given (`--costs`), or, by default, timed here between the runs: one
round of `plan --measure`'s timings (what these configurations use) before each run, each entry's
median kept (plan/measure.py). A file measured before met another machine than the runs on a guest
whose speed drifts (10-30 % between hours); the host probe reports that drift either way.
Timed between the runs, each run is set against the round timed just before it: a configuration's
prediction and error are the medians over the runs of its prediction from that round and its
error against it. The guest's speed moved by a fifth between two rounds of one validation (its
host probes 55.6, 38.6, 44.6 ms), which a median file set against median runs turns into error.
"""

from __future__ import annotations

import contextlib
import json
import statistics
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from ..bench.report import pooled
from ..bench.run import BenchConfig, distributed_key, load_sets, method_specs, run_distributed_spd, run_prompts
from ..drafting.pdm import bundled_draft
from ..generators import PIPELINED, MethodOptions, base_method, make_generator, split_specs
from ..methods.spd_core import TreeShape
from ..runtime.errors import SpdError
from ..runtime.generation import eos_ids
from ..runtime.models import DEFAULT_MODEL
from .cost_model import CONCURRENT
from .planner import load_costs
from .predict import Setup, pooled_prediction, predict
from .simulate import Drawn, Replayed

IN_PROCESS = ("ar:threads=1,ar:threads=2,sd:threads=2,eagle:threads=2,spd:stages=2:budget=1:threads=2,"
              "spd:stages=4:budget=1:threads=2")
ONE_PROCESS_PER_STAGE = "spd:budget=1,spd"  # at --stages 2: one node per slot, and spd's default tree


@dataclass(frozen=True)
class ValidateConfig:
    model: str = DEFAULT_MODEL
    dtype: str = "float32"
    device: str = "cpu"
    costs: str | None = None  # the cost file to check; None: timed between the runs
    costs_out: str | None = None  # where the cost file timed between the runs is written
    reps: int = 5  # timings per point of that cost file
    methods: str = IN_PROCESS  # method specs run in this process (bench's syntax)
    distributed: str = ONE_PROCESS_PER_STAGE  # pipeline specs run with one process per stage ("" for none)
    stages: int = 2  # the pipelines' stages where a spec gives none
    data: str = "mt_bench,gsm8k,humaneval"
    limit: int | None = 4
    max_new_tokens: int = 128
    runs: int = 3
    json_out: str | None = None
    master_port: int | None = None
    timeout: float = 120.0
    steady_wait_s: float = 90.0  # the most a wait for the machine's usual speed takes (plan/steady.py; 0: none)
    steady_budget_s: float = 1800.0  # the most all those waits take together


def rank_threads(threads: str, distributed: bool, ranks: int, data: dict) -> str:
    """The cost file's key for a configuration's timings: a pipeline whose ranks share one machine's
    cores (and memory bandwidth) is timed by the concurrent ones where the file has them."""
    if distributed and CONCURRENT in data["target"] and ranks <= data["hardware"]["cores"]:
        return CONCURRENT
    return "1" if threads == CONCURRENT else threads


def setup_for(method: str, opts: MethodOptions, sizes: list[int], distributed: bool, data: dict,
              model_name: str) -> Setup:
    """What the simulator must run for a measured configuration."""
    layers = (sum(sizes),)
    threads = rank_threads(str(opts.threads or (1 if distributed else torch.get_num_threads())), distributed,
                           len(sizes), data)
    if method == "ar":
        return Setup("ar", layers, threads)
    budget, depth, topk = opts.tree(method)
    if method == "sd":
        if opts.adaptive_gamma or (budget == 0 and opts.gamma < 2):
            raise SpdError("plan --validate models sd chains of a fixed gamma >= 2 (the core's smallest tree)")
        shape = TreeShape(opts.gamma, opts.gamma, 1) if budget == 0 else TreeShape(budget, depth, topk)
        drafter = opts.drafter if opts.drafter.startswith("early-exit:") else None
        return Setup("sd", layers, threads, shape=shape, drafter=drafter, chain=budget == 0)
    shape = TreeShape(budget, depth, topk)
    if method == "eagle":
        return Setup("eagle", layers, threads, shape=shape, drafter=Path(opts.draft).name if opts.draft
                     else f"{model_name}-eagle")
    if method == "spd":
        draft = opts.draft or bundled_draft(model_name, sizes, tree=shape.tree)
        return Setup("spd", tuple(sizes), threads, distributed, shape, Path(draft).name if draft else None)
    raise SpdError(f"plan --validate predicts ar, sd, eagle and spd, not {method}")


DRAWS = 8  # seeds per generation where verifications are drawn from alpha


def predict_records(data: dict, setup: Setup, records: list[dict], alpha, replay: bool) -> dict:
    """The pooled prediction for the generations `records` (each at its own prompt and token counts):
    replaying each one's walks (`replay`), or drawing every verification from `alpha` (one value,
    or one per depth), each generation DRAWS times with its own seeds (a generation that verified
    nothing too). One draw of ~350 verifications put SPD's tokens per cycle at 4 stages 7 % under
    the measured in every backend: the same four seeds, the same unlucky sequence; the
    expectation is wanted."""
    predictions = []
    for i, r in enumerate(records):
        if replay and any(w[0] for w in r.get("walks", [])):
            acceptances = [Replayed(r["walks"], r.get("draft_scores"))]
        else:
            acceptances = [Drawn(alpha or 0.0, seed=DRAWS * i + k) for k in range(DRAWS)]
        predictions += [predict(data, setup, a, r["prompt_tokens"], r["new_tokens"]) for a in acceptances]
    return pooled_prediction(predictions)


def depth_acceptance(generations: list[dict]) -> list[float] | None:
    """The acceptance at each depth of the generations' walks, as their replay counts it: a walk
    that ended at a leaf of the real tree stops one level down (the stand-in's tree goes on where
    the real one had no draft). Counted without those stops, as the engine's alpha per depth is,
    independent draws walked the stand-in's deeper trees and put spd's tokens per cycle over
    trees 13 % over the measured (int8w, 1.21 against 1.07); with them, 1.12 (its walks: 1.11)."""
    walks = [w for g in generations for w in g.get("walks", [])]
    return Replayed(walks).rates() if any(w[0] for w in walks) else None


def measure_all(cfg: ValidateConfig, bench: BenchConfig, data: dict | None, log=print):
    """Per configuration key: (method, options, stage sizes, distributed) and its records of each run;
    the host probe (costs.host_probe) before each run and after the last; the cost file: `data`, or
    where that is None, timed between the runs (what the configurations use); and then each round's
    file, the one timed before each run (else None)."""
    from ..runtime.models import load_model
    from .costs import CONTEXTS, host_probe
    from .measure import measure
    from .steady import SteadyGate, gauge
    from .steady import steadily as gated

    local = method_specs(bench) if cfg.methods.strip() else {}
    piped = method_specs(replace(bench, method=cfg.distributed, distributed=True)) if cfg.distributed else {}
    model, tok = load_model(cfg.model, cfg.dtype, cfg.device)
    sets = load_sets(bench)
    eos = eos_ids(model, tok)
    setups, runs, probes, rounds = {}, [[] for _ in range(cfg.runs)], [], []
    with contextlib.ExitStack() as stack:
        built = {spec: make_generator(method, model, cfg.model, opts, stack) for spec, (method, opts) in local.items()}
        for spec, (method, opts) in local.items():
            setups[spec] = (method, opts, list(built[spec][1]), False)
        runners = {spec: b[0] for spec, b in built.items()}
        dtypes = {spec: opts.dtype for spec, (_, opts) in local.items()}
        timed_threads, drafts = timed_parts(setups, cfg.model, bool(piped))
        # The probe's threads, whatever a configuration's runner sets: the process's, where the
        # cost file times them.
        threads = torch.get_num_threads() if data or torch.get_num_threads() in timed_threads else timed_threads[-1]
        probe_context = min(data.get("contexts") or [128]) if data else min(CONTEXTS)
        gate = SteadyGate(gauge(model, threads, context=probe_context), max_wait_s=cfg.steady_wait_s,
                          budget_s=cfg.steady_budget_s, log=log) if cfg.steady_wait_s > 0 else None
        steadily = gated(gate)

        def probe():
            before = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                probes.append(host_probe(model, probe_context))
            finally:
                torch.set_num_threads(before)

        # Run by run, every configuration in each: this guest's speed drifts by 10-15 % within
        # minutes, and a configuration measured only at the end (the pipelines were, all their runs
        # after the others') met another machine. The pipelines first: a round times their
        # calibration last, and set against calibrations 1-3 minutes older than their runs, bf16's
        # came out 3, 19 and 18 % fast (its ratios swung 1.37/0.99/1.03 between rounds).
        def run(r: int, costs: dict | None = None) -> None:
            if costs is not None:
                rounds.append(costs)
            probe()
            # A pipeline is started for each prompt (its start and warm-up are not timed): one
            # prompt's decoding lasts a few seconds, shorter than the slow state's episodes, so
            # the gate sees one that overlaps it; four prompts in one start (~30 s) could hold an
            # episode from its beginning to its end unseen.
            for spec, (method, opts) in piped.items():
                key = distributed_key(spec, method, opts)
                log(f"run {r + 1} of {cfg.runs}: {key}")
                for name, rows in sets.items():
                    for row in rows:
                        recs = steadily(f"run {r + 1}: {key}, {name} prompt {row['question_id']}",
                                        lambda m=method, o=opts, k=key, one={name: [row]}:
                                        run_distributed_spd(bench, m, o, k, model, tok, one))
                        runs[r].extend(rec | ({"steady": gate.last_steady} if gate else {}) for rec in recs)
                setups[key] = (method, opts, runs[r][-1]["stage_sizes"], True)
            if runners:
                log(f"run {r + 1} of {cfg.runs}: {', '.join(local)}")
                runs[r].extend(run_prompts(bench, runners, dtypes, tok, sets, eos, gate, label=f"run {r + 1}: "))

        if data is None:
            data = measure(cfg.model, cfg.dtype, cfg.device, timed_threads, reps=cfg.reps, drafts=drafts,
                           link=bool(piped), concurrent=bool(piped), pipeline=bool(piped), rounds=cfg.runs, between=run,
                           gate=gate, log=lambda m: log(f"costs: {m}"))
        else:
            for r in range(cfg.runs):
                run(r)
        probe()
    return (setups, runs, {"threads": str(threads), "context": probe_context, "step_s": probes}, data, rounds or None,
            gate.summary() if gate is not None else None)


def timed_parts(setups: dict, model_name: str, piped: bool) -> tuple[tuple[int, ...], bool | set[str]]:
    """The thread counts and bundled drafts a cost file must time for these one-process
    configurations (`setups`: as measure_all keeps them), and pipelines (`piped`: their ranks run
    one thread each, with every bundled draft that fits their split)."""
    timed = [setup_for(method, opts, sizes, False, {}, model_name) for method, opts, sizes, _ in setups.values()]
    threads = {int(s.threads) for s in timed} | ({1} if piped else set())
    return tuple(sorted(threads)), True if piped else {s.drafter for s in timed if s.drafter}


def validate(cfg: ValidateConfig, log=print) -> dict:
    if cfg.runs < 1:
        raise SpdError(f"--runs must be at least 1 (got {cfg.runs})")
    if cfg.max_new_tokens < 2:
        raise SpdError("--max-new-tokens must be at least 2 to time any decoding")
    if not cfg.methods.strip() and not cfg.distributed.strip():
        raise SpdError("nothing to validate: --methods and --distributed-methods are both empty")
    bad = [s for s in split_specs(cfg.distributed) if base_method(s) not in PIPELINED]
    if bad:
        raise SpdError(f"--distributed-methods runs pipelines (spd, speed), not {', '.join(bad)}")
    data = source = None
    if cfg.costs:
        data, source = load_costs(cfg.costs, cfg.model, cfg.dtype)
        if (data.get("model"), data.get("dtype")) != (cfg.model, cfg.dtype):
            raise SpdError(f"{source} was measured for {data.get('model')} in {data.get('dtype')}, not {cfg.model} "
                           f"in {cfg.dtype}")
    elif cfg.costs_out and not Path(cfg.costs_out).parent.is_dir():
        raise SpdError(f"--out {cfg.costs_out}: no such directory")
    bench = BenchConfig(model=cfg.model, dtype=cfg.dtype, device=cfg.device, method=cfg.methods, data=cfg.data,
                        limit=cfg.limit, max_new_tokens=cfg.max_new_tokens, stages=cfg.stages,
                        master_port=cfg.master_port, timeout=cfg.timeout)
    setups, runs, probe, data, rounds, steady = measure_all(cfg, bench, data, log)
    if source is None:
        source = cfg.costs_out or (str(Path(cfg.json_out).with_suffix(".costs.json")) if cfg.json_out else None)
        if source:
            Path(source).write_text(json.dumps(data, indent=1))
    rows = []
    for key, (method, opts, sizes, distributed) in setups.items():
        setup = setup_for(method, opts, sizes, distributed, data, cfg.model)
        first = [r for r in runs[0] if r["method"] == key]
        measured = [pooled([r for r in run if r["method"] == key]) for run in runs]
        rows.append({"config": key, "stages": sizes, "tree": list(opts.tree(method)) if method != "ar" else None,
                     **saved_setup(setup), "measured_tok_s": statistics.median(m["decode_tok_s"] for m in measured),
                     "measured_runs_tok_s": [m["decode_tok_s"] for m in measured],
                     "measured_tokens_per_cycle": measured[0]["tokens_per_cycle"], "alpha": measured[0]["alpha"],
                     # What the predictions replay: the first run's generations (--replay predicts them again).
                     "generations": [{k: r.get(k) for k in ("dataset", "question_id", "prompt_tokens", "new_tokens",
                                                            "walks", "draft_scores")} for r in first],
                     "steady_runs": steady_runs([[r for r in run if r["method"] == key] for run in runs])})
    return compare(data, source, rows, asdict(cfg), probe, timed_between=cfg.costs is None, rounds=rounds,
                   steady=steady)


def steady_runs(runs: list[list[dict]]) -> list[dict] | None:
    """Per run of one configuration, the prompts whose kept run the gate read steady before and
    after, and their pooled decode tok/s (None where none was, or where nothing was gated)."""
    if not any("steady" in r for run in runs for r in run):
        return None
    kept = [[r for r in run if r.get("steady")] for run in runs]
    return [{"prompts": [[r["dataset"], r["question_id"]] for r in k],
             "tok_s": pooled(k)["decode_tok_s"] if k else None} for k in kept]


def steady_errors(row: dict, setup: Setup, rounds: list[dict], alpha) -> dict | None:
    """A configuration's errors over its steady units alone (`row["steady_runs"]`): each run's
    steady prompts predicted from the round timed before it, against their measured tok/s, the
    medians over the runs that had any. What the all-units error mixes in from a restless hour
    (a run the slow state met, set against tables retaken into the usual speed) is left out; the
    all-units error stays the headline."""
    runs = row.get("steady_runs")
    if not runs or len(runs) != len(rounds):
        return None
    errors, units = {"traces": [], "alpha": []}, 0
    for table, run in zip(rounds, runs, strict=True):
        keep = {tuple(p) for p in run["prompts"]}
        gens = [g for g in row["generations"] if (g.get("dataset"), g.get("question_id")) in keep]
        if not gens or not run["tok_s"]:
            continue
        units += len(run["prompts"])
        for kind, replay in (("traces", True), ("alpha", False)):
            errors[kind].append(predict_records(table, setup, gens, alpha, replay)["tok_s"] / run["tok_s"] - 1)
    if not units:
        return {"steady_units": 0}
    return {"steady_units": units, **{f"error_steady_{k}": statistics.median(v) for k, v in errors.items()}}


def saved_setup(setup: Setup) -> dict:
    """What a saved row keeps of its setup (row_setup rebuilds it)."""
    return {"method": setup.method, "layers": list(setup.sizes), "threads": setup.threads,
            "distributed": setup.distributed, "shape": [setup.shape.budget, setup.shape.depth, setup.shape.topk],
            "drafter": setup.drafter, "chain": setup.chain}


def row_setup(row: dict) -> Setup:
    """The simulator's setup for a saved row (the one setup_for made when it was measured)."""
    # Rows saved before `chain` was kept: sd's chain is the one with no tree budget.
    chain = row.get("chain", row["method"] == "sd" and not (row.get("tree") or [1])[0])
    return Setup(row["method"], tuple(row["layers"]), row["threads"], row["distributed"], TreeShape(*row["shape"]),
                 row["drafter"], chain)


def replayed_row(row: dict, data: dict) -> dict:
    """A saved row against another cost file: its pipeline's thread key as that file has it."""
    return row | {"threads": rank_threads(row["threads"], row["distributed"], len(row["layers"]), data)}


def host_slowdown(data: dict, probe: dict | None) -> float | None:
    """How much slower the machine ran an AR step during the validation (the probes' median) than
    when the cost file was measured (its `step` at the same threads and context); None where either
    is missing."""
    if not probe or not probe.get("step_s"):
        return None
    step = data["target"].get(probe["threads"], {}).get("step", {}).get(str(probe["context"]))
    return statistics.median(probe["step_s"]) / step if step else None


def compare(data: dict, source: str | None, rows: list[dict], config: dict, probe: dict | None = None,
            timed_between: bool = False, rounds: list[dict] | None = None, steady: dict | None = None) -> dict:
    """Each measured configuration's predictions from the cost file `data` (from `source`) beside
    its measurement: from its generations' walks and from its alpha alone (`source`: None for a
    file timed between the runs and not saved); `rounds`, where given (one cost file per run, each
    timed just before it), pair each run with its own (predicted and error: the medians over the
    runs); and, where the host was probed, how much slower it ran than when the costs were
    measured (host_slowdown). The probe is a gauge, not a correction: a tenth of a second of AR
    steps, it moved 36-42 ms within one bf16 validation, and predictions scaled by it came out no
    closer."""
    slowdown = host_slowdown(data, probe)
    out_rows = []
    for row in rows:
        setup = row_setup(row)
        measured = row["measured_runs_tok_s"]
        paired = rounds is not None and len(rounds) == len(measured)
        tables, against = (rounds, measured) if paired else ([data], [row["measured_tok_s"]])
        kinds = {}
        alpha = depth_acceptance(row["generations"]) or row["alpha"]
        for kind, replay in (("traces", True), ("alpha", False)):
            runs = [predict_records(t, setup, row["generations"], alpha, replay) for t in tables]
            kinds[kind] = {"tok_s": statistics.median(p["tok_s"] for p in runs),
                           "runs": [p["tok_s"] for p in runs], "tokens_per_cycle": runs[0]["tokens_per_cycle"],
                           "error": statistics.median(p["tok_s"] / m - 1 for p, m in zip(runs, against, strict=True))}
        # A saved row (--replay) carries the steady errors of the file it was compared with: not this one's.
        fresh = {k: v for k, v in row.items() if not k.startswith(("error_steady_", "steady_units"))}
        out_rows.append(fresh | (steady_errors(row, setup, rounds, alpha) or {} if paired else {}) | {
            "drafter_cost_from": setup.drafter if setup.drafter_timed(data.get("draft", {})) else "none (0 s)",
            **{f"predicted_tok_s_{k}": v["tok_s"] for k, v in kinds.items()},
            **({f"predicted_runs_tok_s_{k}": v["runs"] for k, v in kinds.items()} if paired else {}),
            **{f"predicted_tokens_per_cycle_{k}": v["tokens_per_cycle"] for k, v in kinds.items()},
            **{f"error_{k}": v["error"] for k, v in kinds.items()}})
    worst = max(max(abs(r["error_traces"]), abs(r["error_alpha"])) for r in out_rows)
    steady_rows = [r for r in out_rows if "error_steady_traces" in r]
    worst_steady = max((max(abs(r["error_steady_traces"]), abs(r["error_steady_alpha"])) for r in steady_rows),
                       default=None)
    out = {"config": config, "costs": str(Path(source).resolve()) if source else None, "costs_timed_between_runs":
           timed_between, "records": out_rows, "max_relative_error": worst, "host_probe": probe,
           # Over the units the gate read steady at both ends: configurations with none are not in it.
           "max_relative_error_steady": worst_steady, "steady_configurations": len(steady_rows),
           "host_slowdown": slowdown, "runs_paired_with_rounds": bool(rounds), "steady": steady,
           **({"round_costs": rounds} if rounds else {})}
    if config.get("json_out"):
        Path(config["json_out"]).write_text(json.dumps(out, indent=1))
    return out


def repredict(path: str, costs: str | None = None, json_out: str | None = None) -> dict:
    """A saved validation's measurements (`plan --validate --json-out`) against the cost file `costs`
    (default: the one it was compared with): the model checked again without measuring again."""
    saved = json.loads(Path(path).read_text())
    if any("generations" not in r for r in saved.get("records", [])):
        raise SpdError(f"{path} holds no generations to replay (written before plan --validate kept them)")
    cfg = saved["config"]
    if not (costs or saved.get("costs")):
        raise SpdError(f"{path}: its cost file was timed between its runs and not saved: give --costs")
    data, source = load_costs(costs or saved["costs"], cfg["model"], cfg["dtype"])
    if (data.get("model"), data.get("dtype")) != (cfg["model"], cfg["dtype"]):
        raise SpdError(f"{source} was measured for {data.get('model')} in {data.get('dtype')}, not {cfg['model']} in "
                       f"{cfg['dtype']}")
    # Its runs paired with the rounds timed before them, unless another file is given.
    rounds = None if costs else saved.get("round_costs")
    return compare(data, source, [replayed_row(r, data) for r in saved["records"]], cfg | {"json_out": json_out},
                   saved.get("host_probe"), saved.get("costs_timed_between_runs", False) and not costs, rounds,
                   saved.get("steady"))
