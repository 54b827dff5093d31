"""The CPU training recipes' data: the target's own answers (OUT/regen.jsonl) plus RAW raw ShareGPT
first exchanges that are not among them (the teacher signal is the target's distribution on any
text; raw text only widens the contexts), written to OUT/mix.jsonl.

    python scripts/mix_conversations.py OUT RAW
"""

import json
import sys

from spdecode.data import load_conversations


def main(out: str, raw_count: int) -> None:
    with open(f"{out}/regen.jsonl") as f:
        regen = [json.loads(line) for line in f]
    seen = {c[0]["content"][:200] for c in regen}
    raw = [c[:2] for c in load_conversations("sharegpt", None) if c[0]["content"][:200] not in seen][:raw_count]
    with open(f"{out}/mix.jsonl", "w") as f:
        for c in regen + raw:
            f.write(json.dumps({"messages": c}) + "\n")
    print(len(regen), "regenerated +", len(raw), "raw conversations")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
