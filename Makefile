# The course's commands. Each installs what it needs into .venv first (once, and again when
# pyproject.toml changes). On Windows without make, see README.md for the plain commands.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python

.PHONY: install lab test export run badges check bench bench-tokenizer bench-nanogpt clean

$(VENV)/.installed: pyproject.toml
	@if [ -x $(PY) ]; then py=$(PY); else py=$(PYTHON); fi; \
	$$py -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { \
	echo "make: $$py is Python $$($$py -c 'import platform; print(platform.python_version())'); the course needs 3.11+."; \
	echo "      Run make with PYTHON=python3.11 (or newer), after rm -rf $(VENV) if that venv was made with the old one."; \
	exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -e ".[lab,test]"
	touch $@

install: $(VENV)/.installed

lab: install          ## install everything and open the course in JupyterLab
	$(PY) -m jupyter lab notebooks/ $$([ "$$(id -u)" = 0 ] && echo --allow-root)   # root: containers, cloud boxes

test: install         ## install everything and run the whole test suite (unit tests + strict nbval)
	$(PY) -m pytest

export: install       ## re-export every notebook into nanolib/
	$(PY) tools/nb.py export

run: install          ## execute one notebook in place, then re-export: make run NB=notebooks/01_tokenizer.ipynb
	@test -n "$(NB)" || { echo "make: say which notebook: make run NB=notebooks/01_tokenizer.ipynb"; exit 1; }
	$(PY) tools/nb.py run $(NB)

badges: install       ## rewrite every notebook's Colab badge and setup cell from pyproject.toml
	$(PY) tools/nb.py badges

clean: install        ## strip metadata noise from every notebook (outputs and execution counts stay)
	$(PY) tools/nb.py clean

check: install        ## report sync, execution-count, error and badge problems
	$(PY) tools/nb.py check

bench: install        ## model throughput on this device
	$(PY) -m nanolib.bench

bench-tokenizer: install  ## BPE training speed: ours vs the lesson's naive trainer
	$(PY) benchmarks/tokenizer.py

bench-nanogpt: install    ## final val loss of nanoGPT's CPU config: nanoGPT's loop vs our Trainer
	$(PY) benchmarks/side_by_side.py
