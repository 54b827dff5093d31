"""Glue between the `train` / `vocab` commands and the training modules (argument handling only)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from .errors import SpdError


def examples_from(args, model, tok):
    from .data import load_conversations
    from .models import cache_dir
    from .train_data import regenerate, tokenize_conversation

    convs = load_conversations(args.data, args.limit)
    if getattr(args, "regenerate", False):
        from .models import load_model

        # Regenerating is generation-bound: bfloat16 and batches of 32 make it ~2x faster on CPU.
        gen_model, _ = load_model(args.model, args.regen_dtype, args.device)
        name = f"{Path(args.model).name}-{Path(args.data).name}-{args.limit}-{args.regen_dtype}.jsonl"
        convs = regenerate(gen_model, tok, convs, cache_dir() / "regenerated" / name, batch_size=args.regen_batch)
        del gen_model
    examples = [ex for ex in (tokenize_conversation(tok, c, args.max_len) for c in convs) if ex]
    if not examples:
        raise SpdError("no usable training sequences (every conversation lacked assistant tokens)")
    return examples


def read_vocab(spec: str, train_ex, vocab_size: int):
    from .train_data import build_draft_vocab

    if spec.isdigit():
        size = int(spec)
        if size == 0 or size >= vocab_size:
            return None, 1.0
        return build_draft_vocab(train_ex, size, vocab_size)
    path = Path(spec)
    if not path.exists():
        raise SpdError(f"--draft-vocab {spec!r} is neither a size nor an existing JSON file")
    ids = torch.tensor(sorted(json.loads(path.read_text())["token_ids"]), dtype=torch.long)
    keep = set(ids.tolist())
    counted = [t for i, k in train_ex for t, m in zip(i, k, strict=True) if m]
    return ids, sum(t in keep for t in counted) / max(len(counted), 1)


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


def run_train(args) -> int:
    from .models import load_model, weights_fingerprint
    from .pdm import CONFIG_FILE, new_pdm
    from .staged import StagedTarget
    from .train import TrainSettings, train
    from .train_data import TeacherFeatures

    fixed_mmap_threshold()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda"):
        torch.set_float32_matmul_precision("high")  # TF32 for the draft's matmuls: it is an approximation anyway
    out = Path(args.out)
    if (out / CONFIG_FILE).exists() and not args.resume:
        raise SpdError(f"{out} already holds a checkpoint: pass --resume to continue it, or another --out")
    model, tok = load_model(args.model, args.dtype, args.device)
    target = StagedTarget(model, args.stages)
    examples = examples_from(args, model, tok)
    random.Random(args.seed).shuffle(examples)
    n_val = max(1, int(len(examples) * args.val_frac)) if len(examples) > 1 else 0
    train_ex, val_ex = examples[n_val:], examples[:n_val]
    vocab, coverage = read_vocab(args.draft_vocab, train_ex, model.config.vocab_size)
    anchors = [int(x) for x in args.anchors.split(",")] if args.anchors else None
    pdm = new_pdm(target, args.model, weights_fingerprint(model), args.layers, anchors, vocab)
    if args.resume and (out / CONFIG_FILE).exists():
        saved = json.loads((out / CONFIG_FILE).read_text())
        mine = json.loads(json.dumps(pdm.cfg.__dict__))
        if saved != mine:
            raise SpdError(f"--resume: the checkpoint in {out} was made with other settings ({saved} vs {mine})")
    n_tok = sum(len(i) for i, _ in train_ex)
    print(f"{len(train_ex)} training sequences ({n_tok} tokens), {len(val_ex)} held out; "
          f"draft vocabulary {pdm.lm_head.out_features} covers {coverage:.1%} of assistant tokens; "
          f"stages {target.stage_sizes}, anchors {pdm.cfg.anchors}, Ls {args.layers}")
    teacher = TeacherFeatures(target, pdm.cfg.anchors + [target.n_layers], args.cache_dir, pdm.cfg.base_fingerprint)
    teacher.warm(train_ex + val_ex, batch_size=args.teacher_batch)
    settings = TrainSettings(args.epochs, args.lr, 50, args.batch_tokens, 1.0, args.seed, args.val_every,
                             args.save_every, args.micro_batch, args.time_limit)
    result = train(pdm, teacher, train_ex, val_ex, out, settings, resume=args.resume)
    pdm.save(out / "export-fp16", dtype=torch.float16)
    last = result["history"][-1] if result["history"] else result["last"]
    print(f"done: step {result['step']}, val top-1 {last.get('top1', 0):.3f}, {result['seconds']:.0f} s; "
          f"draft in {out} (half-precision copy in {out / 'export-fp16'})")
    return 0


def run_regenerate(args) -> int:
    from .data import load_conversations
    from .models import load_model
    from .train_data import regenerate

    if args.threads:
        torch.set_num_threads(args.threads)
    convs = load_conversations(args.data, args.limit, need_answer=False)  # only the first user turn is used
    model, tok = load_model(args.model, args.dtype, args.device)
    done = regenerate(model, tok, convs, Path(args.out), args.max_new_tokens, args.batch_size,
                      time_limit=args.time_limit)
    print(f"{len(done)} answered conversations in {args.out} (a .jsonl usable as --data)")
    return 0


def run_vocab(args) -> int:
    from transformers import AutoTokenizer

    from .models import resolve_model
    from .train_data import build_draft_vocab

    tok = AutoTokenizer.from_pretrained(resolve_model(args.model))
    examples = examples_from(args, None, tok)
    ids, coverage = build_draft_vocab(examples, args.size, len(tok))
    Path(args.out).write_text(json.dumps({"model": args.model, "size": len(ids), "coverage": coverage,
                                          "token_ids": ids.tolist()}))
    print(f"{len(ids)} tokens cover {coverage:.2%} of the assistant-token mass in {len(examples)} conversations "
          f"-> {args.out}")
    return 0
