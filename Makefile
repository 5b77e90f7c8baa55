# Quick start (fresh machine):  make demo   |   make test
PYTHON ?= python3

.PHONY: setup demo test bench
setup:
	bash scripts/setup.sh

demo: setup
	$(PYTHON) -m pfgmpp_fast demo

# Two workers, whole files each (the machine's 2 cores; a file's tests share their fixtures).
TEST_WORKERS ?= 2
test: setup
	$(PYTHON) -m pytest -n $(TEST_WORKERS) --dist loadfile

bench: setup
	$(PYTHON) -m pfgmpp_fast bench
