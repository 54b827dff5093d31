"""files_fingerprint (rank 0 of a distributed run matches a draft to the base model's files) reads
only samples of the weights, one tensor at a time, and equals weights_fingerprint of the loaded model."""

from __future__ import annotations

import json
import weakref

import pytest
import safetensors
import torch
from conftest import tiny_model
from safetensors.torch import save_file

from spdecode.runtime.models import files_fingerprint, resolve_model, weights_fingerprint, write_source_info


class TensorCounter:
    """Wraps safetensors.safe_open: counts the tensors read from the files that are alive at once."""

    def __init__(self, monkeypatch):
        self.alive = self.peak = self.reads = 0
        real = safetensors.safe_open
        counter = self

        class Slice:
            def __init__(self, sl):
                self.sl = sl

            def get_shape(self):
                return self.sl.get_shape()

            def get_dtype(self):
                return self.sl.get_dtype()

            def __getitem__(self, index):
                return counter.track(self.sl[index])

        class Handle:
            def __init__(self, *a, **k):
                self.h = real(*a, **k)

            def __enter__(self):
                self.h.__enter__()
                return self

            def __exit__(self, *exc):
                return self.h.__exit__(*exc)

            def keys(self):
                return self.h.keys()

            def metadata(self):
                return self.h.metadata()

            def get_tensor(self, name):
                return counter.track(self.h.get_tensor(name))

            def get_slice(self, name):
                return Slice(self.h.get_slice(name))

        monkeypatch.setattr(safetensors, "safe_open", Handle)

    def track(self, t: torch.Tensor) -> torch.Tensor:
        self.reads += 1
        self.alive += 1
        self.peak = max(self.peak, self.alive)
        weakref.finalize(t, self._dead)
        return t

    def _dead(self):
        self.alive -= 1


@pytest.mark.parametrize("tied", [False, True])
def test_files_fingerprint_never_holds_the_whole_model(tmp_path, monkeypatch, tied):
    """It read every tensor into one dict (the whole model in memory on rank 0); now at most one read
    is alive at a time, and the value is the same as before."""
    model = tiny_model("llama", tie_word_embeddings=tied)
    model.save_pretrained(tmp_path)
    counter = TensorCounter(monkeypatch)
    assert files_fingerprint(tmp_path) == weights_fingerprint(model)
    assert counter.reads > 0
    assert counter.peak <= 1


def test_stored_fingerprint_is_trusted_only_for_its_files(tmp_path, monkeypatch):
    model = tiny_model("llama")
    model.save_pretrained(tmp_path)
    write_source_info(tmp_path, gguf="x.gguf")  # what the GGUF conversion writes
    info = json.loads((tmp_path / "spdecode_source.json").read_text())
    assert info["gguf"] == "x.gguf" and info["fingerprint"] == weights_fingerprint(model)
    counter = TensorCounter(monkeypatch)
    assert files_fingerprint(tmp_path) == weights_fingerprint(model)
    assert counter.reads == 0  # read from spdecode_source.json
    other = tiny_model("llama", seed=1)  # new weights in the same file: the stored value no longer applies
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, tmp_path / "model.safetensors",
              metadata={"format": "pt"})
    assert files_fingerprint(tmp_path) == weights_fingerprint(other) != weights_fingerprint(model)
    assert counter.reads > 0


@pytest.mark.integration
def test_default_model_files_fingerprint_is_unchanged(default_model):
    """The bundled drafts name base_fingerprint f05aa70870683f6a; a conversion made before fingerprints
    were stored takes the fallback path, which must give the same value."""
    source = resolve_model("smollm2-135m")
    assert files_fingerprint(source) == weights_fingerprint(default_model[0]) == "f05aa70870683f6a"
