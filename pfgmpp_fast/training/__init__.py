"""The training workflow: options (options.py), the entry points `run_training` and `train`
(train.py), the loop (loop.py) with its tick reports (report.py) and run-directory files
(run_files.py), post-hoc EMA tracking and the `phema` command (phema.py), data sets (data.py)
and the non-leaking augmentation pipeline (augment.py)."""
