"""Multi-process SPD (torchrun, gloo on CPU): same tokens and counters as one process; failures end cleanly."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import tiny_model, train_tiny_pdm
from transformers import GenerationConfig

from spdecode.distributed.launch import torchrun_command
from spdecode.distributed.stage import STAGE_STATS
from spdecode.drafting.pdm import load_pdm
from spdecode.drafting.pdm_tree import PdmTreeDrafter
from spdecode.methods.ar import generate_ar
from spdecode.methods.spd import generate_spd
from spdecode.methods.spd_core import TreeShape
from spdecode.runtime.generation import eos_ids
from spdecode.runtime.models import load_model, weights_fingerprint
from spdecode.runtime.staged import StagedTarget

EOS = {2}


def launch(nproc, args, **kw):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(torchrun_command(nproc, args), capture_output=True, text=True, env=env, **kw)


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    """A tiny model on disk, prompts, and per split a PDM trained a little (mixed accept/reject)."""
    root = tmp_path_factory.mktemp("dist")
    model = tiny_model("llama")
    model.save_pretrained(root / "model")
    g = torch.Generator().manual_seed(11)
    prompts = [torch.randint(3, 97, (6,), generator=g).tolist() for _ in range(12)]
    drafts = {}
    for sizes in ([3, 3], [2, 2, 2]):
        pdm = train_tiny_pdm(model, sizes, prompts[:9], root / f"train{len(sizes)}")
        pdm.save(root / f"draft{len(sizes)}", dtype=torch.float32)
        drafts[len(sizes)] = root / f"draft{len(sizes)}"
    requests = root / "requests.jsonl"
    requests.write_text("".join(json.dumps(p) + "\n" for p in prompts[9:]))
    return model, root, prompts[9:], drafts, requests


@pytest.mark.parametrize("tree", [(1, 1, 1), (6, 3, 3)], ids=["one node per slot", "trees"])
@pytest.mark.parametrize("sizes", [[3, 3], [2, 2, 2]])
def test_distributed_equals_single_process_and_ar(tiny_setup, sizes, tree):
    """The same tokens and counters as the single-process engine, with one node per slot and with
    trees (the plans travel with the slots: compactions, layouts, sampled successors)."""
    model, root, prompts, drafts, requests = tiny_setup
    out = root / f"out{len(sizes)}-{tree[0]}.json"
    res = launch(len(sizes), ["--model", str(root / "model"), "--stages", ",".join(map(str, sizes)),
                              "--draft", str(drafts[len(sizes)]), "--requests", str(requests),
                              "--max-new-tokens", "30", "--json-out", str(out), "--timeout", "60",
                              "--tree-budget", str(tree[0]), "--tree-depth", str(tree[1]),
                              "--tree-topk", str(tree[2])], timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    records = json.loads(out.read_text())
    target = StagedTarget(model, sizes)
    pdm = load_pdm(drafts[len(sizes)], target, weights_fingerprint(model))
    accepted = rejected = 0
    for p, rec in zip(prompts, records, strict=True):
        single = generate_spd(target, PdmTreeDrafter(pdm), p, 30, eos=EOS, shape=TreeShape(*tree))
        assert rec["tokens"] == single.tokens == generate_ar(StagedTarget(model), p, 30, eos=EOS).tokens
        m = rec["metrics"]
        assert (m["cycles"], m["drafts_verified"], m["drafts_accepted"]) == \
            (single.metrics.cycles, single.metrics.drafts_verified, single.metrics.drafts_accepted)
        accepted += m["drafts_accepted"]
        rejected += m["drafts_verified"] - m["drafts_accepted"]
        assert len(rec["rank_stats"]) == len(sizes) - 1
        for stats in rec["rank_stats"]:  # each rank's time part by part, and the slots and rows it ran
            st = dict(zip(STAGE_STATS, stats, strict=True))
            assert 0 < st["slots"] <= m["cycles"] and st["layers"] > 0 and st["plan"] > 0 and st["post"] > 0
            assert st["rows"] == st["slots"] if tree[0] == 1 else st["rows"] >= st["slots"]
    assert accepted and rejected  # rollbacks across processes were exercised


def test_distributed_ranks_take_eos_from_generation_config(tiny_setup, tmp_path):
    """config.json and generation_config.json name different EOS ids: the distributed run stops where
    the single-process decoder on load_model (from_pretrained: generation_config.json) stops."""
    model, root, prompts, drafts, _ = tiny_setup
    d = tmp_path / "model"
    shutil.copytree(root / "model", d)
    p = prompts[0]
    free = generate_ar(StagedTarget(model), p, 30).tokens  # no EOS at all
    k = next(i for i in range(2, 30) if free[i] not in free[:i] and free[i] != 2)
    GenerationConfig(bos_token_id=1, eos_token_id=[free[k]], pad_token_id=0).save_pretrained(d)
    assert json.loads((d / "config.json").read_text())["eos_token_id"] == 2
    loaded, _ = load_model(str(d), tokenizer=False)
    eos = eos_ids(loaded, None)
    assert eos == {free[k]}
    expected = generate_ar(StagedTarget(loaded), p, 30, eos=eos).tokens
    assert expected == free[: k + 1]
    requests, out = tmp_path / "r.jsonl", tmp_path / "o.json"
    requests.write_text(json.dumps(p) + "\n")
    res = launch(2, ["--model", str(d), "--stages", "3,3", "--draft", str(drafts[2]), "--requests", str(requests),
                     "--max-new-tokens", "30", "--json-out", str(out), "--timeout", "60"], timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads(out.read_text())[0]["tokens"] == expected


@pytest.mark.integration
def test_cli_distributed_default_model_matches_ar(ar_reference):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-m", "spdecode", "generate", "--method", "spd", "--distributed",
                          "--stages", "2", "--prompt", "def fib(n):", "--max-new-tokens", "20", "--json"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout)
    assert out["distributed"] and out["tokens"] == ar_reference("def fib(n):", 20)


def children(pid):
    try:
        out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    except FileNotFoundError:
        return []
    return [int(x) for x in out.split()]


def start_launcher(nproc, args):
    """What `spdecode generate/bench --distributed` run: run_distributed (torchrun under it)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    code = ("import sys; from spdecode.distributed.launch import run_distributed; "
            "sys.exit(run_distributed(int(sys.argv[1]), sys.argv[2:]))")
    return subprocess.Popen([sys.executable, "-c", code, str(nproc), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def rank_of(pid):
    env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
    return int(next(e for e in env if e.startswith(b"RANK="))[5:])


@pytest.mark.parametrize("victim", [1, 0])
def test_killed_rank_ends_the_run_with_a_message(tiny_setup, tmp_path, victim):
    """SIGKILL one rank mid-generation: the run ends non-zero within seconds (not after --timeout), with
    spdecode's own `error: rank ...` line naming the dead rank, and leaves no process behind."""
    _, root, _, drafts, _ = tiny_setup
    requests = tmp_path / "long.jsonl"
    requests.write_text("".join(json.dumps([5, 6, 7]) + "\n" for _ in range(200)))
    proc = start_launcher(2, ["--model", str(root / "model"), "--stages", "3,3", "--draft", str(drafts[2]),
                              "--requests", str(requests), "--max-new-tokens", "200",
                              "--json-out", str(tmp_path / "o.json"), "--timeout", "60"])
    workers = []
    deadline = time.time() + 60
    while len(workers) < 2 and time.time() < deadline:
        time.sleep(0.5)
        workers = [w for t in children(proc.pid) for w in children(t)]
    assert len(workers) == 2, "torchrun did not start two ranks"
    time.sleep(8)  # let them load and start decoding
    assert proc.poll() is None
    victim_pid = next(w for w in workers if rank_of(w) == victim)
    os.kill(victim_pid, signal.SIGKILL)
    t0 = time.time()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert time.time() - t0 < 30, err  # not the 60 s --timeout
    lines = err.splitlines()
    assert any(line.startswith("error: rank") and f"rank {victim}" in line for line in lines), err
    assert all(line.startswith(("error: rank", "warning:", "[spd")) for line in lines), err  # no torchrun noise
    time.sleep(1)
    for pid in workers:
        assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"


def test_unexpected_exception_on_a_rank_shows_its_cause(tiny_setup, tmp_path):
    """A failure that is no SpdError (here a corrupted weights file) shows its type, message and
    traceback through the launcher, instead of only torchrun's 'a rank failed'."""
    _, root, prompts, drafts, _ = tiny_setup
    d = tmp_path / "model"
    shutil.copytree(root / "model", d)
    (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:100])
    requests = tmp_path / "r.jsonl"
    requests.write_text(json.dumps(prompts[0]) + "\n")
    proc = start_launcher(2, ["--model", str(d), "--stages", "3,3", "--draft", str(drafts[2]),
                              "--requests", str(requests), "--json-out", str(tmp_path / "o.json"),
                              "--timeout", "60"])
    _, err = proc.communicate(timeout=180)
    assert proc.returncode != 0
    assert re.search(r"^error: rank \d: unexpected SafetensorError: \S", err, re.M), err
    assert re.search(r"^  rank \d \| Traceback \(most recent call last\):$", err, re.M), err
    assert re.search(r"^  rank \d \| .*in load_partial_model$", err, re.M), err
