"""Point-to-point messages between pipeline ranks (torch.distributed: gloo on CPU, NCCL on GPU).

A message is an int64 header and, when it carries rows, a float payload [rows, width], then an
optional flat `extra` tensor that keeps its dtype (float32 draft distributions, int64 sampling
parameters). Sends are non-blocking (isend) and waited for once per cycle; receives block, with
the process group's timeout, and a failure names the peer rank.

Both directions of a rank pair share one NCCL stream, and a send completes only once the peer
has posted the matching receive: two ranks that each send and then receive from the other
deadlock there (gloo's buffered sends hide it). Every pair must post its operations in the same
order on both sides. The point-to-point primitives go through a transport object (default:
torch.distributed), so that tests can run ranks as threads under NCCL-like ordering rules.

Header fields: kind, slot index, payload rows and columns, meta length, extra length, extra dtype.
`meta` is an int64 vector: a slot's plan (`pack_plan`: the compaction to apply before it, where
its rows go and what they see, and which rows carry a sampled child) on the way down, the
target's choices on the way back to rank 0.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..runtime.cache_layout import ChunkLayout, Compaction
from ..runtime.errors import SpdError

NONE, SLOT, PREFILL, REPORT, END, SHUTDOWN = range(6)
HEADER = 7
TAG_FORWARD, TAG_TO_ROOT = 1, 2
# dtypes an `extra` tensor may travel in, by wire code
EXTRA_DTYPES = [torch.float32, torch.float64, torch.int64, torch.bfloat16, torch.float16]


@dataclass
class Message:
    kind: int
    slot: int = 0  # the slot the message is about (its entry cycle)
    payload: torch.Tensor | None = None  # [rows, width]: hidden states of the slot's rows
    meta: list[int] | None = None  # a plan (pack_plan) or the target's choices
    extra: torch.Tensor | None = None  # e.g. sampled children's distributions q, sampling parameters


def pack_plan(slot) -> tuple[list[int], torch.Tensor | None]:
    """(meta, extra) of a slot leaving stage 0 (methods.schedule.Slot): its compaction, its
    layout, and the rows whose only child was sampled (each with the child's token; the children's
    q stacked in extra)."""
    c, lay = slot.compaction, slot.layout
    succ = [(k, d) for k, d in enumerate(slot.successors) if d is not None and d.q is not None]
    meta = [c.dst, c.length, len(c.src), *c.src, lay.start, lay.committed, len(lay.positions), *lay.positions,
            lay.rows, *(int(v) for row in lay.visible for v in row), len(succ), *(k for k, _ in succ),
            *(d.token for _, d in succ)]
    extra = torch.stack([d.q.float() for _, d in succ]) if succ else None
    return meta, extra


@dataclass(frozen=True)
class Plan:
    """What a rank >= 1 does with a slot: apply `compaction`, run the rows at `layout`; the last
    rank verifies with `successors` (per row: a Draft of its sampled child, or None)."""

    compaction: Compaction
    layout: ChunkLayout
    successors: list


def unpack_plan(meta: list[int], extra: torch.Tensor | None) -> Plan:
    from ..runtime.verify import Draft

    it = iter(meta)

    def take(k):
        return [next(it) for _ in range(k)]

    dst, length, n_src = take(3)
    src = tuple(take(n_src))
    start, committed, n_keys = take(3)
    positions = tuple(take(n_keys))
    (q,) = take(1)
    flat = take(q * n_keys)
    visible = tuple(tuple(bool(v) for v in flat[i * n_keys:(i + 1) * n_keys]) for i in range(q))
    (n_succ,) = take(1)
    rows, tokens = take(n_succ), take(n_succ)
    successors: list = [None] * q
    if n_succ:
        extra = extra.reshape(n_succ, -1)
    for i, (k, t) in enumerate(zip(rows, tokens, strict=True)):
        successors[k] = Draft(t, extra[i])
    return Plan(Compaction(dst, src, length), ChunkLayout(start, committed, positions, visible), successors)


class TorchTransport:
    """Point-to-point primitives of the default process group (gloo or NCCL)."""

    def isend(self, tensor: torch.Tensor, dst: int, tag: int):
        """Start sending; returns a work object whose wait() blocks until the send completed."""
        return dist.isend(tensor, dst, tag=tag)

    def recv(self, tensor: torch.Tensor, src: int, tag: int) -> None:
        """Receive into `tensor`, blocking."""
        dist.recv(tensor, src, tag=tag)


class Link:
    """One rank's endpoints: pending sends, blocking receives, per-phase timers."""

    def __init__(self, rank: int, world: int, device, dtype, transport=None):
        self.rank, self.world = rank, world
        self.device, self.dtype = device, dtype
        self.transport = transport if transport is not None else TorchTransport()
        self.pending: list = []  # (work, tensor) of this cycle's sends; tensors must outlive them
        self.previous: list = []  # last cycle's sends
        self.last_send = time.monotonic()  # when this rank last sent: a server's heartbeat counts from it

    def send(self, dst: int, msg: Message, tag: int) -> None:
        if msg.payload is not None and msg.payload.shape[0] == 0:
            msg.payload = None  # no rows: nothing to send
        rows = 0 if msg.payload is None else msg.payload.shape[0]
        cols = 0 if msg.payload is None else msg.payload.reshape(rows, -1).shape[1]
        meta = msg.meta or []
        extra = 0 if msg.extra is None else msg.extra.numel()
        code = 0
        if extra:
            if msg.extra.dtype not in EXTRA_DTYPES:
                raise SpdError(f"a message's extra tensor cannot travel as {msg.extra.dtype}")
            code = EXTRA_DTYPES.index(msg.extra.dtype)
        head = torch.tensor([msg.kind, msg.slot, rows, cols, len(meta), extra, code], dtype=torch.long)
        parts = [head.to(self.device)]
        if meta:
            parts.append(torch.tensor(meta, dtype=torch.long, device=self.device))
        if rows:
            parts.append(msg.payload.reshape(rows, -1).to(self.device, self.dtype).contiguous())
        if extra:
            parts.append(msg.extra.reshape(-1).to(self.device).contiguous())
        for t in parts:
            self.pending.append((self.transport.isend(t, dst, tag), t))
        self.last_send = time.monotonic()

    def recv(self, src: int, tag: int) -> Message:
        head = torch.empty(HEADER, dtype=torch.long, device=self.device)
        self._recv(head, src, tag)
        kind, slot, rows, cols, n_meta, extra, code = head.tolist()
        msg = Message(kind, slot)
        if n_meta:
            meta = torch.empty(n_meta, dtype=torch.long, device=self.device)
            self._recv(meta, src, tag)
            msg.meta = meta.tolist()
        if rows:
            msg.payload = torch.empty(rows, cols, dtype=self.dtype, device=self.device)
            self._recv(msg.payload, src, tag)
        if extra:
            msg.extra = torch.empty(extra, dtype=EXTRA_DTYPES[code], device=self.device)
            self._recv(msg.extra, src, tag)
        return msg

    def _recv(self, t: torch.Tensor, src: int, tag: int) -> None:
        try:
            self.transport.recv(t, src, tag)
        except Exception as exc:  # gloo/NCCL report a dead or hung peer as a generic RuntimeError
            raise SpdError(f"rank {src} (stage {src}) failed, hung or disconnected while rank {self.rank} "
                           f"waited for it: {str(exc).splitlines()[0][:200]}") from exc

    def end_cycle(self) -> None:
        """Wait for the previous cycle's sends, not this one's: a rank can start its next cycle while its
        latest messages are still on their way (a peer takes them when it gets to its receive)."""
        self._wait(self.previous)
        self.previous, self.pending = self.pending, []

    def flush(self) -> None:
        """Wait for every pending send (end of a request, shutdown)."""
        self._wait(self.previous)
        self._wait(self.pending)
        self.previous, self.pending = [], []

    def _wait(self, works) -> None:
        for w, _ in works:
            try:
                w.wait()
            except Exception as exc:
                raise SpdError(f"rank {self.rank}: a send failed, a peer is gone: "
                               f"{str(exc).splitlines()[0][:200]}") from exc
