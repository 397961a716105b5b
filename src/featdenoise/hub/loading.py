"""A model or a data set from the names a user types: what every command does, as a library.

- :func:`load_model_spec`: a run directory, ``checkpoint.pt`` or ``model.safetensors`` (trained by
  :mod:`featdenoise.training`), an official tensorpack ``.npz`` (``FILE.npz`` with ``arch``, or
  ``FILE.npz:ARCH[:DEPTH]``, see :mod:`featdenoise.hub.tensorpack`), a library or user-code spec
  (:mod:`featdenoise.hub.specs`) or a registered model name (untrained weights), the last two
  built with :class:`SpecOptions`;
- :func:`load_dataset`: ``fashion_mnist``, ``cifar10``, ``imagenet`` (standard on-disk formats)
  or ``folder`` (a flat folder of images with a ``filename,label`` CSV);
- :func:`check_compatible`: one clear error when the data cannot fit the model.

Every model comes back in eval mode, takes ``[N, C, H, W]`` pixels in [0, 1] and returns logits
``[N, K]``; every data set yields ``(image [C, H, W] float in [0, 1], label)``.

    from featdenoise.hub.loading import load_model_spec, load_dataset
    name, model, source = load_model_spec("runs/fmnist_adv")
    data = load_dataset("fashion_mnist", split="val")
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import Dataset

from featdenoise.data.datasets import build_dataset
from featdenoise.data.files import labelled_folder
from featdenoise.hub.build import build_model, build_spec, set_facts
from featdenoise.hub.checkpoints import load_model
from featdenoise.hub.specs import is_code_spec
from featdenoise.hub.tensorpack import load_tensorpack
from featdenoise.models import (
    list_models,
    model_in_channels,
    model_label,
    model_num_classes,
)
from featdenoise.runtime.modes import eval_mode

OFFICIAL_ARCHS = ("ResNet", "ResNetDenoise", "ResNeXtDenoiseAll")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SpecOptions:
    """How a library, user-code or registry spec is built: ``kwargs`` for its builder
    (``--model-kwargs``), a ``weights`` file (``--weights``), the ``normalize`` layer in front
    (``--normalize``) and RobustBench's checkpoint folder ``model_dir`` (``--model-dir``); see
    :func:`featdenoise.hub.build.build_spec`. A featdenoise or official file carries its own."""

    kwargs: dict | None = None
    weights: str | None = None
    normalize: str | None = None
    model_dir: str | None = None

    def given(self) -> bool:
        """Whether any option is set."""
        return any((self.kwargs, self.weights, self.normalize, self.model_dir))


def model_name_from_path(path: str) -> str:
    """A short label for a model file: the run folder's name for ``runs/x/model.safetensors``;
    taken from the resolved path, so ``.`` and ``..`` are named by the folders they stand for."""
    path = os.path.realpath(path)
    if os.path.isdir(path):
        return os.path.basename(path)
    base, _ = os.path.splitext(os.path.basename(path))
    if base in ("checkpoint", "model"):
        return os.path.basename(os.path.dirname(os.path.abspath(path))) or base
    return base


def load_official(path: str, arch: str | None, depth: int | None = None,
                  blocks: list[int] | None = None) -> nn.Module:
    """An official tensorpack ``.npz`` checkpoint as our model (eval mode)."""
    if not arch:
        raise ValueError(f"official checkpoint {path} needs its arch ({', '.join(OFFICIAL_ARCHS)};"
                         " see the official model zoo), e.g. --arch ResNetDenoise")
    if arch not in OFFICIAL_ARCHS:
        raise ValueError(f"unknown official arch {arch!r}; use one of {', '.join(OFFICIAL_ARCHS)}")
    return load_tensorpack(path, arch, depth=depth, blocks=blocks).eval()


def load_model_spec(spec: str, options: SpecOptions | None = None, *, arch: str | None = None,
                    depth: int | None = None, blocks: list[int] | None = None,
                    num_classes: int | None = None,
                    in_channels: int | None = None) -> tuple[str, nn.Module, dict]:
    """``(name, model, source facts)`` from a model spec (see the module docstring and
    :mod:`featdenoise.hub.specs`), in eval mode.

    ``options`` (:class:`SpecOptions`: kwargs, weights, normalize, model_dir) build library,
    user-code and registry specs; a featdenoise or official file carries its own and refuses
    them. ``arch``/``depth``/``blocks`` are the official checkpoint's ``--arch``/``-d`` (or block
    counts) when ``spec`` is a bare ``FILE.npz``; ``num_classes``/``in_channels`` size a
    registered model built from its name when ``options.kwargs`` does not (a warning is logged
    unless ``options.weights`` is given: its weights are random).
    """
    options = options or SpecOptions()
    if is_code_spec(spec):
        model, facts = build_spec(spec, options.kwargs, options.weights, options.normalize,
                                  options.model_dir)
        return spec.rpartition(":")[2] or spec, model, facts
    cut = spec.find(".npz:") + 4 if ".npz:" in spec else len(spec)
    path, rest = spec[:cut], spec[cut + 1:]
    if path.endswith(".npz") or os.path.exists(spec):
        given = [flag for flag, v in (("--model-kwargs", options.kwargs),
                                      ("--weights", options.weights),
                                      ("--normalize", options.normalize)) if v]
        if given:
            raise ValueError(f"{spec} is a model file with its own architecture, weights and "
                             f"input convention; drop {', '.join(given)}")
    if path.endswith(".npz"):
        if rest:
            arch, _, d = rest.partition(":")
            depth = int(d) if d else depth
        model = load_official(path, arch, depth, blocks)
        return (model_name_from_path(path), model,
                {"official": os.path.abspath(path), "arch": arch, "depth": depth})
    if os.path.exists(spec):
        return model_name_from_path(spec), load_model(spec).eval(), \
            {"checkpoint": os.path.abspath(spec)}
    return spec, *_registry_model(spec, options, num_classes, in_channels)


def _registry_model(spec: str, options: SpecOptions, num_classes: int | None,
                    in_channels: int | None) -> tuple[nn.Module, dict]:
    """A registry model and its facts; without ``options.kwargs`` it is sized by
    ``num_classes``/``in_channels``, ``in_channels`` dropped when its builder does not take it."""
    kwargs, weights, normalize = options.kwargs, options.weights, options.normalize
    if spec not in list_models():
        raise ValueError(f"model {spec!r} is neither an existing file, a library spec "
                         "(torchvision:NAME, timm:NAME, PATH.py:FUNCTION, module:FUNCTION) nor a "
                         f"registered model ({', '.join(list_models())})")
    if weights is None:
        log.warning("featdenoise: warning: %s is a registered model with random weights "
                    "(no checkpoint)", spec)
    kw = dict(kwargs) if kwargs is not None else {
        k: v for k, v in (("num_classes", num_classes), ("in_channels", in_channels))
        if v is not None}
    try:
        model = build_model(spec, kw, normalize=normalize, init=weights)
    except TypeError:
        if kwargs is not None:
            raise
        kw.pop("in_channels", None)
        model = build_model(spec, kw, normalize=normalize, init=weights)
    if weights:
        set_facts(model, source_file=os.path.abspath(weights))
    facts = {"registry": spec, "kwargs": kw,
             "weights": os.path.abspath(weights) if weights else None}
    return model.eval(), facts


def load_dataset(name: str, *, root: str | None = None, split: str = "val",
                 labels: str | None = None, image_size: int = 224, channels: int = 3) -> Dataset:
    """An evaluation data set: a named one (standard layout under ``root``, default its own
    folder) or ``folder`` (images in ``root``, labels from the ``labels`` CSV), no augmentation.

    ``image_size``: ImageNet's crop (resize to 256/224 of it, centre crop); ``channels``: what a
    folder's images are converted to (1 = gray, 3 = RGB).
    """
    if name == "folder":
        if not root:
            raise ValueError("--data folder needs --data-root DIR (the folder of images)")
        if not labels:
            raise ValueError("--data folder needs --labels CSV (filename,label lines)")
        return labelled_folder(root, labels, channels)
    return build_dataset(name, root, split, augment=False, image_size=image_size)


def probe_num_classes(model: nn.Module, x: torch.Tensor) -> int:
    """K of a model that does not say it (a user's or library model): the logits of one image
    ``x`` ``[C, H, W]``; one line when the model does not return logits ``[1, K]``."""
    param = next(model.parameters(), None)
    with eval_mode(model), torch.no_grad():
        out = model(x[None].to(param.device if param is not None else x.device))
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != 1:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"{model_label(model)} returns {shape} for one image of "
                         f"{tuple(x.shape)}, not logits [1, K]; wrap it to return logits")
    return int(out.shape[1])


def check_compatible(model: nn.Module, dataset: Dataset, what: str) -> None:
    """One clear error when the data's channels or labels cannot fit the model."""
    if len(dataset) == 0:  # type: ignore[arg-type]  # Dataset does not declare __len__
        raise ValueError(f"{what} holds no images")
    x, y = dataset[0]
    c = model_in_channels(model)
    if x.dim() != 3 or x.shape[0] != c:
        raise ValueError(f"the model takes {c}-channel images but {what} gives shape "
                         f"{tuple(x.shape)}; use a model trained on this data")
    if getattr(model, "num_classes", None) is None:
        set_facts(model, num_classes=probe_num_classes(model, x))
    k = model_num_classes(model)
    classes = getattr(dataset, "classes", None)
    top = len(classes) - 1 if classes is not None and len(classes) else int(y)
    if top >= k or int(y) >= k:
        raise ValueError(f"{what} has labels up to {max(top, int(y))} but the model has {k} "
                         "classes; use a model trained on this data")
