"""A model or a data set from the names a user types: what every command does, as a library.

- :func:`load_model_spec`: a run directory, ``checkpoint.pt`` or ``model.safetensors`` (trained by
  :mod:`featdenoise.training`), an official tensorpack ``.npz`` (``FILE.npz`` with ``arch``, or
  ``FILE.npz:ARCH[:DEPTH]``, see :mod:`featdenoise.pretrained`), or a registered model name
  (untrained weights);
- :func:`load_dataset`: ``fashion_mnist``, ``cifar10``, ``imagenet`` (standard on-disk formats)
  or ``folder`` (a flat folder of images with a ``filename,label`` CSV);
- :func:`check_compatible`: one clear error when the data cannot fit the model.

Every model comes back in eval mode, takes ``[N, C, H, W]`` pixels in [0, 1] and returns logits
``[N, K]``; every data set yields ``(image [C, H, W] float in [0, 1], label)``.

    from featdenoise.loading import load_model_spec, load_dataset
    name, model, source = load_model_spec("runs/fmnist_adv")
    data = load_dataset("fashion_mnist", split="val")
"""

from __future__ import annotations

import os

from torch import nn
from torch.utils.data import Dataset

OFFICIAL_ARCHS = ("ResNet", "ResNetDenoise", "ResNeXtDenoiseAll")


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
    from featdenoise.pretrained import load_tensorpack

    if not arch:
        raise ValueError(f"official checkpoint {path} needs its arch ({', '.join(OFFICIAL_ARCHS)};"
                         " see the official model zoo), e.g. --arch ResNetDenoise")
    if arch not in OFFICIAL_ARCHS:
        raise ValueError(f"unknown official arch {arch!r}; use one of {', '.join(OFFICIAL_ARCHS)}")
    return load_tensorpack(path, arch, depth=depth, blocks=blocks).eval()


def load_model_spec(spec: str, *, arch: str | None = None, depth: int | None = None,
                    blocks: list[int] | None = None, num_classes: int | None = None,
                    in_channels: int | None = None) -> tuple[str, nn.Module, dict]:
    """``(name, model, source facts)`` from a model spec (see the module docstring).

    ``arch``/``depth``/``blocks`` are the official checkpoint's ``--arch``/``-d`` (or block
    counts) when ``spec`` is a bare ``FILE.npz``; ``num_classes``/``in_channels`` size a
    registered model built from its name (a warning is printed: its weights are random).
    """
    from featdenoise.training.checkpoint import load_model

    cut = spec.find(".npz:") + 4 if ".npz:" in spec else len(spec)
    path, rest = spec[:cut], spec[cut + 1:]
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
    from featdenoise.models import create_model, list_models

    if spec not in list_models():
        raise ValueError(f"model {spec!r} is neither an existing checkpoint nor a registered "
                         f"model ({', '.join(list_models())})")
    print(f"featdenoise: warning: {spec} is a registered model with random weights "
          "(no checkpoint)")
    kw = {k: v for k, v in (("num_classes", num_classes), ("in_channels", in_channels))
          if v is not None}
    try:
        model = create_model(spec, **kw)
    except TypeError:
        kw.pop("in_channels", None)
        model = create_model(spec, **kw)
    return spec, model.eval(), {"registry": spec}


def load_dataset(name: str, *, root: str | None = None, split: str = "val",
                 labels: str | None = None, image_size: int = 224, channels: int = 3) -> Dataset:
    """An evaluation data set: a named one (standard layout under ``root``, default its own
    folder) or ``folder`` (images in ``root``, labels from the ``labels`` CSV), no augmentation.

    ``image_size``: ImageNet's crop (resize to 256/224 of it, centre crop); ``channels``: what a
    folder's images are converted to (1 = gray, 3 = RGB).
    """
    if name == "folder":
        from featdenoise.data.files import labelled_folder

        if not root:
            raise ValueError("--data folder needs --data-root DIR (the folder of images)")
        if not labels:
            raise ValueError("--data folder needs --labels CSV (filename,label lines)")
        return labelled_folder(root, labels, channels)
    from featdenoise.data.datasets import build_dataset

    return build_dataset(name, root, split, augment=False, image_size=image_size)


def check_compatible(model: nn.Module, dataset: Dataset, what: str) -> None:
    """One clear error when the data's channels or labels cannot fit the model."""
    from featdenoise.evaluation.engine import model_num_classes
    from featdenoise.models import model_in_channels

    if len(dataset) == 0:
        raise ValueError(f"{what} holds no images")
    x, y = dataset[0]
    c, k = model_in_channels(model), model_num_classes(model)
    if x.dim() != 3 or x.shape[0] != c:
        raise ValueError(f"the model takes {c}-channel images but {what} gives shape "
                         f"{tuple(x.shape)}; use a model trained on this data")
    classes = getattr(dataset, "classes", None)
    top = len(classes) - 1 if classes is not None and len(classes) else int(y)
    if top >= k or int(y) >= k:
        raise ValueError(f"{what} has labels up to {max(top, int(y))} but the model has {k} "
                         "classes; use a model trained on this data")
