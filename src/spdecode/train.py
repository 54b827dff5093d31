"""`spdecode train`: fit a Pipeline Draft Module to a frozen target by distillation.

Loss: forward KL from the teacher's next-token distribution to the PDM's, both over the draft
vocabulary (the teacher renormalised over it), at rows whose next token the assistant wrote.
Rows whose teacher argmax lies outside the draft vocabulary are left out: under greedy decoding
no draft from the subset could be accepted there; their share is reported as `oov`.

Every step draws the number of tokens in flight k (n with probability 1/2, else uniform in
1..n-1, the states right after a rollback) and trains every position as the newest token of
such a window with the exact inference view (train_layout.py).
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from tqdm import tqdm

from .pdm import CONFIG_FILE, WEIGHTS_FILE, PipelineDraftModule
from .train_data import TeacherFeatures
from .train_layout import layout_logits

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


def fill_for_step(n: int, seed: int, step: int) -> int:
    """Tokens in flight for this step; a function of (seed, step) so a resumed run draws the same."""
    rng = random.Random(seed * 1_000_003 + step)
    return n if n == 1 or rng.random() < 0.5 else rng.randint(1, n - 1)


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


def example_loss(pdm: PipelineDraftModule, head: TeacherHead, teacher: TeacherFeatures, feats, mask, k: int):
    """(summed KL, rows counted, top-1 agreements, rows left out as out-of-vocabulary) for one sequence."""
    t = pdm.target[0]
    anchors = teacher.select(feats, pdm.cfg.anchors, t.dtype)
    with torch.no_grad():
        # Row p predicts token p+1: it counts when the assistant wrote p+1 and the teacher's
        # favourite is in the draft vocabulary.
        rows = torch.zeros(len(mask), dtype=torch.bool, device=t.device)
        rows[:-1] = torch.tensor(mask[1:], device=t.device)
        ok_vocab = head.in_vocab[feats["best"]]
        oov = int((rows & ~ok_vocab).sum())
        rows &= ok_vocab
        if not rows.any():
            return None, 0, 0, oov
        log_p = torch.log_softmax(head(teacher.select(feats, [t.n_layers], t.dtype)[0][rows]), -1)
    logits = layout_logits(pdm, anchors, k)[rows]
    kl = torch.nn.functional.kl_div(torch.log_softmax(logits, -1), log_p, log_target=True, reduction="sum")
    agree = int((logits.argmax(-1) == log_p.argmax(-1)).sum())
    return kl, int(rows.sum()), agree, oov


@torch.no_grad()
def evaluate(pdm, head, teacher, examples, offset: int, k: int) -> dict:
    tot = rows = agree = oov = 0
    for i, (ids, mask) in enumerate(examples):
        kl, r, a, o = example_loss(pdm, head, teacher, teacher.get(offset + i, ids), mask, k)
        tot += float(kl) if kl is not None else 0.0
        rows, agree, oov = rows + r, agree + a, oov + o
    return {"loss": tot / max(rows, 1), "top1": agree / max(rows, 1), "rows": rows,
            "oov": oov / max(rows + oov, 1)}


def save_checkpoint(pdm, opt, out: Path, state: dict) -> None:
    """Write weights, config and optimiser state to temporaries, then rename: never a half checkpoint."""
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".tmp"
    pdm.save(tmp, dtype=torch.float32)
    torch.save({"optimizer": opt.state_dict(), **state}, tmp / STATE_FILE)
    for name in (WEIGHTS_FILE, CONFIG_FILE, STATE_FILE):
        os.replace(tmp / name, out / name)
    tmp.rmdir()


def train(pdm: PipelineDraftModule, teacher: TeacherFeatures, train_ex, val_ex, out: Path,
          settings: TrainSettings, resume: bool = False, log=print) -> dict:
    torch.manual_seed(settings.seed)
    params = [p for p in pdm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
    tokens_total = sum(len(ids) for ids, _ in train_ex)
    step, history = 0, []

    def lr_at(s):  # linear warm-up, then linear decay to 10%
        if s < settings.warmup:
            return settings.lr * (s + 1) / settings.warmup
        return settings.lr * max(0.1, 1 - (s - settings.warmup) / max(1, total_steps - settings.warmup))

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
    if resume and (out / STATE_FILE).exists():
        state = torch.load(out / STATE_FILE, weights_only=False)
        pdm.load_state_dict({k: v.to(pdm.lm_head.weight.dtype) if v.is_floating_point() else v
                             for k, v in load_file(out / WEIGHTS_FILE).items()})
        opt.load_state_dict(state["optimizer"])
        step, history = state["step"], state.get("history", [])
        log(f"resumed from {out} at step {step}/{total_steps}")

    n = pdm.cfg.n_stages
    head = TeacherHead(pdm)
    meta = {"settings": asdict(settings), "train_sequences": len(train_ex), "train_tokens": tokens_total}
    bar = tqdm(total=total_steps, initial=step, desc="train PDM", unit="step", dynamic_ncols=True)
    t_start, tok_done, last = time.perf_counter(), 0, {}
    pdm.train()
    try:
        while step < total_steps:
            k = fill_for_step(n, settings.seed, step)
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            opt.zero_grad(set_to_none=True)
            tot_kl = rows = agree = 0
            for i in schedule[step]:
                ids, mask = train_ex[i]
                kl, r, a, _ = example_loss(pdm, head, teacher, teacher.get(i, ids), mask, k)
                if kl is None:
                    continue
                (kl / settings.batch_tokens).backward()
                tot_kl, rows, agree = tot_kl + kl.item(), rows + r, agree + a
                tok_done += len(ids)
            torch.nn.utils.clip_grad_norm_(params, settings.grad_clip)
            opt.step()
            step += 1
            last = {"loss": tot_kl / max(rows, 1), "top1": agree / max(rows, 1)}
            bar.set_postfix(loss=f"{last['loss']:.3f}", top1=f"{last['top1']:.3f}", k=k,
                            tok_s=f"{tok_done / (time.perf_counter() - t_start):.0f}")
            bar.update(1)
            if val_ex and (step % settings.val_every == 0 or step == total_steps):
                pdm.eval()
                v = evaluate(pdm, head, teacher, val_ex, len(train_ex), n)
                pdm.train()
                history.append({"step": step, **v})
                bar.write(f"step {step}: val loss {v['loss']:.3f} top-1 {v['top1']:.3f} (k={n}, {v['rows']} rows, "
                          f"oov {v['oov']:.3f})")
            if step % settings.save_every == 0 or step == total_steps:
                save_checkpoint(pdm, opt, out, {"step": step, "history": history, **meta})
    except KeyboardInterrupt:
        bar.close()
        save_checkpoint(pdm, opt, out, {"step": step, "history": history, **meta})
        log(f"interrupted: resumable checkpoint at step {step} saved in {out} (rerun with --resume)")
        raise
    bar.close()
    pdm.eval()
    result = {"step": step, "last": last, "history": history, "seconds": time.perf_counter() - t_start, **meta}
    (out / "train_log.json").write_text(json.dumps(result, indent=2))
    return result
