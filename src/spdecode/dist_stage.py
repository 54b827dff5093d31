"""Ranks 1..n-1 of distributed SPD: run one stage on what the previous rank sent, pass it on,
report to rank 0; the last rank also runs the LM head and verifies (see dist_spd.py for the protocol).
"""

from __future__ import annotations

from collections import defaultdict

import torch

from .dist_comm import END, NONE, PREFILL, SHUTDOWN, TAG_FORWARD, TAG_TO_ROOT, TOKEN, VERDICT, Link, Message
from .sampling import Sampler, SamplingParams
from .spd import Clock
from .staged import StagedTarget
from .verify import Draft, verify


def sampling_vector(s: SamplingParams) -> torch.Tensor:
    return torch.tensor([s.temperature, s.top_k, s.top_p, -1 if s.seed is None else s.seed], dtype=torch.float)


def sampling_from(v: torch.Tensor) -> SamplingParams:
    t, k, p, seed = v.tolist()
    return SamplingParams(t, int(k), p, None if seed < 0 else int(seed))


def serve_stage(target: StagedTarget, link: Link, stage: int) -> None:
    """Loop of a rank s >= 1 until SHUTDOWN: prefill, cycles, and an END ack after each request."""
    last = stage == target.n_stages - 1
    epoch, sampler, timer = 0, None, Clock(defaultdict(float))

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
            if msg.kind == END:  # the request is over: acknowledge with this rank's timers
                report(Message(END, payload=torch.tensor([[timer.phases[k] for k in ("compute", "wait", "send")]])))
                timer.phases.clear()
            else:
                report(Message(NONE))
            link.end_cycle()
            timer.lap("send")
            continue
        with torch.inference_mode():
            if msg.kind == PREFILL:
                epoch, sampler = msg.epoch, Sampler(sampling_from(msg.extra))
                target.rollback(0)
                target.reserve(msg.payload.shape[0] + 1)
                h = target.run_stage(stage, msg.payload[None], 0)
                timer.lap("compute")
                if last:
                    y0 = sampler.choose(target.logits(h[:, -1])[0])
                    report(Message(VERDICT, epoch, 0, token=y0, payload=h[0]))
                else:
                    forward(Message(PREFILL, epoch, payload=h[0], extra=msg.extra))
                    report(Message(TOKEN, epoch, 0, payload=h[0]))
                    forward(Message(NONE))  # primes the next rank: in cycle c it consumes our cycle c-1
            else:
                if msg.epoch != epoch:  # first token after a rejection: drop the flushed positions
                    target.rollback(msg.pos)
                    epoch = msg.epoch
                h = target.run_stage(stage, msg.payload[None], msg.pos)
                if last:
                    draft = Draft(msg.successor, msg.extra)
                    accepted, token = verify(target.logits(h)[0, -1], draft, sampler)
                    report(Message(VERDICT, epoch, msg.pos, token=token, flag=int(accepted), payload=h[0]))
                else:
                    forward(Message(TOKEN, epoch, msg.pos, msg.token, msg.successor, payload=h[0], extra=msg.extra))
                    report(Message(TOKEN, epoch, msg.pos, payload=h[0]))
                timer.lap("compute")
        link.end_cycle()
        timer.lap("send")
