# Quick start: `make demo` runs the embedded default end to end; `make test` runs the whole suite.
# Both create .venv with the CPU build of torch when it is missing. Everything runs offline.
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export WANDB_MODE ?= disabled
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test install clean gpu-wheels

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

# Wheels tools/gpu_check.sh installs on a GPU machine without network (Python 3.12, manylinux x86_64): the
# lines of tools/gpu_wheels.txt; the one without a wheel on PyPI is built here (pure Python).
gpu-wheels: $(VENV)/.installed
	mkdir -p tools/wheels
	awk '!/^#/ && NF && $$3 != "sdist" {print $$1}' tools/gpu_wheels.txt | xargs $(PY) -m pip download -q --no-deps \
		--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
		--platform manylinux2014_x86_64 -d tools/wheels
	awk '!/^#/ && $$3 == "sdist" {print $$1}' tools/gpu_wheels.txt | xargs $(PY) -m pip wheel -q --no-deps -w tools/wheels

clean:
	rm -rf $(VENV) runs demo_out .gpu-site
