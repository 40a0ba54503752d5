# The two commands of the README. Both install what is missing into .venv first.
PY := .venv/bin/python

.PHONY: install lint test demo clean

install:
	@bash tools/install.sh

# ruff: pyflakes, import order, line length 120 (pyproject.toml)
lint: install
	$(PY) -m ruff check catseg tests benchmarks datasets demo train_net.py

test: lint
	$(PY) -m pytest -n 2 -q tests

demo: install
	$(PY) demo/run_default.py

clean:
	rm -rf output
