# The two commands of the README. Both install what is missing into .venv first.
PY := .venv/bin/python

.PHONY: install test demo clean

install:
	@bash tools/install.sh

test: install
	$(PY) -m pytest -n 2 -q tests

demo: install
	$(PY) demo/run_default.py

clean:
	rm -rf output
