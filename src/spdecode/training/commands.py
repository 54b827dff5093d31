"""Training a draft end to end, regenerating answers, building a draft vocabulary: what the `train`,
`regenerate` and `vocab` commands run, with plain arguments (`TrainConfig` holds train's)."""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from ..runtime.backends import PACKED
from ..runtime.errors import SpdError
from ..runtime.models import DEFAULT_MODEL


@dataclass(frozen=True)
class TrainConfig:
    """One PDM training run (the `spdecode train` options, with their defaults)."""

    out: str  # checkpoint directory (a usable --draft)
    model: str = DEFAULT_MODEL
    dtype: str = "float32"
    teacher_dtype: str | None = None  # the frozen target's dtype for the teacher pass (default: dtype)
    device: str = "cpu"
    threads: int | None = None
    stages: int | list[int] = 4
    layers: int = 1  # PDM decoder layers Ls
    anchors: str | None = None  # "0,8,16,23,30"; default: the stage ends
    draft_vocab: str = "8192"  # a size, 0 for the full vocabulary, or a JSON file of token ids
    data: str = "sharegpt"
    limit: int | None = 2000
    regenerate: bool = False  # train on the target's own greedy answers to the first user turns
    regen_dtype: str = "bfloat16"
    regen_batch: int = 32
    max_len: int = 512
    val_frac: float = 0.02
    epochs: float = 1.0
    lr: float = 5e-4
    batch_tokens: int = 4096
    seed: int = 0
    val_every: int = 100
    save_every: int = 100
    cache_dir: str | None = None  # keep teacher features here across runs
    resume: bool = False
    micro_batch: int = 1
    teacher_batch: int = 1
    time_limit: float = 0.0  # seconds; 0: none
    eagle: str = ""  # train an EAGLE-style head (one stage) that chains drafts by: embed | feedback
    chain_depth: int = 4  # the head's deepest trained draft; a tree-ready draft's rows per depth
    tree: bool = False  # a tree-ready SPD draft: trained on paths through draft trees in flight
    init: str | None = None  # start from this PDM checkpoint (its anchors and draft vocabulary)
    topk: int = 0  # > 0: add a top-K distillation term (HASS) over the teacher's K likeliest tokens
    topk_weight: float = 1.0


def init_from(pdm, directory: str | Path) -> int:
    """Copy every tensor of the checkpoint in `directory` that `pdm` has with the same name and shape
    (e.g. an SPD draft's decoder layer, head and anchor projections into an EAGLE-style head).
    A new feedback head's FC_fb starts as the embedding-only projection FC_0 with zero weight on
    the fed-back output, so it starts out drafting exactly as an "embed" head and learns what the
    feedback adds (seeding it from the deepest projection, the output standing in for h_L, was
    tried: the output's scale is not h_L's, and the loss at depth >= 2 started at ~13 nats).
    Returns the tensors copied."""
    from safetensors.torch import load_file

    from ..drafting.pdm import WEIGHTS_FILE

    state = load_file(Path(directory) / WEIGHTS_FILE)
    mine = pdm.state_dict()
    same = {k: v for k, v in state.items() if k in mine and v.shape == mine[k].shape}
    if pdm.fc_feedback is not None and "fc_feedback.weight" not in same and "fcs.0.weight" in same:
        first = same["fcs.0.weight"]
        same["fc_feedback.weight"] = torch.cat([first, torch.zeros_like(first)], dim=1)
    pdm.load_state_dict({k: v.to(mine[k].dtype) if v.is_floating_point() else v for k, v in same.items()},
                        strict=False)
    return len(same)


def init_settings(directory: str | Path, fingerprint: str) -> tuple[list[int], torch.Tensor | None]:
    """(anchors, draft vocabulary) of the checkpoint a run starts from, which must have been
    trained for the same target weights (`fingerprint`)."""
    from safetensors.torch import safe_open

    from ..drafting.pdm import CONFIG_FILE, WEIGHTS_FILE

    d = Path(directory)
    if not (d / CONFIG_FILE).exists() or not (d / WEIGHTS_FILE).exists():
        raise SpdError(f"--init {d}: not a PDM checkpoint (needs {CONFIG_FILE} and {WEIGHTS_FILE})")
    cfg = json.loads((d / CONFIG_FILE).read_text())
    if cfg.get("base_fingerprint") != fingerprint:
        raise SpdError(f"--init {d} was trained for {cfg.get('base_model')} (weights {cfg.get('base_fingerprint')}), "
                       f"not for this model (weights {fingerprint})")
    with safe_open(d / WEIGHTS_FILE, "pt") as f:
        vocab = f.get_tensor("vocab") if "vocab" in f.keys() else None
    return cfg["anchors"], vocab


def require_clean(convs: list, data: str) -> None:
    """Training data must not hold evaluation text (clean.py's rules against every evaluation set
    on this machine): otherwise a clear refusal naming `spdecode data clean`."""
    import sys

    from .clean import contaminated

    used, bad = contaminated(convs)
    if not used:
        print("train: no evaluation set found here to check the data against (set SPDECODE_EVAL_DATA)",
              file=sys.stderr)
        return
    if bad:
        first = next(m["content"] for m in bad[0] if m["role"] == "user")
        raise SpdError(f"{len(bad)} of {len(convs)} training conversations in {data} share text with the evaluation "
                       f"sets ({', '.join(used)}), e.g. {first[:80]!r}: clean them first with `spdecode data clean "
                       f"--data {data} --out CLEAN.jsonl` and train on CLEAN.jsonl")


def regeneration_cache(root: Path, model: str, fingerprint: str, convs: list, dtype: str) -> Path:
    """Where a model's answers to `convs` are kept (and resumed by count): keyed on the
    conversations' content, the model's weights and the dtype, never on a file's name, so a
    rewritten or cleaned prompt file gets answers of its own."""
    h = hashlib.sha256(json.dumps(convs, sort_keys=True, ensure_ascii=False).encode())
    h.update(f"{fingerprint}|{dtype}".encode())
    return Path(root) / "regenerated" / f"{Path(model).name}-{h.hexdigest()[:16]}.jsonl"


def examples_from(tok, data: str, limit: int | None, max_len: int, regenerate_with: TrainConfig | None = None,
                  decontaminated: bool = False):
    """Tokenised training conversations with their assistant masks; `regenerate_with`: first have
    that run's model answer every first user turn itself (cached under the cache dir);
    `decontaminated`: refuse data sharing text with the evaluation sets (`require_clean`)."""
    from ..data import load_conversations
    from ..runtime.models import cache_dir
    from .features import regenerate, tokenize_conversation

    convs = load_conversations(data, limit)
    if decontaminated:
        require_clean(convs, data)
    if regenerate_with is not None:
        from ..runtime.models import load_model, weights_fingerprint

        c = regenerate_with
        # Regenerating is generation-bound: bfloat16 and batches of 32 make it ~2x faster on CPU.
        gen_model, _ = load_model(c.model, c.regen_dtype, c.device)
        path = regeneration_cache(cache_dir(), c.model, weights_fingerprint(gen_model), convs, c.regen_dtype)
        convs = regenerate(gen_model, tok, convs, path, batch_size=c.regen_batch)
        del gen_model
    examples = [ex for ex in (tokenize_conversation(tok, c, max_len) for c in convs) if ex]
    if not examples:
        raise SpdError("no usable training sequences (every conversation lacked assistant tokens)")
    return examples


def read_vocab(spec: str, train_ex, vocab_size: int):
    from .features import build_draft_vocab

    if spec.isdigit():
        size = int(spec)
        if size == 0 or size >= vocab_size:
            return None, 1.0
        return build_draft_vocab(train_ex, size, vocab_size)
    path = Path(spec)
    if not path.exists():
        raise SpdError(f"--draft-vocab {spec!r} is neither a size nor an existing JSON file")
    ids = torch.tensor(sorted(json.loads(path.read_text())["token_ids"]), dtype=torch.long)
    return ids, vocab_coverage(ids, train_ex)


def vocab_coverage(ids: torch.Tensor, train_ex) -> float:
    """The share of assistant tokens in `train_ex` that the draft vocabulary `ids` holds."""
    keep = set(ids.tolist())
    counted = [t for i, k in train_ex for t, m in zip(i, k, strict=True) if m]
    return sum(t in keep for t in counted) / max(len(counted), 1)


def fixed_mmap_threshold(size: int = 1 << 20) -> None:
    """Make glibc serve every allocation above `size` with its own mmap, returned on free.

    The teacher pass allocates large buffers of a different size per sequence; with glibc's
    adaptive threshold they end up in the heap and fragment it: a 2400-sequence pass grew by
    ~10 MB per sequence and would have run out of memory. No-op where glibc is absent."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, size)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def run_train(cfg: TrainConfig) -> int:
    from ..drafting.pdm import CONFIG_FILE, new_pdm
    from ..runtime.models import load_model, weights_fingerprint
    from ..runtime.staged import StagedTarget
    from .features import TeacherFeatures
    from .loop import TrainSettings, train

    if cfg.dtype in PACKED:  # its Linears are packed inference kernels: no gradient flows through them
        raise SpdError(f"{cfg.dtype} is an inference backend: train the draft in float32 or bfloat16 "
                       f"(--teacher-dtype {cfg.dtype} may compute the frozen target's features)")
    if cfg.teacher_batch <= 1:  # the batched pass (similar lengths in a row) did not fragment, and mmap costs
        fixed_mmap_threshold()  # it ~45 % (every large buffer faulted in afresh)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.device.startswith("cuda"):
        torch.set_float32_matmul_precision("high")  # TF32 for the draft's matmuls: it is an approximation anyway
    out = Path(cfg.out)
    if (out / CONFIG_FILE).exists() and not cfg.resume:
        raise SpdError(f"{out} already holds a checkpoint: pass --resume to continue it, or another --out")
    if (cfg.eagle or cfg.tree) and cfg.chain_depth < 1:
        raise SpdError(f"--chain-depth must be at least 1 (got {cfg.chain_depth})")
    if cfg.topk < 0:
        raise SpdError(f"--topk must be 0 (plain KL) or a positive number of tokens (got {cfg.topk})")
    if cfg.eagle and cfg.tree:
        raise SpdError("--tree trains an SPD draft for a pipeline of trees; --eagle a one-stage head (it drafts "
                       "trees anyway): choose one")
    model, tok = load_model(cfg.model, cfg.dtype, cfg.device)
    target = StagedTarget(model, 1 if cfg.eagle else cfg.stages)  # an EAGLE-style head is the n = 1 PDM
    examples = examples_from(tok, cfg.data, cfg.limit, cfg.max_len, cfg if cfg.regenerate else None,
                             decontaminated=True)
    random.Random(cfg.seed).shuffle(examples)
    n_val = max(1, int(len(examples) * cfg.val_frac)) if len(examples) > 1 else 0
    train_ex, val_ex = examples[n_val:], examples[:n_val]
    anchors = [int(x) for x in cfg.anchors.split(",")] if cfg.anchors else None
    if cfg.init:
        init_anchors, vocab = init_settings(cfg.init, weights_fingerprint(model))
        anchors = anchors or init_anchors
        coverage = vocab_coverage(vocab, train_ex) if vocab is not None else 1.0
    else:
        vocab, coverage = read_vocab(cfg.draft_vocab, train_ex, model.config.vocab_size)
    pdm = new_pdm(target, cfg.model, weights_fingerprint(model), cfg.layers, anchors, vocab, cfg.eagle)
    if cfg.init and not (cfg.resume and (out / CONFIG_FILE).exists()):
        print(f"initialised {init_from(pdm, cfg.init)} tensors from {cfg.init}")
    if cfg.resume and (out / CONFIG_FILE).exists():
        saved = json.loads((out / CONFIG_FILE).read_text())
        mine = json.loads(json.dumps(pdm.cfg.__dict__))
        if saved != mine:
            raise SpdError(f"--resume: the checkpoint in {out} was made with other settings ({saved} vs {mine})")
    n_tok = sum(len(i) for i, _ in train_ex)
    print(f"{len(train_ex)} training sequences ({n_tok} tokens), {len(val_ex)} held out; "
          f"draft vocabulary {pdm.lm_head.out_features} covers {coverage:.1%} of assistant tokens; "
          f"stages {target.stage_sizes}, anchors {pdm.cfg.anchors}, Ls {cfg.layers}")
    if cfg.teacher_dtype and cfg.teacher_dtype != cfg.dtype:  # the same weights, one more copy in memory
        teacher_target = StagedTarget(load_model(cfg.model, cfg.teacher_dtype, cfg.device)[0], target.stage_sizes)
    else:
        teacher_target = target
    teacher = TeacherFeatures(teacher_target, pdm.cfg.anchors + [target.n_layers], cfg.cache_dir,
                              pdm.cfg.base_fingerprint)
    teacher.warm(train_ex + val_ex, batch_size=cfg.teacher_batch)
    settings = TrainSettings(cfg.epochs, cfg.lr, 50, cfg.batch_tokens, 1.0, cfg.seed, cfg.val_every,
                             cfg.save_every, cfg.micro_batch, cfg.time_limit, cfg.chain_depth, cfg.tree, cfg.topk,
                             cfg.topk_weight)
    result = train(pdm, teacher, train_ex, val_ex, out, settings, resume=cfg.resume)
    pdm.save(out / "export-fp16", dtype=torch.float16)
    last = result["history"][-1] if result["history"] else result["last"]
    print(f"done: step {result['step']}, val top-1 {last.get('top1', 0):.3f}, {result['seconds']:.0f} s; "
          f"draft in {out} (half-precision copy in {out / 'export-fp16'})")
    return 0


def run_regenerate(out: str, model: str = DEFAULT_MODEL, data: str = "sharegpt", limit: int | None = 2000,
                   max_new_tokens: int = 256, batch_size: int = 32, time_limit: float = 0.0, dtype: str = "float32",
                   device: str = "cpu", threads: int | None = None, temperature: float = 0.0, top_p: float = 1.0,
                   seed: int = 0) -> int:
    """Have `model` answer the first user turns of `data` (greedy, or sampled at `temperature`),
    appended to the jsonl `out`."""
    from ..data import load_conversations
    from ..runtime.models import load_model
    from .features import regenerate

    if threads:
        torch.set_num_threads(threads)
    convs = load_conversations(data, limit, need_answer=False)  # only the first user turn is used
    target, tok = load_model(model, dtype, device)
    done = regenerate(target, tok, convs, Path(out), max_new_tokens, batch_size, time_limit=time_limit,
                      temperature=temperature, top_p=top_p, seed=seed)
    print(f"{len(done)} answered conversations in {out} (a .jsonl usable as --data)")
    return 0


def run_synth(out: str, model: str = DEFAULT_MODEL, count: int = 1000, topics: str = "explain,write,math,python",
              temperature: float = 1.0, top_p: float = 0.95, answer_temperature: float = 0.0,
              max_new_tokens: int = 256, batch_size: int = 32, seed: int = 0, time_limit: float = 0.0,
              dtype: str = "float32", device: str = "cpu", threads: int | None = None, prompt_tokens: int = 160) -> int:
    """Self-synthesized prompts (synth.py) in OUT/prompts.jsonl, then the target's answers to them in
    OUT/answers.jsonl (a conversations .jsonl usable as --data); `time_limit` holds for each phase."""
    from ..runtime.models import load_model
    from .features import regenerate
    from .synth import check_topics, synthesize_prompts

    if count < 1:
        raise SpdError(f"--count must be at least 1 (got {count})")
    chosen = [t.strip() for t in topics.split(",")]
    check_topics(chosen)  # before the model loads
    if threads:
        torch.set_num_threads(threads)
    target, tok = load_model(model, dtype, device)
    out_dir = Path(out)
    prompts = synthesize_prompts(target, tok, out_dir / "prompts.jsonl", count, chosen, temperature, top_p, batch_size,
                                 prompt_tokens, seed, time_limit)
    by_topic = Counter(p["topic"] for p in prompts)
    topics_line = ", ".join(f"{k} {v}" for k, v in by_topic.items())
    print(f"{len(prompts)} prompts in {out_dir / 'prompts.jsonl'} ({topics_line})")
    convs = [[{"role": "user", "content": p["prompt"]}] for p in prompts]
    done = regenerate(target, tok, convs, out_dir / "answers.jsonl", max_new_tokens, batch_size, time_limit=time_limit,
                      temperature=answer_temperature, seed=seed)
    print(f"{len(done)} answered conversations in {out_dir / 'answers.jsonl'} (a .jsonl usable as --data)")
    return 0


def run_clean(data: str, out: str, eval_sets: str = "mt_bench,gsm8k,humaneval", threshold: float = 0.8,
              ngram: int = 13) -> int:
    """Conversations from every source in `data` (comma-separated) without near-duplicates and without
    any that share an `ngram`-word n-gram with the evaluation sets, to the jsonl `out`."""
    from ..data import load_conversations
    from .clean import Contamination, clean, eval_texts

    if ngram < 1:
        raise SpdError(f"--ngram must be at least 1 (got {ngram})")
    convs = [c for source in data.split(",") if source.strip() for c in load_conversations(source.strip(), None)]
    texts = eval_texts([s.strip() for s in eval_sets.split(",") if s.strip()])
    kept, report = clean(convs, Contamination(texts, ngram), threshold)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w") as f:
        for conv in kept:
            f.write(json.dumps({"messages": conv}) + "\n")
    print(report.line() + f" ({len(texts)} evaluation texts) -> {out}")
    for example in report.contaminated_examples:
        print(f"  contaminated: {example!r}")
    return 0


def run_vocab(out: str, model: str = DEFAULT_MODEL, data: str = "sharegpt", limit: int | None = 2000,
              max_len: int = 512, size: int = 8192) -> int:
    """Write the `size` most frequent assistant tokens of `data` (a draft vocabulary) to the JSON `out`."""
    from transformers import AutoTokenizer

    from ..runtime.models import resolve_model
    from .features import build_draft_vocab

    tok = AutoTokenizer.from_pretrained(resolve_model(model))
    examples = examples_from(tok, data, limit, max_len)
    ids, coverage = build_draft_vocab(examples, size, len(tok))
    Path(out).write_text(json.dumps({"model": model, "size": len(ids), "coverage": coverage,
                                     "token_ids": ids.tolist()}))
    print(f"{len(ids)} tokens cover {coverage:.2%} of the assistant-token mass in {len(examples)} conversations "
          f"-> {out}")
    return 0
