"""Stage sizes that balance a pipeline: measured costs of a layer, the LM head and the PDM.

Rank 0 runs the PDM beside stage 0 and the last rank runs the LM head beside its stage (the
head of the default model costs about as much as 7 of its layers), so equal layer counts leave
those two ranks slower than the others. We time one decode step of each part and pick sizes that
minimise the slowest rank's time.
"""

from __future__ import annotations

import time

import torch

from ..runtime.staged import StagedTarget


def _time(fn, reps: int) -> float:
    fn()  # warm-up
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


@torch.inference_mode()
def measure_costs(target: StagedTarget, pdm=None, reps: int = 10, context: int = 64) -> dict:
    """Seconds per single-token decode step: one layer (mean), the head, the PDM (one full window)."""
    t = target
    t.reserve(context + reps + 8)
    t.rollback(0)
    ids = torch.randint(0, t.config.vocab_size, (1, context), device=t.device)
    h = t.run_layers(0, t.n_layers, t.embed(ids), 0)
    x = h[:, -1:]

    def all_layers():
        t.rollback(context)
        t.run_layers(0, t.n_layers, x, context)

    layer = _time(all_layers, reps) / t.n_layers
    head = _time(lambda: t.logits(x), reps)
    cost = {"layer": layer, "head": head, "pdm": 0.0}
    if pdm is not None:
        n = pdm.cfg.n_stages
        rows = torch.randn(1, n + 1, t.config.hidden_size, dtype=t.dtype, device=t.device)

        def pdm_step():
            pdm.cache.reset()
            for d in range(n):
                pdm.project(pdm.type_of_depth[d], [rows[0, :1]] * pdm.cfg.n_types)
            pdm.head(pdm.run(rows, 0)[:, -1])

        cost["pdm"] = _time(pdm_step, reps)
    t.rollback(0)
    return cost


def balanced_split(n_layers: int, n_stages: int, layer: float, head: float, pdm: float = 0.0) -> list[int]:
    """Sizes minimising max(pdm + s_0 * layer, s_i * layer, s_last * layer + head), every s >= 1."""
    if n_stages == 1:
        return [n_layers]
    fixed = [pdm] + [0.0] * (n_stages - 2) + [head]
    sizes = [1] * n_stages
    for _ in range(n_layers - n_stages):  # give each next layer to the rank that stays fastest
        s = min(range(n_stages), key=lambda i: (fixed[i] + (sizes[i] + 1) * layer, i))
        sizes[s] += 1
    return sizes
