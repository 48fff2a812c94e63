# The two fresh-machine commands: `make quickstart` (main job) and `make test` (tests).
VENV ?= $(CURDIR)/.venv
PY := $(VENV)/bin/python
export VENV

.PHONY: install test quickstart clean-quickstart

install:
	@tools/setup_env.sh

test: install
	$(PY) -m pytest

quickstart: install
	$(PY) tools/quickstart.py

clean-quickstart:
	rm -rf output/quickstart
