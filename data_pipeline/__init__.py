"""Datasets to FFCV .beton files, and FFCV loaders that read them back.

Writers: ``python -m data_pipeline.write DATASET --src PATH --out DIR``.
Loaders: ``data_pipeline.loaders.make_loaders(dataset, data_dir, batch_size=...)``.
Inspection: ``python -m data_pipeline.inspect FILE.beton``.

Kept import-light on purpose: ``DataError`` is needed by every module here and by the CLIs,
which should not pay for importing FFCV and torch just to report a bad path.
"""

# The data sets the loaders read (data_pipeline.loaders.make_loaders); the config's choices.
DATASETS = ("demo", "cifar10", "imagenet", "dvs_cifar10")


class DataError(ValueError):
    """Bad input data or output location; the message names the file and the problem."""
