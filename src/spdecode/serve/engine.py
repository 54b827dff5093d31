"""One thread that owns the decoder and runs the served requests one at a time, in order.

Low concurrency is SPD's niche: one sequence decodes at a time and the others wait in a bounded
queue. Every model call (and, with --distributed, every torch.distributed message) happens in this
thread; the HTTP side only submits jobs and reads their events. A job's client going away sets
its Halt: a waiting job is skipped, a running one ends at its next token.
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ..runtime.errors import DecoderFailure, SpdError
from ..runtime.generation import Generation, Halt
from ..runtime.sampling import SamplingParams
from .text import TextStream

_STOP = object()  # the queue's end marker


class QueueFull(Exception):
    """More requests wait than --max-queue allows."""


class EngineDown(Exception):
    """The engine cannot take requests: shutting down, or the pipeline failed."""


@dataclass
class Job:
    """One request as the engine runs it, and the channel its events go back on."""

    prompt_ids: list[int]
    max_tokens: int
    sampling: SamplingParams
    stops: list[str]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    halt: Halt = field(default_factory=Halt)
    id: int = field(default_factory=itertools.count(1).__next__)
    submitted: float = field(default_factory=time.perf_counter)

    def post(self, *event) -> None:
        """Hand an event to the request's coroutine (thread-safe): ("text", str), ("done", Outcome),
        ("error", status, message)."""
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


@dataclass
class Outcome:
    """How a finished job ended: what the response's finish_reason, usage and metrics need."""

    finish_reason: str  # stop | length | cancelled | shutdown
    completion_tokens: int
    text: str
    generation: Generation
    queued_s: float
    first_token_s: float | None  # from submission to the first token
    total_s: float


def describe(exc: Exception) -> str:
    """An error for a client: our own errors' message, anything else with its type."""
    return str(exc) if isinstance(exc, SpdError) else f"{type(exc).__name__}: {exc}"


Generate = Callable[..., Generation]  # generate(ids, max_new_tokens, sampling, eos, on_token, halt)


@dataclass
class Decoder:
    """What the engine runs, and how the server keeps it alive and tells the truth about it."""

    generate: Generate
    in_flight: int = 0  # positions written past a request's last token (drafts in flight)
    # Does this error leave the decoder unusable for good (a pipeline rank failed mid-request)?
    fatal: Callable[[Exception], bool] = lambda exc: False
    # After a DecoderFailure: bring the decoder back (PipeSpec restarts its stage processes), or raise.
    recover: Callable[[], None] | None = None
    # Why the decoder cannot serve right now (a stage process died), for /health; None: it can.
    problem: Callable[[], str | None] | None = None
    # A heartbeat (the pipeline's round trip; PipeSpec's stage check), due once the decoder's last
    # contact (last_contact(), time.monotonic(); by default the last heartbeat) is heartbeat_s old.
    heartbeat: Callable[[], None] | None = None
    heartbeat_s: float = 30.0
    last_contact: Callable[[], float] | None = None
    on_close: Callable[[], None] | None = None  # the goodbye at the end (the pipeline's SHUTDOWN)


class Engine:
    """The decoder's `generate` run for each submitted Job in one thread. An error that leaves the
    decoder unusable (`fatal`, or a DecoderFailure it cannot recover from) fails every waiting job
    and stops the engine, and `on_fatal(message)` tells the server to exit."""

    def __init__(self, decoder: Decoder, tokenizer, eos: set[int], max_queue: int = 32, on_fatal=None,
                 metrics=None):
        if max_queue < 1:
            raise SpdError(f"--max-queue must be at least 1 (got {max_queue})")
        self.decoder, self.tokenizer, self.eos = decoder, tokenizer, set(eos)
        self.jobs: queue.Queue = queue.Queue(maxsize=max_queue)
        self.on_fatal, self.metrics = on_fatal, metrics
        self.last_beat = time.monotonic()
        self.running: Job | None = None
        self.down: str | None = None  # why the engine takes no more jobs
        self.thread = threading.Thread(target=self._loop, name="spdecode-engine", daemon=True)

    # -- the HTTP side ----------------------------------------------------------------------------
    def start(self) -> None:
        self.thread.start()

    def submit(self, job: Job) -> None:
        if self.down:
            raise EngineDown(self.down)
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise QueueFull(f"{self.jobs.maxsize} requests are already waiting; retry later") from None
        self._gauges()

    def waiting(self) -> int:
        return self.jobs.qsize()

    def close(self, reason: str = "the server is shutting down") -> None:
        """Stop taking jobs, halt the running one and fail the waiting ones; the thread then runs
        on_close (e.g. the pipeline's SHUTDOWN) and ends."""
        if not self.down:
            self.down = reason
        if self.running is not None:
            self.running.halt.set("shutdown")
        self._fail_waiting(503, reason)
        try:
            self.jobs.put_nowait(_STOP)
        except queue.Full:  # only after _fail_waiting raced a submit: the loop sees `down` anyway
            pass

    def join(self, timeout: float | None = None) -> None:
        self.thread.join(timeout)

    # -- the engine thread ----------------------------------------------------------------------
    def _loop(self) -> None:
        failed = False
        try:
            while True:
                wait = self._until_heartbeat()
                if wait is not None and wait <= 0:
                    try:
                        self.decoder.heartbeat()
                    except Exception as exc:  # noqa: BLE001 - a heartbeat that fails: the pipeline is gone
                        failed = True
                        self._die(describe(exc))
                        break
                    self.last_beat = time.monotonic()
                    continue
                try:
                    job = self.jobs.get(timeout=wait)
                except queue.Empty:
                    continue
                if job is _STOP:
                    break
                if self.down:
                    job.post("error", 503, self.down)
                    continue
                if job.halt.is_set():  # its client left while it waited
                    job.post("error", 499, "the client went away")
                    continue
                self.running = job
                self._gauges()
                try:
                    self._run(job)
                except Exception as exc:  # noqa: BLE001 - reported to the client; fatal ones end the engine
                    if not self._failed(job, exc):
                        failed = True
                        break
                finally:
                    self.running = None
                    self._gauges()
        finally:
            if self.decoder.on_close and not failed:  # after a failure a peer may be dead: no goodbye
                try:
                    self.decoder.on_close()
                except Exception as exc:  # noqa: BLE001 - e.g. the other ranks were stopped first (SIGTERM)
                    print(f"warning: closing the decoder: {exc}", file=sys.stderr, flush=True)

    def _until_heartbeat(self) -> float | None:
        """Seconds until the next heartbeat is due (None: no heartbeat). Counted from the decoder's
        last contact, not from the last job: a job refused before its first message (a prompt the
        method cannot fit) is no contact, and a stream of those must not starve the heartbeat."""
        d = self.decoder
        if d.heartbeat is None:
            return None
        contact = max(self.last_beat, d.last_contact() if d.last_contact else 0.0)
        return d.heartbeat_s - (time.monotonic() - contact)

    def _failed(self, job: Job, exc: Exception) -> bool:
        """Tell the job's client why it failed; False when the decoder is gone for good."""
        message, d = describe(exc), self.decoder
        if isinstance(exc, DecoderFailure) and d.recover is not None and not d.fatal(exc):
            try:
                d.recover()
            except Exception as again:  # noqa: BLE001 - it cannot come back: end the server
                job.post("error", 503, f"the decoder failed: {message}")
                self._die(f"{message}; restarting it failed: {describe(again)}")
                return False
            job.post("error", 503, f"the decoder failed and was restarted: {message}")
            if self.metrics:
                self.metrics.failed()
            return True
        if d.fatal(exc) or isinstance(exc, DecoderFailure):
            job.post("error", 503, f"the decoding pipeline failed: {message}")
            self._die(message)
            return False
        job.post("error", 400 if isinstance(exc, SpdError) else 500, message)
        if self.metrics:
            self.metrics.failed()
        return True

    def _die(self, message: str) -> None:
        """The decoder is unusable: fail everything waiting, take nothing more, tell the server."""
        self.down = f"the decoding pipeline failed: {message}"
        self._fail_waiting(503, self.down)
        if self.on_fatal:
            self.on_fatal(self.down)

    def _run(self, job: Job) -> None:
        stream = TextStream(self.tokenizer, job.stops)
        first: list[float] = []

        def on_token(token: int) -> None:
            if not first:
                first.append(time.perf_counter())
            if stream.stopped:
                return
            delta = stream.feed(token)
            if stream.stopped:
                job.halt.set("stop")  # the decoder ends at this very token
            if delta:
                job.post("text", delta)

        started = time.perf_counter()
        gen = self.decoder.generate(job.prompt_ids, job.max_tokens, job.sampling, self.eos, on_token=on_token,
                                    halt=job.halt)
        rest = "" if stream.stopped else stream.finish()
        if rest:
            job.post("text", rest)
        reason = gen.metrics.stop_reason
        finish = {"eos": "stop", "stop": "stop", "length": "length"}.get(reason, reason)
        done = time.perf_counter()
        outcome = Outcome(finish, len(stream.tokens), stream.text, gen, started - job.submitted,
                          first[0] - job.submitted if first else None, done - job.submitted)
        if self.metrics:
            if finish in ("cancelled", "shutdown"):
                self.metrics.cancelled.inc()
            else:
                self.metrics.finished(outcome)
        job.post("done", outcome)

    def _fail_waiting(self, status: int, message: str) -> None:
        while True:
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                return
            if job is not _STOP:
                job.post("error", status, message)

    def _gauges(self) -> None:
        if self.metrics:
            self.metrics.queue(running=int(self.running is not None), waiting=self.jobs.qsize())
