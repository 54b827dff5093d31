"""SPEED gets one stage split, and so one default exit depth, in every mode: `generate` in one
process, `generate --distributed`, and `bench` in one process (with or without spd beside it) or
distributed. The rule (see --speed-depth's help): --stages' sizes as given, a count split evenly.

Each path runs for real up to the point where it has chosen: the SpeedDrafter it builds, or the
sizes it hands the distributed launcher, are recorded, and the run stops there."""

import pytest

import spdecode.distributed.launch
import spdecode.drafting.build
import spdecode.runtime.models
from spdecode.bench import run as bench
from spdecode.cli import build_parser, config_from, main
from spdecode.runtime.staged import split_layers

pytestmark = pytest.mark.integration


class Chosen(Exception):
    pass


@pytest.fixture
def chosen(monkeypatch, default_model):
    """(stage sizes, exit depth) of every SPEED set-up the command makes, in order."""
    seen = []
    real = spdecode.drafting.build.SpeedDrafter

    class Recording(real):
        def __init__(self, target, depth):
            seen.append((list(target.stage_sizes), depth))
            raise Chosen

    def launcher(nprocs, worker, *args, **kwargs):
        assert "--speed-depth" not in worker  # so each rank takes its default: stage 0's size
        sizes = [int(x) for x in worker[worker.index("--stages") + 1].split(",")]
        assert nprocs == len(sizes) and worker[worker.index("--method") + 1] == "speed"
        seen.append((sizes, sizes[0]))  # the worker's make_pipeline_drafter: stage 0's size
        raise Chosen

    monkeypatch.setattr(spdecode.drafting.build, "SpeedDrafter", Recording)
    monkeypatch.setattr(spdecode.distributed.launch, "run_distributed", launcher)
    monkeypatch.setattr(spdecode.runtime.models, "load_model", lambda *a, **k: default_model)
    return seen


@pytest.mark.parametrize("n", [2, 4])
def test_speed_split_is_the_same_in_every_mode(chosen, default_model, n):
    model, tok = default_model
    common = ["--stages", str(n)]
    for argv in (["generate", "--method", "speed", "--prompt", "hi", "--json"],
                 ["generate", "--method", "speed", "--prompt", "hi", "--distributed"],
                 ["bench", "--method", "speed", "--data", "mt_bench", "--limit", "1"],
                 ["bench", "--method", "ar,spd,speed", "--data", "mt_bench", "--limit", "1"]):
        with pytest.raises(Chosen):
            main(argv + common)
    # bench --distributed: its SPEED run, given the same arguments (its AR runs are not the point here)
    args = build_parser().parse_args(["bench", "--distributed", "--method", "speed", *common])
    sets = {"mine": [{"question_id": 1, "turns": ["hi"]}]}
    cfg = config_from(bench.BenchConfig, args)
    method, opts = bench.method_specs(cfg)["speed"]
    with pytest.raises(Chosen):
        bench.run_distributed_spd(cfg, method, opts, "speed-dist", model, tok, sets)
    even = split_layers(model.config.num_hidden_layers, n)
    assert chosen == [(even, even[0])] * 5, chosen
