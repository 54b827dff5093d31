"""The Pipeline Draft Module (PDM): drafts the next token from target hidden states of every depth.

Features. `anchors` are hidden-state indices b_0 = 0 < b_1 < ... <= L (h_0 the embedding, h_j the
raw residual after layer j-1, never the post-norm state). Aggregation type i concatenates the
anchors b_0..b_i of one token and projects them with its own linear map FC_i: (i+1)H -> H.
A token at depth d (it passed d stages) has produced h_j for j <= A(d) = layers in stages < d,
and uses type f(d) = max{i : b_i <= A(d)}. The default anchors are the stage boundaries, which
makes f injective (one type per depth), so training can reproduce inference exactly.

Model. The rows (completed tokens at the deepest type, in-flight tokens at their depth's type)
run through `Ls` decoder layers of the target's own class over the PDM's own position-indexed KV
cache; the newest row goes through the target's final norm (shared, frozen) and the PDM's LM
head over the full vocabulary or a draft-vocabulary subset. Rotary embedding and token embedding
are the target's, shared and frozen.

With one stage (n = 1) the PDM is an EAGLE-style head (Li et al., arXiv 2401.15077 / 2503.01840):
`chain` says how it drafts several tokens in a row, when the tokens after the last one the
target processed have no target features: "embed", each drafted token an embedding-only row
(type 0, as the newest token always is); "feedback", a drafted token's row fuses its embedding
with the head's own output at its parent (FC_fb: 2H -> H), EAGLE-3's "training-time test".
"""

from __future__ import annotations

import copy
import json
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..runtime.backends import apply_backend, backend_of
from ..runtime.compact_layer import compact_layers
from ..runtime.errors import SpdError
from ..runtime.kv_cache import StaticKVCache
from ..runtime.staged import StagedTarget, run_decoder_layers

FORMAT_VERSION = 1
CONFIG_FILE, WEIGHTS_FILE = "pdm_config.json", "pdm.safetensors"
CHAINS = ("", "embed", "feedback")


def stage_boundaries(stage_sizes: list[int]) -> list[int]:
    """A(d) for d = 0..n: the deepest hidden-state index a token at depth d has produced."""
    out = [0]
    for size in stage_sizes:
        out.append(out[-1] + size)
    return out


def depth_to_type(anchors: list[int], stage_sizes: list[int]) -> list[int]:
    """f(d) for d = 0..n."""
    return [max(i for i, b in enumerate(anchors) if b <= a) for a in stage_boundaries(stage_sizes)]


@dataclass
class PDMConfig:
    base_model: str
    base_fingerprint: str
    stage_sizes: list[int]
    anchors: list[int] = field(default_factory=list)  # empty: the stage boundaries
    num_layers: int = 1
    hidden_size: int = 0
    vocab_size: int = 0
    draft_vocab_size: int = 0  # 0: the full vocabulary
    chain: str = ""  # "" (SPD's PDM), or an EAGLE-style head's way of chaining drafts: embed | feedback
    version: int = FORMAT_VERSION

    def __post_init__(self):
        L = sum(self.stage_sizes)
        if not self.anchors:
            self.anchors = stage_boundaries(self.stage_sizes)
        a = self.anchors
        if a[0] != 0 or any(x >= y for x, y in zip(a, a[1:], strict=False)) or a[-1] > L:
            raise SpdError(f"anchors {a} must start at 0, increase strictly and not exceed {L}")
        if self.num_layers < 1:
            raise SpdError("the PDM needs at least one decoder layer")
        if self.chain not in CHAINS or (self.chain and len(self.stage_sizes) != 1):
            raise SpdError(f"chain {self.chain!r}: an EAGLE-style head has one stage and chains by "
                           f"{' or '.join(CHAINS[1:])}")

    @property
    def n_stages(self) -> int:
        return len(self.stage_sizes)

    @property
    def n_types(self) -> int:
        return len(self.anchors)


class PipelineDraftModule(nn.Module):
    def __init__(self, cfg: PDMConfig, target: StagedTarget, draft_vocab: torch.Tensor | None = None):
        super().__init__()
        self.cfg = cfg
        self.target = [target]  # a list keeps the frozen target out of this module's parameters
        H = target.config.hidden_size
        self.type_of_depth = depth_to_type(cfg.anchors, cfg.stage_sizes)
        self.fcs = nn.ModuleList(nn.Linear((i + 1) * H, H, bias=False) for i in range(cfg.n_types))
        # EAGLE-3's feedback row: a drafted token's embedding and the head's output at its parent.
        self.fc_feedback = nn.Linear(2 * H, H, bias=False) if cfg.chain == "feedback" else None
        for fc in [*self.fcs, *([self.fc_feedback] if self.fc_feedback is not None else [])]:
            nn.init.normal_(fc.weight, std=0.02)
        lcfg = copy.deepcopy(target.config)
        lcfg.num_hidden_layers = cfg.num_layers
        if getattr(lcfg, "layer_types", None) is not None:
            lcfg.layer_types = ["full_attention"] * cfg.num_layers  # the PDM always attends fully
        layer_cls = type(target.layers[0])
        self.layers = nn.ModuleList(layer_cls(lcfg, layer_idx=i) for i in range(cfg.num_layers))
        self.step_layers = compact_layers(self.layers)  # a plain list: the same submodules, run compactly
        head = target.model.lm_head.weight
        if draft_vocab is not None:
            draft_vocab = torch.as_tensor(draft_vocab, dtype=torch.long)
            self.register_buffer("vocab", draft_vocab)
            head = head[draft_vocab]
        else:
            self.vocab = None
        self.lm_head = nn.Linear(H, head.shape[0], bias=False)
        with torch.no_grad():
            self.lm_head.weight.copy_(head)  # start from the target's own head rows
        self.to(device=target.device, dtype=target.dtype)
        self._types = ["full_attention"] * cfg.num_layers
        self.cache = StaticKVCache(dict.fromkeys(range(cfg.num_layers)), 256, target.context_length)

    # -- features ------------------------------------------------------------------------
    def project(self, t: int, anchor_feats: list[torch.Tensor]) -> torch.Tensor:
        """g_t = FC_t(concat of the first t+1 anchors) for rows [..., H] -> [..., H]."""
        return self.fcs[t](torch.cat(anchor_feats[: t + 1], dim=-1))

    def drafted_rows(self, embedding: torch.Tensor, parent_out: torch.Tensor) -> torch.Tensor:
        """Rows of drafted tokens the target has not processed (an EAGLE-style head's chain):
        embedding-only (type 0), or with feedback fused with the head's raw output at the parent."""
        if self.fc_feedback is None:
            return self.project(0, [embedding])
        return self.fc_feedback(torch.cat([embedding, parent_out], dim=-1))

    def run(self, rows: torch.Tensor, start: int, positions: torch.Tensor | None = None,
            visible: torch.Tensor | None = None, committed: int | None = None) -> torch.Tensor:
        """Decoder layers over rows [1, r, H] in slots start.. of the PDM cache; raw outputs.
        `positions`/`visible`/`committed` run a draft tree's rows (runtime.staged.run_decoder_layers)."""
        t = self.target[0]
        return run_decoder_layers(self.step_layers, range(len(self.layers)), self._types, [None] * len(self.layers),
                                  t.decoder.rotary_emb, t._rotary_per_type, self.cache, rows, start,
                                  positions=positions, visible=visible, committed=committed)

    def get_output_embeddings(self) -> nn.Linear:
        """The draft head, by HF's name: a backend that treats output layers apart (int4w keeps
        them 8-bit) finds it as it finds a model's."""
        return self.lm_head

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Draft logits over the draft vocabulary (fp32)."""
        return self.lm_head(self.target[0].decoder.norm(hidden)).float()

    # -- persistence -----------------------------------------------------------------------
    def save(self, directory: str | Path, dtype: torch.dtype = torch.float16) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype).contiguous()
                   for k, v in self.state_dict().items()}
        save_file(tensors, d / WEIGHTS_FILE)
        (d / CONFIG_FILE).write_text(json.dumps(asdict(self.cfg), indent=2))


def new_pdm(target: StagedTarget, base_model: str, fingerprint: str, num_layers: int = 1,
            anchors: list[int] | None = None, draft_vocab=None, chain: str = "") -> PipelineDraftModule:
    cfg = PDMConfig(base_model, fingerprint, list(target.stage_sizes), list(anchors or []), num_layers,
                    target.config.hidden_size, target.config.vocab_size,
                    0 if draft_vocab is None else len(draft_vocab), chain)
    return PipelineDraftModule(cfg, target, draft_vocab)


def load_pdm(directory: str | Path, target: StagedTarget, fingerprint: str) -> PipelineDraftModule:
    """Load a saved PDM for `target`; a draft for another base model or another split is refused."""
    d = Path(directory)
    if not (d / CONFIG_FILE).exists() or not (d / WEIGHTS_FILE).exists():
        raise SpdError(f"{d} is not a PDM checkpoint (needs {CONFIG_FILE} and {WEIGHTS_FILE})")
    raw = json.loads((d / CONFIG_FILE).read_text())
    if raw.get("version") != FORMAT_VERSION:
        raise SpdError(f"{d}: PDM format version {raw.get('version')} is not supported (expected {FORMAT_VERSION})")
    cfg = PDMConfig(**raw)
    if cfg.base_fingerprint != fingerprint or cfg.hidden_size != target.config.hidden_size:
        raise SpdError(f"the draft in {d} was trained for {cfg.base_model} (weights {cfg.base_fingerprint}), "
                       f"not for this model (weights {fingerprint})")
    if cfg.stage_sizes != list(target.stage_sizes):
        raise SpdError(f"the draft in {d} was trained for stages {cfg.stage_sizes} (n={cfg.n_stages}), "
                       f"but the pipeline has stages {target.stage_sizes} (n={target.n_stages})")
    state = load_file(d / WEIGHTS_FILE)
    pdm = PipelineDraftModule(cfg, target, state.get("vocab"))
    pdm.load_state_dict({k: v.to(target.dtype) if v.is_floating_point() else v for k, v in state.items()})
    # A draft computes its Linears as the target does (backends.py): one backend per run.
    return apply_backend(pdm.eval().requires_grad_(False), backend_of(target.model))


BUNDLED = Path(__file__).parents[1] / "drafts"


def bundled_draft(model_name: str, stage_sizes: list[int] | None, n: int | None = None,
                  tree: bool = False) -> Path | None:
    """A draft shipped with spdecode for this model alias and split (or just this many stages);
    `tree`: the one trained for draft trees in flight, where there is one."""
    n = len(stage_sizes) if stage_sizes is not None else n
    d = BUNDLED / f"{model_name}-n{n}-tree"
    if not tree or not (d / CONFIG_FILE).exists():
        d = BUNDLED / f"{model_name}-n{n}"
    if not (d / CONFIG_FILE).exists():
        return None
    if stage_sizes is not None and json.loads((d / CONFIG_FILE).read_text())["stage_sizes"] != list(stage_sizes):
        return None
    return d


def bundled_drafts(model_name: str) -> list[Path]:
    """Every draft shipped for this model alias (none for a model given by path or hub id)."""
    if "/" in model_name or Path(model_name).exists():
        return []
    return sorted(d for d in BUNDLED.glob(f"{model_name}-*") if (d / CONFIG_FILE).exists())


def bundled_head(model_name: str) -> Path | None:
    """The EAGLE-style head shipped with spdecode for this model alias (--method eagle)."""
    d = BUNDLED / f"{model_name}-eagle"
    return d if (d / CONFIG_FILE).exists() else None


def pdm_for(target: StagedTarget, model_name: str, fingerprint: str, draft: str | Path | None = None,
            tree: bool = False):
    """The PDM to use: `draft` if given, else the bundled draft for this model and split (`tree`:
    preferably the one trained for draft trees), else an untrained one (lossless, but its drafts
    are noise)."""
    draft = draft if draft is not None else bundled_draft(model_name, target.stage_sizes, tree=tree)
    if draft is not None:
        return load_pdm(draft, target, fingerprint)
    warnings.warn(f"no trained draft given for {model_name} with {target.n_stages} stages: SPD runs with an "
                  "untrained PDM, which is lossless but slow (almost every draft is rejected); pass --draft",
                  stacklevel=2)
    return apply_backend(new_pdm(target, model_name, fingerprint).eval(), backend_of(target.model))
