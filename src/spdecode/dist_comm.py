"""Point-to-point messages between pipeline ranks (torch.distributed: gloo on CPU, NCCL on GPU).

A message is an int64 header and, when it carries rows, a float payload [rows, width]. Sends are
non-blocking (isend) and waited for once per cycle, so two ranks sending to each other never
deadlock; receives block, with the process group's timeout, and a failure names the peer rank.

Header fields: kind, epoch, position, token, successor token, payload rows and columns, flag, extra length.
The epoch counts rollbacks: a rank that receives a newer epoch rolls its cache back to the
message's position; rank 0 ignores anything from an older epoch (stale work of flushed tokens).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import SpdError

NONE, TOKEN, PREFILL, VERDICT, END, SHUTDOWN, STATS = range(7)
HEADER = 9
TAG_FORWARD, TAG_TO_ROOT = 1, 2


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


class Link:
    """One rank's endpoints: pending sends, blocking receives, per-phase timers."""

    def __init__(self, rank: int, world: int, device, dtype):
        self.rank, self.world = rank, world
        self.device, self.dtype = device, dtype
        self.pending: list = []  # (work, tensor) of this cycle's sends; tensors must outlive them
        self.previous: list = []  # last cycle's sends

    def send(self, dst: int, msg: Message, tag: int) -> None:
        rows = 0 if msg.payload is None else msg.payload.shape[0]
        cols = 0 if msg.payload is None else msg.payload.reshape(rows, -1).shape[1]
        extra = 0 if msg.extra is None else msg.extra.numel()
        head = torch.tensor([msg.kind, msg.epoch, msg.pos, msg.token, msg.successor, rows, cols, msg.flag, extra],
                            dtype=torch.long)
        parts = [head.to(self.device)]
        if rows:
            parts.append(msg.payload.reshape(rows, -1).to(self.dtype).contiguous())
        if extra:
            parts.append(msg.extra.reshape(-1).float().contiguous())
        for t in parts:
            self.pending.append((dist.isend(t, dst, tag=tag), t))

    def recv(self, src: int, tag: int) -> Message:
        head = torch.empty(HEADER, dtype=torch.long, device=self.device)
        self._recv(head, src, tag)
        kind, epoch, pos, token, successor, rows, cols, flag, extra = head.tolist()
        msg = Message(kind, epoch, pos, token, successor, flag)
        if rows:
            msg.payload = torch.empty(rows, cols, dtype=self.dtype, device=self.device)
            self._recv(msg.payload, src, tag)
        if extra:
            msg.extra = torch.empty(extra, dtype=torch.float, device=self.device)
            self._recv(msg.extra, src, tag)
        return msg

    def _recv(self, t: torch.Tensor, src: int, tag: int) -> None:
        try:
            dist.recv(t, src, tag=tag)
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
