"""bench's divergence report: where an output leaves AR of its backend, and whether the float32
reference called it a near-tie there. A method that picks against a clear margin is caught."""

from types import SimpleNamespace

import torch
from conftest import tiny_model

from spdecode.bench.divergence import NEAR_TIE, divergences, first_divergence, print_divergences
from spdecode.methods.ar import generate_ar
from spdecode.runtime.staged import StagedTarget


def test_first_divergence():
    assert first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert first_divergence([1, 2, 3], [1, 5, 3]) == 1
    assert first_divergence([1, 2, 3], [1, 2]) == 2


class TieModel:
    """A reference whose two best logits differ by `margin` after any prefix."""

    device = torch.device("cpu")

    def __init__(self, margin):
        self.margin = margin

    def __call__(self, ids):
        logits = torch.zeros(1, ids.shape[1], 10)
        logits[0, -1, 3], logits[0, -1, 4] = 1.0, 1.0 - self.margin
        return SimpleNamespace(logits=logits)


def records_with_a_swap(model, prompt, at, backend):
    ar = generate_ar(StagedTarget(model), prompt, 20).tokens
    other = list(ar)
    other[at] = (other[at] + 1) % model.config.vocab_size
    return [{"method": "ar", "dtype": backend, "dataset": "d", "question_id": 0, "tokens": ar},
            {"method": "eagle", "dtype": backend, "dataset": "d", "question_id": 0, "tokens": other,
             "matches_ar": False},
            {"method": "spd", "dtype": backend, "dataset": "d", "question_id": 0, "tokens": ar, "matches_ar": True}]


def test_a_departure_against_a_clear_margin_fails_in_fp16w_and_is_reported_in_bf16(capsys):
    model = tiny_model("llama")
    prompt = [5, 17, 42, 8, 33]
    for backend, code in (("fp16w", 1), ("bfloat16", 0)):
        found = divergences(records_with_a_swap(model, prompt, 7, backend), {("d", 0): prompt}, lambda b: model)
        assert list(found) == ["eagle"]  # spd matched: nothing to report
        (entry,) = found["eagle"]
        assert entry["position"] == 7 and entry["fp32_margin"] > NEAR_TIE
        assert entry["fp32_top2"][0] == entry["ar_token"]  # the reference agrees with AR where they part
        assert print_divergences(found, {"eagle": backend}) == code
        assert "NOT near-ties" in capsys.readouterr().out


def test_a_near_tie_departure_passes():
    model = tiny_model("llama")
    prompt = [5, 17, 42, 8, 33]
    found = divergences(records_with_a_swap(model, prompt, 3, "fp16w"), {("d", 0): prompt},
                        lambda b: TieModel(2e-5))
    assert abs(found["eagle"][0]["fp32_margin"] - 2e-5) < 1e-6
    assert print_divergences(found, {"eagle": "fp16w"}) == 0


def test_rowcount_noise_is_the_gap_between_one_row_and_nine():
    from spdecode.bench.divergence import rowcount_noise
    from spdecode.runtime.backends import apply_backend

    ids = [5, 17, 42, 8, 33, 71, 9, 5, 17, 60, 61, 62, 63, 64]
    exact = rowcount_noise(tiny_model("llama"), ids)
    packed = rowcount_noise(apply_backend(tiny_model("llama"), "fp16w"), ids)
    assert 0 <= exact < 1e-4 and 0 <= packed < 1e-4  # fp32 accumulation: rounding level


def test_the_fp16w_reference_rounds_the_linears_and_keeps_the_embedding(tmp_path):
    from spdecode.bench.divergence import reference_model

    tiny_model("gemma3").save_pretrained(tmp_path / "m")  # Gemma ties its head to the embedding
    plain = tiny_model("gemma3")
    ref = reference_model(str(tmp_path / "m"), "fp16w")
    assert torch.equal(ref.model.embed_tokens.weight, plain.model.embed_tokens.weight)
    assert torch.equal(ref.lm_head.weight, plain.lm_head.weight.half().float())
    q = ref.model.layers[0].self_attn.q_proj.weight
    assert torch.equal(q, plain.model.layers[0].self_attn.q_proj.weight.half().float())
