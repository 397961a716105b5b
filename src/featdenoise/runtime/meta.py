"""Models built from a file's metadata are checked against the file before they get memory.

A model file names its network (``model``, ``model_kwargs``) and stores the tensors. The names
cost nothing to write, the tensors cost their size: a file of a few kilobytes may name a network
of terabytes (``width: 1000000``). Every loader therefore builds the named network on the
``meta`` device first (shapes and dtypes only, no memory), compares each parameter and buffer
with what the file stores (:func:`check_fits`), and only then builds it for real; a network that
does not fit is one ``ValueError`` naming the file and the tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

Stored = Mapping[str, tuple[tuple[int, ...], torch.dtype | str]]
"""``{state-dict key: (shape, dtype)}`` of the tensors a file holds (read from its header)."""


class _NoDataDependentInit(TorchFunctionMode):
    # Meta tensors hold no values; an initialiser that looks at them (``nonzero`` to redraw
    # truncated-normal outliers) is told that nothing needs redrawing.
    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch.Tensor.nonzero, torch.nonzero) and args and args[0].is_meta:
            return torch.empty((0, args[0].dim()), dtype=torch.long, device="meta")
        return func(*args, **(kwargs or {}))


def build_on_meta(build: Callable[[], nn.Module]) -> nn.Module:
    """``build()`` on the ``meta`` device: every parameter and buffer has its shape and dtype but
    no storage, so any network, however large its arguments make it, costs no memory."""
    with torch.device("meta"), _NoDataDependentInit():
        return build()


def stored_shapes(state: dict, path: str) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """``{key: (shape, dtype)}`` of a state dict read from ``path``; an entry that is not a
    tensor is one line naming it."""
    bad = next((k for k, v in state.items() if not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        raise ValueError(f"{path}: model entry {bad!r} is a {type(state[bad]).__name__}, not a "
                         "tensor; the file is damaged or was not written by featdenoise")
    return {k: (tuple(v.shape), v.dtype) for k, v in state.items()}


def _dtype_name(dtype: torch.dtype | str) -> str:
    return str(dtype).removeprefix("torch.")


def check_fits(model: nn.Module, stored: Stored, source: str, name: str,
               subject: str = "the model it names",
               advice: str = "the file is damaged or its metadata does not describe its tensors",
               ) -> None:
    """Refuse a network whose state dict differs from the file's tensors in keys, shapes or dtypes.

    Args:
        model: the network the file names (on the meta device: nothing is read from it but its
            shapes and dtypes).
        stored: the file's tensors, ``{key: (shape, dtype)}``.
        source: the file, named first in the message.
        name: the model name the file gives.
        subject, advice: how the message speaks of the model and what it suggests.

    Raises:
        ValueError: one line: how many keys are missing, unexpected, or of another shape or dtype
            (file vs model), with the first three named.
    """
    own = {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}
    missing = [k for k in own if k not in stored]
    unexpected = [k for k in stored if k not in own]
    misshaped = []
    for k, (shape, dtype) in stored.items():
        if k not in own:
            continue
        want_shape, want_dtype = own[k]
        if tuple(shape) != want_shape or _dtype_name(dtype) != _dtype_name(want_dtype):
            misshaped.append(f"{k} {tuple(shape)} {_dtype_name(dtype)} vs {want_shape} "
                             f"{_dtype_name(want_dtype)}")
    if missing or unexpected or misshaped:
        raise ValueError(
            f"{source}: its weights do not fit {subject} ({name!r}): {len(missing)} "
            f"missing, {len(unexpected)} unexpected, {len(misshaped)} with another shape or "
            f"dtype (file vs model), e.g. {'; '.join((missing + unexpected + misshaped)[:3])}; "
            f"{advice}")
