# Two entry points (see README): `make demo` and `make test`. Everything installs into .venv/.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# CPU torch from this machine's disk; on a GPU machine run `make test TORCH=torch` for the usual wheels.
TORCH ?= torch==2.13.0

$(BIN)/python:
	$(PY) -m venv $(VENV)

# core: numpy, safetensors, click, tqdm -- enough for convert and inspect
$(VENV)/.core: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

# everything the tests need: torch, diffusers, peft, transformers, gguf, pytest, and the ComfyUI oracle
$(VENV)/.test: pyproject.toml scripts/get_oracles.sh | $(BIN)/python
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[torch,test]" "$(TORCH)"
	PY=$(BIN)/python bash scripts/get_oracles.sh
	touch $(VENV)/.core $@

install: $(VENV)/.core
install-test: $(VENV)/.test

demo: $(VENV)/.core
	@mkdir -p .cache/demo
	$(BIN)/lorabox inspect fixtures/flux1_kohya_bfl.safetensors
	$(BIN)/lorabox convert fixtures/flux1_kohya_bfl.safetensors --to diffusers -o .cache/demo/flux1_peft.safetensors --overwrite
	$(BIN)/lorabox convert .cache/demo/flux1_peft.safetensors --to comfyui -o .cache/demo/flux1_comfyui.safetensors --overwrite
	$(BIN)/lorabox inspect .cache/demo/flux1_comfyui.safetensors

# the suite on every core (pytest-xdist): 6 min instead of 11.6 on 2 cores in the same hour; PYTEST= for one process
PYTEST ?= -n auto
test: $(VENV)/.test
	@PY=$(BIN)/python bash scripts/get_oracles.sh >/dev/null  # 30 ms when present; restores a deleted .cache/
	$(BIN)/python -m pytest -q $(PYTEST)

fixtures: $(VENV)/.test
	$(BIN)/python scripts/make_fixtures.py

# the tiny pretrained Flux base and LoRA data set of `lorabox train --minimal` (4-5 minutes on one CPU core)
tiny-base: $(VENV)/.test
	$(BIN)/python scripts/make_tiny_base.py

bench: $(VENV)/.test
	$(BIN)/python scripts/bench_convert.py

.PHONY: install install-test demo test fixtures tiny-base bench
