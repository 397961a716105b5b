"""Model registry: every named model is a dict of arguments plus one builder call.

``create_model("resnet152_denoise")`` is the paper's best ImageNet model (ResNet-152 with four
non-local Gaussian denoising blocks, Sec. 6); keyword arguments override the variant's
defaults, e.g. ``create_model("resnet152_denoise", denoise="mean", blocks=[1, 1, 1, 1])``.

Variants of each ImageNet backbone (``resnet50``, ``resnet101``, ``resnet152``,
``resnext101_32x8d``) and of ``small_resnet``:

* ``<base>``: no denoising;
* ``<base>_denoise``: one denoising block after the last residual block of each stage,
  default op ``nonlocal_gaussian`` (paper's "+4 denoise");
* ``<base>_denoise_all``: one after every residual block, op ``nonlocal_dot`` without
  embedding and without sub-sampling: the official ResNeXt101-32x8d "DenoiseAll" (the CAAD 2018
  winner, Sec. 6.2; ``resnext101_32x8d_denoise_all`` loads the released checkpoint). The paper
  and the code disagree on its op: the paper says the non-local ops are Gaussian "unless noted"
  and notes nothing for this model, while the released ``nets.py`` builds it with
  ``denoising(..., embed=False, softmax=False)``, the dot product; we follow the code, since its
  checkpoint is the model whose numbers are published;
* ``<base>_denoise_all_gaussian``: one after every residual block, op ``nonlocal_gaussian``
  (embedded) with the ``x_j`` side sub-sampled by 2x2 max pooling and ``x_i`` full size: the
  paper's Table 2 row "R-152 +all denoise" (Sec. 6.2, "Pushing the envelope", 49.5% in the
  CAAD black-box setting) is ``resnet152_denoise_all_gaussian``; no released checkpoint;
* ``<base>_bottleneck``: the "+4 bottleneck" control of Fig. 7 (an extra residual block of the
  network's own kind at the ``_denoise`` places).
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import json
import math
from collections.abc import Callable
from typing import overload

from torch import nn

from featdenoise.models.denoise import OP_NAMES, DenoiseOptions
from featdenoise.models.resnet import NUM_BLOCKS, ResNet
from featdenoise.models.small import SmallResNet
from featdenoise.runtime.finite import finite_float

_BACKBONES: dict[str, tuple[Callable[..., nn.Module], dict]] = {
    "resnet50": (ResNet, dict(blocks=NUM_BLOCKS[50])),
    "resnet101": (ResNet, dict(blocks=NUM_BLOCKS[101])),
    "resnet152": (ResNet, dict(blocks=NUM_BLOCKS[152])),
    "resnext101_32x8d": (ResNet, dict(blocks=NUM_BLOCKS[101], groups=32, res2_bottleneck=8)),
    "small_resnet": (SmallResNet, dict(in_channels=3, num_classes=10, width=16,
                                       blocks=[1, 1, 1])),
}

_VARIANTS: dict[str, dict] = {
    "": dict(placement="none"),
    "_denoise": dict(placement="stages", denoise="nonlocal_gaussian"),
    "_denoise_all": dict(placement="all", denoise="nonlocal_dot"),
    "_denoise_all_gaussian": dict(placement="all", denoise="nonlocal_gaussian", subsample=True),
    "_bottleneck": dict(placement="bottleneck"),
}

_MODELS: dict[str, tuple[Callable[..., nn.Module], dict]] = {
    base + suffix: (builder, {**args, **variant})
    for base, (builder, args) in _BACKBONES.items()
    for suffix, variant in _VARIANTS.items()
}

# The block options a network's ``denoise`` groups (DenoiseOptions but ``op``, which is
# ``denoise`` itself): create_model and the saved ``model_kwargs`` name them one by one.
_BLOCK_OPTIONS = tuple(f.name for f in dataclasses.fields(DenoiseOptions) if f.name != "op")


def list_models() -> list[str]:
    """Names accepted by :func:`create_model`, sorted."""
    return sorted(_MODELS)


def model_defaults(name: str) -> dict:
    """The keyword arguments the variant ``name`` passes to its builder."""
    return dict(_lookup(name)[1])


def _lookup(name: str) -> tuple[Callable[..., nn.Module], dict]:
    if name not in _MODELS:
        close = difflib.get_close_matches(name, _MODELS, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown model {name!r}.{hint} Available: {', '.join(list_models())}")
    return _MODELS[name]


def create_model(name: str, **kwargs) -> nn.Module:
    """Build the model called ``name`` (see :func:`list_models`) with kwargs overriding defaults.

    Common kwargs: ``num_classes``, ``blocks`` (4 counts for ImageNet nets, 3 for small nets),
    ``denoise`` (op name) and the block options ``use_conv``, ``residual``, ``subsample``,
    ``embed``, ``backend`` (one :class:`~featdenoise.models.denoise.DenoiseOptions` for the
    network), ``placement`` (none/stages/all/bottleneck); small nets also take ``in_channels``
    and ``width``. Every model takes float RGB (or gray) in [0, 1], NCHW, and
    returns logits ``[N, num_classes]``; it has ``num_classes``, ``feature_modules()``, and
    ``model_name`` / ``model_kwargs`` (what rebuilds it: ``create_model(name, **kwargs)``).
    """
    builder, defaults = _lookup(name)
    accepted = _keywords(builder)
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ValueError(f"model {name!r} does not take {', '.join(unknown)}; it takes "
                         f"{', '.join(accepted)}")
    for key, value in kwargs.items():
        if isinstance(value, float) and not math.isfinite(value):
            finite_float(key, value)  # raises: no model size or rate is NaN or infinite
    args = {**defaults, **kwargs}
    if args.get("denoise") is not None and args["denoise"] not in OP_NAMES:  # even if unused
        raise ValueError(f"unknown denoising op {args['denoise']!r}; choose one of "
                         f"{', '.join(OP_NAMES)}")
    model = builder(**_grouped(args))
    # nn.Module types unknown attributes as submodules; these two are plain values
    model.model_name = name  # type: ignore[assignment]
    model.model_kwargs = {  # type: ignore[assignment]
        k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}
    return model


def _keywords(builder: Callable[..., nn.Module]) -> list[str]:
    """What :func:`create_model` takes for ``builder``: its parameters, ``denoise`` followed by
    the block options it groups (:data:`_BLOCK_OPTIONS`)."""
    names: list[str] = []
    for name in inspect.signature(builder).parameters:
        names += [name, *_BLOCK_OPTIONS] if name == "denoise" else [name]
    return names


def _grouped(args: dict) -> dict:
    """The builder's arguments: ``denoise`` (an op name) and the block options given one by one
    become one :class:`~featdenoise.models.denoise.DenoiseOptions`."""
    options = {k: args.pop(k) for k in _BLOCK_OPTIONS if k in args}
    if "denoise" in args:
        options["op"] = args.pop("denoise")
    return {**args, "denoise": DenoiseOptions(**options)}


def model_metadata(model: nn.Module) -> dict[str, str]:
    """String metadata (safetensors-style) that rebuilds ``model`` with :func:`model_from_metadata`.

    Keys: ``model`` (registry name) and ``model_kwargs`` (JSON object).
    """
    if not hasattr(model, "model_name"):
        raise ValueError("model was not built by create_model, so its name/kwargs are unknown")
    return {"model": str(model.model_name), "model_kwargs": json.dumps(model.model_kwargs)}


def model_from_metadata(meta: dict[str, str]) -> nn.Module:
    """Inverse of :func:`model_metadata`: a freshly initialised model of that name and kwargs."""
    if "model" not in meta:
        raise ValueError(f"metadata has no 'model' entry (keys: {', '.join(sorted(meta))})")
    return create_model(meta["model"], **json.loads(meta.get("model_kwargs", "{}")))


@overload
def model_in_channels(model: nn.Module, default: int = 3) -> int: ...


@overload
def model_in_channels(model: nn.Module, default: None) -> int | None: ...


def model_in_channels(model: nn.Module, default: int | None = 3) -> int | None:
    """Input channels the model expects: ``model.in_channels`` if set, else its first conv's,
    else ``default`` (3: RGB; None: unknown)."""
    c = getattr(model, "in_channels", None)
    if c is not None:
        return int(c)
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return default if conv is None else int(conv.in_channels)


def model_num_classes(model: nn.Module) -> int:
    """``model.num_classes`` (every model of the library has it)."""
    k = getattr(model, "num_classes", None)
    if k is None:
        raise ValueError("the model has no num_classes attribute; build it with "
                         "featdenoise.models.create_model or a model spec, or set "
                         "model.num_classes")
    return int(k)


def model_label(model: nn.Module) -> str:
    """How messages name ``model``: ``model NAME`` (its registry name, else its class), followed
    by the file it was loaded from when a loader recorded it in ``model.source_file``."""
    name = getattr(model, "model_name", None) or type(model).__name__
    source = getattr(model, "source_file", None)
    return f"model {name} ({source})" if source else f"model {name}"
