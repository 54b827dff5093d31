"""Waiting for the machine's usual speed before a timing or a run (`plan --validate`).

On a 2-vCPU KVM guest (AMD EPYC, Zen 4) a 5-row pass of the target at 2 threads ran 850-900 us a
layer for minutes on end, then 1260-1340 us for anything from 8 s to over a minute, and back: the
same tensors in the same process, in a loop doing nothing else. Several rows suffered most (int8w
+45-50 %, fp32 +28 %, bf16 and fp16w +15 %), one row little (+4-7 %), which is why a probe of one AR
step never saw it. Neither the cost table nor the simulator can know when that state comes; a
round's table timed in one state and set against runs in the other put int8w's sd 21 % off
(predicted 17.5 and 18.4 tok/s against runs of 14.3-15.3; a one-process sd run in the slow state
spent 41.5 ms a cycle in its target pass against 30.7 in the usual one).

So `plan --validate` reads a gauge (several rows through every layer, the validation's threads)
before each unit it times or runs, waits while the gauge reads slower than its usual reading (a
low quantile of its readings so far) by more than a tolerance (at most `max_wait_s` each time, and
`budget_s` in all), and reads it again after: a unit the slow state may have met is timed or run
again, once. The units are shorter than the slow state's
episodes (a few row counts of the table, one method on one prompt), so an episode that overlaps a
unit is seen by the reading before or the one after. What it waited and took again is reported
beside the errors, and a wait that ran out is counted, not hidden. In an hour whose state changed
within a second, many times a unit (the readings' median 1.33x their 10th percentile), that
premise failed: the tables' own entries then differed by up to 56 % between rounds (README).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .costs import prime, ungated

TOLERANCE = 1.10  # a gauge reading this much over the reference is the slow state (its jitter is 2-5 %)
MAX_WAIT_S = 90.0
BUDGET_S = 1800.0  # a validation's waits in all: past it, units are read and counted, not waited for or retaken
FRESH_S = 0.5  # a steady check read this recently stands for the next wait's first reading
# The reference is a low quantile of the readings so far, not their minimum: a bf16 validation reads
# the gauge ~760 times, and the fastest of them is an extreme its usual readings sit 5-9 % above
# (quantiles 5/25/50 %: 1.03/1.06/1.09x the minimum), so a 10 % tolerance tripped on ordinary
# jitter in 219 of 381 checks. Until there are enough readings for a quantile, the minimum.
REFERENCE_QUANTILE = 0.10
QUANTILE_AFTER = 10


@dataclass
class SteadyGate:
    """`reading()`: seconds of the gauge (lower is faster); `clock`: injectable for tests. A wait
    reads again at once rather than sleep between readings: runs and timings keep the cores busy,
    and a gauge read after idle seconds need not see the machine they see."""

    reading: Callable[[], float]
    tolerance: float = TOLERANCE
    max_wait_s: float = MAX_WAIT_S
    clock: Callable[[], float] = time.monotonic
    budget_s: float = BUDGET_S
    log: Callable[[str], None] = lambda m: None
    events: list[dict] = field(default_factory=list)
    readings: list[float] = field(default_factory=list)
    fresh_s: float = FRESH_S
    last_steady: bool | None = None  # whether around()'s last unit read steady before and after
    _checked: tuple[float, float] | None = None  # (clock, reading) of the last check, until a wait
    _waited_s: float = 0.0

    def _read(self) -> float:
        r = self.reading()
        self.readings.append(r)
        return r

    @property
    def reference(self) -> float:
        """The machine's usual reading: the minimum of the first few, then a low quantile of all."""
        if len(self.readings) < QUANTILE_AFTER:
            return min(self.readings, default=float("inf"))
        ordered = sorted(self.readings)
        return ordered[int(REFERENCE_QUANTILE * (len(ordered) - 1))]

    @property
    def spent(self) -> bool:
        """Whether the waits have used the whole budget (then units are no longer retaken either)."""
        return self._waited_s >= self.budget_s

    def steady(self, r: float) -> bool:
        return r <= self.tolerance * self.reference

    def wait(self, what: str) -> bool:
        """Read the gauge until it reads steady or `max_wait_s` has passed; whether it did."""
        t0 = self.clock()
        # Parts timed back to back (a table's row groups, a prompt's methods): a steady check just
        # read after one is the machine the next one starts on; reading it again costs a gauge's
        # time (a third to half a second) and tells nothing new.
        checked = self._checked
        fresh = checked is not None and t0 - checked[0] <= self.fresh_s and self.steady(checked[1])
        r = checked[1] if fresh else self._read()
        self._checked = None
        limit = min(self.max_wait_s, max(0.0, self.budget_s - self._waited_s))
        while not self.steady(r) and self.clock() - t0 < limit:
            r = self._read()
        ok = self.steady(r)
        waited = self.clock() - t0
        self._waited_s += waited
        if waited >= 1.0 or not ok:
            self.log(f"steady: waited {waited:.0f} s before {what} (gauge {r / self.reference:.2f}x its usual"
                     f"{'' if ok else ', gave up' if limit == self.max_wait_s else ', the waits budget spent'})")
        self.events.append({"what": what, "kind": "wait", "waited_s": waited, "ratio": r / self.reference,
                            "steady": ok})
        return ok

    def held(self, what: str) -> bool:
        """After a part or a run: whether the gauge still reads steady (else it is taken again)."""
        r = self._read()
        self._checked = (self.clock(), r)
        ok = self.steady(r)
        self.events.append({"what": what, "kind": "after", "ratio": r / self.reference, "steady": ok})
        return ok

    def around(self, what: str, fn: Callable[[], object], retakes: int = 1):
        """fn() between a wait and a check, taken again (at most `retakes` times) where the check
        finds the slow state; returns fn's last result."""
        for attempt in range(retakes + 1):
            began = self.wait(what)
            out = fn()
            ended = self.held(what)
            self.last_steady = began and ended  # the attempt kept, where this returns
            if ended or attempt == retakes or self.spent:
                return out
            self.events.append({"what": what, "kind": "retake"})
            self.log(f"steady: {what} met the slow state; taken again")
        return out

    def restlessness(self) -> list[float]:
        """How restless the hour was: the readings' 5/25/50/75/95 % quantiles over the reference."""
        if len(self.readings) < 2:
            return []
        cuts = statistics.quantiles(self.readings, n=20)
        return [round(cuts[i] / self.reference, 3) for i in (0, 4, 9, 14, 18)]

    def summary(self) -> dict:
        waits = [e for e in self.events if e["kind"] == "wait"]
        return {"tolerance": self.tolerance, "max_wait_s": self.max_wait_s, "budget_s": self.budget_s,
                "reference_s": self.reference, "gauges": len(waits),
                "waited_s": sum(e["waited_s"] for e in waits), "budget_spent": self.spent,
                "gave_up": sum(1 for e in waits if not e["steady"]),
                "retaken": sum(1 for e in self.events if e["kind"] == "retake"),
                # How restless the hour was: the readings' quantiles (5/25/50/75/95 %) over the reference.
                "readings_over_reference": self.restlessness(),
                "events": self.events}


def steadily(gate: SteadyGate | None) -> Callable:
    """`gate.around`, or `ungated` where there is no gate."""
    return gate.around if gate is not None else ungated


def gauge(model, threads: int, rows: int = 5, context: int = 128, reps: int = 5) -> Callable[[], float]:
    """fn(): median seconds of `reps` passes of `rows` rows through every layer of `model` after
    `context` tokens, at `threads` threads, after one untimed: what the slow state slows most."""
    import torch

    from ..runtime.staged import StagedTarget

    t = StagedTarget(model)
    prime(t, context, rows)
    x = torch.randn(1, rows, t.config.hidden_size, dtype=t.dtype, device=t.device)

    @torch.inference_mode()
    def read() -> float:
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            times = []
            for _ in range(reps + 1):
                t.rollback(context)
                t0 = time.perf_counter()
                t.run_layers(0, t.n_layers, x, context)
                if t.device.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            return statistics.median(times[1:])
        finally:
            torch.set_num_threads(before)

    return read
