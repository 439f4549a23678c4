# Each target builds .venv from nothing when it is missing, so a fresh clone
# needs only `make demo` and `make test`.
PYTHON ?= python3
# The MLX backend extra on Linux: cpu here, cuda12 or cuda13 on an NVIDIA machine (make test BACKEND=cuda13);
# macOS needs none (Metal comes with mlx).
BACKEND ?= $(if $(filter Darwin,$(shell uname -s)),,cpu)
comma := ,
EXTRAS := $(if $(BACKEND),$(BACKEND)$(comma))test
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow test-ui bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[$(EXTRAS)]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/adapterhub --registry registry demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

# The web page's browser tests: Debian's Chromium and its driver (apt, as root as on CI and the dev machines)
# and Selenium from PyPI when missing; without them tests/test_ui.py still runs its HTTP tests and skips the rest.
test-ui: $(STAMP)
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; }
	$(BIN)/python -c "import selenium" 2>/dev/null || $(BIN)/python -m pip install --quiet 'selenium>=4.20'
	$(BIN)/python -m pytest -q tests/test_ui.py

bench: $(STAMP)
	$(BIN)/python bench/fingerprint.py
	$(BIN)/python bench/registry_scale.py
	$(BIN)/python bench/fuse.py
	$(BIN)/python bench/train.py
	$(BIN)/python bench/loreft.py
	$(BIN)/python bench/remote.py

clean:
	rm -rf $(VENV) build dist *.egg-info
