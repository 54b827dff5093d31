"""Prompts the target writes itself (Magpie, Xu et al. arXiv 2406.08464), steered by topic seeds.

An instruct model given only its chat template up to the user's turn writes a plausible user
message, as it saw many in its own training. Left alone it drifts to a few favourite topics; so
each user turn starts with a seed phrase of a topic (explanations, writing, grade-school word
problems, Python functions: what users ask, and what the evaluation sets measure) and the model
writes the rest, sampled, until its end-of-turn token. A turn that does not end within the token
budget, or is too short to be a request, is dropped. The prompts are then answered by the target
(`features.regenerate`), so both sides of every conversation come from the target alone.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import torch
from tqdm import tqdm

from ..runtime.errors import SpdError
from ..runtime.generation import eos_ids
from .features import read_appended

# The first words of a user turn, per topic; the model writes the rest.
SEEDS = {
    "explain": ["Explain", "Why does", "How does", "What is the difference between", "Can you explain how",
                "What are the main causes of", "Describe how"],
    "write": ["Write a short story about", "Write an email to", "Write a poem about", "Write a blog post about",
              "Draft a letter", "Write a product description for", "Rewrite the following paragraph"],
    "math": ["A farmer has", "Sarah buys", "A train travels", "Tom has", "A store sells", "Maria saves",
             "There are 24", "A recipe needs", "John runs"],
    "python": ["Write a Python function that", "Write a Python function to", "Implement a Python class",
               "Write a Python script that", "Fix this Python code:", "def"],
}
MARK = "\u2063SPDECODE-USER-TURN\u2063"  # stands in for the user's text to find where it begins
MIN_WORDS = 4


def user_header(tok) -> str:
    """The chat template's text up to where a user's message begins (its system turn included)."""
    if not tok.chat_template:
        raise SpdError("self-synthesized prompts need an instruct model with a chat template")
    text = tok.apply_chat_template([{"role": "user", "content": MARK}], tokenize=False)
    return text[:text.index(MARK)]


def read_prompts(path: Path) -> list[dict]:
    """The prompts an earlier (possibly interrupted) run wrote."""
    return read_appended(path)


def check_topics(topics: list[str]) -> None:
    unknown = [t for t in topics if t not in SEEDS]
    if unknown or not topics:
        raise SpdError(f"unknown topics {unknown or topics}; choose from {', '.join(SEEDS)}")


@torch.no_grad()
def synthesize_prompts(model, tok, out_file: Path, count: int, topics: list[str], temperature: float = 1.0,
                       top_p: float = 0.95, batch_size: int = 32, max_new_tokens: int = 160, seed: int = 0,
                       time_limit: float = 0.0) -> list[dict]:
    """`count` user prompts ({"topic", "prompt", "batch"}), appended to `out_file` as they come (a
    rerun resumes with the batch after the last written one)."""
    check_topics(topics)
    if temperature <= 0:
        raise SpdError("self-synthesized prompts are sampled: --temperature must be > 0")
    head = user_header(tok)
    stop = eos_ids(model, tok)
    pad = tok.pad_token_id if tok.pad_token_id is not None else next(iter(stop), 0)
    done = read_prompts(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    # Each batch draws from its own seed: a resumed run goes on with the batch after the last written.
    t0, batch = time.perf_counter(), done[-1]["batch"] + 1 if done else 0
    with out_file.open("a") as f, tqdm(total=count, initial=min(len(done), count), desc="prompts") as bar:
        while len(done) < count:
            if time_limit and time.perf_counter() - t0 > time_limit:
                bar.write(f"prompts: time limit reached after {len(done)} of {count}")
                break
            rng = random.Random(seed * 1_000_003 + batch)
            torch.manual_seed(seed * 1_000_003 + batch)
            picks = [rng.choice(topics) for _ in range(batch_size)]
            seeds = [rng.choice(SEEDS[t]) for t in picks]
            enc = [tok(head + s, add_special_tokens=False)["input_ids"] for s in seeds]
            width = max(map(len, enc))
            ids = torch.tensor([[pad] * (width - len(e)) + e for e in enc], device=model.device)
            attn = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in enc], device=model.device)
            out = model.generate(ids, attention_mask=attn, max_new_tokens=max_new_tokens, do_sample=True,
                                 temperature=temperature, top_p=top_p, pad_token_id=pad)
            for topic, s, row in zip(picks, seeds, out[:, width:].tolist(), strict=True):
                end = next((k for k, t in enumerate(row) if t in stop), None)
                if end is None:  # the turn did not end within the budget: a ramble, not a request
                    continue
                text = (s + tok.decode(row[:end], skip_special_tokens=True)).strip()
                if len(text.split()) < MIN_WORDS or len(done) >= count:
                    continue
                rec = {"topic": topic, "prompt": text, "batch": batch}
                f.write(json.dumps(rec) + "\n")
                done.append(rec)
                bar.update(1)
            f.flush()
            batch += 1
    return done
