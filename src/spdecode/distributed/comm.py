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

Header fields: kind, epoch, position, token, successor token, payload rows and columns, flag, extra
length, extra dtype.
The epoch counts rollbacks: a rank that receives a newer epoch rolls its cache back to the
message's position; rank 0 ignores anything from an older epoch (stale work of flushed tokens).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..runtime.errors import SpdError

NONE, TOKEN, PREFILL, VERDICT, END, SHUTDOWN = range(6)
HEADER = 10
TAG_FORWARD, TAG_TO_ROOT = 1, 2
# dtypes an `extra` tensor may travel in, by wire code
EXTRA_DTYPES = [torch.float32, torch.float64, torch.int64, torch.bfloat16, torch.float16]


@dataclass
class Message:
    kind: int
    epoch: int = 0
    pos: int = 0
    token: int = -1
    successor: int = -1
    flag: int = 0
    payload: torch.Tensor | None = None  # [rows, width]
    extra: torch.Tensor | None = None  # e.g. the successor draft's distribution q when sampling


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

    def send(self, dst: int, msg: Message, tag: int) -> None:
        rows = 0 if msg.payload is None else msg.payload.shape[0]
        cols = 0 if msg.payload is None else msg.payload.reshape(rows, -1).shape[1]
        extra = 0 if msg.extra is None else msg.extra.numel()
        code = 0
        if extra:
            if msg.extra.dtype not in EXTRA_DTYPES:
                raise SpdError(f"a message's extra tensor cannot travel as {msg.extra.dtype}")
            code = EXTRA_DTYPES.index(msg.extra.dtype)
        head = torch.tensor([msg.kind, msg.epoch, msg.pos, msg.token, msg.successor, rows, cols, msg.flag, extra,
                             code], dtype=torch.long)
        parts = [head.to(self.device)]
        if rows:
            parts.append(msg.payload.reshape(rows, -1).to(self.device, self.dtype).contiguous())
        if extra:
            parts.append(msg.extra.reshape(-1).to(self.device).contiguous())
        for t in parts:
            self.pending.append((self.transport.isend(t, dst, tag), t))

    def recv(self, src: int, tag: int) -> Message:
        head = torch.empty(HEADER, dtype=torch.long, device=self.device)
        self._recv(head, src, tag)
        kind, epoch, pos, token, successor, rows, cols, flag, extra, code = head.tolist()
        msg = Message(kind, epoch, pos, token, successor, flag)
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
