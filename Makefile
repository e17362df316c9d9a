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

.PHONY: setup demo test lint bench study browser
setup: $(VENV)/.installed browser

# The browser tests drive Chromium from the distribution's packages (Playwright's own download cannot
# work offline); installed when missing and apt-get is at hand as root, else those tests skip and say why.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
		echo "chromium not installed: the browser tests will skip"; }

# The main job: a clipped (AutoClip p=10) and an unclipped (p=100) run of the built-in task
# (speech corpus; built once, cached in ~/.cache/dyn), side by side on two cores, then their
# summary and figures (docs/, shown in the README). runs/demo is the demo's own output: redone each time.
DEMO := runs/demo
demo: setup
	rm -rf $(DEMO)
	mkdir -p $(DEMO) docs
	$(PY) -c "from dynamics.tasks.separation.speech import load_corpus; load_corpus()"  # once, before both runs
	$(VENV)/bin/dyn record --p 100 --out $(DEMO)/p100 2>$(DEMO)/p100.log & \
	$(VENV)/bin/dyn record --p 10 --out $(DEMO)/autoclip-p10 || exit 1; \
	wait $$! || { cat $(DEMO)/p100.log; exit 1; }
	$(VENV)/bin/dyn compare $(DEMO)/autoclip-p10 $(DEMO)/p100 --out docs/compare.png
	$(VENV)/bin/dyn compare $(DEMO)/autoclip-p10 $(DEMO)/p100 --csv > docs/demo.csv.tmp && mv docs/demo.csv.tmp docs/demo.csv
	$(VENV)/bin/dyn plot $(DEMO)/p100 $(DEMO)/autoclip-p10 --out docs/fig1.png
	$(VENV)/bin/dyn animate $(DEMO)/autoclip-p10 --out docs/threshold.gif
	$(VENV)/bin/dyn report $(DEMO)/autoclip-p10 $(DEMO)/p100 --out docs/report.html
	$(PY) tools/screenshot.py docs/report.html docs/report.png 1400 1800 || true  # the README's picture; needs Chromium

test: setup
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# The study: AutoClip p=10 against no clipping (p=100), SEEDS seeds each, on the speech corpus (about
# 23 minutes on 2 cores), then docs/study.md with each of the paper's Fig. 1 claims, its interval and
# verdict, and the README's study block, all computed from the runs. Rerunning resumes and skips.
STUDY := runs/study
SEEDS ?= 0,1,2,3,4
study: setup
	$(VENV)/bin/dyn sweep --p 10,100 --loss mi --seeds $(SEEDS) --steps 6000 --jobs 2 --out $(STUDY)
	$(VENV)/bin/dyn study $(STUDY) --out docs/study.md --readme README.md

bench: setup
	$(PY) benchmarks/autoclip_overhead.py
	$(PY) benchmarks/record_overhead.py
	$(PY) benchmarks/figures_speed.py
	$(PY) benchmarks/analysis_speed.py
	$(PY) benchmarks/window_speed.py
