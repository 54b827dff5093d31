"""`spdecode tune`: measure the machine profile `--method auto` decides from.

Quick (the default, and what the first `--method auto` runs): Linears of the model's MLP shape, as
many as its MLPs hold up to PROBE_BYTES (so their weights come from memory, as in a decode step),
in each backend prune those far behind the best (a backend whose one-row GEMMs take more than PRUNE
times the best's, and whose one-row plus nine-row GEMMs too, can win neither AR nor a speculative
configuration); the survivors get the cost file's timings (every layer and the head, plain and as a
tree chunk, and a whole AR step) at rows {1, 2, 5, 9} (AR, SPD's one node and its root, the trees
auto may pick: the shipped 8-node trees and their root) at contexts 128 and 512 with 1 thread and
with every usable core, the passes of the drafts auto may use, and the link between two local
processes. `--full` adds every backend, rows 1..17, every bundled draft and a rank's timings beside
a busy twin (plan/costs.py).
"""

from __future__ import annotations

import statistics
import time

import torch
from tqdm import tqdm

PRUNE = 1.5
QUICK_ROWS = (1, 2, 5, 9)
PROBE_BYTES = 256 << 20  # fp32 bytes of the probe's Linears: past the caches, as a decode step's weights


def linear_probe(hidden: int, inner: int, backends: list[str], threads: int, reps: int = 15,
                 copies: int = 1) -> dict:
    """backend -> {"1": s, "9": s}: a Linear hidden -> inner (random weights, the backend's
    kernels) over 1 and 9 rows with `threads` threads, per Linear, run over `copies` distinct ones
    in turn: one copy stays in cache, which hides what a decode step pays for reading weights
    (the reason int4w wins a one-row step)."""
    from ..runtime.backends import activation_dtype

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    out = {}
    try:
        with torch.inference_mode():
            for b in backends:
                lins = None  # the previous backend's copies go before the next are built
                lins = [linear_in(b, hidden, inner) for _ in range(copies)]
                out[b] = {}
                for rows in (1, 9):
                    x = torch.randn(1, rows, hidden).to(activation_dtype(b))

                    def run(x=x, lins=lins):
                        for lin in lins:
                            lin(x)

                    run()
                    times = []
                    for _ in range(reps):
                        t0 = time.perf_counter()
                        run()
                        times.append((time.perf_counter() - t0) / copies)
                    # The best of three blocks' medians: a neighbour's burst must not prune a backend.
                    blocks = [times[i::3] for i in range(3)]
                    out[b][str(rows)] = min(statistics.median(block) for block in blocks)
    finally:
        torch.set_num_threads(before)
    return out


def probe_copies(cfg) -> int:
    """How many MLP-shaped Linears the probe runs in turn: as many as the model's MLPs hold, at
    most PROBE_BYTES of fp32 weights (a large model's MLPs would take gigabytes), at least 2."""
    per = 4 * cfg.hidden_size * cfg.intermediate_size
    return max(2, min(3 * cfg.num_hidden_layers, PROBE_BYTES // per))


def linear_in(backend: str, hidden: int, inner: int) -> torch.nn.Module:
    """One Linear as `backend` computes it (in a Sequential: the packed backends swap a module's
    Linear children), built from weights in the dtype the backend loads."""
    from ..runtime.backends import apply_backend, load_dtype

    lin = torch.nn.Sequential(torch.nn.Linear(hidden, inner, bias=False)).to(load_dtype(backend))
    return apply_backend(lin, backend)


def survivors(probe: dict) -> list[str]:
    """The backends within PRUNE of the probe's best one-row time (AR's candidates) or of its best
    one-row plus nine-row time (the speculative methods')."""
    one = {b: t["1"] for b, t in probe.items()}
    total = {b: sum(t.values()) for b, t in probe.items()}
    return [b for b in probe if one[b] <= PRUNE * min(one.values()) or total[b] <= PRUNE * min(total.values())]


def drafts_for_auto(model_name: str) -> set[str]:
    """The bundled drafts the grid of candidates.py uses: eagle's head and the 2-stage drafts."""
    from ..drafting.pdm import bundled_draft, bundled_head

    found = (bundled_head(model_name), bundled_draft(model_name, None, 2, tree=True),
             bundled_draft(model_name, None, 2))
    return {d.name for d in found if d is not None}


def tune_threads(cores: int, full: bool) -> list[int]:
    """1, every usable core, and a 2-stage pipeline rank's share; --full: the whole sweep too."""
    from ..runtime.machine import thread_sweep

    return sorted({1, cores, max(1, cores // 2)} | (set(thread_sweep(cores)) if full else set()))


def link_possible(device: str, cores: int) -> bool:
    """Whether two local processes can each run a stage: a core each, or a GPU each."""
    if device == "cpu":
        return cores >= 2
    return torch.cuda.is_available() and torch.cuda.device_count() >= 2


def tune(model_name: str, device: str = "cpu", full: bool = False, log=None) -> dict:
    """Measure the profile (profile.new_profile) and return it (the caller saves it)."""
    from transformers import AutoConfig

    from ..plan.costs import CONTEXTS, ROWS, time_link
    from ..plan.measure import measure
    from ..runtime.machine import usable_cores
    from ..runtime.models import model_backends, resolve_model
    from .profile import new_profile, profile_key

    t0 = time.perf_counter()
    log = log or (lambda m: None)
    key = profile_key(model_name, device)
    cores = usable_cores()
    source = resolve_model(model_name)
    cfg = AutoConfig.from_pretrained(source)
    backends = model_backends(model_name, device)
    probe = linear_probe(cfg.hidden_size, cfg.intermediate_size, backends, cores,
                         copies=probe_copies(cfg)) if device == "cpu" else {}
    chosen = backends if full or not probe else survivors(probe)
    threads = tune_threads(cores, full)
    drafts = drafts_for_auto(model_name)
    log(f"tune: backends {', '.join(chosen)} (probe: " + ", ".join(
        f"{b} {1e3 * sum(t.values()):.2f} ms" for b, t in probe.items()) + f"); threads {threads}")
    costs = {}
    linked = link_possible(device, cores)
    steps = len(chosen) + linked
    with tqdm(total=steps, desc="tune", unit="step", leave=False, disable=None) as bar:
        for b in chosen:
            bar.set_postfix_str(b)
            costs[b] = measure(model_name, b, device, threads=threads, rows=ROWS if full else QUICK_ROWS,
                               contexts=CONTEXTS, reps=5, drafts=True if full else drafts, link=False,
                               concurrent=full, log=lambda m: None)
            bar.update()
        link = None
        if linked:
            bar.set_postfix_str("link")
            link = time_link("nccl" if device.startswith("cuda") else "gloo")
            for data in costs.values():
                data["link"] = link
            bar.update()
    return new_profile(key, costs, probe, link, full, time.perf_counter() - t0)
