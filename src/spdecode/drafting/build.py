"""Drafters from their spec strings (`--drafter`, PipeSpec's `--chain`), with plain arguments."""

from __future__ import annotations

import json
from pathlib import Path

from ..runtime.errors import SpdError
from ..runtime.models import load_model
from .candidates import ModelCandidates, PromptLookupCandidates, early_exit_candidates
from .drafters import SpeedDrafter
from .pdm import CONFIG_FILE, bundled_head, load_pdm, pdm_for
from .pdm_tree import PdmTreeDrafter

DRAFTER_SPECS = "early-exit:K, prompt-lookup or model:PATH"


def make_pipeline_drafter(method: str, target, model_name: str, fingerprint: str, draft: str | None = None,
                          speed_depth: int | None = None, tree: bool = False):
    """The drafter of SPD's pipeline for `method`: spd, the PDM (`draft`, else the bundled one for
    this model and split); speed, SPEED's early exit at `speed_depth` (default: stage 0's last layer)."""
    if method == "spd":
        return PdmTreeDrafter(pdm_for(target, model_name, fingerprint, draft, tree))
    if method == "speed":
        return SpeedDrafter(target, speed_depth or target.stage_sizes[0])
    raise SpdError(f"{method!r} runs no drafter in SPD's pipeline (spd or speed)")


def make_eagle_drafter(target, model_name: str, fingerprint: str, draft: str | None = None) -> PdmTreeDrafter:
    """eagle's drafter: the EAGLE-style head in `draft`, else the one bundled for this model (the
    PDM with one stage, drafting a tree below the last verified token)."""
    draft = draft or bundled_head(model_name)
    if draft is None:
        raise SpdError(f"no EAGLE-style head is bundled for {model_name}: train one with `spdecode train --eagle "
                       "feedback --out DIR` and pass --draft DIR")
    config = Path(draft) / CONFIG_FILE
    if config.exists() and not json.loads(config.read_text()).get("chain"):
        raise SpdError(f"{draft} is an SPD draft (a PDM for a pipeline), not an EAGLE-style head: train one with "
                       "`spdecode train --eagle feedback`")
    return PdmTreeDrafter(load_pdm(draft, target, fingerprint))


def make_candidates(spec: str, model, dtype: str = "float32", device: str = "cpu"):
    """A candidate generator for classic SD (and PipeSpec's stages) drafting for `model`:
    early-exit:K (its first K layers), prompt-lookup, or model:PATH (a second model, loaded on
    `device` in `dtype`, which must share the target's vocabulary)."""
    kind, _, arg = spec.partition(":")
    if kind == "prompt-lookup":
        return PromptLookupCandidates(model.config.vocab_size, device=model.device)  # q beside the target's p
    if kind == "early-exit" and arg.isdigit():
        return early_exit_candidates(model, int(arg))
    if kind == "model" and arg:
        draft_model, _ = load_model(arg, dtype, device, tokenizer=False)
        if draft_model.config.vocab_size != model.config.vocab_size:
            raise SpdError(f"draft model {arg} has another vocabulary ({draft_model.config.vocab_size} tokens) "
                           f"than the target ({model.config.vocab_size})")
        return ModelCandidates(draft_model)
    raise SpdError(f"--drafter {spec!r}: expected {DRAFTER_SPECS}")
