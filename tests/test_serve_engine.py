"""serve/engine.py without a model: the heartbeat keeps to the decoder's last contact whatever the
jobs do, a failed decoder is restarted (or ends the engine), and nothing is left hanging."""

from __future__ import annotations

import asyncio
import contextlib
import time

from spdecode.runtime.errors import DecoderFailure, SpdError
from spdecode.runtime.generation import Generation
from spdecode.runtime.sampling import GREEDY
from spdecode.serve.engine import Decoder, Engine, Job


class OneCharTokenizer:
    def decode(self, ids, **kw):
        return "".join(chr(97 + i % 26) for i in ids)


def events_of(job: Job, loop, timeout: float = 5.0) -> list:
    """The job's events up to its last one (done or error)."""

    async def collect():
        out = []
        while not out or out[-1][0] == "text":
            out.append(await asyncio.wait_for(job.events.get(), timeout))
        return out

    return loop.run_until_complete(collect())


@contextlib.contextmanager
def running(engine: Engine):
    """The engine's thread started, and an event loop for its jobs' events; closed afterwards."""
    loop = asyncio.new_event_loop()
    engine.start()
    try:
        yield loop
    finally:
        engine.close()
        engine.join(5)
        loop.close()


def test_fast_failing_jobs_do_not_starve_the_heartbeat():
    """Jobs refused before the decoder sends anything (a prompt the method cannot fit) are no
    contact with the pipeline: a stream of them, one well inside the heartbeat period after
    another, must not postpone the heartbeat (the ranks' receive would time out and kill the server)."""
    beats: list[float] = []
    contact = [time.monotonic()]  # the pipeline's last message: only heartbeats send any here

    def refuse(*args, **kwargs):
        raise SpdError("the prompt does not fit with the drafts in flight")

    def heartbeat():
        beats.append(time.monotonic())
        contact[0] = time.monotonic()

    engine = Engine(Decoder(refuse, heartbeat=heartbeat, heartbeat_s=0.3, last_contact=lambda: contact[0]),
                    OneCharTokenizer(), set())
    with running(engine) as loop:
        start = time.monotonic()
        while time.monotonic() - start < 2.0:
            job = Job([1, 2], 4, GREEDY, [], loop)
            engine.submit(job)
            assert events_of(job, loop)[-1][:2] == ("error", 400)
            time.sleep(0.05)
    gaps = [b - a for a, b in zip([start, *beats], beats, strict=False)]
    assert len(beats) >= 4 and max(gaps) < 0.6, gaps


def test_a_decoder_failure_is_restarted_and_the_next_job_served():
    calls, restarts = [0], [0]

    def generate(ids, k, sampling, eos, on_token=None, halt=None):
        calls[0] += 1
        if calls[0] == 1:
            raise DecoderFailure("stage 1 exited with code -9")
        for t in (7, 8):
            on_token(t)
        return Generation([7, 8])

    engine = Engine(Decoder(generate, recover=lambda: restarts.__setitem__(0, restarts[0] + 1)),
                    OneCharTokenizer(), set())
    with running(engine) as loop:
        first, second = Job([1], 2, GREEDY, [], loop), Job([1], 2, GREEDY, [], loop)
        engine.submit(first)
        engine.submit(second)
        failed, served = events_of(first, loop), events_of(second, loop)
        still_up = engine.down is None
    assert failed[-1][:2] == ("error", 503) and "restarted" in failed[-1][2]
    assert served[-1][0] == "done" and served[-1][1].text == "hi"
    assert restarts == [1] and still_up


def test_a_decoder_that_cannot_be_restarted_ends_the_engine():
    told: list[str] = []

    def generate(*args, **kwargs):
        raise DecoderFailure("stage 0 exited with code 1")

    def recover():
        raise SpdError("stage 0 failed to start again")

    engine = Engine(Decoder(generate, recover=recover), OneCharTokenizer(), set(), on_fatal=told.append)
    with running(engine) as loop:
        first, waiting = Job([1], 2, GREEDY, [], loop), Job([1], 2, GREEDY, [], loop)
        engine.submit(first)
        engine.submit(waiting)
        assert events_of(first, loop)[-1][:2] == ("error", 503)
        assert events_of(waiting, loop)[-1][:2] == ("error", 503)
        engine.join(5)
    assert not engine.thread.is_alive()
    assert told and "failed to start again" in told[0] and engine.down
