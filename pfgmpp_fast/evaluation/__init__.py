"""The evaluation workflow: generation (generate.py), feature networks (features.py,
digits_features.py), metrics (metrics.py), the sharded streaming calculation (calc.py), the
sweep engine (sweep.py), post-training quantisation (quantize.py) and the `fid` command (fid.py)."""
