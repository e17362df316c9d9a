# Two entry points: `make demo` and `make test`. Both set up .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Two cores: OpenMP spinning next to a busy neighbour can stall torch for seconds.
export OMP_NUM_THREADS ?= 1
export OMP_WAIT_POLICY ?= PASSIVE

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $@

.PHONY: setup demo test lint bench
setup: $(VENV)/.installed

# The main job: a clipped (AutoClip p=10) and an unclipped (p=100) run of the built-in task,
# side by side on two cores, then their summary and figures (docs/, shown in the README).
# runs/demo is the demo's own output: redone each time.
DEMO := runs/demo
demo: setup
	rm -rf $(DEMO)
	mkdir -p $(DEMO) docs
	$(VENV)/bin/dyn record --p 100 --out $(DEMO)/p100 2>$(DEMO)/p100.log & \
	$(VENV)/bin/dyn record --p 10 --out $(DEMO)/autoclip-p10 || exit 1; \
	wait $$! || { cat $(DEMO)/p100.log; exit 1; }
	$(VENV)/bin/dyn compare $(DEMO)/autoclip-p10 $(DEMO)/p100 --out docs/compare.png
	$(VENV)/bin/dyn plot $(DEMO)/p100 $(DEMO)/autoclip-p10 --out docs/fig1.png
	$(VENV)/bin/dyn animate $(DEMO)/autoclip-p10 --out docs/threshold.gif

test: setup
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: setup
	$(PY) benchmarks/autoclip_overhead.py
	$(PY) benchmarks/record_overhead.py
	$(PY) benchmarks/figures_speed.py
