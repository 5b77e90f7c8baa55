"""The training workflow: options and the `train` command (options.py), the loop
(loop.py), data sets (data.py) and the non-leaking augmentation pipeline (augment.py)."""
