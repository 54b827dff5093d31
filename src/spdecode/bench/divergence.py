"""Where a greedy output departs from AR's on the same backend, and whether it had to.

Outside float32 a batched verification pass rounds differently from one-row AR, so a method may
pick the other of two near-equal tokens. That is legitimate only at a near-tie: at the first token
where the two outputs part, the reference's top-2 logit margin after the shared prefix must be
tiny. The reference is the backend's own weights computed in float32 throughout (fp16w: the
Linear weights rounded to fp16; bfloat16: every weight rounded to bf16; int4w/int8w: the Linears
de-quantized from what the kernels hold, the rest rounded to bf16), so the margin measures
the model the backend holds, not the rounding of its arithmetic. A wide margin means the method
chose a token the target would not have: a bug, not rounding. fp16w accumulates in fp32, so its
divergences must all be near-ties (NEAR_TIE); bf16's arithmetic rounds at ~1e-2 relative, so
its may be wider, and are reported.
"""

from __future__ import annotations

import torch

from ..generators import base_method
from ..runtime.quantized import QUANTIZED, stored_weight

NEAR_TIE = 1e-3  # logit margin below which two tokens are a tie at float32 rounding level


def first_divergence(a: list[int], b: list[int]) -> int | None:
    """The first index where two token lists differ (a prefix that stops early counts), or None."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def reference_model(name: str, backend: str):
    """`name` in float32 with its weights rounded as `backend` stores them (see the module docstring)."""
    from ..runtime.models import load_model

    model, _ = load_model(name, "float32", "cpu", tokenizer=False)
    stored = {"fp16w": torch.float16, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(backend)
    if backend == "fp16w":  # the Linears only; a head tied to the embedding gets its own copy (the lookup stays exact)
        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight = torch.nn.Parameter(m.weight.detach().to(stored).float(), requires_grad=False)
    elif backend in QUANTIZED:  # the Linears as de-quantized (from the fp32 values), the rest bf16
        head = model.get_output_embeddings()
        linears = [(m, stored_weight(backend, m, m is head)) for m in model.modules() if isinstance(m, torch.nn.Linear)]
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.to(torch.bfloat16).float())
        for m, w in linears:
            m.weight = torch.nn.Parameter(w, requires_grad=False)
    elif stored is not None:
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.to(stored).float())
    return model


def top2_margin(model, ids: list[int]) -> tuple[float, int, int]:
    """(top-1 minus top-2 logit, top-1 token, top-2 token) of `model` (float32) after `ids`."""
    with torch.inference_mode():
        logits = model(torch.tensor([ids], device=model.device)).logits[0, -1].float()
    top = torch.topk(logits, 2)
    return float(top.values[0] - top.values[1]), int(top.indices[0]), int(top.indices[1])


def divergences(records: list[dict], prompts: dict[tuple[str, str], list[int]], reference) -> dict[str, list[dict]]:
    """method -> one entry per greedy output that differs from AR of its backend: where, the two
    tokens, and the float32 reference's top-2 margin there. `prompts`: (dataset, question_id) ->
    prompt ids; `reference`: backend -> its reference model (`reference_model`)."""
    ar = {}
    for r in records:
        if base_method(r["method"]) == "ar":
            ar.setdefault((r["dtype"], r["dataset"], r["question_id"]), r["tokens"])
    out: dict[str, list[dict]] = {}
    for r in records:
        if r.get("matches_ar") is not False:
            continue
        ref = ar[r["dtype"], r["dataset"], r["question_id"]]
        at = first_divergence(ref, r["tokens"])
        entry = {"dataset": r["dataset"], "question_id": r["question_id"], "position": at}
        if at is not None and at < min(len(ref), len(r["tokens"])):
            prefix = prompts[r["dataset"], r["question_id"]] + ref[:at]
            margin, first, second = top2_margin(reference(r["dtype"]), prefix)
            entry.update(ar_token=ref[at], method_token=r["tokens"][at], fp32_margin=margin,
                         fp32_top2=[first, second])
        out.setdefault(r["method"], []).append(entry)
    return out


@torch.inference_mode()
def rowcount_noise(model, ids: list[int], rows: int = 9) -> float:
    """How far a backend's logits move with the row count alone: the largest |difference| between
    the logits of `rows` tokens computed one row at a time (AR) and in one pass over all of them
    (verification), after `ids[:-rows]`. The scale against which a departure's margin is judged."""
    from ..runtime.staged import StagedTarget

    target = StagedTarget(model, 1, capacity=len(ids) + 1)
    start = len(ids) - rows
    target.reserve(len(ids))
    target.forward(torch.tensor([ids[:start]], device=target.device), 0)
    one_by_one = []
    for p in range(start, len(ids)):
        one_by_one.append(target.logits(target.forward(torch.tensor([[ids[p]]], device=target.device), p))[0, -1])
    target.rollback(start)
    together = target.logits(target.forward(torch.tensor([ids[start:]], device=target.device), start))[0]
    return float((torch.stack(one_by_one) - together).abs().max())


def print_divergences(found: dict[str, list[dict]], dtypes: dict[str, str],
                      noise: dict[str, float] | None = None) -> int:
    """One line per method that departed from AR, beside its backend's measured row-count noise
    (`noise`: backend -> rowcount_noise); 1 if an fp16w departure was not a near-tie."""
    failed = 0
    noise = noise or {}
    for m, entries in found.items():
        margins = [e["fp32_margin"] for e in entries if "fp32_margin" in e]
        wide = [x for x in margins if x >= NEAR_TIE]
        scale = noise.get(dtypes.get(m))
        print(f"{m} ({dtypes.get(m)}): {len(entries)} output(s) depart from AR; top-2 margins of the float32 "
              f"reference at the first differing token: {', '.join(f'{x:.1e}' for x in sorted(margins)) or '-'}"
              + (f"; {len(wide)} NOT near-ties (>= {NEAR_TIE:g})" if wide else "; all near-ties")
              + (f"; this backend's logits move by up to {scale:.1e} between one row and nine, "
                 f"{sum(x < scale for x in margins)} of the margins are within that" if scale is not None else ""),
              flush=True)
        if wide and dtypes.get(m) == "fp16w":
            print(f"error: {m} in fp16w (fp32 accumulation) chose against a clear float32 margin", flush=True)
            failed = 1
    return failed
