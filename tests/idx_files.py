"""Fashion-MNIST-format files for tests: gzipped IDX (big-endian header, then uint8 data)."""

from __future__ import annotations

import gzip

import numpy as np


def write_idx(path, array: np.ndarray) -> None:
    """Write ``array`` (any shape, values 0..255) as a gzipped IDX file of unsigned bytes."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def write_random_fashion_mnist(folder, n_train: int, n_test: int, seed: int = 0) -> None:
    """A Fashion-MNIST-format folder (``folder`` must exist) of random 28x28 images and random
    labels 0..9: ``n_train`` in the train files, ``n_test`` in the t10k files."""
    rng = np.random.default_rng(seed)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, n))
