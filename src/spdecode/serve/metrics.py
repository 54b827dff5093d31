"""The server's Prometheus metrics (prometheus_client), speculative ones with vLLM's meanings.

vLLM's spec_decode counters, per verification: a *draft* is one target pass (or, in SPD, one slot's
walk) that checks at least one drafted token; *draft tokens* are the drafted tokens the target
checked (for a tree, the nodes on the walk: a chain of that length would have been checked the
same way; the tree's other nodes, proposed but never on the walk, count in
spdecode:draft_tree_nodes_total); *accepted tokens* are the checked ones that the target's own
token matched. `position` is a drafted token's depth below the last verified token, 0-based
(vLLM's position in the draft): in SPD, the depth in the walk of the slot leaving the pipeline.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120)


class ServerMetrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.http = Counter("spdecode:http_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
                            registry=r)
        self.success = Counter("spdecode:request_success", "generations finished, by finish_reason",
                               ["finished_reason"], registry=r)
        self.cancelled = Counter("spdecode:request_cancelled", "generations cut short: client gone or shutdown",
                                 registry=r)
        self.failure = Counter("spdecode:request_failure", "generations that ended in an error", registry=r)
        self.latency = Histogram("spdecode:e2e_request_latency_seconds", "submission to last token", buckets=LATENCY,
                                 registry=r)
        self.queue_time = Histogram("spdecode:request_queue_time_seconds", "time spent waiting for the engine",
                                    buckets=LATENCY, registry=r)
        self.ttft = Histogram("spdecode:time_to_first_token_seconds", "submission to first token", buckets=LATENCY,
                              registry=r)
        self.tok_s = Gauge("spdecode:decode_tokens_per_second", "decode speed of the last finished request",
                           registry=r)
        self.prompt_tokens = Counter("spdecode:prompt_tokens", "prompt tokens processed", registry=r)
        self.generation_tokens = Counter("spdecode:generation_tokens", "tokens generated", registry=r)
        self.running = Gauge("spdecode:num_requests_running", "requests decoding now (0 or 1)", registry=r)
        self.waiting = Gauge("spdecode:num_requests_waiting", "requests waiting in the queue", registry=r)
        self.drafts = Counter("spdecode:spec_decode_num_drafts", "verifications that checked drafted tokens",
                              registry=r)
        self.draft_tokens = Counter("spdecode:spec_decode_num_draft_tokens", "drafted tokens the target checked",
                                    registry=r)
        self.accepted = Counter("spdecode:spec_decode_num_accepted_tokens", "drafted tokens accepted", registry=r)
        self.accepted_per_pos = Counter("spdecode:spec_decode_num_accepted_tokens_per_pos",
                                        "drafted tokens accepted, by depth below the verified token (0-based)",
                                        ["position"], registry=r)
        self.tree_nodes = Counter("spdecode:draft_tree_nodes", "draft nodes proposed (entered a pass or a slot)",
                                  registry=r)
        self.cycles = Counter("spdecode:cycles", "decode cycles (target passes; SPD: pipeline cycles)", registry=r)
        self.tokens_per_cycle = Gauge("spdecode:tokens_per_cycle", "generated tokens per cycle over all requests",
                                      registry=r)
        self._tokens = self._cycles = 0

    def queue(self, running: int, waiting: int) -> None:
        self.running.set(running)
        self.waiting.set(waiting)

    def failed(self) -> None:
        self.failure.inc()

    def finished(self, outcome) -> None:
        m = outcome.generation.metrics
        self.success.labels(outcome.finish_reason).inc()
        self.latency.observe(outcome.total_s)
        self.queue_time.observe(outcome.queued_s)
        if outcome.first_token_s is not None:
            self.ttft.observe(outcome.first_token_s)
        if m.decode_s > 0:
            self.tok_s.set(max(m.new_tokens - 1, 0) / m.decode_s)
        self.prompt_tokens.inc(m.prompt_tokens)
        self.generation_tokens.inc(m.new_tokens)
        per_depth = list(m.verified_per_depth or [])
        self.drafts.inc(per_depth[0] if per_depth else (m.cycles if m.drafts_verified else 0))
        self.draft_tokens.inc(m.drafts_verified)
        self.accepted.inc(m.drafts_accepted)
        for depth, accepted in enumerate(m.accepted_per_depth or []):
            self.accepted_per_pos.labels(str(depth)).inc(accepted)
        self.tree_nodes.inc(m.nodes_entered or m.drafts_proposed)
        self.cycles.inc(m.cycles)
        self._tokens += max(m.new_tokens - 1, 0)  # the first token costs no cycle (runtime.metrics)
        self._cycles += m.cycles
        if self._cycles:
            self.tokens_per_cycle.set(self._tokens / self._cycles)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
