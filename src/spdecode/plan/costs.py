"""`spdecode plan --measure`: time what a decoding configuration is made of, on this machine.

Recorded (seconds, medians of repeated timings; rows = tokens in one pass, at a context length):
- `layer`: one decoder layer's decode pass, for 1..R rows, at a few context lengths, per thread
  count, alone and, on a CPU, with another process decoding without a pause beside it
  (`concurrent`: two ranks on two cores share the memory bandwidth, which a lone timing hides);
- `head`: the final norm and LM head over R rows, right after a pass over the layers (as at work);
- `draft`: one pass of the bundled drafter (the PDM of each bundled draft: its layers and head)
  over R rows, the cost of one tree level, right after a pass of the target (as at work);
- `draft_call`: each bundled drafter at work in a short real generation with its own shape (one
  process): seconds per PDM pass with everything around it (masks, tree growth, Python) and the
  engine core's bookkeeping per cycle, which a lone pass does not show;
- `link`: point-to-point latency and bandwidth between two local processes on the backend a
  pipeline uses (gloo on CPU, NCCL on GPU), and one hop of an engine message (several sends);
- `pipeline`: a short real run of two processes, each rank's time part by part against the
  table (plan/calibrate.py);
- `hardware`: what it was measured on.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import platform
import statistics
import time
from datetime import UTC, datetime

import torch

from ..runtime.errors import SpdError

ROWS = tuple(range(1, 18))  # one row (AR) up to a root and a 16-node tree: where rows stop being cheap
CONTEXTS = (128, 512)


def median_time(fn, reps: int, before=None) -> float:
    """Median seconds of `fn()` after a warm-up; `before`, where given, runs untimed ahead of each
    call: what precedes the part in a decoding cycle. A part timed alone in a loop finds its weights
    and buffers warm, which at work it does not: at 9 rows and 2 threads the LM head took 5.0 ms in
    a loop and 8.1 ms right after the layers (int8w; fp16w 2.6 -> 4.7, bf16 2.6 -> 4.1), and the
    one-process predictions of the weight-only backends came out 12-20 % fast."""
    fn()  # warm-up
    times = []
    for _ in range(reps):
        if before is not None:
            before()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def hardware(device: str) -> dict:
    """The machine a cost file was measured on: the CPU, its flags that decide the backend, torch's
    dispatch level, and its usable cores (`cores`: affinity and cgroup quota, what ranks share)."""
    from ..runtime.machine import describe_cpu

    cpu = describe_cpu()
    out = {"cpu": cpu["cpu"], "flags": cpu["flags"], "capability": cpu["capability"], "cores": cpu["usable_cores"],
           "machine": platform.machine(), "system": platform.system(), "torch": torch.__version__, "device": device,
           "measured": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")}
    if device.startswith("cuda"):
        out["gpu"] = torch.cuda.get_device_name(device)
    return out


def ungated(what: str, fn):
    """A part's `steadily(what, fn)` where nothing waits for the machine's usual speed: fn() once."""
    return fn()


ROWS_PER_GATE = 4  # row counts timed between one wait and check of plan --validate's gate


def row_groups(rows) -> list[tuple[int, ...]]:
    """`rows` in runs of ROWS_PER_GATE: what time_target times between one wait and one check."""
    rows = tuple(rows)
    return [rows[i:i + ROWS_PER_GATE] for i in range(0, len(rows), ROWS_PER_GATE)]


@torch.inference_mode()
def time_target(target, rows=ROWS, contexts=CONTEXTS, reps: int = 5, steadily=ungated) -> dict:
    """{"layer": {context: {rows: s}}, "chunk": {context: {rows: s}}, "chunk1_in_flight": {context:
    s}, "head": {rows: s}, "step": {context: s}} for `target` (a StagedTarget, one stage). `layer`
    is a plain causal decode (AR), `chunk` a chunk of tree rows through the engine's stage call
    (the speculative methods: masks, positions off the causal line), `chunk1_in_flight` one row
    through it behind a row in flight (one-process SPD's stage calls of one node per slot); a step
    is one whole AR decode step (embedding, every layer, head, argmax): what it costs beyond its
    layers and head is the per-step overhead.
    `steadily(what, fn)` runs the timings a few row counts at a time (row_groups): plan --validate's
    gate waits before each group and checks after (plan/steady.py). A group lasts a second or two,
    shorter than the slow state's episodes (8 s and more), so one that overlaps it is seen; a whole
    table (15-25 s) could hold an episode unseen. One entry per group would double the table's time
    in gauge readings."""
    t, L, H = target, target.n_layers, target.config.hidden_size
    contexts = [c for c in contexts if c + max(rows) + 1 <= t.context_length]
    if not contexts:
        raise SpdError(f"the model's context ({t.context_length}) is too short to time")

    def decode_and_chunk(c: int, r: int) -> tuple[float, float]:
        x = torch.randn(1, r, H, dtype=t.dtype, device=t.device)
        layout = star_layout(c, r)

        def decode():
            t.rollback(c)
            t.run_layers(0, L, x, c)
            if t.device.type == "cuda":
                torch.cuda.synchronize()

        def tree_chunk():
            t.rollback(c)
            t.run_stage_chunk(0, x, layout)
            if t.device.type == "cuda":
                torch.cuda.synchronize()

        return median_time(decode, reps) / L, median_time(tree_chunk, reps) / L

    layer: dict = {}
    chunk: dict = {}
    in_flight: dict = {}
    step: dict = {}
    for c in contexts:
        prime(t, c, max(rows))
        layer[str(c)], chunk[str(c)] = {}, {}
        for g in row_groups(rows):
            timed = steadily(f"context {c}, rows {g[0]}-{g[-1]}", lambda c=c, g=g: [decode_and_chunk(c, r) for r in g])
            for r, (one, tree) in zip(g, timed, strict=True):
                layer[str(c)][str(r)], chunk[str(c)][str(r)] = one, tree
        in_flight[str(c)], step[str(c)] = steadily(
            f"context {c}, one row in flight and an AR step",
            lambda c=c: (median_time(one_row_in_flight(t, c), reps) / L, ar_step_time(t, c, reps)))
    layers_first = target_pass(t, contexts[-1], max(rows), head=False)

    def head_time(r: int) -> float:
        x = torch.randn(1, r, H, dtype=t.dtype, device=t.device)
        return median_time(lambda: t.logits(x), reps, before=lambda: layers_first(x))

    head = {}
    for g in row_groups(rows):
        head |= zip(map(str, g), steadily(f"the head, rows {g[0]}-{g[-1]}", lambda g=g: [head_time(r) for r in g]),
                    strict=True)
    t.rollback(0)
    return {"layer": layer, "chunk": chunk, "chunk1_in_flight": in_flight, "head": head, "step": step}


@torch.inference_mode()
def prime(target, context: int, rows: int = 1) -> None:
    """`context` random tokens in `target`'s cache and room for `rows` more: the state a timing
    here starts from (a decode pass reads the whole cache)."""
    target.reserve(context + rows + 1)
    target.rollback(0)
    ids = torch.randint(0, target.config.vocab_size, (1, context), device=target.device)
    target.run_layers(0, target.n_layers, target.embed(ids), 0)


def target_pass(target, context: int, rows: int, head: bool = True):
    """fn(x): `target`'s every layer over x (at most `rows` rows) as a decode after `context` tokens
    (primed once here), then its head: what runs before the head and before a drafter in a cycle."""
    t = target
    prime(t, context, rows)

    @torch.inference_mode()
    def run(x):
        t.rollback(context)
        h = t.run_layers(0, t.n_layers, x, context)
        if head:
            t.logits(h)
        if t.device.type == "cuda":
            torch.cuda.synchronize()

    return run


@torch.inference_mode()
def ar_step_time(target, context: int, reps: int = 5) -> float:
    """One whole AR decode step (embedding, every layer, head, argmax) after `context` tokens
    already in `target`'s cache (median seconds)."""
    one = torch.tensor([[1]], device=target.device)

    def ar_step():
        target.rollback(context)
        int(target.logits(target.forward(one, context)[:, -1])[0].argmax())

    return median_time(ar_step, reps)


@torch.inference_mode()
def host_probe(model, context: int, reps: int = 5) -> float:
    """An AR step after `context` tokens, timed as `--measure` times its table's `step`: how fast the
    machine runs now, for `plan --validate` to set beside the cost file (a guest's speed drifts)."""
    from ..runtime.staged import StagedTarget

    t = StagedTarget(model)
    prime(t, context)
    return ar_step_time(t, context, reps)


def one_row_in_flight(target, context: int):
    """fn(): one row through the stage call behind a row still in flight (committed < start), after
    `context` verified tokens: the masked path, which one-process SPD's one-row stage calls take
    whenever older slots are in flight. The chunk table's one row, with nothing in flight, takes
    the unmasked path, 2-4 % cheaper per layer on the Xeon (int8w, fp32, bf16 at 2 threads; 5 % on
    an EPYC, fp16w); with it one-process SPD at 4 stages came out 5-13 % fast."""
    from ..runtime.cache_layout import ChunkLayout

    t = target
    x = torch.zeros(1, 1, t.config.hidden_size, dtype=t.dtype, device=t.device)
    t.rollback(context)
    t.run_layers(0, t.n_layers, x, context)  # the row in flight
    layout = ChunkLayout(context + 1, context, (context, context + 1), ((True, True),))

    def run():
        t.rollback(context + 1)
        t.run_stage_chunk(0, x, layout)
        if t.device.type == "cuda":
            torch.cuda.synchronize()

    return run


def star_layout(context: int, rows: int):
    """A chunk as the speculative engines run one: a root at `context` and rows - 1 draft nodes
    below it, each seeing the root and itself (a tree mask, positions off the causal line)."""
    from ..runtime.cache_layout import ChunkLayout

    visible = tuple(tuple(k == 0 or k == i for k in range(rows)) for i in range(rows))
    return ChunkLayout(context, context, (context,) + (context + 1,) * (rows - 1), visible)


@torch.inference_mode()
def time_pdm(pdm, rows=ROWS, reps: int = 5, before=None) -> dict:
    """{rows: s} of one PDM pass (its layers and head) over `rows` rows: one level of a draft tree;
    `before(x)`: run untimed ahead of each pass (target_pass: the target's pass it follows at work)."""
    t = pdm.target[0]
    out = {}
    for r in rows:
        x = torch.randn(1, r, t.config.hidden_size, dtype=t.dtype, device=t.device)

        def level(x=x):
            pdm.cache.reset()
            pdm.head(pdm.run(x, 0))

        out[str(r)] = median_time(level, reps, None if before is None else lambda x=x: before(x))
    return out


@torch.inference_mode()
def time_drafting(model, model_name: str, draft_dir, tokens: int = 48) -> dict:
    """A bundled drafter in a short greedy generation (one process, its split, its default shape:
    eagle's tree for a head, spd's tree for a tree-ready draft, else one node per slot): seconds
    per PDM pass, rows per pass, and the engine core's bookkeeping per cycle."""
    from ..drafting.pdm import CONFIG_FILE, load_pdm
    from ..drafting.pdm_tree import PdmTreeDrafter
    from ..generators import MethodOptions
    from ..methods.spd import generate_spd
    from ..methods.spd_core import ONE_NODE, TreeShape
    from ..runtime.models import weights_fingerprint
    from ..runtime.staged import StagedTarget

    cfg = json.loads((draft_dir / CONFIG_FILE).read_text())
    target = StagedTarget(model, cfg["stage_sizes"])
    drafter = PdmTreeDrafter(load_pdm(draft_dir, target, weights_fingerprint(model)))
    shape = (TreeShape(*MethodOptions().tree("eagle")) if cfg.get("chain") else
             TreeShape(*MethodOptions().tree("spd")) if draft_dir.name.endswith("-tree") else ONE_NODE)
    prompt = torch.randint(0, model.config.vocab_size, (64,), generator=torch.Generator().manual_seed(0)).tolist()
    generate_spd(target, drafter, prompt, 4, shape=shape)  # warm-up
    drafter.passes = drafter.pass_rows = 0
    m = generate_spd(target, drafter, prompt, tokens, shape=shape).metrics
    return {"shape": [shape.budget, shape.depth, shape.topk], "stages": len(cfg["stage_sizes"]),
            "s_per_pass": m.phase_s["draft"] / drafter.passes, "rows_per_pass": drafter.pass_rows / drafter.passes,
            "bookkeeping_s_per_cycle": m.phase_s["bookkeeping"] / m.cycles}


def load_target(model_name: str, dtype: str, device: str):
    """The model and its one-stage StagedTarget, without a tokenizer: what the timings run."""
    from ..runtime.models import load_model
    from ..runtime.staged import StagedTarget

    model, _ = load_model(model_name, dtype, device, tokenizer=False)
    return model, StagedTarget(model)


def _concurrent(rank: int, model_name: str, dtype: str, rows, contexts, reps: int, barrier, results, done) -> None:
    """Rank 0 times the target with one thread while rank 1 decodes without a pause beside it."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.set_num_threads(1)
    _, target = load_target(model_name, dtype, "cpu")
    barrier.wait()
    if rank == 0:
        results.put(time_target(target, rows, contexts, reps))
        done.set()
        return
    with torch.inference_mode():
        context = max(contexts)
        prime(target, context)
        one = torch.tensor([[1]])
        owner = multiprocessing.parent_process()  # a neighbour whose owner was killed stops too
        while not done.is_set() and owner.is_alive():  # a busy neighbour: decode step after decode step
            target.rollback(context)
            target.logits(target.forward(one, context)[:, -1])


def time_concurrent(model_name: str, dtype: str, rows=ROWS, contexts=CONTEXTS, reps: int = 5) -> dict:
    """The target's costs with one thread while a second process decodes on the other core without
    a pause (what each rank of a two-process pipeline on a 2-core CPU meets while the other rank
    works: they share the memory bandwidth)."""
    from ..runtime.processes import process_context

    ctx = process_context(__name__)
    barrier, results, done = ctx.Barrier(2), ctx.Queue(), ctx.Event()
    procs = [ctx.Process(target=_concurrent, args=(r, model_name, dtype, rows, contexts, reps, barrier, results, done))
             for r in range(2)]
    for p in procs:
        p.start()
    try:
        return results.get(timeout=600)
    finally:
        done.set()
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()


def _pingpong(rank: int, port: int, sizes, reps: int, backend: str, results) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group(backend, rank=rank, world_size=2)
    device = f"cuda:{rank}" if backend == "nccl" else "cpu"
    out = {}
    for n in sizes:
        buf = torch.zeros(n, dtype=torch.float32, device=device)
        times = []
        for i in range(reps + 2):
            t0 = time.perf_counter()
            if rank == 0:
                dist.send(buf, 1)
                dist.recv(buf, 1)
            else:
                dist.recv(buf, 0)
                dist.send(buf, 0)
            if i >= 2:  # the first two set the connection up
                times.append(time.perf_counter() - t0)
        out[n] = statistics.median(times) / 2  # one way
    out["message"] = _message_pingpong(rank, device, reps)
    if rank == 0:
        results.put(out)
    dist.barrier()
    dist.destroy_process_group()


def _message_pingpong(rank: int, device: str, reps: int) -> tuple[float, float]:
    """One way of an engine message (distributed.comm: header, a slot's plan, 8 rows of hidden
    states; each part its own send) and its report back: what a pipeline pays per hop; and what
    posting a message costs its sender."""
    from ..distributed.comm import REPORT, SLOT, TAG_FORWARD, TAG_TO_ROOT, Link, Message

    link = Link(rank, 2, torch.device(device), torch.bfloat16)
    rows = torch.zeros(8, 576)
    times, sends = [], []
    for i in range(reps + 2):
        t0 = time.perf_counter()
        if rank == 0:
            link.send(1, Message(SLOT, i, rows, list(range(64))), TAG_FORWARD)
            sends.append(time.perf_counter() - t0)
            link.recv(1, TAG_TO_ROOT)
        else:
            link.recv(0, TAG_FORWARD)
            link.send(0, Message(REPORT, i, rows, list(range(8))), TAG_TO_ROOT)
        link.end_cycle()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    link.flush()
    return statistics.median(times) / 2, statistics.median(sends[2:]) if sends else 0.0


def time_link(backend: str = "gloo", reps: int = 20) -> dict:
    """One-way latency (a 1 KiB message) and bandwidth (from a 4 MiB one) between two local processes."""
    import socket

    from ..runtime.processes import process_context

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    small, big = 256, 1 << 20  # float32 elements: 1 KiB, 4 MiB
    ctx = process_context(__name__)
    results = ctx.Queue()
    procs = [ctx.Process(target=_pingpong, args=(r, port, (small, big), reps, backend, results)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        one_way = results.get(timeout=300)
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
    latency = one_way[small]
    message, send = one_way["message"]
    return {"backend": backend, "latency_s": latency,
            "bandwidth_bytes_per_s": 4 * big / max(one_way[big] - latency, 1e-9), "message_s": message, "send_s": send}
