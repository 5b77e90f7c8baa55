"""Applications built on the workflows: the demo, the robustness experiment, the benchmark
runner and the digits toolkit they share (digits.py)."""
