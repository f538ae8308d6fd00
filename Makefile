# make demo : create .venv if needed, install, plan GPT-2 medium on a DGX A100 and run a tiny plan on CPU.
# make test : create .venv if needed, install, run the test suite.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The torch to install when the venv has none. A torch already in the venv is kept as it is.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install demo test bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e '.[test]'
	@touch $@

demo: install
	$(VENV)/bin/autopar demo

test: install
	$(PY) -m pytest -q tests

bench: install
	for f in bench/*.py; do $(PY) $$f || exit 1; done

clean:
	rm -rf $(VENV) .autopar-cache *.egg-info
