"""Speculative Pipeline Decoding in one process: the SPD core (spd_core.py) driven over the staged
target, running the stages one after another; with one stage, speculative decoding over a draft
tree (eagle, and sd with a tree budget).

With n > 1 this path shows the algorithm, its acceptance and its per-cycle overhead, not the
wall-clock gain, which needs one process per stage (the distributed executor). Output is exactly
AR's: every emitted token is the target's own choice at a node whose prefix is the emitted one,
computed over the same KV history as AR (verify.target_choices).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..drafting.drafters import AnchorStore
from ..runtime.generation import Generation, Halt, first_reservation, start_generation
from ..runtime.sampling import GREEDY, Sampler, SamplingParams
from ..runtime.staged import StagedTarget
from ..runtime.verify import target_choices
from .schedule import Slot
from .spd_core import ONE_NODE, SpdRun, TreeShape


def anchor_store(target, drafter, positions: int) -> AnchorStore | None:
    """Buffers for the hidden states the drafter reads: `positions` at first, more as they are written."""
    anchors = list(drafter.anchors)
    return AnchorStore(anchors, target.config.hidden_size, target.dtype, target.device, positions) if anchors else None


def stage_captures(target, anchors: list[int]) -> list[set[int]]:
    """Per stage, the anchors it produces: h_j comes out of layer j-1, so stage [lo, hi) gives
    lo < j <= hi (h_0, the embedding, is stored on entry)."""
    return [{j for j in anchors if lo < j <= hi} for lo, hi in target.stage_bounds]


def embed_rows(target, store: AnchorStore | None, run: SpdRun, rows: list[int]) -> torch.Tensor:
    """The entering nodes' embeddings [1, q, H]: stage 0's input and their anchor h_0."""
    h = target.embed(torch.tensor([[run.sched.nodes[i].token for i in rows]], dtype=torch.long, device=target.device))
    if store is not None:
        store.put_nodes(0, rows, h[0])
    return h


def run_stage_keeping(target, store: AnchorStore | None, stage: int, h: torch.Tensor, layout, rows: list[int],
                      capture: set[int], sched) -> torch.Tensor:
    """One stage on a chunk of nodes, keeping the anchors it produces (h_j comes out of layer j-1)
    for the nodes still alive."""
    if not rows:
        return h
    out, got = target.run_stage_chunk(stage, h, layout, capture)
    if store is not None and got:
        keep_nodes(store, sched, got, rows)
    return out


def keep_nodes(store: AnchorStore, sched, got: dict[int, torch.Tensor], rows: list[int]) -> None:
    """Store h_j [1, q, H] of `rows` for each anchor j in `got`, for the rows that are alive."""
    alive = sched.alive(rows)
    if not alive:
        return
    ids = [rows[k] for k in alive]
    for j, hj in got.items():
        store.put_nodes(j, ids, hj[0, alive] if len(alive) < len(rows) else hj[0])


def prefill_keeping(target, store: AnchorStore | None, prompt: list[int], stages, captures) -> torch.Tensor:
    """The prompt through `stages` from position 0 in one batched pass, keeping its anchors."""
    h = target.embed(torch.tensor([prompt], device=target.device))
    if store is not None and 0 in store.slot:
        store.put(0, 0, h[0])
    for s in stages:
        h, got = target.run_stage(s, h, 0, captures[s])
        for j, hj in got.items():
            store.put(j, 0, hj[0])
    return h


class LocalPipeline:
    """The executor of SpdRun in one process: every stage on the same staged target, in the order
    and with the plans the distributed ranks use (schedule.py's timing)."""

    def __init__(self, target: StagedTarget, drafter, store, sampler: Sampler):
        self.target, self.store, self.sampler = target, store, sampler
        self.late = drafter.after_stage0
        self.capture = stage_captures(target, list(drafter.anchors))
        self.carry: list[torch.Tensor | None] = [None] * target.n_stages  # what stage s produced last cycle

    def prefill(self, run: SpdRun) -> int:
        t = self.target
        h = prefill_keeping(t, self.store, run.prompt, range(t.n_stages), self.capture)
        return self.sampler.choose(t.logits(h[:, -1])[0])

    def cycle(self, run: SpdRun, slot: Slot) -> None:
        t, clock, sched = self.target, run.clock, run.sched
        h0 = embed_rows(t, self.store, run, slot.rows)
        clock.lap("bookkeeping")
        # The PDM drafts concurrently with the stages, from what exists before the cycle; SPEED's
        # drafter needs the newest token's state from stage 0 of this very cycle, so it runs after.
        if not self.late:
            run.grow()
            clock.lap("draft")
        for s, sl in sched.stage_slots():  # deepest first: see schedule.stage_slots
            if s == 0:
                h_in, rows, layout = h0, sl.rows, sl.layout0
            else:  # the stages after stage 0 apply the verdict that came before this slot, then run it
                t.compact(sl.compaction, s)
                h_in, rows, layout = self.carry[s - 1], sl.down_rows, sl.layout
            self.carry[s] = run_stage_keeping(t, self.store, s, h_in, layout, rows, self.capture[s], sched)
        clock.lap("stages")
        if self.late:
            run.grow()
            clock.lap("draft")
        choices = None
        if sched.exiting is not None:  # its logits decide the next positions
            rows = sched.exit_rows()
            successors = sched.exiting.successors if run.n > 1 else [sched.successor(i) for i in rows]
            choices = target_choices(t.logits(self.carry[-1])[0], self.sampler, successors) if rows else []
            clock.lap("verify")
        done = run.settle(choices)
        t.compact(done.stage0, 0)
        if done.leaving is not None:  # only the rows still live travel on
            self.carry[0] = self.carry[0][:, done.leaving.keep]


def lookahead_rows(n: int, shape: TreeShape) -> int:
    """Cache slots past the last emitted token's that in-flight rows can take: one node per slot,
    n - 1 positions ahead (SPD as published); a tree, n slots of its budget and the waiting root,
    several rows at one position."""
    return n * (shape.budget + 1) if shape.tree else n - 1


@torch.inference_mode()
def generate_spd(
    target: StagedTarget,
    drafter,
    prompt_ids: list[int],
    max_new_tokens: int = 64,
    sampling: SamplingParams = GREEDY,
    eos: set[int] = frozenset(),
    on_token: Callable[[int], None] | None = None,
    shape: TreeShape = ONE_NODE,
    method: str | None = None,
    halt: Halt | None = None,
) -> Generation:
    """SPD over `target`'s stages with `drafter` (a protocols.SlotDrafter); `shape`: the draft
    tree per slot (budget 1: SPD as published). `method`: the name the metrics carry."""
    n = target.n_stages
    extra = lookahead_rows(n, shape)
    max_new_tokens, sampler, stop, m = start_generation(target, prompt_ids, max_new_tokens, sampling, eos,
                                                        method or drafter.method, lookahead=extra, halt=halt)
    store = anchor_store(target, drafter, first_reservation(len(prompt_ids), max_new_tokens, extra))
    run = SpdRun(n, prompt_ids, drafter, stop, m, store, shape, on_token, sampler)
    return run.drive(LocalPipeline(target, drafter, store, sampler))
