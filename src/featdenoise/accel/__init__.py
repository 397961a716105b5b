"""Fast forward and input-gradient passes of eval-mode models, for any attack.

One entry point, :func:`inference_grad`: a context manager inside which ``model(x)`` and the
input gradients of an eval-mode model are computed with BatchNorm folded into the convolutions
and, on a CPU in float32, convolutions on weights packed once for oneDNN. Attacks only compute
input gradients (paper Sec. 5 and 6: PGD on eval-mode networks), so every attack gains, ours
(:class:`featdenoise.attacks.Attack` enters it unless ``exact=True``) and others'::

    with featdenoise.accel.inference_grad(model):
        x_adv = torchattacks.PGD(model, eps=16 / 255, alpha=1.6 / 255, steps=10)(x, y)

Modules, each readable alone:

- :mod:`~featdenoise.accel.layer`: the context manager, its routing functions, verification;
- :mod:`~featdenoise.accel.state`: per-model caches and the routing state of a block;
- :mod:`~featdenoise.accel.fold`: BatchNorm folding and its cache;
- :mod:`~featdenoise.accel.pack`: packed convolutions (forward and input gradient) and their cache;
- :mod:`~featdenoise.accel.onednn`: the only caller of PyTorch's private oneDNN operators;
- :mod:`~featdenoise.accel.unchanged`: whether a cache's source tensors are unchanged.
"""

from __future__ import annotations

from featdenoise.accel.layer import inference_grad
from featdenoise.accel.state import caches

__all__ = ["caches", "inference_grad"]
