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
in. :func:`check_model` builds a config's network on the ``meta`` device, so a network the real
build would refuse is refused before anything takes memory.
"""

from __future__ import annotations

import os
from typing import Protocol

from torch import nn

from featdenoise.hub.specs import construct, is_code_spec
from featdenoise.hub.weights import load_weights
from featdenoise.models.normalize import Normalized, parse_normalize
from featdenoise.models.registry import create_model, list_models
from featdenoise.models.surgery import add_denoising
from featdenoise.runtime.distributed import file_digest
from featdenoise.runtime.meta import build_on_meta


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
    return _assemble(model, default, name, kwargs, denoise, normalize, init)[0]


def _assemble(model: nn.Module, default, name: str, kwargs: dict, denoise: dict | None,
              normalize: str | None, init: str | None) -> tuple[nn.Module, tuple | None]:
    """Weights, blocks and normalisation on a built architecture, and the facts checkpoints
    record; ``(model, the normalisation's (mean, std) or None)``."""
    own_kwargs = getattr(model, "model_kwargs", None)  # a registry model's, lists for tuples
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
        set_facts(model, num_classes=int(kwargs["num_classes"]))
    set_facts(model, model_name=name,
              model_kwargs=own_kwargs if own_kwargs is not None else kwargs,
              model_denoise=dict(denoise or {}), model_normalize=normalize)
    return model, stats


def set_facts(model: nn.Module, **facts: object) -> None:
    """Set plain attributes on ``model``: the facts checkpoints and messages read back
    (``model_name``, ``model_kwargs``, ``model_denoise``, ``model_normalize``, ``source_file``)."""
    for name, value in facts.items():
        setattr(model, name, value)


def _normalization_facts(stats) -> dict | None:
    """How an evaluation records a normalisation: ``{"mean": [...], "std": [...]}`` or None."""
    return None if stats is None else {"mean": list(stats[0]), "std": list(stats[1])}


def build_spec(spec: str, kwargs: dict | None = None, weights: str | None = None,
               normalize: str | None = None, model_dir: str | None = None) -> tuple[nn.Module,
                                                                                    dict]:
    """``(model, facts)`` for a library or user-code spec (:func:`~featdenoise.hub.specs.
    is_code_spec`), eval mode.

    Args:
        spec: ``torchvision:NAME``, ``timm:NAME``, ``robustbench:NAME``, ``PATH.py:FUNCTION`` or
            ``package.module:FUNCTION``.
        kwargs: keyword arguments of the builder (``{"num_classes": 10}``).
        weights: a weights file (:func:`featdenoise.hub.weights.load_weights`, strict).
        normalize: ``imagenet``, ``cifar10``, ``none``, ``M1,M2,M3/S1,S2,S3`` or None (the kind's
            default, see :mod:`featdenoise.hub.specs`).
        model_dir: RobustBench's checkpoint folder (``robustbench:`` only).

    Returns:
        The model, taking ``[N, C, H, W]`` pixels in [0, 1] and returning logits ``[N, K]``,
        with ``model_name`` (the spec) and ``model_kwargs`` set (an evaluation's identity records
        them with the weights digest), and the facts recorded with it: spec, kwargs, weights
        file and SHA-256, normalisation.

    Raises:
        ValueError: one line naming the spec: unknown library model or function, a download it
            would need, weights of another architecture, a returned object that is no module.
    """
    kwargs = dict(kwargs or {})
    built = construct(spec, kwargs, model_dir)
    weights = weights or built.weights
    model, stats = _assemble(built.model, built.normalize, spec, kwargs, None, normalize, weights)
    if weights:
        set_facts(model, source_file=os.path.abspath(weights))
    facts = {"spec": spec, "kwargs": kwargs, **built.facts,
             "weights": os.path.abspath(weights) if weights else None,
             "weights_file_sha256": file_digest(weights) if weights else None,
             "normalize": _normalization_facts(stats)}
    return model.eval(), facts


class ModelSection(Protocol):
    """A config's ``model:`` section (:class:`featdenoise.training.config.ModelConfig`)."""

    @property
    def name(self) -> str: ...
    @property
    def kwargs(self) -> dict: ...
    @property
    def denoise(self) -> dict: ...
    @property
    def normalize(self) -> str | None: ...
    @property
    def init(self) -> str | None: ...


class HasModelSection(Protocol):
    """A config with a ``model:`` section (:class:`featdenoise.training.config.Config`)."""

    @property
    def model(self) -> ModelSection: ...


def check_model(cfg: HasModelSection) -> None:
    """Refuse a model that training would refuse, without allocating weights.

    Builds the network of ``cfg.model`` (without ``init``) on the ``meta`` device (shapes only,
    no memory), so a misspelt name, an unknown kwarg, a denoising placement that does not fit or
    a value the builder rejects is one ``ValueError`` naming the config key (``model.name``,
    ``model.kwargs``, ``model.denoise``), exactly as the real build in training would give it; a
    missing ``model.init`` file is named too.
    """
    m = cfg.model

    def build(key: str, denoise: dict | None) -> None:
        try:
            build_on_meta(lambda: build_model(m.name, dict(m.kwargs), denoise=denoise,
                                              normalize=m.normalize))
        except (ValueError, TypeError) as err:
            text = str(err).strip().splitlines()
            raise ValueError(f"config key '{key}': {text[0] if text else type(err).__name__}") \
                from None

    known = m.name in list_models() or is_code_spec(m.name)
    try:
        # The backbone first, so an error is told against the key that causes it.
        build("model.kwargs" if known else "model.name", None)
        if m.denoise:
            build("model.denoise", dict(m.denoise))
    except (NotImplementedError, RuntimeError):
        pass  # a builder that needs real values: the real build in training checks it
    if m.init and not os.path.isfile(m.init):
        raise ValueError(f"config key 'model.init': {m.init} not found; give the backbone's "
                         "weights file")
