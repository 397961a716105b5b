"""One finiteness rule: a number that cannot be right is refused, never printed.

- :func:`finite_float`: a float option of the library (eps, step sizes, rates...) as a float, or
  one ``ValueError`` line naming the option when it is not a finite number;
- :func:`check_finite_tensors`: every loader of model weights (run folders, safetensors files,
  the official ``.npz``) refuses weights or buffers that hold NaN or inf, naming the tensor;
- :func:`check_finite_logits`: the evaluation, ``predict`` and the attacks refuse a logits batch
  that holds NaN or inf, naming the model and the images.

All raise :class:`NonFiniteError` (a ``ValueError``: the CLI prints it as one line, exit 2).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch


class NonFiniteError(ValueError):
    """Weights, logits or images hold NaN or inf (one line: what, where, what to do)."""


def finite_float(name: str, value, hint: str = "") -> float:
    """``value`` as a float, or one ``ValueError`` line naming ``name``.

    Refused: what is not a real number (None, a string, a bool) and NaN / inf (no option of the
    library means "undefined" or "infinitely"). ``hint`` ends the message (e.g. the paper's value).
    """
    if isinstance(value, (str, bytes, bool)) or value is None:
        raise ValueError(f"{name}={value!r} is not a number{hint}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={value!r} is not a number{hint}") from None
    if not math.isfinite(number):
        raise ValueError(f"{name}={number!r} is not a finite number{hint}")
    return number


def all_finite(t: torch.Tensor) -> torch.Tensor:
    """0-d bool tensor on ``t``'s device: no NaN or inf in ``t`` (non-empty, floating). No host
    sync; one reduction (``amax`` propagates NaN), several times cheaper on a CPU than
    ``isfinite(t).all()``, which first writes a bool tensor of ``t``'s size."""
    return torch.isfinite(t.detach().abs().amax())


def _counts(t: torch.Tensor) -> tuple[int, int]:
    """(NaN count, inf count) of a floating tensor."""
    return int(torch.isnan(t).sum()), int(torch.isinf(t).sum())


def _what(nan: int, inf: int) -> str:
    parts = [f"{nan} NaN" if nan else "", f"{inf} inf" if inf else ""]
    return " and ".join(p for p in parts if p) + " values"


def check_finite_tensors(tensors: Mapping[str, torch.Tensor | np.ndarray], source: str,
                         hint: str = "the file is damaged or the training diverged") -> None:
    """Refuse a state dict (or the arrays of a checkpoint) holding NaN or inf.

    Args:
        tensors: name -> tensor (weights and buffers) or numpy array; non-float entries are
            skipped.
        source: what is named first (a file path, ``"model.init"``...).
        hint: what the message says it means.
    Raises:
        NonFiniteError: ``"{source}: fc.weight holds 12 NaN values; {hint}"`` (the first bad
            tensor in order, and how many others there are).
    """
    bad = []
    for name, t in tensors.items():
        if isinstance(t, np.ndarray):
            if not np.issubdtype(t.dtype, np.floating):
                continue
            if not np.isfinite(t).all():
                bad.append((name, int(np.isnan(t).sum()), int(np.isinf(t).sum())))
            continue
        if isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex()) \
                and not t.is_meta and not bool(torch.isfinite(t).all()):
            bad.append((name, *_counts(t)))
    if bad:
        name, nan, inf = bad[0]
        more = f" (and {len(bad) - 1} more tensors)" if len(bad) > 1 else ""
        raise NonFiniteError(f"{source}: {name} holds {_what(nan, inf)}{more}; {hint}")


def list_some(items: Sequence, limit: int = 5) -> str:
    shown = ", ".join(str(i) for i in items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def bad_rows(t: torch.Tensor) -> list[int]:
    """Indices of the rows (first dimension) of ``t`` holding a NaN or inf."""
    return (~torch.isfinite(t.detach()).flatten(1).all(1)).nonzero()[:, 0].tolist()


def check_finite_logits(logits: torch.Tensor, who: str,
                        ids: Sequence | None = None, what: str = "images") -> None:
    """Refuse a logits batch ``[N, K]`` holding NaN or inf: one host sync when it is finite.

    Args:
        logits: the model's output ``[N, K]``.
        who: the model, as the message names it.
        ids: one name per row (file names, image ids); default the row indices.
        what: what the rows are (``"images"``, ``"adversarial images"``).
    Raises:
        NonFiniteError: naming ``who``, how many rows and which (the first five).
    """
    if logits.numel() == 0 or bool(torch.isfinite(logits).all()):
        return
    rows = bad_rows(logits)
    names = [ids[i] for i in rows] if ids is not None else rows
    raise NonFiniteError(
        f"{who} returned NaN or inf logits for {len(rows)} of {len(logits)} {what} "
        f"({list_some(names)}); its weights or computation are broken (a diverged training, a "
        "damaged file, an overflow in reduced precision): no accuracy can be computed")
