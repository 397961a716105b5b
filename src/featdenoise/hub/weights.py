"""Weights files of models built elsewhere: a state dict in safetensors or ``torch.save`` form.

``--weights FILE`` reads ``.safetensors`` or ``.pt``/``.pth``/``.bin`` (``torch.load`` with
``weights_only=True``: a file whose pickle needs code is refused). The state dict may be nested
the ways training scripts save it (``{"state_dict": ...}``, ``{"model": ...}``,
``{"model_state_dict": ...}``, ``{"net": ...}``, and one level more) and carry DDP's
``module.`` prefix (or torch.compile's ``_orig_mod.``). It must then fit the model exactly: keys,
shapes and dtypes are compared before anything is copied, and every difference is counted in one
line naming the first ones.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from featdenoise.runtime.finite import check_finite_tensors
from featdenoise.runtime.meta import check_fits, stored_shapes
from featdenoise.runtime.safeio import read_safetensors, safe_torch_load

NESTED_KEYS = ("state_dict", "model_state_dict", "model", "net", "module", "ema")
"""Keys under which checkpoints of common training scripts keep the model's state dict."""

PREFIXES = ("module.", "_orig_mod.")
"""Prefixes that wrappers add to every key (DDP / DataParallel, torch.compile)."""


def _unnest(obj: object, path: str) -> dict[str, torch.Tensor]:
    for _ in range(3):  # {"state_dict": {"model": {...}}} at most
        if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
        if not isinstance(obj, dict):
            break
        inner = next((obj[k] for k in NESTED_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = inner
    keys = ", ".join(map(repr, list(obj)[:6])) if isinstance(obj, dict) else type(obj).__name__
    raise ValueError(f"{path}: no state dict of tensors found (top-level keys: {keys}); save "
                     "model.state_dict() or a dict holding it under 'state_dict' or 'model'")


def _strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict of a weights file, unnested and without wrapper prefixes.

    Raises:
        FileNotFoundError: no such file.
        ValueError: one line naming the file: unreadable, a pickle needing code, no state dict
            of tensors inside, or a tensor holding NaN or inf.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ValueError(f"--weights {path} is a folder; give the weights file in it")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--weights {path} not found; check the path")
    if path.endswith(".safetensors"):
        state, _ = read_safetensors(path)
    else:
        state = _unnest(safe_torch_load(path), path)
    state = _strip_prefixes(state)
    check_finite_tensors(state, path)
    return state


def load_weights(model: nn.Module, path: str | os.PathLike, name: str) -> None:
    """Copy the weights file ``path`` into ``model`` (strict: same keys, shapes and dtypes).

    Args:
        model: the built model (any ``nn.Module``).
        path: the weights file (see the module docstring).
        name: how the model was named (its spec), for the message.

    Raises:
        ValueError: one line counting the missing, unexpected and mis-shaped keys, naming the
            first ones (the file and the model do not describe the same network).
    """
    state = read_state_dict(path)
    check_fits(model, stored_shapes(state, os.fspath(path)), os.fspath(path), name,
               subject="the model",
               advice="give the weights of this architecture (and its --model-kwargs)")
    model.load_state_dict(state, strict=True)
