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
