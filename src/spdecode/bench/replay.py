"""`spdecode eval-draft`: a draft's greedy acceptance on many prompts, fast and exact.

Greedy SPD emits the target's greedy continuation, and a draft is only ever verified when every
token before it was right, so the draft was computed from the teacher-forced features of that
continuation. Hence one teacher-forced pass over prompt + continuation, plus the PDM in its
training layout for every window size k, determines every draft SPD would verify; running the
pipeline schedule over those predictions replays SPD's alpha, tokens/cycle and tau exactly
(`tests/test_evaluate.py` checks it against the decoder), at a fraction of the decoding cost.

The continuations come from batched greedy generation (fast on CPU). Batched and single-sequence
arithmetic can differ in the last bits, so each continuation is cut where it first departs from
the teacher-forced argmax; the report says how many tokens were replayed.

Draft trees (`--tree-budget N`, N > 1) have no such replay: a dynamic tree's off-path nodes are
drafted from features of other off-path nodes at partial depths, which no teacher-forced pass of
the true continuation computes. They are decoded instead (the single-process engine, greedy,
exact counters), and the report says "decoded".
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from ..data import load_prompt_set
from ..distributed.split import pdm_split
from ..drafting.pdm import PipelineDraftModule
from ..methods.spd_core import SpdRun
from ..runtime.generation import StopRule
from ..runtime.metrics import Metrics
from ..runtime.models import DEFAULT_MODEL
from ..runtime.prompts import encode_prompt
from ..runtime.staged import StagedTarget
from ..training.layout import layout_logits
from .report import pooled


class ReplayDrafts:
    """The PDM's greedy drafts for every position and window size, read from the training layout
    (a SlotDrafter for one node per slot: the newest leaf's child)."""

    method, after_stage0, anchors = "spd-replay", False, []

    def __init__(self, by_window: dict[int, list[int]], length: int):
        self.by_window, self.length = by_window, length

    def reset(self, run) -> None:
        pass

    def grow(self, run, now: bool) -> None:
        sched = run.sched
        window = sched.live()  # the root and the drafts after it: the tokens in flight
        leaf = window[-1]
        pos = sched.nodes[leaf].position + 1
        # Drafts past the teacher-forced sequence are never verified (they sit behind the last token).
        token = self.by_window[len(window)][pos - 1] if pos - 1 < self.length else -1
        sched.add(token, leaf)


class Replay:
    """The SpdRun executor that runs no stage: the teacher-forced pass already knows every verdict.
    The target's choice after a row is the continuation's next token: exact for every row the
    walk visits (each one's prefix is the emitted one, hence the teacher-forced one)."""

    def __init__(self, generated: list[int], prompt_len: int):
        self.generated, self.prompt_len = list(generated), prompt_len  # the target's greedy tokens

    def prefill(self, run: SpdRun) -> int:
        return self.generated[0]

    def cycle(self, run: SpdRun, slot) -> None:
        run.grow()
        sched = run.sched
        choices = None
        if sched.exiting is not None:
            later = [sched.nodes[i].position + 1 - self.prompt_len for i in sched.exit_rows()]
            choices = [self.generated[k] if k < len(self.generated) else -1 for k in later]
        run.settle(choices)


@torch.no_grad()
def replay_greedy(target: StagedTarget, pdm: PipelineDraftModule, prompt: list[int], continuation: list[int],
                  eos: set[int] = frozenset()) -> dict:
    """SPD's greedy counters for `prompt` + the target's greedy `continuation` (cut at a departure or EOS)."""
    ids = list(prompt) + list(continuation)
    h, got = target.teacher_pass(ids, pdm.cfg.anchors)
    best = target.logits(h)[0].argmax(-1).tolist()  # best[p]: the target's token for p+1 given ids[:p+1]
    P = len(prompt)
    gen, p = [], P - 1  # what greedy decoding emits, as far as the teacher-forced pass can vouch for it
    while True:
        gen.append(best[p])
        if gen[-1] in eos or len(gen) == len(continuation) or ids[p + 1] != gen[-1]:
            break
        p += 1
    anchors = [got[j] for j in pdm.cfg.anchors]
    drafts = {}
    for k in range(1, pdm.cfg.n_stages + 1):
        top = layout_logits(pdm, anchors, k).argmax(-1)
        drafts[k] = (top if pdm.vocab is None else pdm.vocab[top]).tolist()
    n = pdm.cfg.n_stages
    # The generation ends where `gen` ends: at EOS, or where the teacher-forced pass stops vouching.
    m = Metrics(method="spd-replay", n_stages=n, prompt_tokens=P)
    run = SpdRun(n, prompt, ReplayDrafts(drafts, len(ids)), StopRule(set(eos), len(gen)), m)
    if run.drive(Replay(gen, P)).tokens != gen:
        raise RuntimeError("the replay emitted other tokens than the teacher-forced pass vouches for")
    return {"method": "spd-replay", "n_stages": n, "new_tokens": m.new_tokens, "cycles": m.cycles,
            "drafts_verified": m.drafts_verified, "drafts_accepted": m.drafts_accepted, "decode_s": 0.0,
            "decode_tok_s": None, "prompt_tokens": P, "walks": m.walks}


def print_row(name: str, s: dict, how: str, n: int) -> None:
    depth = s.get("alpha_per_depth")
    per_depth = ("  acceptance per depth " + " ".join("-" if a is None else f"{a:.2f}" for a in depth)) if depth else ""
    print(f"{name:<10} prompts {s['prompts']:>3}  {how} tokens {s['new_tokens']:>6}  alpha {s['alpha']:.3f}  "
          f"tokens/cycle {s['tokens_per_cycle']:.3f}  tau {s['tau']:.2f} (n={n}){per_depth}")


@torch.no_grad()
def greedy_continuations(model, tok, prompts: list[list[int]], max_new_tokens: int, batch_size: int = 16):
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    out = []
    for i in tqdm(range(0, len(prompts), batch_size), desc="greedy continuations", unit="batch", leave=False):
        chunk = prompts[i : i + batch_size]
        width = max(map(len, chunk))
        ids = torch.tensor([[pad] * (width - len(c)) + c for c in chunk])
        attn = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c in chunk])
        gen = model.generate(ids, attention_mask=attn, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=pad)
        out += [row.tolist() for row in gen[:, width:]]
    return out


@dataclass(frozen=True)
class EvalConfig:
    """What `spdecode eval-draft` replays (its options, with their defaults)."""

    model: str = DEFAULT_MODEL
    dtype: str = "float32"
    device: str = "cpu"
    threads: int | None = None
    stages: int | list[int] = 4
    draft: str | None = None  # default: the bundled draft for the model and split
    data: str = "mt_bench,gsm8k,humaneval"
    limit: int | None = None
    max_new_tokens: int = 256
    json_out: str | None = None
    tree_budget: int | None = None  # > 1: decode SPD over draft trees instead of replaying
    tree_depth: int | None = None
    tree_topk: int | None = None


def decode_trees(target, pdm, prompt: list[int], max_new_tokens: int, eos: set[int], shape) -> dict:
    """SPD over draft trees, decoded in one process (greedy): the counters a replay would give."""
    from ..drafting.pdm_tree import PdmTreeDrafter
    from ..methods.spd import generate_spd

    m = generate_spd(target, PdmTreeDrafter(pdm), prompt, max_new_tokens, eos=eos, shape=shape).metrics
    return {"method": "spd-decoded", "n_stages": m.n_stages, "new_tokens": m.new_tokens, "cycles": m.cycles,
            "drafts_verified": m.drafts_verified, "drafts_accepted": m.drafts_accepted, "decode_s": m.decode_s,
            "decode_tok_s": m.decode_tok_s, "verified_per_depth": m.verified_per_depth,
            "accepted_per_depth": m.accepted_per_depth, "phase_s": dict(m.phase_s), "prompt_tokens": len(prompt),
            "walks": m.walks}


def run_eval(cfg: EvalConfig) -> int:
    from ..drafting.pdm import pdm_for
    from ..runtime.generation import eos_ids
    from ..runtime.models import cache_dir, load_model, weights_fingerprint

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model, tok = load_model(cfg.model, cfg.dtype, cfg.device)
    from ..generators import MethodOptions
    from ..methods.spd_core import TreeShape

    # One node per slot (the exact replay) unless a tree budget is asked for.
    shape = TreeShape() if cfg.tree_budget is None else TreeShape(*MethodOptions(
        tree_budget=cfg.tree_budget, tree_depth=cfg.tree_depth, tree_topk=cfg.tree_topk).tree("spd"))
    target = StagedTarget(model, pdm_split(model, cfg.model, cfg.stages, cfg.draft, tree=shape.tree))
    pdm = pdm_for(target, cfg.model, weights_fingerprint(model), cfg.draft, shape.tree)
    eos = eos_ids(model, tok)
    how = "decoded" if shape.tree else "replayed"
    summary, records = {}, []
    for name in [d.strip() for d in cfg.data.split(",") if d.strip()]:
        rows = load_prompt_set(name, cfg.limit)
        prompts = [encode_prompt(tok, r["turns"][0]) for r in rows]
        # The continuations depend only on the target: cached, they serve every draft evaluated after.
        key = hashlib.sha256(json.dumps([weights_fingerprint(model), cfg.dtype, prompts, cfg.max_new_tokens])
                             .encode()).hexdigest()[:20]
        cached = cache_dir() / "continuations" / f"{key}.json"
        if cached.exists():
            conts = json.loads(cached.read_text())
        else:
            conts = greedy_continuations(model, tok, prompts, cfg.max_new_tokens)
            cached.parent.mkdir(parents=True, exist_ok=True)
            cached.write_text(json.dumps(conts))
        recs = []
        for r, p, c in tqdm(list(zip(rows, prompts, conts, strict=True)), desc=f"{how} {name}", leave=False):
            rec = decode_trees(target, pdm, p, cfg.max_new_tokens, eos, shape) if shape.tree else \
                replay_greedy(target, pdm, p, c, eos)
            recs.append({"dataset": name, "question_id": r["question_id"], **rec})
        summary[name] = pooled(recs)
        records += recs
        print_row(name, summary[name], how, pdm.cfg.n_stages)
    summary["overall"] = pooled(records)
    print_row("overall", summary["overall"], how, pdm.cfg.n_stages)
    if cfg.json_out:
        Path(cfg.json_out).write_text(json.dumps({"summary": summary, "records": records}, indent=1))
    return 0
