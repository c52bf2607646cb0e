# forgetguard: the two commands of the README's quick start, and a few more.
#   make run    install everything, pull the reference model, serve (SQLite + one local worker)
#   make test   install everything, run the whole test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/pip
# torch is pinned in the `worker` extra (2.13.0); installing it first takes the CPU build
# where one is available locally instead of the multi-GB CUDA wheels.
TORCH  ?= torch==2.13.0
HOST   ?= 127.0.0.1
PORT   ?= 8000

.PHONY: install run test lint typecheck bench demo compose-config clean

$(BIN)/forgetguard: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet $(TORCH)
	$(PIP) install --quiet -e ".[worker,postgres,dev]"
	@touch $@

install: $(BIN)/forgetguard

run: install
	$(BIN)/forgetguard models pull smollm2-135m-instruct
	$(BIN)/forgetguard serve --host $(HOST) --port $(PORT) --workers 1

test: install
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check app workers tests benchmarks

typecheck: install
	$(BIN)/mypy

bench: install
	$(BIN)/forgetguard models pull smollm2-135m-instruct
	$(BIN)/python benchmarks/eval_throughput.py

demo: install
	$(BIN)/forgetguard models pull smollm2-135m-instruct
	$(BIN)/forgetguard demo

compose-config:
	docker compose -f docker/compose.yml config --quiet

clean:
	rm -rf $(VENV) var .pytest_cache .ruff_cache .mypy_cache
