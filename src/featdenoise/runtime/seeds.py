"""One rule for every derived seed: :func:`derive_seed`.

Image subsets, per-image targets, random starts of an evaluation batch, training-step attack
randomness: each is seeded by the run's seed and labels saying what it is for, so that a result
never depends on batching, sharding, resumption or on what ran before it.
"""

from __future__ import annotations

import hashlib

import torch


def derive_seed(seed: int, *parts: object) -> int:
    """A 63-bit seed from ``seed`` and any labels (image id, batch index, ...), stable across runs.

    ``derive_seed(0, "target", "n01440764_1")``. Python's ``hash`` is salted per process, so a
    SHA-256 digest of the labels is used instead.
    """
    text = "|".join([str(int(seed))] + [str(p) for p in parts])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def generator(seed: int, *parts: object, device: torch.device | str = "cpu") -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded with :func:`derive_seed` ``(seed, *parts)``."""
    return torch.Generator(device=device).manual_seed(derive_seed(seed, *parts))
