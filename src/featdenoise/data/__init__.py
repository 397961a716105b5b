"""Datasets in their standard formats (:mod:`featdenoise.data.datasets`) and preprocessing
(:mod:`featdenoise.data.transforms`); images are float RGB in [0, 1], ``[C, H, W]``."""

from featdenoise.data.datasets import (
    IN_CHANNELS,
    NUM_CLASSES,
    build_dataset,
    drop_skipped,
)

__all__ = ["IN_CHANNELS", "NUM_CLASSES", "build_dataset", "drop_skipped"]
