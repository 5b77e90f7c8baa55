# Quick start (fresh machine):  make demo   |   make test
PYTHON ?= python3

.PHONY: setup demo test bench
setup:
	bash scripts/setup.sh

demo: setup
	$(PYTHON) -m pfgmpp_fast demo

test: setup
	$(PYTHON) -m pytest

bench: setup
	$(PYTHON) -m pfgmpp_fast bench
