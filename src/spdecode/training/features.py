"""Training examples for the PDM: chat-templated conversations, assistant masks, teacher anchors.

The teacher signal comes from ONE frozen, teacher-forced pass of the target per sequence: the
depth-d feature of a token is a prefix of its anchor list, so that pass gives every partial depth.
Anchors are kept in half precision (on disk with --cache-dir, so further epochs and further runs
with the same anchors reuse them); teacher logits are recomputed from h_L with the target's head,
restricted to the draft vocabulary, which is cheaper than storing them.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from ..runtime.prompts import template_ids
from ..runtime.staged import StagedTarget


def tokenize_conversation(tok, conv: list[dict], max_len: int) -> tuple[list[int], list[bool]] | None:
    """Token ids of the templated conversation and, per token, whether the assistant wrote it.

    An assistant turn's tokens are what its message adds after the generation prompt of the
    conversation before it (its text and end-of-turn marker), found by templating prefixes.
    """
    ids: list[int] = []
    mask: list[bool] = []
    for i, msg in enumerate(conv):
        if msg["role"] == "assistant":
            before = template_ids(tok, conv[:i], add_generation_prompt=True) if i else []
            after = template_ids(tok, conv[: i + 1])
            if after[: len(ids)] != ids or before[: len(ids)] != ids or after[: len(before)] != before:
                return None  # a template whose prefixes do not tokenize stably
            mask += [False] * (len(before) - len(ids)) + [True] * (len(after) - len(before))
            ids = after
        if len(ids) >= max_len:
            break
    ids, mask = ids[:max_len], mask[:max_len]
    return (ids, mask) if any(mask[1:]) else None


def build_draft_vocab(examples, size: int, vocab_size: int) -> tuple[torch.Tensor, float]:
    """The `size` most frequent assistant tokens (sorted ids) and the share of assistant-token mass they cover."""
    counts = Counter()
    for ids, mask in examples:
        counts.update(t for t, m in zip(ids, mask, strict=True) if m)
    top = [t for t, _ in counts.most_common(min(size, vocab_size))]
    total = sum(counts.values())
    coverage = sum(counts[t] for t in top) / total if total else 0.0
    return torch.tensor(sorted(top), dtype=torch.long), coverage


class TeacherFeatures:
    """Per example, from one pass of the frozen target: the wanted anchors [A, S, H] (fp16) and the
    teacher's argmax over the full vocabulary [S].

    The target may run in another dtype than the draft trains in (bfloat16 passes are ~2.7x faster
    than float32 on a CPU). With a cache dir, the wanted anchors go to disk under a key of the
    weights, the teacher's dtype, the anchors and the tokens: every hidden state would be ~36 KB a
    token for SmolLM2 (72 GB for 2M tokens), the anchors of one draft 3-6 KB.
    """

    def __init__(self, target: StagedTarget, anchors: list[int], cache_dir: str | Path | None, model_id: str):
        self.target, self.anchors = target, sorted(set(anchors))
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.model_id = model_id
        # Held in host memory (pinned beside a GPU, so a batch's copy overlaps compute), moved to
        # the training device per batch by `select`: every example's features on the GPU beside a
        # larger target would not fit.
        self.pin = target.device.type == "cuda"
        self.memory: dict[int, dict[str, torch.Tensor]] = {}

    def _host(self, feats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {k: v.to("cpu") for k, v in feats.items()}
        return {k: v.pin_memory() for k, v in out.items()} if self.pin else out

    def _path(self, ids: list[int]) -> Path:
        key = json.dumps([self.model_id, str(self.target.dtype), self.anchors, ids])
        return self.cache_dir / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.safetensors"

    @torch.no_grad()
    def compute(self, ids: list[int]) -> dict[str, torch.Tensor]:
        """One sequence's features through the staged target (what `compute_batch` gives in a batch)."""
        h, got = self.target.teacher_pass(ids, self.anchors)
        return {"anchors": torch.stack([got[j] for j in self.anchors]).to(torch.float16),
                "best": self.target.logits(h)[0].argmax(-1)}

    def _store(self, ids: list[int], feats: dict[str, torch.Tensor]) -> None:
        path = self._path(ids)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({k: v.to("cpu").contiguous() for k, v in feats.items()}, tmp)
        tmp.replace(path)

    def _cached(self, ids: list[int]) -> dict[str, torch.Tensor] | None:
        """The sequence's features from the cache dir, in host memory; None if not there."""
        path = self._path(ids) if self.cache_dir else None
        return self._host(load_file(path)) if path is not None and path.exists() else None

    def get(self, i: int, ids: list[int]) -> dict[str, torch.Tensor]:
        if i in self.memory:
            return self.memory[i]
        feats = self._cached(ids)
        if feats is None:
            feats = self._host(self.compute(ids))
            if self.cache_dir:
                self._store(ids, feats)
        self.memory[i] = feats
        return feats

    def warm(self, examples, desc="teacher features", batch_size: int = 1) -> None:
        """Compute (or read from the cache) every example's features up front; batch_size > 1 runs
        right-padded batches of similar lengths through the target, which a GPU needs (a CPU ran
        2M tokens at ~1630 tokens/s so, in bfloat16 with 2 threads and batches of 8)."""
        if batch_size <= 1:
            for i, (ids, _) in enumerate(tqdm(examples, desc=desc, unit="seq", leave=False)):
                self.get(i, ids)
            return
        for i, (ids, _) in enumerate(examples):
            feats = self._cached(ids)
            if feats is not None:
                self.memory[i] = feats
        order = sorted((i for i in range(len(examples)) if i not in self.memory), key=lambda i: len(examples[i][0]))
        with tqdm(total=len(examples), initial=len(examples) - len(order), desc=desc, unit="seq", leave=False) as bar:
            for j in range(0, len(order), batch_size):
                group = order[j : j + batch_size]
                seqs = [examples[i][0] for i in group]
                for i, ids, feats in zip(group, seqs, self.compute_batch(seqs), strict=True):
                    self.memory[i] = feats = self._host(feats)
                    if self.cache_dir:
                        self._store(ids, feats)
                bar.update(len(group))

    @torch.no_grad()
    def compute_batch(self, seqs: list[list[int]]) -> list[dict[str, torch.Tensor]]:
        """`compute` for several sequences in one pass of the HF model, right-padded (causal
        attention keeps padding out of every real position); h_j is layer j's input, captured by
        hooks, and h_L the last layer's raw output (before the final norm)."""
        t = self.target
        S = max(map(len, seqs))
        ids = torch.zeros(len(seqs), S, dtype=torch.long, device=t.device)
        for r, s in enumerate(seqs):
            ids[r, : len(s)] = torch.tensor(s, device=t.device)
        got: dict[int, torch.Tensor] = {}

        def grab_input(j):
            return lambda _m, args, kwargs: got.__setitem__(j, args[0] if args else kwargs["hidden_states"])

        hooks = [t.layers[j].register_forward_pre_hook(grab_input(j), with_kwargs=True)
                 for j in self.anchors if j < t.n_layers]
        hooks.append(t.layers[-1].register_forward_hook(
            lambda _m, _a, out: got.__setitem__(t.n_layers, out[0] if isinstance(out, tuple) else out)))
        try:
            t.decoder(input_ids=ids, use_cache=False)
        finally:
            for h in hooks:
                h.remove()
        out = []
        for r, s in enumerate(seqs):
            n = len(s)
            out.append({"anchors": torch.stack([got[j][r, :n] for j in self.anchors]).to(torch.float16),
                        "best": t.logits(got[t.n_layers][r : r + 1, :n])[0].argmax(-1)})
        return out

    def select(self, feats: dict, wanted: list[int], dtype) -> list[torch.Tensor]:
        """The wanted anchors of one example, on the training device in `dtype` (copied per batch)."""
        device = self.target.device
        return [feats["anchors"][self.anchors.index(j)].to(device, dtype, non_blocking=self.pin) for j in wanted]


def fit_prompt(tok, text: str, max_prompt: int) -> tuple[str, list[int]]:
    """(text, templated ids) of a user prompt of at most max_prompt tokens: an over-long prompt loses
    the end of its text, never the template's opening (cutting ids would drop the role header)."""
    ids = template_ids(tok, [{"role": "user", "content": text}], add_generation_prompt=True)
    while len(ids) > max_prompt:
        content = tok(text, add_special_tokens=False)["input_ids"]
        keep = len(content) - (len(ids) - max_prompt) - 4
        if keep < 1:
            raise ValueError(f"the chat template alone is longer than {max_prompt} tokens")
        text = tok.decode(content[:keep])
        ids = template_ids(tok, [{"role": "user", "content": text}], add_generation_prompt=True)
    return text, ids


def read_appended(path: Path) -> list:
    """The rows of a jsonl that an interrupted run may have appended to; a torn last line is dropped."""
    done = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                done.append(json.loads(line))
            except json.JSONDecodeError:
                break  # only the last line can be torn: everything before it was flushed whole
    return done


def read_regenerated(path: Path) -> list[list[dict]]:
    """The conversations a (possibly interrupted) regeneration wrote."""
    return [row["messages"] if isinstance(row, dict) else row for row in read_appended(path)]


@torch.no_grad()
def regenerate(model, tok, convs: list[list[dict]], out_file: Path, max_new_tokens: int = 256,
               batch_size: int = 16, max_prompt: int = 384, time_limit: float = 0.0, temperature: float = 0.0,
               top_p: float = 1.0, seed: int = 0) -> list[list[dict]]:
    """Single-turn conversations whose answers the target itself wrote (greedy, or sampled at
    `temperature` > 0 with `top_p`, seeded per batch so a resumed run draws what a straight one
    would), appended to `out_file` as it goes so an interrupted run picks up where it stopped.
    With `time_limit` (seconds), stops starting new batches after that long and returns what exists.

    Distilling on the target's own text matches what the drafter sees at inference (the target's
    greedy continuation), which the original human/ChatGPT answers do not.
    """
    done = read_regenerated(out_file)
    prompts = [c[0]["content"] for c in convs if c[0]["role"] == "user"]
    todo = prompts[len(done):]
    tok.padding_side = "left"
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    out_file.parent.mkdir(parents=True, exist_ok=True)
    t0, written = time.perf_counter(), 0
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else \
        {"do_sample": False}
    with out_file.open("a") as f, tqdm(total=len(prompts), initial=len(done), desc="regenerate", unit="conv") as bar:
        for i in range(0, len(todo), batch_size):
            torch.manual_seed(seed * 1_000_003 + len(done))  # by absolute position: a resumed run draws alike
            if time_limit and time.perf_counter() - t0 > time_limit:
                bar.write(f"regenerate: time limit reached after {len(done)} of {len(prompts)} conversations")
                break
            # The stored prompt is the (possibly shortened) text the answer was written for.
            chunk, enc = zip(*(fit_prompt(tok, p, max_prompt) for p in todo[i : i + batch_size]), strict=True)
            width = max(map(len, enc))
            ids = torch.tensor([[pad] * (width - len(e)) + e for e in enc], device=model.device)
            attn = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in enc], device=model.device)
            out = model.generate(ids, attention_mask=attn, max_new_tokens=max_new_tokens, pad_token_id=pad, **sampling)
            for p, row in zip(chunk, out[:, width:], strict=True):
                written += int((row != pad).sum())
                text = tok.decode(row, skip_special_tokens=True).strip()
                conv = [{"role": "user", "content": p}, {"role": "assistant", "content": text}]
                f.write(json.dumps(conv) + "\n")
                done.append(conv)
            f.flush()
            bar.update(len(chunk))
    seconds = time.perf_counter() - t0
    if written:
        rate = 3600 * written / seconds
        bar.write(f"regenerate: {written} answer tokens in {seconds:.0f} s ({rate:,.0f} tokens/hour)")
    return [c for c in done if c[1]["content"]]
