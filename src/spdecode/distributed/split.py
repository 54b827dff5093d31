"""Which layers each stage gets, by one rule per method in every mode (one process, one process
per stage, bench), and the arguments every rank of a distributed run is started with."""

from __future__ import annotations

import json
from pathlib import Path

from ..drafting.pdm import CONFIG_FILE, bundled_draft, new_pdm
from ..runtime.sampling import SamplingParams
from ..runtime.staged import StagedTarget, split_layers
from .balance import balanced_split, measure_costs


def pdm_split(model, model_name: str, stages: int | list[int], draft: str | None = None,
              balance: bool = False, tree: bool = False) -> list[int]:
    """Stage sizes for SPD: explicit sizes as given; a count takes the split of the draft that will
    be used (its anchors depend on it; `tree`: the bundled draft for trees, where there is one),
    else a cost-balanced split (`balance`: one process per stage) or an even one."""
    L = model.config.num_hidden_layers
    if isinstance(stages, list):
        return split_layers(L, stages)
    even = split_layers(L, stages)
    draft = draft or bundled_draft(model_name, None, stages, tree=tree)
    if draft and (Path(draft) / CONFIG_FILE).exists():
        sizes = json.loads((Path(draft) / CONFIG_FILE).read_text()).get("stage_sizes", [])
        if len(sizes) == stages and sum(sizes) == L:
            return sizes
    if balance and stages > 1:
        target = StagedTarget(model, even)
        return balanced_split(L, stages, **measure_costs(target, new_pdm(target, model_name, "-")))
    return even


def speed_split(model, stages: int | list[int]) -> list[int]:
    """SPEED's stage sizes in every mode: explicit sizes as given, a count split evenly. SPEED uses
    no PDM, so neither a draft's split nor a PDM-cost balance applies; its default exit depth,
    stage 0's size, is then the same in every mode too."""
    return split_layers(model.config.num_hidden_layers, stages)


def method_split(method: str, model, model_name: str, stages: int | list[int], draft: str | None = None,
                 distributed: bool = False, tree: bool = False) -> list[int]:
    """Stage sizes of `method`'s target: spd `pdm_split` (balanced when `distributed`), speed
    `speed_split`, any other method --stages split evenly."""
    if method == "spd":
        return pdm_split(model, model_name, stages, draft, balance=distributed, tree=tree)
    if method == "speed":
        return speed_split(model, stages)
    return split_layers(model.config.num_hidden_layers, stages)


def worker_args(model_name: str, sizes: list[int], max_new_tokens: int, sampling: SamplingParams,
                dtype: str = "float32", device: str = "cpu", timeout: float = 120.0, draft: str | None = None,
                method: str = "spd", speed_depth: int | None = None, threads: int | None = None,
                tree: tuple[int, int, int] = (1, 1, 1)) -> list[str]:
    """The `spdecode.distributed.worker` arguments every distributed run shares (one rank per size).
    `tree`: the draft tree per slot, (budget, depth, top-k); (1, 1, 1) is SPD as published."""
    worker = ["--model", model_name, "--dtype", dtype, "--device", device,
              "--stages", ",".join(map(str, sizes)), "--max-new-tokens", str(max_new_tokens),
              "--temperature", str(sampling.temperature), "--top-k", str(sampling.top_k),
              "--top-p", str(sampling.top_p), "--timeout", str(timeout)]
    worker += ["--seed", str(sampling.seed)] if sampling.seed is not None else []
    worker += ["--draft", str(draft)] if draft else []
    if method == "speed":
        worker += ["--method", "speed"] + (["--speed-depth", str(speed_depth)] if speed_depth else [])
    worker += ["--threads", str(threads)] if threads else []
    if tuple(tree) != (1, 1, 1):
        worker += ["--tree-budget", str(tree[0]), "--tree-depth", str(tree[1]), "--tree-topk", str(tree[2])]
    return worker
