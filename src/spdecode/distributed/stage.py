"""Ranks 1..n-1 of distributed SPD: run one stage on what the previous rank sent, pass it on,
report to rank 0; the last rank also runs the LM head and verifies (see root.py for the protocol).
"""

from __future__ import annotations

from collections import defaultdict

import torch

from ..runtime import trace
from ..runtime.errors import SpdError
from ..runtime.metrics import Clock
from ..runtime.sampling import Sampler, SamplingParams
from ..runtime.staged import StagedTarget
from ..runtime.verify import target_choices
from .comm import END, NONE, PREFILL, REPORT, SHUTDOWN, SLOT, TAG_FORWARD, TAG_TO_ROOT, Link, Message, unpack_plan

# A stage rank's timer laps (their codes in a trace). A slot's work is timed part by part: `plan`
# (unpack the plan, compact the cache), `layers`, `head` (the last rank's LM head and choices) and
# `post` (posting the report and the slot on); the prefill's is `compute`.
PHASES = ("other", "wait", "compute", "send", "plan", "layers", "head", "post")
WORK = ("compute", "plan", "layers", "head", "post")
# What a rank reports at a request's END: seconds per phase, then the slots it ran and their rows.
STAGE_STATS = PHASES + ("slots", "rows")


def _float_bits(x: float) -> int:
    return int(torch.tensor([x], dtype=torch.float64).view(torch.int64)[0])


def _bits_float(b: int) -> float:
    return float(torch.tensor([b], dtype=torch.int64).view(torch.float64)[0])


def sampling_vector(s: SamplingParams, max_positions: int = 0) -> torch.Tensor:
    """A request's sampling parameters, exactly, as an int64 vector (the PREFILL message's extra):
    [temperature and top_p as float64 bits, top_k, seed kind (0 none, 1 int64, 2 wrapped uint64), seed,
    max_positions]. `max_positions` (0: not given) is how many positions every rank reserves in its
    KV cache at prefill (generation.first_reservation)."""
    seed, kind = (0, 0) if s.seed is None else (int(s.seed), 1)
    if kind and not -2**63 <= seed < 2**64:
        raise SpdError(f"seed {seed} is out of range (a 64-bit integer)")
    if seed >= 2**63:
        seed, kind = seed - 2**64, 2
    return torch.tensor([_float_bits(s.temperature), int(s.top_k), _float_bits(s.top_p), kind, seed,
                         int(max_positions)], dtype=torch.int64)


def sampling_from(v: torch.Tensor) -> SamplingParams:
    """Inverse of sampling_vector."""
    return request_from(v)[0]


def request_from(v: torch.Tensor) -> tuple[SamplingParams, int]:
    """(sampling parameters, max_positions or 0) of a PREFILL message's extra."""
    t, k, p, kind, seed, *rest = v.tolist()
    seed = None if kind == 0 else seed + (2**64 if kind == 2 else 0)
    return SamplingParams(_bits_float(t), int(k), _bits_float(p), seed), int(rest[0]) if rest else 0


def serve_stage(target: StagedTarget, link: Link, stage: int) -> None:
    """Loop of a rank s >= 1 until SHUTDOWN: prefill, cycles, and an END ack after each request.

    At prefill the rank reserves its KV cache for the positions rank 0 names in the PREFILL message
    (the prompt, the answer's first positions and the drafts in flight); it grows past them only
    for a long answer.
    Each SLOT message carries a plan (comm.pack_plan): the compaction to apply first (what the
    verdicts since the previous slot left alive), then where the slot's rows go and what they see.
    """
    last = stage == target.n_stages - 1
    sampler, timer, counts = None, Clock(defaultdict(float)), defaultdict(int)

    def report(msg: Message) -> None:
        link.send(0, msg, TAG_TO_ROOT)

    def forward(msg: Message) -> None:
        if not last:
            link.send(stage + 1, msg, TAG_FORWARD)

    while True:
        timer.lap("other")
        msg = link.recv(stage - 1, TAG_FORWARD)
        timer.lap("wait")
        if msg.kind == SHUTDOWN:
            forward(Message(SHUTDOWN))
            link.flush()
            return
        if msg.kind in (END, NONE):
            forward(Message(msg.kind))
            if msg.kind == END:  # the request is over: acknowledge with this rank's timers (and trace)
                spans = trace.spans()
                stats = [timer.phases[k] for k in PHASES] + [counts["slots"], counts["rows"]]
                report(Message(END, payload=torch.tensor([stats], dtype=torch.float64),
                               meta=[PHASES.index(n) for n, _, _ in spans] or None,
                               extra=torch.tensor([t for _, t0, t1 in spans for t in (t0, t1)],
                                                  dtype=torch.float64) if spans else None))
                timer.phases.clear()
                counts.clear()
                if trace.active():
                    trace.start(stage, f"rank {stage}")  # the next request's spans only
            else:
                report(Message(NONE))
            link.end_cycle()
            timer.lap("send")
            continue
        with torch.inference_mode():
            if msg.kind == PREFILL:
                params, positions = request_from(msg.extra)
                sampler = Sampler(params, target.device)
                target.rollback(0, stage)
                prompt = msg.payload.shape[0]
                target.reserve(min(max(positions, prompt + 1), target.context_length))
                h = target.run_stage(stage, msg.payload[None], 0)
                timer.lap("compute")
                if last:
                    report(Message(REPORT, 0, payload=h[0], meta=[sampler.choose(target.logits(h[:, -1])[0])]))
                else:
                    forward(Message(PREFILL, payload=h[0], extra=msg.extra))
                    report(Message(REPORT, 0, payload=h[0]))
                    forward(Message(NONE))  # primes the next rank: in cycle c it consumes our cycle c-1
            elif msg.kind == SLOT:
                plan = unpack_plan(msg.meta, msg.extra)
                target.compact(plan.compaction, stage)
                timer.lap("plan")
                h = msg.payload
                if plan.layout.rows:
                    h = target.run_stage_chunk(stage, msg.payload[None], plan.layout)[0]
                    counts["slots"] += 1
                    counts["rows"] += plan.layout.rows
                timer.lap("layers")
                if last:
                    choices = target_choices(target.logits(h[None])[0], sampler, plan.successors) \
                        if plan.layout.rows else []
                    timer.lap("head")
                    report(Message(REPORT, msg.slot, payload=h, meta=choices))
                else:
                    forward(Message(SLOT, msg.slot, payload=h, meta=msg.meta, extra=msg.extra))
                    report(Message(REPORT, msg.slot, payload=h))
                timer.lap("post")
            else:
                raise SpdError(f"protocol error: rank {stage} got a message of kind {msg.kind}")
        link.end_cycle()
        timer.lap("send")
