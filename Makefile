# Two commands for a newcomer (see README): `make run` and `make test`. Both install what they need first.
PYTHON ?= python3
VENV ?= .venv
CELEBA_DIR ?= ../shared/celeba
CONFIG ?= configs/local.yaml
PYTEST_ARGS ?=

.PHONY: install run test lint

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/install-system.sh
	bash scripts/install-system.sh
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --upgrade pip
	$(VENV)/bin/pip install -e '.[test]'
	touch $@

run: install
	$(VENV)/bin/python jobs/train_all.py --config $(CONFIG) --celeba-dir $(CELEBA_DIR)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	GENDERREC_CELEBA_DIR=$(abspath $(CELEBA_DIR)) $(VENV)/bin/pytest $(PYTEST_ARGS)
