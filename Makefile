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

.PHONY: demo test test-slow bench clean

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

bench: $(STAMP)
	$(BIN)/python bench/fingerprint.py
	$(BIN)/python bench/registry_scale.py
	$(BIN)/python bench/fuse.py
	$(BIN)/python bench/train.py
	$(BIN)/python bench/loreft.py

clean:
	rm -rf $(VENV) build dist *.egg-info
