# The two set-up commands of the README:
#   make demo   create .venv (first time: ~3 min) and run the whole pipeline on the embedded default model
#   make test   create .venv if needed and run the test suite (CI runs this)
VENV ?= .venv
QDPO := $(VENV)/bin/qdpo-ray
PYTEST_ARGS ?=

.PHONY: venv demo test test-fast clean-runs

venv:
	@bash scripts/setup_venv.sh

demo: venv
	$(QDPO) pipeline --config configs/default.yaml

test: venv
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

test-fast: venv
	$(VENV)/bin/python -m pytest -m "not slow" $(PYTEST_ARGS)

clean-runs:
	rm -rf runs/default runs/demo
