"""Training launcher: config, distributed set-up, DeepSpeed engine config, checkpoints, MLflow.

`python -m launcher.train --config configs/NAME.yaml [section.key=value ...]` runs a job; the
modules here are its parts (imported explicitly; importing this package loads nothing heavy).
"""
