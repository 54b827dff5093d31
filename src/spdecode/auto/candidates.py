"""The configurations `--method auto` chooses from, and the simulator's prediction of each.

The grid, per backend the profile holds (at most 3) and thread count t in {1, every usable core}:
- ar with t threads;
- eagle with t threads, its shipped 8-node tree (generators.EAGLE_TREE) and the bundled head;
- spd in one process with t threads over the bundled tree-ready 2-stage draft and spd's shipped
  tree (generators.SPD_TREE);
and, per backend, where the machine has a core per stage: spd with one process per stage (the
cores shared out), over trees and one node per slot (SPD as published). 3 x (2 x 3 + 2) = 24
configurations at most. A drafted configuration needs its bundled draft and the acceptance per
depth shipped beside it (`acceptance.json`, measured on held-out prompts): the simulator draws
each verification from it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..runtime.errors import SpdError

ACCEPTANCE_FILE = "acceptance.json"
PROMPT_TOKENS = 64  # the prompt and answer a prediction is for (a chat turn of a short answer)
NEW_TOKENS = 128


@dataclass(frozen=True)
class Candidate:
    method: str  # ar, eagle or spd
    backend: str
    threads: int  # per process
    stages: int = 1
    distributed: bool = False
    tree: tuple[int, int, int] | None = None  # (budget, depth, top-k); None: the method has none (ar)
    draft: str | None = None  # the bundled draft's directory name

    @property
    def label(self) -> str:
        where = (f"{self.stages} processes x {self.threads} thread(s)" if self.distributed
                 else f"{self.threads} thread(s)" + (f", {self.stages} stages" if self.stages > 1 else ""))
        tree = ("" if self.tree is None else ", one node per slot" if self.tree[0] == 1
                else f", tree {':'.join(map(str, self.tree))}")
        return f"{self.method} ({self.backend}, {where}{tree})"

    @property
    def spec(self) -> str:
        """The method spec of generators.parse_method_spec (bench's --method syntax)."""
        parts = [self.method, f"backend={self.backend}", f"threads={self.threads}"]
        if self.stages > 1:
            parts.append(f"stages={self.stages}")
        if self.tree is not None:
            parts += [f"budget={self.tree[0]}", f"depth={self.tree[1]}", f"topk={self.tree[2]}"]
        return ":".join(parts)

    def as_dict(self) -> dict:
        return {"method": self.method, "backend": self.backend, "threads": self.threads, "stages": self.stages,
                "distributed": self.distributed, "tree": list(self.tree) if self.tree else None, "draft": self.draft}

    @classmethod
    def from_dict(cls, d: dict) -> Candidate:
        return cls(d["method"], d["backend"], int(d["threads"]), int(d["stages"]), bool(d["distributed"]),
                   tuple(d["tree"]) if d.get("tree") else None, d.get("draft"))


def shipped_acceptance(draft_dir: Path) -> list[float] | None:
    """The acceptance per depth measured for a bundled draft, or None where none was shipped."""
    path = draft_dir / ACCEPTANCE_FILE
    if not path.exists():
        return None
    try:
        per_depth = json.loads(path.read_text())["per_depth"]
    except (OSError, ValueError, KeyError) as exc:
        raise SpdError(f"{path} is not an acceptance file ({exc})") from None
    return [float(a) for a in per_depth]


def grid(profile: dict, model_name: str, cores: int, backend: str | None = None,
         distributed: bool = True) -> list[Candidate]:
    """Every configuration of the module docstring the profile can predict; `backend`: only that
    one (the user named it); `distributed`: whether one process per stage may be chosen."""
    from ..drafting.pdm import bundled_draft, bundled_head
    from ..generators import EAGLE_TREE, SPD_TREE

    def shape(d: dict) -> tuple[int, int, int]:
        return d["tree_budget"], d["tree_depth"], d["tree_topk"]

    backends = [b for b in profile["costs"] if backend is None or b == backend]
    head, tree2, node2 = bundled_head(model_name), bundled_draft(model_name, None, 2, tree=True), \
        bundled_draft(model_name, None, 2)
    usable = {d.name for d in (head, tree2, node2) if d is not None and shipped_acceptance(d) is not None}
    out = []
    for b in backends:
        for t in sorted({1, cores}):
            out.append(Candidate("ar", b, t))
            if head is not None and head.name in usable:
                out.append(Candidate("eagle", b, t, tree=shape(EAGLE_TREE), draft=head.name))
            if tree2 is not None and tree2.name in usable:
                out.append(Candidate("spd", b, t, stages=2, tree=shape(SPD_TREE), draft=tree2.name))
        if distributed and profile.get("link"):  # two processes could be timed talking: a pipeline may run
            share = cores // 2
            if tree2 is not None and tree2.name in usable:
                out.append(Candidate("spd", b, share, 2, True, shape(SPD_TREE), tree2.name))
            if node2 is not None and node2.name in usable:
                out.append(Candidate("spd", b, share, 2, True, (1, 1, 1), node2.name))
    return out


def predict(profile: dict, cand: Candidate, tokens: int = NEW_TOKENS) -> dict:
    """The simulator's {"tok_s", "tokens_per_cycle", "cycle_s"} for `cand` from the profile's
    timings and its draft's shipped acceptance."""
    from ..drafting.pdm import BUNDLED, CONFIG_FILE
    from ..methods.spd_core import TreeShape
    from ..plan.predict import Setup
    from ..plan.predict import predict as simulate
    from ..plan.simulate import Drawn

    data = profile["costs"][cand.backend]
    layers = int(data["n_layers"])
    timed = data["target"]
    key = str(cand.threads) if str(cand.threads) in timed else min(timed, key=lambda k: abs(int(k.split()[0])
                                                                                          - cand.threads))
    if cand.method == "ar":
        setup, acceptance = Setup("ar", (layers,), key), None
    else:
        draft_dir = BUNDLED / cand.draft
        sizes = tuple(json.loads((draft_dir / CONFIG_FILE).read_text())["stage_sizes"])
        shape = TreeShape(*cand.tree)
        setup = Setup(cand.method, sizes, key, cand.distributed, shape, cand.draft)
        acceptance = Drawn(shipped_acceptance(draft_dir))
    r = simulate(data, setup, acceptance, PROMPT_TOKENS, tokens)
    return {"tok_s": r["tok_s"], "tokens_per_cycle": r["tokens_per_cycle"], "cycle_s": r["decode_s"] / r["cycles"]}
