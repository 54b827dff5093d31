"""One PipeSpec stage: the loop a stage process runs for a request (see `pipespec.py`).

Shared state, one row per stage, guarded by one condition variable:
  seq[i, :length[i]]  stage i's token list (prompt, then its output)
  probs[i, pos - P]   the distribution stage i drew its token at pos from (sampling only)
  done                set by the target when the request is over
Only stage i writes row i. Every loop of stage i, under the lock:
  1. downstream truth: if stage i+1's list is not a prefix of ours, ours is wrong from the first
     difference on: adopt theirs (rollback; the cached prefix that still matches is kept).
     Stage i-1 sees the same thing at its next loop, so rollbacks cascade upstream.
  2. if stage i-1's list extends ours: verify up to gamma of its tokens in one forward pass;
  3. else one token of its own. A stage 2*gamma tokens ahead of stage i+1 waits instead, and
     checks at most gamma tokens, and no more than keep it within 2*gamma (+1) of stage i+1.
The target's list therefore only ever grows by tokens it checked itself: greedy output equals
AR. With sampling, each check is the shared rejection-sampling rule against the upstream's
published q, so every stage's tokens are distributed as its own model's (see pipespec.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..drafting.reference import ReferenceCandidates
from ..runtime.generation import StopRule
from ..runtime.sampling import Sampler, SamplingParams
from ..runtime.verify import Draft, verify

WAIT_S = 0.02  # how long an idle stage sleeps on the condition before looking again


@dataclass
class StageStats:
    steps: int = 0  # forward passes (stage 0: draft calls that proposed something)
    verify_steps: int = 0  # steps that checked upstream tokens
    drafts_verified: int = 0
    drafts_accepted: int = 0
    rollbacks: int = 0
    busy_s: float = 0.0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    tokens: list[int] = field(default_factory=list)
    stop_reason: str = ""


def is_prefix(a: list[int], b: list[int]) -> bool:
    return len(a) <= len(b) and b[: len(a)] == a


class SharedChain:
    """Per-request shared tensors (allocated by the parent, passed through the stage queues).

    A stage's q's live in a ring of `ring` positions, not one per position of the answer (a dense
    q at a 2k context is ~400 MB of shared memory, past a container's 64 MB /dev/shm): stage i
    writes position p only while p <= len(stage i+1) + 2 gamma, and stage i+1 reads q's of
    positions >= its own length, so 2 gamma + 2 slots keep every q that can still be read. Each slot
    records its position; a read that finds another is an error, never a wrong q."""

    def __init__(self, n: int, capacity: int, vocab: int, sampling: bool, ring: int):
        self.seq = torch.zeros(n, capacity, dtype=torch.long).share_memory_()
        self.length = torch.zeros(n, dtype=torch.long).share_memory_()
        self.done = torch.zeros(1, dtype=torch.long).share_memory_()
        self.probs = torch.zeros(n - 1, ring, vocab).share_memory_() if sampling and n > 1 else None
        self.probs_at = torch.full((n - 1, ring), -1, dtype=torch.long).share_memory_() if self.probs is not None \
            else None

    def put_q(self, i: int, position: int, q: torch.Tensor) -> None:
        slot = position % self.probs.shape[1]
        self.probs[i, slot] = q
        self.probs_at[i, slot] = position

    def q_of(self, i: int, lo: int, hi: int) -> torch.Tensor:
        """Stage i's q's for positions lo..hi-1 [hi - lo, vocab] (a copy)."""
        positions = torch.arange(lo, hi)
        slots = positions % self.probs.shape[1]
        if not torch.equal(self.probs_at[i, slots], positions):
            raise RuntimeError(f"pipespec: stage {i}'s q's for positions {lo}..{hi - 1} were overwritten "
                               "before they were read (the ring is too small for the schedule)")
        return self.probs[i, slots]

    def read(self, i: int) -> list[int]:
        return self.seq[i, : int(self.length[i])].tolist()

    def write(self, i: int, tokens: list[int], start: int) -> None:
        self.seq[i, start : len(tokens)] = torch.tensor(tokens[start:], dtype=torch.long)
        self.length[i] = len(tokens)


class Stage:
    """Stage `index` of `n`: stage 0 wraps a drafter with the candidates interface, every later
    stage a `CachedLM` that verifies its upstream and drafts for its downstream."""

    def __init__(self, index: int, n: int, gamma: int, candidates=None, lm=None, block: int = 1,
                 patience: float = 0.0):
        self.index, self.n, self.gamma = index, n, gamma
        # Seconds a verifying stage waits for upstream drafts before generating a token itself
        # (0: never wait, the paper's behaviour; tests use it to make the schedule deterministic).
        self.patience = patience
        # Upstream runs ahead by up to two windows, so drafts are ready right after a full accept.
        self.lookahead = 2 * gamma
        self.candidates, self.lm = candidates, lm
        self.block = block  # tokens stage 0 drafts per call (1 for a model: publish each at once)

    def pick(self, logits: torch.Tensor, sampler: Sampler) -> tuple[int, torch.Tensor | None]:
        if sampler.params.greedy:
            return int(torch.argmax(logits)), None
        p = sampler.probs(logits)
        return sampler.draw(p), p

    def check(self, logits, drafts: list[int], qs, sampler: Sampler) -> list[tuple[int, object, bool | None]]:
        """Verify `drafts` with the shared rule: (token, its q, accepted?) per emitted token, then
        the bonus token (accepted None) when every draft passed. The upstream's q comes from shared
        (CPU) memory: it is compared on the device of this stage's logits."""
        if qs is not None:
            qs = qs.to(logits.device)
        out = []
        for j, x in enumerate(drafts):
            ok, token = verify(logits[j], Draft(x, None if qs is None else qs[j]), sampler)
            p = None if sampler.params.greedy else sampler.probs(logits[j])
            out.append((token, p, ok))
            if not ok:
                return out
        return out + [(*self.pick(logits[len(drafts)], sampler), None)]

    @torch.inference_mode()
    def serve(self, req: dict, cond) -> StageStats:
        i, last = self.index, self.index == self.n - 1
        sh: SharedChain = req["shared"]
        prompt, P = list(req["prompt"]), len(req["prompt"])
        s = req["sampling"]
        # Each stage draws from its own seeded stream (exactness never needs shared randomness).
        seed = None if s.seed is None else s.seed + 7919 * i
        sampler = Sampler(SamplingParams(s.temperature, s.top_k, s.top_p, seed))
        stop = StopRule(set(req["eos"]), req["max_new_tokens"])
        st = StageStats()
        if self.candidates is not None:
            self.candidates.reset()
            if isinstance(self.candidates, ReferenceCandidates):
                self.candidates.set_reference(prompt, req.get("reference") or [])
        if self.lm is not None:
            self.lm.reset()
        tokens = list(prompt)
        t0 = time.perf_counter()
        if last:  # the target starts: prefill, first token
            token, _ = self.pick(self.lm.next_logits(tokens)[-1], sampler)
            tokens.append(token)
            st.prefill_s = time.perf_counter() - t0
            with cond:
                sh.write(i, tokens, 0)
                if stop.done(tokens[P:]):
                    sh.done[0] = 1
                cond.notify_all()
        t1 = idle_since = time.perf_counter()
        while True:
            drafts, qs, ahead = None, None, 0
            with cond:
                if int(sh.done[0]):
                    break
                if not last:
                    down = sh.read(i + 1)
                    if not is_prefix(down, tokens):  # 1. downstream truth wins: roll back to it
                        st.rollbacks += not is_prefix(tokens, down)  # (else: it only got ahead)
                        tokens = down
                        sh.write(i, tokens, 0)
                        cond.notify_all()
                    ahead = len(tokens) - len(down)
                room = self.lookahead - ahead  # at most `lookahead` (+1 bonus) ahead of downstream
                if room <= 0:
                    cond.wait(WAIT_S)  # far enough ahead: let downstream catch up
                    continue
                if i > 0:
                    up = sh.read(i - 1)
                    if len(up) > len(tokens) and up[: len(tokens)] == tokens:  # 2. upstream has news
                        end = min(len(up), len(tokens) + min(room, self.gamma))
                        drafts = up[len(tokens) : end]
                        if sh.probs is not None:
                            qs = sh.q_of(i - 1, len(tokens), end)
                    elif time.perf_counter() - idle_since < self.patience:
                        cond.wait(WAIT_S)  # give the upstream a chance to draft first
                        continue
            busy = time.perf_counter()
            if self.lm is None:  # stage 0: a drafter
                got = self.candidates.propose(tokens, min(self.block, room), sampler)
                new = [(d.token, d.q, None) for d in got]
                if not new:  # nothing to propose (e.g. no n-gram match): wait for a change
                    with cond:
                        cond.wait(WAIT_S)
                    continue
            elif drafts:
                new = self.check(self.lm.next_logits(tokens, drafts), drafts, qs, sampler)
                st.verify_steps += 1
            else:
                new = [(*self.pick(self.lm.next_logits(tokens)[-1], sampler), None)]
            st.steps += 1
            st.busy_s += time.perf_counter() - busy
            idle_since = time.perf_counter()
            with cond:
                start = len(tokens)
                for token, p, ok in new:
                    tokens.append(token)
                    if p is not None and not last:
                        sh.put_q(i, len(tokens) - 1, p)
                    if ok is not None:
                        st.drafts_verified += 1
                        st.drafts_accepted += ok
                    if last and stop.done(tokens[P:]):
                        sh.done[0] = 1
                        break
                sh.write(i, tokens, start)
                cond.notify_all()
        st.decode_s = time.perf_counter() - t1
        if last:
            st.tokens, st.stop_reason = tokens[P:], stop.reason
        return st
