"""One builder for every network that training makes and checkpoints rebuild.

A network is described by four plain values, which a config's ``model:`` section holds and every
checkpoint records (``model``, ``model_kwargs``, ``model_denoise``, ``model_normalize``):

- ``name``: a featdenoise registry name (``resnet152_denoise``) or a library / user-code spec
  (``torchvision:resnet50``, ``timm:resnet50``, ``nets.py:build``; :mod:`featdenoise.hub.specs`);
- ``kwargs``: the builder's keyword arguments;
- ``denoise``: ``{"op": ..., "after": [...] | "stages", **block options}``: denoising blocks
  inserted into the backbone (:func:`featdenoise.models.surgery.add_denoising`, paper Sec. 4),
  each starting as the identity so a pretrained backbone keeps its function;
- ``normalize``: the normalisation layer in front (``imagenet``, ``none``, ``M/S``), so the network
  takes [0, 1] pixels; None: the kind's default (none for registry models).

Pretrained weights (``init``) are the backbone's: they are loaded, strictly, before the blocks go
in.
"""

from __future__ import annotations

from torch import nn

from featdenoise.hub.specs import construct, is_code_spec
from featdenoise.hub.weights import load_weights
from featdenoise.models.normalize import Normalized, parse_normalize
from featdenoise.models.registry import create_model
from featdenoise.models.surgery import add_denoising


def build_model(name: str, kwargs: dict | None = None, *, denoise: dict | None = None,
                normalize: str | None = None, init: str | None = None) -> nn.Module:
    """The network the four values describe (see the module docstring), in train mode.

    Args:
        name: registry name or library / user-code spec.
        kwargs: the builder's keyword arguments.
        denoise: ``{"op": "nonlocal_gaussian", "after": "stages", ...}`` or None (no blocks).
        normalize: normalisation in front, or None for the kind's default.
        init: a weights file of the backbone (before the blocks), loaded strictly
            (:func:`featdenoise.hub.weights.load_weights`).

    Returns:
        The model, ``[N, C, H, W]`` pixels in [0, 1] -> logits ``[N, K]``, with ``model_name``,
        ``model_kwargs``, ``model_denoise`` and ``model_normalize`` set (what checkpoints record).

    Raises:
        ValueError: one line: an unknown name or kwargs, a denoising placement that does not fit,
            init weights of another architecture.
    """
    kwargs = dict(kwargs or {})
    if is_code_spec(name):
        built = construct(name, kwargs)
        model, default = built.model, built.normalize
    else:
        model, default = create_model(name, **kwargs), None
    if init:
        load_weights(model, init, name)
    if denoise:
        options = dict(denoise)
        model = add_denoising(model, options.pop("after", "stages"),
                              options.pop("op", "nonlocal_gaussian"), **options)
    stats = default if normalize is None else parse_normalize(normalize)
    if stats is not None:
        model = Normalized(model, *stats)
    if getattr(model, "num_classes", None) is None and "num_classes" in kwargs:
        model.num_classes = int(kwargs["num_classes"])
    model.model_name, model.model_kwargs = name, kwargs
    model.model_denoise, model.model_normalize = dict(denoise or {}), normalize
    return model
