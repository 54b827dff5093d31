"""Write each bundled draft's acceptance per depth (`acceptance.json`, what --method auto's
simulator draws from) from a `spdecode bench --json-out` run of the methods that use them.

    spdecode bench --method eagle,spd:stages=2,spd:stages=2:budget=1,spd:stages=4:budget=1 \
        --backend float32 --data mt_bench,gsm8k,humaneval --limit 8 --max-new-tokens 128 --json-out acc.json
    python scripts/ship_acceptance.py acc.json

Acceptance at depth d: of the verification passes whose walk tried a node at depth d + 1, the
share that accepted one (Metrics.walks, pooled over every prompt).
"""

import json
import sys
from pathlib import Path

from spdecode.drafting.pdm import BUNDLED

# bench's method key -> the bundled draft it ran with (the defaults of generators.MethodOptions)
DRAFTS = {"eagle": "smollm2-135m-eagle", "spd:stages=2": "smollm2-135m-n2-tree",
          "spd:stages=2:budget=1": "smollm2-135m-n2", "spd:stages=4:budget=1": "smollm2-135m-n4"}


def per_depth(walks: list[list[int]]) -> tuple[list[float], list[int]]:
    depth = max(t for t, _ in walks)
    tried = [sum(t > d for t, _ in walks) for d in range(depth)]
    accepted = [sum(a > d for _, a in walks) for d in range(depth)]
    return [a / t for a, t in zip(accepted, tried, strict=True) if t], [t for t in tried if t]


def main(path: str) -> None:
    data = json.loads(Path(path).read_text())
    for key, draft in DRAFTS.items():
        records = [r for r in data["records"] if r["method"] == key]
        if not records:
            continue
        walks = [w for r in records for w in r["walks"]]
        rates, tried = per_depth(walks)
        out = {"per_depth": [round(a, 4) for a in rates], "verifications_per_depth": tried,
               "prompts": len(records), "datasets": sorted({r["dataset"] for r in records}),
               "new_tokens": sum(r["new_tokens"] for r in records), "method": key,
               "backend": records[0].get("dtype", "float32"),
               "how": "spdecode bench greedy on the first prompts of each set; scripts/ship_acceptance.py"}
        (BUNDLED / draft / "acceptance.json").write_text(json.dumps(out, indent=1) + "\n")
        print(draft, " ".join(f"{a:.2f}" for a in rates), tried)


if __name__ == "__main__":
    main(sys.argv[1])
