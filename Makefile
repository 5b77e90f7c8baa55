# Quick start (fresh machine):  make demo   |   make test
PYTHON ?= python3

.PHONY: setup demo test test-slow bench
setup:
	bash scripts/setup.sh

demo: setup
	$(PYTHON) -m pfgmpp_fast demo

# Two workers, whole files each (the machine's 2 cores; a file's tests share their fixtures).
# `make test` leaves out the few end-to-end tests marked `slow` (killed and restarted torchrun
# jobs and experiments, Inception and DINOv2 on random weights, the benchmark and GPU-script
# dry runs); `make test-slow` runs them (after `make test`, which set everything up); CI runs both.
TEST_WORKERS ?= 2
test: setup
	$(PYTHON) -m pytest -n $(TEST_WORKERS) --dist loadfile -m "not slow"

test-slow:
	$(PYTHON) -m pytest -n $(TEST_WORKERS) --dist loadfile -m slow

bench: setup
	$(PYTHON) -m pfgmpp_fast bench
