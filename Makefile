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

# Two pytest runs at once: schemathesis in a plain process that runs only when a core is idle (SCHED_IDLE via chrt,
# else nice 19; it cannot run under xdist; its report is printed after the other's), and the rest on 2 xdist workers,
# a module per worker. Fails if either fails. The idle-priority run may wait for the workers (one generated operation
# took over 300 s of wall clock in CI at nice 10 for about 25 s of CPU), so its per-test limit is 900 s: still a hang
# catcher. At nice 10 it took about a tenth of the CPU from the workers (xdist 608 s in CI, 510 s alone).
LOW_PRIORITY := $(shell command -v chrt >/dev/null 2>&1 && chrt --idle 0 true 2>/dev/null && echo "chrt --idle 0" || echo "nice -n 19")

test: install
	@log=$$(mktemp); $(LOW_PRIORITY) $(PY) -m pytest -q -p no:xdist --timeout 900 tests/test_service_schema.py > $$log 2>&1 & schema=$$!; \
	$(PY) -m pytest -q -n 2 --dist loadfile tests; rest=$$?; \
	wait $$schema; st=$$?; echo "--- tests/test_service_schema.py (plain pytest, run alongside):"; cat $$log; \
	rm -f $$log; test $$rest -eq 0 -a $$st -eq 0

bench: install
	for f in bench/*.py; do $(PY) $$f || exit 1; done

clean:
	rm -rf $(VENV) .autopar-cache *.egg-info
