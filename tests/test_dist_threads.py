"""Distributed SPD with ranks as threads of one process, over a transport with NCCL's ordering rules.

NCCL runs both directions of a rank pair on one stream, in the order each rank posted its
operations, and a send completes only once the peer's matching receive is at the head of the
peer's queue for that pair. gloo buffers sends, so a protocol that deadlocks under NCCL can pass
every gloo test; `Rendezvous` makes such a deadlock show here, on CPU, as a timeout.
"""

from __future__ import annotations

import threading
from collections import deque

import pytest
import torch
from conftest import tiny_model
from oracles import ReferenceDrafter

from spdecode.distributed.comm import NONE, PREFILL, REPORT, SLOT, TAG_FORWARD, TAG_TO_ROOT, Link, Message
from spdecode.distributed.root import RootRank
from spdecode.distributed.stage import sampling_from, sampling_vector, serve_stage
from spdecode.methods.ar import generate_ar
from spdecode.methods.spd_core import TreeShape
from spdecode.runtime.errors import SpdError
from spdecode.runtime.sampling import GREEDY, SamplingParams
from spdecode.runtime.staged import StagedTarget

EOS = {2}


class DeadlockError(RuntimeError):
    pass


class _Op:
    def __init__(self, kind, tensor, tag):
        self.kind, self.tensor, self.tag = kind, tensor, tag
        self.done, self.error = False, None


class Rendezvous:
    """The fabric shared by the rank threads.

    nccl=True: per rank pair, one FIFO of posted operations per side. The head operations of the
    two sides complete together when one is a send and the other the matching receive (same tag,
    shape and dtype); two sends (or two receives) at the heads never complete.
    nccl=False (gloo-like): a send completes at once (buffered); receives take a peer's sends in order.
    Any wait longer than `timeout` seconds raises DeadlockError, and from then on every wait raises
    at once, so that all threads end.
    """

    def __init__(self, timeout: float = 30.0, nccl: bool = True):
        self.timeout, self.nccl = timeout, nccl
        self.cv = threading.Condition()
        self.queues: dict[tuple, deque] = {}  # (rank, peer[, kind]) -> that rank's pending ops towards peer
        self.failed: Exception | None = None

    def endpoint(self, rank: int) -> RendezvousTransport:
        return RendezvousTransport(self, rank)

    def _queue(self, rank: int, peer: int, kind: str) -> deque:
        return self.queues.setdefault((rank, peer) if self.nccl else (rank, peer, kind), deque())

    def post(self, rank: int, peer: int, op: _Op) -> _Op:
        with self.cv:
            if not self.nccl and op.kind == "send":
                op.tensor, op.done = op.tensor.clone(), True
            self._queue(rank, peer, op.kind).append(op)
            for a, b in ((rank, peer), (peer, rank)):  # sends from a, receives at b
                self._match(self._queue(a, b, "send"), self._queue(b, a, "recv"))
        return op

    def _match(self, qa: deque, qb: deque) -> None:
        while qa and qb and qa[0].kind != qb[0].kind:
            x, y = qa.popleft(), qb.popleft()
            send, recv = (x, y) if x.kind == "send" else (y, x)
            if (send.tag, send.tensor.shape, send.tensor.dtype) != (recv.tag, recv.tensor.shape, recv.tensor.dtype):
                err = RuntimeError(f"mismatched pair: send {send.tag} {tuple(send.tensor.shape)} {send.tensor.dtype}"
                                   f" vs recv {recv.tag} {tuple(recv.tensor.shape)} {recv.tensor.dtype}")
                send.error = recv.error = err
            else:
                with torch.inference_mode():
                    recv.tensor.copy_(send.tensor)
            send.done = recv.done = True
            self.cv.notify_all()

    def wait(self, op: _Op) -> None:
        with self.cv:
            if not self.cv.wait_for(lambda: op.done or self.failed is not None, self.timeout):
                heads = {k: q[0].kind for k, q in self.queues.items() if q}
                self.failed = DeadlockError(f"no progress for {self.timeout} s; heads (rank, peer) -> op: {heads}")
                self.cv.notify_all()
            if op.error is not None:
                raise op.error
            if not op.done:
                raise self.failed


class _Work:
    def __init__(self, fabric: Rendezvous, op: _Op):
        self.fabric, self.op = fabric, op

    def wait(self) -> None:
        self.fabric.wait(self.op)


class RendezvousTransport:
    """One rank's view of the fabric, with the interface Link expects of a transport."""

    def __init__(self, fabric: Rendezvous, rank: int):
        self.fabric, self.rank = fabric, rank

    def isend(self, tensor: torch.Tensor, dst: int, tag: int) -> _Work:
        return _Work(self.fabric, self.fabric.post(self.rank, dst, _Op("send", tensor, tag)))

    def recv(self, tensor: torch.Tensor, src: int, tag: int) -> None:
        self.fabric.wait(self.fabric.post(self.rank, src, _Op("recv", tensor, tag)))


def run_threads(fns: dict[int, object], limit: float = 120.0) -> dict[int, object]:
    """Run fns[rank]() on one thread per rank; return their results, or re-raise the first exception."""
    results, errors = {}, {}

    def body(rank, fn):
        try:
            results[rank] = fn()
        except BaseException as exc:  # noqa: B036 - reported to the test thread
            errors[rank] = exc

    threads = [threading.Thread(target=body, args=(r, fn), daemon=True) for r, fn in fns.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(limit)
    assert not any(t.is_alive() for t in threads), f"rank threads still running after {limit} s"
    if errors:
        raise errors[min(errors)]
    return results


def serve(model, sizes, fabric, rank, **kw):
    """A rank >= 1: its own StagedTarget over the shared model; returns the target (to inspect its cache)."""
    target = StagedTarget(model, sizes, **kw)
    serve_stage(target, Link(rank, len(sizes), "cpu", target.dtype, fabric.endpoint(rank)), rank)
    return target


def prompts(count, seed=5):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 97, (6,), generator=g).tolist() for _ in range(count)]


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


@pytest.mark.parametrize("shape", [TreeShape(), TreeShape(6, 3, 2)], ids=["one node per slot", "trees"])
@pytest.mark.parametrize("sizes", [[3, 3], [2, 2, 2], [2, 1, 2, 1]])
def test_rank_pair_exchange_cannot_deadlock_under_nccl_ordering(model, sizes, shape):
    """RootRank and serve_stage, three requests and a shutdown, under NCCL ordering: no deadlock,
    greedy tokens equal AR's, and drafts were both accepted and rejected (rollbacks crossed ranks)."""
    n, reqs, max_new = len(sizes), prompts(3), 24
    refs = [generate_ar(StagedTarget(model), p, max_new, eos=EOS).tokens for p in reqs]
    fabric = Rendezvous()

    def root():
        target = StagedTarget(model, sizes)
        rr = RootRank(target, ReferenceDrafter(reqs[0], refs[0], 97), Link(0, n, "cpu", target.dtype,
                                                                              fabric.endpoint(0)))
        out = []
        for i, (p, ref) in enumerate(zip(reqs, refs, strict=True)):
            rr.drafter = ReferenceDrafter(p, ref, 97, accuracy=0.6, seed=i, branches=2)
            out.append(rr.generate(p, max_new, GREEDY, EOS, shape=shape))
            assert len(rr.rank_stats) == n - 1  # every rank acknowledged the request's END
        rr.shutdown()
        return out

    fns = {0: root, **{r: (lambda r=r: serve(model, sizes, fabric, r)) for r in range(1, n)}}
    gens = run_threads(fns)[0]
    assert [g.tokens for g in gens] == refs
    verified = sum(g.metrics.drafts_verified for g in gens)
    accepted = sum(g.metrics.drafts_accepted for g in gens)
    assert 0 < accepted < verified


def test_rendezvous_shim_detects_the_old_send_before_receive_order():
    """The shim has power: rank 0 in the old order (send PREFILL, send NONE, then take rank 1's report)
    against rank 1 (receive, send its report, receive) deadlocks under NCCL's rules, and times out here."""
    fabric = Rendezvous(timeout=2.0)
    h = torch.zeros(3, 4)

    def old_root():
        link = Link(0, 2, "cpu", torch.float32, fabric.endpoint(0))
        link.send(1, Message(PREFILL, 1, payload=h, extra=sampling_vector(GREEDY)), TAG_FORWARD)
        link.send(1, Message(NONE), TAG_FORWARD)
        link.recv(1, TAG_TO_ROOT)
        link.flush()

    def rank1():
        link = Link(1, 2, "cpu", torch.float32, fabric.endpoint(1))
        link.recv(0, TAG_FORWARD)
        link.send(0, Message(REPORT, 1, payload=h), TAG_TO_ROOT)
        link.recv(0, TAG_FORWARD)
        link.flush()

    with pytest.raises(SpdError) as info:
        run_threads({0: old_root, 1: rank1}, limit=30)
    assert isinstance(info.value.__cause__, DeadlockError)

    # The same exchange with rank 0 taking the report before its next send completes.
    fabric = Rendezvous(timeout=2.0)

    def new_root():
        link = Link(0, 2, "cpu", torch.float32, fabric.endpoint(0))
        link.send(1, Message(PREFILL, 1, payload=h, extra=sampling_vector(GREEDY)), TAG_FORWARD)
        link.recv(1, TAG_TO_ROOT)
        link.send(1, Message(NONE), TAG_FORWARD)
        link.flush()

    run_threads({0: new_root, 1: rank1}, limit=30)


@pytest.mark.parametrize("seed", [None, 0, 2**24 + 1, 2**40 + 3, 2**63 + 5])
def test_sampling_seed_above_2_24_travels_exactly(seed):
    """Sampling parameters reach the other ranks exactly: the seed (float32 held only 24 bits),
    temperature and top_p, through sampling_vector / sampling_from and through Link's wire format."""
    s = SamplingParams(0.7, 13, 0.9, seed)
    assert sampling_from(sampling_vector(s)) == s
    fabric = Rendezvous(timeout=5.0)
    q = torch.softmax(torch.randn(97, dtype=torch.float32), -1)

    def sender():
        link = Link(0, 2, "cpu", torch.float32, fabric.endpoint(0))
        link.send(1, Message(PREFILL, 1, payload=torch.zeros(3, 4), extra=sampling_vector(s)), TAG_FORWARD)
        link.send(1, Message(SLOT, 3, payload=torch.zeros(1, 4), meta=[5, 6, 2**40], extra=q), TAG_FORWARD)
        link.flush()

    def receiver():
        link = Link(1, 2, "cpu", torch.float32, fabric.endpoint(1))
        return link.recv(0, TAG_FORWARD), link.recv(0, TAG_FORWARD)

    prefill, token = run_threads({0: sender, 1: receiver})[1]
    assert sampling_from(prefill.extra) == s
    assert token.extra.dtype == torch.float32 and torch.equal(token.extra, q)  # a draft's q keeps its dtype
    assert token.slot == 3 and token.meta == [5, 6, 2**40]


def test_stage_kv_cache_never_grows_after_prefill(model):
    """Ranks >= 1 reserved only prompt + 1 positions and grew their cache (allocate and copy) while
    decoding; now they reserve prompt + max_new_tokens + n_stages once, at prefill."""
    sizes, p, max_new = [2, 2, 2], prompts(1)[0], 120
    n = len(sizes)
    fabric, grown = Rendezvous(nccl=False), []  # gloo's rules: this test is about the cache, not the order

    def stage(rank):
        target = StagedTarget(model, sizes, capacity=4)
        cache, reserving = target.cache, []
        ensure, reserve = cache.ensure_capacity, target.reserve

        def watched_ensure(k):
            before = cache.capacity
            ensure(k)
            if cache.capacity != before and not reserving:
                grown.append((rank, before, cache.capacity))

        def watched_reserve(k):
            reserving.append(k)
            try:
                reserve(k)
            finally:
                reserving.pop()

        cache.ensure_capacity, target.reserve = watched_ensure, watched_reserve
        link = Link(rank, n, "cpu", target.dtype, fabric.endpoint(rank))
        serve_stage(target, link, rank)
        return cache.capacity

    def root():
        target = StagedTarget(model, sizes)
        rr = RootRank(target, ReferenceDrafter(p, [], 97, accuracy=0.0), Link(0, n, "cpu", target.dtype,
                                                                                 fabric.endpoint(0)))
        gen = rr.generate(p, max_new, GREEDY)
        rr.shutdown()
        return gen

    out = run_threads({0: root, **{r: (lambda r=r: stage(r)) for r in range(1, n)}})
    assert len(out[0].tokens) == max_new
    assert grown == []
    assert all(out[r] >= len(p) + max_new for r in range(1, n))


def test_rank0_releases_unverified_drafts(model):
    """Rank 0 verifies nothing itself (the last rank does), and kept every draft it ever sent; now the
    features of each are released once its verdict is in, so at most those in flight remain."""
    sizes, p, max_new = [2, 2, 2], prompts(1, seed=9)[0], 150
    n = len(sizes)
    ref = generate_ar(StagedTarget(model), p, max_new).tokens
    fabric = Rendezvous(nccl=False)

    def root():
        target = StagedTarget(model, sizes)
        drafter = ReferenceDrafter(p, ref, 97, accuracy=0.7, seed=3)
        drafter.anchors = [0, 2, 4, 6]  # a drafter that reads features: rank 0 keeps those of every node
        rr = RootRank(target, drafter, Link(0, n, "cpu", target.dtype, fabric.endpoint(0)))
        gen = rr.generate(p, max_new, GREEDY)
        rr.shutdown()
        return gen, len(rr.store.nodes)

    gen, kept = run_threads({0: root, **{r: (lambda r=r: serve(model, sizes, fabric, r)) for r in range(1, n)}})[0]
    assert gen.tokens == ref and gen.metrics.drafts_accepted > 100
    assert kept <= n
