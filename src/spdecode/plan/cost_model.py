"""What one pass of each part costs, read from a cost file (plan/costs.py measures one).

Layer times are linear in rows between the timed row counts and linear in context between the
timed context lengths (a decode pass reads the whole KV cache, so it slows as the context grows).
What a whole AR step costs beyond its layers and head (embedding, sampling, Python) is shared
out per layer: every pass pays it for the layers it runs, whatever its rows.
"""

from __future__ import annotations

from ..runtime.errors import SpdError

CONCURRENT = "1 concurrent"  # the cost file's key for one thread beside a twin process


def at_rows(table: dict[int, float], rows: int) -> float:
    """Linear in rows between the timed row counts, proportional past the last (0 rows: nothing runs)."""
    if rows <= 0:
        return 0.0
    keys = sorted(table)
    lo = max([k for k in keys if k <= rows], default=keys[0])
    hi = min([k for k in keys if k >= rows], default=keys[-1])
    if lo == hi:
        return table[lo] * (rows / lo if rows > keys[-1] else 1.0)
    return table[lo] + (table[hi] - table[lo]) * (rows - lo) / (hi - lo)


def at(rows: list[float], values: list[float], r: float) -> float:
    """`values` measured at `rows`, linear in rows between them, held flat outside."""
    pts = sorted(zip(rows, values, strict=True))
    if r <= pts[0][0]:
        return pts[0][1]
    for (r0, v0), (r1, v1) in zip(pts, pts[1:], strict=False):
        if r <= r1:
            return v0 + (v1 - v0) * (r - r0) / (r1 - r0) if r1 > r0 else v1
    return pts[-1][1]


def at_context(by_context: dict[str, object], context: float, value=lambda v: v) -> float:
    """`value` of the entry timed at `context`, linear between the two timed contexts around it
    (held flat outside the timed range: no extrapolation from two noisy points)."""
    ctx = sorted(int(c) for c in by_context)
    c = min(max(context, ctx[0]), ctx[-1])
    lo = max(k for k in ctx if k <= c)
    hi = min(k for k in ctx if k >= c)
    a, b = value(by_context[str(lo)]), value(by_context[str(hi)])
    return a if lo == hi else a + (b - a) * (c - lo) / (hi - lo)


def at_threads(by_threads: dict, key: str):
    """A drafter's timings at thread count `key`, else at the first one timed."""
    return by_threads.get(key, by_threads[next(iter(by_threads))])


class Costs:
    """Seconds per part of one configuration: the target at a thread count (a key of the cost
    file's "target": "1", "2", "1 concurrent"), at a context length (default: the first timed)."""

    def __init__(self, data: dict, threads: str, context: float | None = None):
        if threads not in data["target"]:
            raise SpdError(f"the cost file has no timings for {threads!r} threads (it has "
                           f"{', '.join(data['target'])})")
        t = data["target"][threads]
        self.layers = int(data["n_layers"])
        context = float(context if context is not None else min(int(c) for c in t["layer"]))
        rows = sorted({int(r) for by in t["layer"].values() for r in by})
        self._layer = {r: at_context(t["layer"], context, lambda by, r=r: by[str(r)]) for r in rows}
        # A chunk of tree rows through the engine's stage call (older cost files: the plain decode).
        chunk = t.get("chunk", t["layer"])
        self._chunk = {r: at_context(chunk, context, lambda by, r=r: by[str(r)]) for r in rows}
        # One row behind rows in flight (the masked path; older files: the chunk's one row).
        self._chunk1_in_flight = at_context(t["chunk1_in_flight"], context) if t.get("chunk1_in_flight") else None
        self._head = {int(r): s for r, s in t["head"].items()}
        step = at_context(t["step"], context) if t.get("step") else None
        self.overhead = max(0.0, (step - self.layers * self._layer[1] - self._head[1]) / self.layers) if step else 0.0
        self.link = data.get("link", {"latency_s": 0.0, "bandwidth_bytes_per_s": float("inf")})
        # A real pipeline's work per slot beyond the table (plan/calibrate.py; older files: none), and
        # how its parts ran against the table where the ranks shared the cores as they did there.
        self.pipeline = data.get("pipeline")
        self.shared_cores = threads == CONCURRENT and self.pipeline is not None
        # A drafter's timings at this configuration's thread count (a rank runs one thread).
        key = threads.split()[0]
        self.draft = {name: {int(r): s for r, s in at_threads(by, key).items()}
                      for name, by in data.get("draft", {}).items()}
        # What a pass costs at work beyond the lone pass, and the core's bookkeeping per cycle
        # (cost files from before these were timed have neither: 0).
        self.draft_overhead, self.bookkeeping = {}, {}
        for name, by in data.get("draft_call", {}).items():
            call = at_threads(by, key)
            self.draft_overhead[name] = max(0.0, call["s_per_pass"] - at_rows(self.draft[name],
                                                                             round(call["rows_per_pass"])))
            self.bookkeeping[name] = call["bookkeeping_s_per_cycle"]

    def layer(self, rows: int) -> float:
        return at_rows(self._layer, rows)

    def head(self, rows: int) -> float:
        return at_rows(self._head, rows)

    def layers_pass(self, layers: int, rows: int, chunk: bool = False, in_flight: bool = False) -> float:
        """`layers` decoder layers over `rows` rows, with their share of the step's overhead; `chunk`:
        as a speculative engine runs them (tree rows through the stage call), else a plain decode;
        `in_flight`: behind rows in flight in the stage's cache (one row then takes the masked path,
        as several always do)."""
        if not rows:
            return 0.0
        if chunk and in_flight and rows == 1 and self._chunk1_in_flight is not None:
            per_layer = self._chunk1_in_flight
        else:
            per_layer = at_rows(self._chunk, rows) if chunk else self.layer(rows)
        return layers * (per_layer + self.overhead)

    def calibrated(self, name: str, rows: int, default: float | None = 0.0) -> float | None:
        """The pipeline calibration's `name` at `rows` rows (plan/calibrate.py; `default` without one,
        or where the file's calibration predates `name`)."""
        if self.pipeline is None or name not in self.pipeline:
            return default
        by = self.pipeline["root_rows" if name.startswith("root_") else "rows"]
        return at(by, self.pipeline[name], max(rows, 1))

    def ratio(self, name: str, rows: int) -> float:
        """How a rank's part ran against the table, where the ranks share the cores as in the
        calibration run (1 elsewhere)."""
        return self.calibrated(name, rows, 1.0) if self.shared_cores else 1.0

    def stage_slot(self, rows: int) -> float:
        """A stage rank's work per slot beyond its layers and head: unpack the plan, compact its
        cache, post its report and the slot on (0 where the cost file has no calibration)."""
        return self.calibrated("stage_slot_s", rows) if rows else 0.0

    def root_send(self, rows: int) -> float:
        """Rank 0's settle, compaction, plan and send per cycle beyond send() (0 without a calibration)."""
        return self.calibrated("root_send_s", rows)

    def hop(self, kind: str, nbytes: int, rows: int) -> float:
        """One hop of an engine message carrying `nbytes` of hidden states (`kind` "forward": a slot
        down the pipeline; "report": a report back to rank 0): where the ranks share the cores as in
        the calibration run, as a waiting receiver saw it there; else `message(nbytes)`."""
        hop = self.calibrated(f"{kind}_hop_s", rows, None) if self.shared_cores else None
        return self.message(nbytes) if hop is None else hop

    def report_recv(self, rows: int) -> float:
        """Rank 0 taking a report that came before it waited for it: the receive and the anchors it
        stores (0 without a calibration)."""
        return self.calibrated("report_recv_s", rows)

    def send(self) -> float:
        """What posting one engine message costs its sender (0 where the cost file has no timing)."""
        return self.link.get("send_s", 0.0)

    def ar_token(self) -> float:
        return self.layers_pass(self.layers, 1) + self.head(1)

    def message(self, nbytes: int) -> float:
        """One hop of an engine message carrying `nbytes` of hidden states: its measured cost where
        the cost file has it (header, plan and rows each a send), else the link's latency."""
        return self.link.get("message_s", self.link["latency_s"]) + nbytes / self.link["bandwidth_bytes_per_s"]

    def draft_pass(self, name: str | None, rows: int) -> float:
        """One pass of a timed bundled drafter (its layers and head) over `rows` rows, as it costs at
        work; 0 when the cost file has no timing for it (the caller says so)."""
        if name not in self.draft or not rows:
            return 0.0
        return at_rows(self.draft[name], rows) + self.draft_overhead.get(name, 0.0)

    def cycle_bookkeeping(self, name: str | None) -> float:
        """The engine core's own work per cycle (the schedule, plans, counters) beside `name`'s drafting."""
        return self.bookkeeping.get(name, 0.0)

    def early_exit_pass(self, depth: int, rows: int) -> float:
        """The target's first `depth` layers and its head over `rows` rows (sd's early-exit drafter)."""
        return self.layers_pass(depth, rows) + self.head(rows) if rows else 0.0
