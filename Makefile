# `make repro`: the whole pipeline on the embedded digits data, then the README's figure table from its metrics.
# `make repro-fashion`: the same pipeline on Fashion-MNIST (runs/fashion/, about an hour on 2 CPU cores), then the README.
# `make test`: the test suite.
# Both create .venv on first use; re-running is fast while pyproject.toml is unchanged.
VENV   ?= .venv
PYTHON ?= python3
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install repro repro-fashion test bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check --progress-bar off -e '.[dev]'
	touch $(STAMP)

repro: install
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro
	$(BIN)/python -m stages.figures

# the data check is one line and exit code 2 when Fashion-MNIST is missing (not a DVC traceback)
repro-fashion: install
	@$(BIN)/python -m stages.runs --check-data runs/fashion || exit 2
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro runs/fashion/dvc.yaml
	$(BIN)/python -m stages.figures

test: install
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -n 2 -p no:cacheprovider

clean:
	rm -rf models metrics plots reports deploy .dvc/tmp
