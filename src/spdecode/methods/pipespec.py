"""PipeSpec (McDanel et al., arXiv 2505.01572): a chain of models, one process each, running
asynchronously. Stage 0 only drafts, each later stage verifies its upstream's tokens and drafts
for its downstream, the last stage is the target. Rollbacks cascade upstream (pipespec_stage.py).

    with PipeSpecChain("smollm2-135m", ["early-exit:8"], gamma=4) as chain:
        gen = chain.generate(prompt_ids, 128)

Go beyond the published code (greedy only): sampling is lossless too. Each stage verifies with
the shared rejection-sampling rule against the q its upstream published for that position, so a
stage's token at position j is distributed as its own p(. | prefix), whatever its upstream did;
whether a stage checks j now or generates j itself depends on timing and on earlier positions,
never on the value at j, so the target's tokens are distributed exactly as AR sampling.

The analytic model of the paper (per-token acceptance alpha between neighbours, window gamma):
  rho = alpha / (1 - alpha^(gamma+1) + alpha)   long-run share of verification steps
  E[N] = (1 - rho) + rho (1 - alpha^(gamma+1)) / (1 - alpha)   tokens per target step
"""

from __future__ import annotations

import multiprocessing
import queue
import sys
import time

import torch

from ..runtime.errors import DecoderFailure, SpdError
from ..runtime.generation import Generation, check_prompt
from ..runtime.metrics import Metrics
from ..runtime.processes import process_context
from ..runtime.sampling import GREEDY, SamplingParams
from .pipespec_stage import SharedChain, Stage


def rho(alpha: float, gamma: int) -> float:
    """Steady-state probability that a step of a stage is a verification step."""
    return alpha / (1 - alpha ** (gamma + 1) + alpha)


def expected_tokens_per_step(alpha: float, gamma: int) -> float:
    """E[N]: tokens a stage (the target) commits per forward pass, from the paper's model."""
    r = rho(alpha, gamma)
    block = gamma + 1 if alpha >= 1 else (1 - alpha ** (gamma + 1)) / (1 - alpha)
    return (1 - r) + r * block


CHAIN_WATCH_S = 2.0  # how often a server checks its chain's stage processes between requests


def lookahead(n: int, gamma: int) -> int:
    """Positions past the target's last token that a chain of n models can write: each upstream
    stage runs up to 2 gamma tokens ahead of its downstream, and all of them must fit in context."""
    return 2 * n * gamma + 1


def check_chain(drafters: list[str]) -> None:
    if not drafters:
        raise SpdError("pipespec needs at least one drafter before the target (e.g. --chain early-exit:8)")
    for i, spec in enumerate(drafters):
        kind, _, arg = spec.partition(":")
        ok = {"prompt-lookup": not arg, "early-exit": arg.isdigit(), "model": bool(arg),
              "reference": bool(arg)}.get(kind, False)
        if not ok:
            raise SpdError(f"pipespec stage {spec!r}: expected early-exit:K, model:PATH, prompt-lookup "
                           "or reference:ACCURACY")
        if i > 0 and kind in ("prompt-lookup", "reference"):
            raise SpdError(f"pipespec stage {spec!r} has no model to verify with: it can only be the first stage")


def build_stage(index: int, specs: list[str], model_name: str, dtype: str, gamma: int,
                patience: float = 0.0, device: str = "cpu") -> Stage:
    """In the stage's own process: load what this stage needs, on `device`."""
    from ..drafting.build import make_candidates
    from ..drafting.candidates import CachedLM, PromptLookupCandidates
    from ..drafting.reference import ReferenceCandidates
    from ..runtime.models import load_model

    model, _ = load_model(model_name, dtype, device, tokenizer=False)
    kind, _, arg = specs[index].partition(":")
    n, V = len(specs), model.config.vocab_size
    if index == 0:
        if kind == "reference":
            return Stage(0, n, gamma, candidates=ReferenceCandidates(V, float(arg), device=model.device), block=gamma)
        cands = make_candidates(specs[0], model, dtype, device)
        return Stage(0, n, gamma, candidates=cands, block=gamma if isinstance(cands, PromptLookupCandidates) else 1)
    # A verifying stage: the target itself, or a drafter model checked as `--drafter` checks it.
    lm = CachedLM(model) if kind == "target" else make_candidates(specs[index], model, dtype, device).lm
    return Stage(index, n, gamma, lm=lm, patience=patience)


def stage_main(index, specs, model_name, dtype, gamma, patience, threads, inbox, outbox, cond,
               device: str = "cpu") -> None:
    """A stage process: build, report ready, serve requests until told to stop or orphaned."""
    torch.set_num_threads(threads)
    # The process that started the chain: with a fork server it is not our OS parent (the server
    # is, and it lives as long as we do), so its end is read from the sentinel multiprocessing
    # gives every child of it.
    owner = multiprocessing.parent_process()
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        stage = build_stage(index, specs, model_name, dtype, gamma, patience, device)
        info = (stage.lm.context_length, stage.lm.t.config.vocab_size) if stage.lm is not None else None
        outbox.put(("ready", index, info))
        while True:
            try:
                req = inbox.get(timeout=1.0)
            except queue.Empty:
                if owner is not None and not owner.is_alive():  # it died without closing us
                    return
                continue
            if req is None:
                return
            outbox.put(("done", index, stage.serve(req, cond)))
    except KeyboardInterrupt:
        return
    except Exception as exc:  # reported to the parent, which stops the chain with a clear error
        outbox.put(("error", index, f"{type(exc).__name__}: {exc}"))
        sys.exit(1)


class PipeSpecChain:
    """Owns the stage processes; one request at a time; `close()` (or `with`) ends them."""

    def __init__(self, model_name: str, drafters: list[str], gamma: int = 4, dtype: str = "float32",
                 threads: int = 1, timeout: float = 600.0, patience: float = 0.0, device: str = "cpu"):
        """patience: seconds a verifying stage waits for its upstream before generating a token
        itself (0, the paper's behaviour: never). device: where every stage loads its model (each
        stage process calls load_model with it; a device it cannot use is that stage's error)."""
        from ..runtime.models import resolve_model

        check_chain(drafters)
        resolve_model(model_name)  # a missing model fails here, before any process starts
        if gamma < 1:
            raise SpdError(f"gamma must be at least 1 (got {gamma})")
        self.specs = list(drafters) + ["target"]
        self.gamma, self.timeout = gamma, timeout
        self.model_name, self.dtype, self.device = model_name, dtype, device
        self.patience, self.threads = patience, threads
        self.shared: SharedChain | None = None
        self._start()

    def _start(self) -> None:
        """Start one process per stage and wait until each has loaded its model."""
        ctx = process_context(__name__)
        self.cond = ctx.Condition()
        self.inboxes = [ctx.Queue() for _ in self.specs]
        self.outbox = ctx.Queue()
        self.procs = [ctx.Process(target=stage_main, name=f"pipespec-{i}-{s}", daemon=True,
                                  args=(i, self.specs, self.model_name, self.dtype, self.gamma, self.patience,
                                        self.threads, self.inboxes[i], self.outbox, self.cond, self.device))
                      for i, s in enumerate(self.specs)]
        self.closed, self.starting = False, True
        for p in self.procs:
            p.start()
        ready = self._collect("ready")
        self.context_length, self.vocab_size = ready[len(self.specs) - 1]
        self.starting = False

    def restart(self) -> None:
        """New stage processes after a failure (a server's recovery): the old ones are ended first."""
        self.close(graceful=False)
        self.shared = None
        self._start()

    def problem(self) -> str | None:
        """Why the chain cannot serve now (closed, or a stage process gone); None when it can."""
        if self.closed:
            return "pipespec: the chain is closed"
        if self.starting:
            return "pipespec: the stage processes are starting"
        for i, p in enumerate(list(self.procs)):
            if p.exitcode is not None:
                return f"pipespec: stage {i} ({self.specs[i]}) exited with code {p.exitcode}"
        return None

    def watch(self) -> None:
        """A server's check between requests: restart the chain if a stage process is gone."""
        if self.problem():
            self.restart()

    @property
    def n(self) -> int:
        return len(self.specs)

    def _fail(self, why: str):
        if self.shared is not None:
            self.shared.done[0] = 1  # survivors leave their loop at once
        self.close(graceful=False)
        raise DecoderFailure(f"pipespec: {why}")

    def _collect(self, kind: str, poll=None) -> dict:
        """One `kind` message from every stage. The deadline is an idle one: `timeout` seconds in
        which no stage answers and no stage's token list moves (a long request is no failure)."""
        got, deadline, seen = {}, time.monotonic() + self.timeout, None
        while len(got) < self.n:
            if poll:
                poll()
            if self.shared is not None and (moved := self.shared.length.tolist()) != seen:
                seen, deadline = moved, time.monotonic() + self.timeout
            try:
                k, i, payload = self.outbox.get(timeout=0.05 if poll else 0.2)
            except queue.Empty:
                for i, p in enumerate(self.procs):
                    if p.exitcode is not None and i not in got:
                        self._fail(f"stage {i} ({self.specs[i]}) exited with code {p.exitcode}")
                if time.monotonic() > deadline:
                    self._fail(f"no progress from the stages in {self.timeout:g} s")
                continue
            if k == "error":
                self._fail(f"stage {i} ({self.specs[i]}): {payload}")
            got[i] = payload
        return got

    def generate(self, prompt_ids: list[int], max_new_tokens: int = 64, sampling: SamplingParams = GREEDY,
                 eos=frozenset(), reference: list[int] | None = None, on_token=None, halt=None) -> Generation:
        """Decode one prompt; `on_token` streams the target's tokens as they are committed (the
        target's list only grows), `reference` feeds a reference:ACC test drafter. `halt`
        (runtime.generation.Halt) ends the request early: the tokens stop at the one it was set on,
        and the stages, told through the shared done flag, leave their loops."""
        if self.closed:
            raise DecoderFailure("pipespec: the chain is closed")
        n, g = self.n, self.gamma
        max_new_tokens = check_prompt(list(prompt_ids), max_new_tokens, self.context_length - lookahead(n, g))
        P = len(prompt_ids)
        vocab = 1 if sampling.greedy else self.vocab_size
        self.shared = SharedChain(n, P + max_new_tokens + lookahead(n, g) + 1, vocab, not sampling.greedy,
                                  ring=2 * g + 2)
        # Every stage's list starts as the prompt (a stage may publish drafts before anything else).
        self.shared.seq[:, :P] = torch.tensor(prompt_ids, dtype=torch.long)
        self.shared.length[:] = P
        req = {"prompt": list(prompt_ids), "max_new_tokens": max_new_tokens, "sampling": sampling,
               "eos": sorted(eos), "reference": reference, "shared": self.shared}
        for box in self.inboxes:
            box.put(req)
        sh, streamed, halted_at = self.shared, [0], []

        def stop_stages():
            halted_at.append(streamed[0])
            with self.cond:
                sh.done[0] = 1
                self.cond.notify_all()

        def emit(tokens):
            for t in tokens:
                if halted_at:
                    return
                streamed[0] += 1
                if on_token:
                    on_token(t)
                if halt is not None and halt.is_set():
                    stop_stages()

        def stream():  # the target's committed tokens, as they come
            length = int(sh.length[n - 1]) - P
            emit(sh.seq[n - 1, P + streamed[0] : P + max(length, 0)].tolist())
            if halt is not None and halt.is_set() and not halted_at:  # set from another thread
                stop_stages()

        stats = self._collect("done", stream if on_token or halt is not None else None)
        emit(stats[n - 1].tokens[streamed[0]:])
        self.shared = None
        target = stats[n - 1]
        if halted_at:
            target.tokens, target.stop_reason = target.tokens[:halted_at[0]], halt.reason
        m = Metrics(method="pipespec", n_stages=1, prompt_tokens=P, new_tokens=len(target.tokens),
                    cycles=target.steps, drafts_proposed=target.drafts_verified,
                    drafts_verified=target.drafts_verified, drafts_accepted=target.drafts_accepted,
                    prefill_s=target.prefill_s, decode_s=target.decode_s, stop_reason=target.stop_reason)
        m.phase_s.update({f"stage{i}_busy": stats[i].busy_s for i in range(n)})
        m.chain = [{"stage": self.specs[i], "steps": s.steps, "verify_steps": s.verify_steps,
                    "drafts_verified": s.drafts_verified, "drafts_accepted": s.drafts_accepted,
                    "rollbacks": s.rollbacks, "busy_s": s.busy_s} for i, s in sorted(stats.items())]
        return Generation(target.tokens, m)

    def close(self, graceful: bool = True) -> None:
        if self.closed:
            return
        self.closed = True
        if graceful:
            for box in self.inboxes:
                box.put(None)
            for p in self.procs:
                p.join(10)
        for p in self.procs:
            if p.is_alive():
                p.terminate()
                p.join(5)
            if p.is_alive():
                p.kill()
                p.join(5)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
