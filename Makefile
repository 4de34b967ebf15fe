# Quick start: `make demo` runs the embedded default end to end; `make test` runs the whole suite.
# Both create .venv with the CPU build of torch when it is missing. Everything runs offline.
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export WANDB_MODE ?= disabled
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test install clean

$(VENV)/.installed: pyproject.toml constraints.txt  # constraints.txt: the exact tested versions
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed  # DEMO_ARGS="--quick": a few-minute smoke test (no results); python -m showcase.demo --help
	$(PY) -m showcase.demo $(DEMO_ARGS)

test: $(VENV)/.installed
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs demo_out
