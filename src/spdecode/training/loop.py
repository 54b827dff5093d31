"""`spdecode train`: fit a Pipeline Draft Module to a frozen target by distillation.

Loss: forward KL from the teacher's next-token distribution to the PDM's, both over the draft
vocabulary (the teacher renormalised over it), at rows whose next token the assistant wrote;
optionally plus a top-K distillation term (`topk`). Validation reports the plain KL.
Rows whose teacher argmax lies outside the draft vocabulary are left out: under greedy decoding
no draft from the subset could be accepted there; their share is reported as `oov`.

Every step draws one window, the depths of the rows from the newest back to the oldest token
still in flight, and trains every position as the newest row of such a window with the exact
inference view (layout.py):
- SPD as published: k tokens in flight (n with probability 1/2, else uniform in 1..n-1, the
  states right after a rollback), at depths 0, 1, ..., k-1;
- an EAGLE-style head (n = 1, chained): the depth of the drafted node, uniform in
  1..chain_depth, every row embedding-only: every depth of a draft tree is proposed so;
- a tree-ready SPD draft (`tree`): a path through a draft tree in flight, 0..chain_depth rows
  at each depth 0..n-1 (not all none): the rows of a slot share a depth, the nodes grown this
  cycle are embedding-only rows at depth 0 (methods/schedule.py).
"""

from __future__ import annotations

import json
import math
import os
import pickle
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tqdm import tqdm

from ..drafting.pdm import CONFIG_FILE, WEIGHTS_FILE, PipelineDraftModule
from ..runtime.errors import SpdError
from .features import TeacherFeatures
from .layout import chain_logits, profile_logits

STATE_FILE = "train_state.pt"


@dataclass
class TrainSettings:
    epochs: float = 1.0
    lr: float = 5e-4
    warmup: int = 50
    batch_tokens: int = 4096  # tokens per optimiser step (whole sequences, gradient accumulation)
    grad_clip: float = 1.0
    seed: int = 0
    val_every: int = 100
    save_every: int = 200
    micro_batch: int = 1  # sequences per forward pass (padded); >1 pays off on a GPU
    time_limit: float = 0.0  # seconds for the run, resumes included (0: none); the lr decays by time as well
    chain_depth: int = 4  # an EAGLE-style head: the deepest drafted node; a tree-ready draft: rows per depth
    tree: bool = False  # a tree-ready SPD draft: windows are paths through draft trees in flight
    topk: int = 0  # > 0: add w * -sum over the teacher's top-K tokens of p log q (HASS's top-K distillation)
    topk_weight: float = 1.0


def fill_for_step(n: int, seed: int, step: int, chained: bool = False) -> int:
    """Tokens in flight for this step; a function of (seed, step) so a resumed run draws the same.
    `chained`: an EAGLE-style head's window, uniform in 1..n (n = its chain depth)."""
    rng = random.Random(seed * 1_000_003 + step)
    if chained:
        return rng.randint(1, n)
    return n if n == 1 or rng.random() < 0.5 else rng.randint(1, n - 1)


def window_for_step(pdm, settings: TrainSettings, step: int) -> tuple[int, ...]:
    """The depths of this step's window, newest row first (a function of seed and step)."""
    n = pdm.cfg.n_stages
    if pdm.cfg.chain:
        return (0,) * fill_for_step(settings.chain_depth, settings.seed, step, chained=True)
    if not settings.tree:
        return tuple(range(fill_for_step(n, settings.seed, step)))
    rng = random.Random(settings.seed * 1_000_003 + step)
    while True:
        counts = [rng.randint(0, settings.chain_depth) for _ in range(n)]
        if sum(counts):
            return tuple(d for d in range(n) for _ in range(counts[d]))


def validation_windows(pdm, settings: TrainSettings) -> dict[str, tuple[int, ...]]:
    """Windows reported at validation: the one trained most deeply, and the first a tree starts from."""
    n = pdm.cfg.n_stages
    if pdm.cfg.chain:
        return {"": (0,) * settings.chain_depth, "_k1": (0,)}
    if settings.tree:  # a node grown below two rows of each slot in flight, and the published window
        return {"": (0,) + tuple(d for d in range(1, n) for _ in range(2)), "_k1": tuple(range(n))}
    return {"": tuple(range(n))}


def window_logits(pdm, anchors, window: tuple[int, ...]) -> torch.Tensor:
    if pdm.cfg.chain:  # a head's chain: "feedback" unrolls its own outputs pass by pass
        return chain_logits(pdm, anchors, len(window))
    return profile_logits(pdm, anchors, window)


class TeacherHead:
    """The target's final norm + LM head restricted to the draft vocabulary (rows sliced once)."""

    def __init__(self, pdm: PipelineDraftModule):
        t = pdm.target[0]
        w = t.model.lm_head.weight
        self.norm, self.softcap = t.decoder.norm, t.softcap
        self.weight = w if pdm.vocab is None else w[pdm.vocab]
        self.in_vocab = torch.ones(w.shape[0], dtype=torch.bool, device=w.device)
        if pdm.vocab is not None:
            self.in_vocab[:] = False
            self.in_vocab[pdm.vocab] = True

    def __call__(self, h_final: torch.Tensor) -> torch.Tensor:
        logits = torch.nn.functional.linear(self.norm(h_final), self.weight).float()
        return torch.tanh(logits / self.softcap) * self.softcap if self.softcap else logits


def batch_loss(pdm: PipelineDraftModule, head: TeacherHead, teacher: TeacherFeatures, items, window: tuple[int, ...],
               topk: int = 0, topk_weight: float = 1.0):
    """(summed objective, rows counted, top-1 agreements, rows left out as out-of-vocabulary, rows
    whose teacher favourite is among the draft's 8 likeliest: what a tree can catch) for a
    micro-batch of (features, assistant mask) pairs, right-padded to the longest (padding rows never
    count). The objective is the KL, plus with `topk` the cross-entropy restricted to the teacher's
    K likeliest tokens: KL spreads the draft's capacity over the whole tail, while acceptance only
    asks the draft to rank the head right (HASS, arXiv 2408.15766)."""
    t = pdm.target[0]
    S = max(len(mask) for _, mask in items)
    wanted = pdm.cfg.anchors + [t.n_layers]
    with torch.no_grad():
        per_item = [teacher.select(feats, wanted, t.dtype) for feats, _ in items]
        padded = [torch.stack([F.pad(f[j], (0, 0, 0, S - f[j].shape[0])) for f in per_item])
                  for j in range(len(wanted))]
        # Row p predicts token p+1: it counts when the assistant wrote p+1 and the teacher's
        # favourite is in the draft vocabulary.
        rows = torch.zeros(len(items), S, dtype=torch.bool, device=t.device)
        best = torch.zeros(len(items), S, dtype=torch.long, device=t.device)
        for i, (feats, mask) in enumerate(items):
            rows[i, : len(mask) - 1] = torch.tensor(mask[1:], device=t.device)
            best[i, : len(mask)] = feats["best"]  # host -> device, per batch
        ok_vocab = head.in_vocab[best]
        oov = int((rows & ~ok_vocab).sum())
        rows &= ok_vocab
        if not rows.any():
            return None, 0, 0, oov, 0
        log_p = F.log_softmax(head(padded[-1][rows]), -1)
    logits = window_logits(pdm, padded[:-1], window)[rows]
    log_q = F.log_softmax(logits, -1)
    objective = F.kl_div(log_q, log_p, log_target=True, reduction="sum")
    if topk > 0:
        top_log_p, top_ids = log_p.topk(min(topk, log_p.shape[-1]), dim=-1)
        objective = objective - topk_weight * (top_log_p.exp() * log_q.gather(-1, top_ids)).sum()
    best = log_p.argmax(-1, keepdim=True)
    agree = int((logits.argmax(-1, keepdim=True) == best).sum())
    in_top8 = int((logits.topk(min(8, logits.shape[-1]), dim=-1).indices == best).any(-1).sum())
    return objective, int(rows.sum()), agree, oov, in_top8


def micro_batches(indices: list[int], lengths: list[int], size: int) -> list[list[int]]:
    """Split a step's sequences into groups of `size`, similar lengths together (less padding)."""
    order = sorted(indices, key=lambda i: lengths[i])
    return [order[j : j + size] for j in range(0, len(order), size)]


@torch.no_grad()
def evaluate(pdm, head, teacher, examples, offset: int, window: tuple[int, ...], micro_batch: int = 1) -> dict:
    tot = rows = agree = oov = top8 = 0
    lengths = [len(ids) for ids, _ in examples]
    for group in micro_batches(list(range(len(examples))), lengths, micro_batch):
        items = [(teacher.get(offset + i, examples[i][0]), examples[i][1]) for i in group]
        kl, r, a, o, t8 = batch_loss(pdm, head, teacher, items, window)
        tot += float(kl) if kl is not None else 0.0
        rows, agree, oov, top8 = rows + r, agree + a, oov + o, top8 + t8
    return {"loss": tot / max(rows, 1), "top1": agree / max(rows, 1), "top8": top8 / max(rows, 1), "rows": rows,
            "oov": oov / max(rows + oov, 1)}


LATEST = "latest"  # names the checkpoint directory a resume reads


def save_checkpoint(pdm, opt, out: Path, state: dict) -> None:
    """One resumable checkpoint as a set, atomically: weights, config and optimiser state go into a
    new directory `out/checkpoint-STEP`, then `out/latest` is replaced (one rename) to name it, then
    older checkpoint directories go. A crash anywhere leaves `latest` naming a complete set. The
    draft itself (weights and config at the top of `out`, what --draft reads) is refreshed after."""
    out.mkdir(parents=True, exist_ok=True)
    name = f"checkpoint-{state['step']}"
    tmp = out / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    pdm.save(tmp, dtype=torch.float32)
    torch.save({"optimizer": opt.state_dict(), **state}, tmp / STATE_FILE)
    shutil.rmtree(out / name, ignore_errors=True)
    os.replace(tmp, out / name)
    (out / f".{LATEST}.tmp").write_text(name)
    os.replace(out / f".{LATEST}.tmp", out / LATEST)
    for old in out.glob("checkpoint-*"):
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    for f in (WEIGHTS_FILE, CONFIG_FILE):
        shutil.copyfile(out / name / f, out / f".{f}.tmp")
        os.replace(out / f".{f}.tmp", out / f)


def checkpoint_dir(out: Path) -> Path | None:
    """The complete checkpoint set a resume reads: the one `latest` names (or, from an older
    layout, `out` itself when it holds a state file); None when there is none."""
    latest = out / LATEST
    if latest.exists():
        found = out / latest.read_text().strip()
        if not (found / STATE_FILE).exists():
            raise SpdError(f"{latest} names {found}, which holds no {STATE_FILE}: not a checkpoint to resume")
        return found
    return out if (out / STATE_FILE).exists() else None


def load_state(path: Path) -> dict:
    """A checkpoint's optimiser state and counters, read without running any code: only tensors and
    plain values unpickle (weights_only), so a checkpoint directory from elsewhere cannot execute
    anything on resume."""
    try:
        state = torch.load(path, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as exc:
        raise SpdError(f"{path} is not a plain training checkpoint (tensors and plain values only); refusing "
                       f"to resume from it: {str(exc).splitlines()[0]}") from exc
    if not isinstance(state, dict) or "optimizer" not in state or "step" not in state:
        raise SpdError(f"{path} is not a training checkpoint of this spdecode")
    return state


def train(pdm: PipelineDraftModule, teacher: TeacherFeatures, train_ex, val_ex, out: Path,
          settings: TrainSettings, resume: bool = False, log=print) -> dict:
    torch.manual_seed(settings.seed)
    params = [p for p in pdm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
    tokens_total = sum(len(ids) for ids, _ in train_ex)
    step, history = 0, []

    def lr_at(s):  # linear warm-up, then linear decay to 10% (by steps or by the time limit, whichever is further)
        if s < settings.warmup:
            return settings.lr * (s + 1) / settings.warmup
        done = (s - settings.warmup) / max(1, total_steps - settings.warmup)
        if settings.time_limit:
            done = max(done, elapsed() / settings.time_limit)
        return settings.lr * max(0.1, 1 - done)

    def batches(epoch):
        order = list(range(len(train_ex)))
        random.Random(settings.seed + epoch).shuffle(order)
        batch, size = [], 0
        for i in order:
            batch.append(i)
            size += len(train_ex[i][0])
            if size >= settings.batch_tokens:
                yield batch
                batch, size = [], 0
        if batch:
            yield batch

    per_epoch = [list(batches(e)) for e in range(math.ceil(settings.epochs))]
    total_steps = max(1, int(len(per_epoch[0]) * settings.epochs))
    schedule = [b for epoch in per_epoch for b in epoch][:total_steps]
    elapsed_before = 0.0  # of the run's earlier invocations: a time limit and its lr decay span them all
    found = checkpoint_dir(out) if resume else None
    if found is not None:
        state = load_state(found / STATE_FILE)
        pdm.load_state_dict({k: v.to(pdm.lm_head.weight.dtype) if v.is_floating_point() else v
                             for k, v in load_file(found / WEIGHTS_FILE).items()})
        opt.load_state_dict(state["optimizer"])
        step, history = state["step"], state.get("history", [])
        elapsed_before = float(state.get("elapsed_s", 0.0))
        log(f"resumed from {found} at step {step}/{total_steps}, {elapsed_before:.0f} s in")

    windows = validation_windows(pdm, settings)
    head = TeacherHead(pdm)
    meta = {"settings": asdict(settings), "train_sequences": len(train_ex), "train_tokens": tokens_total}
    bar = tqdm(total=total_steps, initial=step, desc="train PDM", unit="step", dynamic_ncols=True)
    t_start, tok_done, last = time.perf_counter(), 0, {}

    def elapsed() -> float:
        return elapsed_before + time.perf_counter() - t_start
    lengths = [len(ids) for ids, _ in train_ex]

    def validate():
        pdm.eval()
        v = evaluate(pdm, head, teacher, val_ex, len(train_ex), windows[""], settings.micro_batch)
        if "_k1" in windows and windows["_k1"] != windows[""]:  # where a tree starts, or the published window
            v["top1_k1"] = evaluate(pdm, head, teacher, val_ex, len(train_ex), windows["_k1"],
                                    settings.micro_batch)["top1"]
        pdm.train()
        history.append({"step": step, **v})
        first = f", top-1 at {windows['_k1']} {v['top1_k1']:.3f}" if "top1_k1" in v else ""
        bar.write(f"step {step}: val loss {v['loss']:.3f} top-1 {v['top1']:.3f} top-8 {v['top8']:.3f} "
                  f"(window {windows['']}, {v['rows']} rows, oov {v['oov']:.3f}){first}")

    out_of_time = False
    pdm.train()
    try:
        while step < total_steps:
            out_of_time = settings.time_limit and elapsed() > settings.time_limit
            if out_of_time:
                break
            window = window_for_step(pdm, settings, step)
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            opt.zero_grad(set_to_none=True)
            tot_kl = rows = agree = 0
            for group in micro_batches(schedule[step], lengths, settings.micro_batch):
                items = [(teacher.get(i, train_ex[i][0]), train_ex[i][1]) for i in group]
                kl, r, a, _, _ = batch_loss(pdm, head, teacher, items, window, settings.topk, settings.topk_weight)
                if kl is None:
                    continue
                (kl / settings.batch_tokens).backward()
                tot_kl, rows, agree = tot_kl + kl.item(), rows + r, agree + a
                tok_done += sum(lengths[i] for i in group)
            torch.nn.utils.clip_grad_norm_(params, settings.grad_clip)
            opt.step()
            step += 1
            last = {"loss": tot_kl / max(rows, 1), "top1": agree / max(rows, 1)}
            bar.set_postfix(loss=f"{last['loss']:.3f}", top1=f"{last['top1']:.3f}", k=len(window),
                            tok_s=f"{tok_done / (time.perf_counter() - t_start):.0f}")
            bar.update(1)
            if val_ex and (step % settings.val_every == 0 or step == total_steps):
                validate()
            if step % settings.save_every == 0 or step == total_steps:
                save_checkpoint(pdm, opt, out, {"step": step, "history": history, "elapsed_s": elapsed(), **meta})
        if out_of_time:
            bar.write(f"time limit of {settings.time_limit:.0f} s reached at step {step}/{total_steps}")
            if val_ex and (not history or history[-1]["step"] != step):
                validate()
            save_checkpoint(pdm, opt, out, {"step": step, "history": history, "elapsed_s": elapsed(), **meta})
    except KeyboardInterrupt:
        bar.close()
        save_checkpoint(pdm, opt, out, {"step": step, "history": history, "elapsed_s": elapsed(), **meta})
        log(f"interrupted: resumable checkpoint at step {step} saved in {out} (rerun with --resume)")
        raise
    bar.close()
    pdm.eval()
    result = {"step": step, "last": last, "history": history, "seconds": time.perf_counter() - t_start, **meta}
    (out / "train_log.json").write_text(json.dumps(result, indent=2))
    return result
