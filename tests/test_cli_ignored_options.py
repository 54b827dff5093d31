"""Options a command would silently ignore are honoured or refused: `--device` reaches every
PipeSpec stage, and `--draft` (a PDM checkpoint) is refused by methods that take no PDM, in
`generate` and in `bench`, before any model is loaded."""

from types import SimpleNamespace

import pytest
import torch

import spdecode.methods.pipespec
import spdecode.runtime.models
from spdecode.cli import main
from spdecode.runtime.errors import SpdError


@pytest.mark.parametrize("argv", [
    ["--method", "ar"], ["--method", "sd"], ["--method", "speed"], ["--method", "pipespec"],
    ["--method", "speed", "--distributed", "--stages", "2"],
])
def test_draft_ignored_generate_rejects_draft_without_spd(no_loading, capsys, argv):
    code = main(["generate", "--prompt", "hi", "--draft", "some/pdm", *argv])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: --draft") and f"--method {argv[1]} takes none" in err, err


@pytest.mark.parametrize("argv", [
    ["--method", "ar"], ["--method", "ar,sd,speed,pipespec"],
    ["--method", "speed", "--distributed"], ["--method", "ar,speed", "--distributed"],
])
def test_draft_ignored_bench_rejects_draft_without_spd(no_loading, capsys, argv):
    code = main(["bench", "--draft", "some/pdm", "--data", "mt_bench", "--limit", "1", *argv])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: --draft") and "does not run" in err, err


@pytest.mark.parametrize("argv", [["--method", "ar,spd"], ["--method", "ar", "--distributed"]])
def test_bench_keeps_draft_where_spd_runs(monkeypatch, capsys, argv):
    """Where spd runs (listed, or the distributed default) --draft is accepted: the run gets as far
    as loading the model."""

    def load_model(*args, **kwargs):
        raise SpdError("got as far as loading")

    monkeypatch.setattr(spdecode.runtime.models, "load_model", load_model)
    code = main(["bench", "--draft", "some/pdm", "--data", "mt_bench", "--limit", "1", *argv])
    assert code == 2 and "got as far as loading" in capsys.readouterr().err


class FakeTokenizer:
    eos_token_id, chat_template = 2, None

    def __call__(self, text):
        return SimpleNamespace(input_ids=[5, 6, 7])


def test_pipespec_device_generate_passes_device_to_every_stage(monkeypatch, capsys):
    chains = []

    class Chain:
        def __init__(self, *args, **kwargs):
            chains.append(kwargs)
            raise SpdError("chain stopped here")

    monkeypatch.setattr(spdecode.runtime.models, "load_model", lambda *a, **k: (None, FakeTokenizer()))
    monkeypatch.setattr(spdecode.methods.pipespec, "PipeSpecChain", Chain)
    code = main(["generate", "--method", "pipespec", "--device", "cuda", "--prompt", "hi", "--json"])
    assert code == 2 and "chain stopped here" in capsys.readouterr().err
    assert [c.get("device") for c in chains] == ["cuda"]


NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


@NO_CUDA
def test_pipespec_device_reaches_the_stage_processes(tmp_path):
    """The stage processes load on the chain's device: on this machine "cuda" is their load_model's
    clear SpdError (a tiny model, so that the stages start quickly)."""
    from conftest import tiny_model

    from spdecode.methods.pipespec import PipeSpecChain

    tiny_model("llama").save_pretrained(tmp_path / "model")
    with pytest.raises(SpdError, match=r"pipespec: stage \d .*CUDA is not available"):
        PipeSpecChain(str(tmp_path / "model"), ["prompt-lookup"], device="cuda", timeout=120)


@NO_CUDA
@pytest.mark.integration
def test_pipespec_device_cuda_without_cuda_is_one_clear_error(capsys):
    code = main(["generate", "--method", "pipespec", "--device", "cuda", "--chain", "prompt-lookup",
                 "--prompt", "hi", "--max-new-tokens", "4", "--json"])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("error: pipespec: stage") and "CUDA is not available" in lines[0], lines
