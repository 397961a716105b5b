"""The value rules of the training config (:mod:`featdenoise.training.config`): per-key ranges,
a value's type against its field's annotation, and no NaN or inf anywhere.

Each rule refuses a bad value with one ``ValueError`` naming the key, the value and what is
allowed. Pixel sizes (``attack.eps``, ``attack.step_size``, ``attack.fgsm_step``) are checked on the
paper's 0..255 scale, as the config holds them.
"""

from __future__ import annotations

import math
from typing import Any

DATASETS = ("fashion_mnist", "cifar10", "imagenet")
ATTACK_MODES = ("pgd", "free", "fast")
SCHEDULES = ("step", "cyclic")


def _positive(v):
    return v > 0


def _non_negative(v):
    return v >= 0


def _probability(v):
    return 0.0 <= v <= 1.0


# key -> (predicate, description of the allowed values)
CHECKS: dict[str, tuple[Any, str]] = {
    "data.name": (lambda v: v in DATASETS, f"one of {', '.join(DATASETS)}"),
    "data.batch_size": (_positive, "an integer >= 1"),
    "data.eval_batch_size": (_non_negative, "an integer >= 0 (0: same as batch_size)"),
    "data.workers": (_non_negative, "an integer >= 0"),
    "data.train_subset": (_non_negative, "an integer >= 0 (0: whole split)"),
    "data.val_subset": (_non_negative, "an integer >= 0 (0: whole split)"),
    "data.image_size": (_positive, "an integer >= 1"),
    "attack.steps": (_non_negative, "an integer >= 0 (0: clean training)"),
    "attack.eps": (lambda v: 0 <= v <= 255, "a number in [0, 255] (pixel units, paper: 16)"),
    "attack.step_size": (lambda v: 0 < v <= 255, "a number in (0, 255] (pixel units, paper: 1)"),
    "attack.clean_start_prob": (_probability, "a number in [0, 1] (paper: 0.2)"),
    "attack.mode": (lambda v: v in ATTACK_MODES, f"one of {', '.join(ATTACK_MODES)}"),
    "attack.replays": (_positive, "an integer >= 1 (free: Shafahi et al. use 4 to 10)"),
    "attack.fgsm_step": (lambda v: 0 < v <= 255,
                         "a number in (0, 255] (pixel units) or null for 1.25 x eps"),
    "attack.check_images": (_positive, "an integer >= 1"),
    "attack.check_steps": (_positive, "an integer >= 1"),
    "attack.overfit_drop": (_probability, "a fraction in [0, 1] (0: no check; e.g. 0.2)"),
    "optim.lr": (_positive, "a number > 0"),
    "optim.base_batch": (_positive, "an integer >= 1 (paper: 256)"),
    "optim.momentum": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "optim.weight_decay": (_non_negative, "a number >= 0"),
    "optim.label_smoothing": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "optim.warmup_epochs": (_non_negative, "a number >= 0"),
    "optim.milestones": (
        lambda v: all(isinstance(m, (int, float)) and not isinstance(m, bool) and m > 0
                      for m in v) and list(v) == sorted(v),
        "an increasing list of epochs > 0"),
    "optim.lr_decay": (lambda v: 0 < v <= 1, "a number in (0, 1]"),
    "optim.epochs": (_positive, "an integer >= 1"),
    "optim.schedule": (lambda v: v in SCHEDULES, f"one of {', '.join(SCHEDULES)}"),
    "optim.cycle_peak": (lambda v: 0 < v < 1, "a fraction in (0, 1) (Wong et al.: 0.5)"),
    "run.out_dir": (lambda v: len(v) > 0, "a non-empty path"),
    "run.checkpoint_every": (_non_negative, "an integer >= 0 (steps; 0: epoch ends only)"),
    "run.eval_every": (_non_negative, "an integer >= 0 (epochs; 0: final evaluation only)"),
    "run.eval_attack_steps": (_non_negative, "an integer >= 0"),
    "run.eval_sweeps": (
        lambda v: all(isinstance(e, (list, tuple)) and len(e) == 2
                      and all(isinstance(i, int) and not isinstance(i, bool) and i > 0 for i in e)
                      for e in v),
        "a list of [steps, every epochs] pairs of integers >= 1, e.g. [[50, 20], [100, 10]]"),
    "run.final_eval_steps": (_non_negative, "an integer >= 0"),
    "run.device": (lambda v: v in ("auto", "cpu", "cuda") or v.startswith("cuda:"),
                   "auto, cpu, cuda or cuda:N"),
    "run.stop_after": (_non_negative, "an integer >= 0 (0: off)"),
    "run.log_every": (_positive, "an integer >= 1"),
    "run.resume": (lambda v: len(v) > 0, "auto, never, or a checkpoint path"),
}


def check_value(key: str, value: Any, default: Any, annotation: str) -> Any:
    """``value`` of config key ``key`` checked and coerced (:func:`coerce`, then no NaN/inf
    inside it, then its range in :data:`CHECKS`); returns the value to store."""
    value = coerce(key, value, default, annotation)
    refuse_nonfinite(key, value)
    check = CHECKS.get(key)
    if check is not None and value is not None and not check[0](value):
        raise ValueError(f"config key '{key}' = {value!r} is out of range: expected {check[1]}")
    return value


def coerce(key: str, value: Any, default: Any, annotation: str) -> Any:
    """Check the type of ``value`` against the field's annotation.

    Ints are accepted as floats; a float with a whole value (``run.seed=1e3``) is accepted as an
    int, any other float (``2.5``, ``.nan``) is refused for an int key; ``nan`` and ``inf`` are
    refused everywhere (no setting means "infinitely" or "undefined")."""
    optional = "None" in annotation
    if value is None:
        if optional:
            return None
        raise ValueError(f"config key '{key}' may not be null; give a value like {default!r}")
    kind = annotation.replace(" | None", "").strip()
    if isinstance(value, float) and not math.isfinite(value) and kind in ("int", "float"):
        raise ValueError(f"config key '{key}' = {value!r} is not a finite number; give a value "
                         f"like {default!r}")
    if kind == "int" and isinstance(value, float):
        if not value.is_integer():
            raise ValueError(f"config key '{key}' = {value!r} has the wrong type: expected int "
                             f"(a whole number), e.g. {default!r}")
        value = int(value)
    ok = {
        "bool": isinstance(value, bool),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool),
        "str": isinstance(value, (str, int, float)) and not isinstance(value, bool),
        "list": isinstance(value, (list, tuple)),
        "dict": isinstance(value, dict),
    }.get(kind, True)
    if not ok:
        raise ValueError(f"config key '{key}' = {value!r} has the wrong type: expected {kind}, "
                         f"e.g. {default!r}")
    if kind == "float":
        return float(value)
    if kind == "str":
        return str(value)
    if kind == "list":
        return list(value)
    return value


def refuse_nonfinite(key: str, value: Any) -> None:
    """Refuse NaN / inf anywhere inside a list or a free-form mapping (``model.kwargs.width``,
    ``optim.milestones[1]``), naming the nested key: a builder would fail later with an unrelated
    message, or not at all."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"config key '{key}' = {value!r} is not a finite number; give a finite "
                         "value")
    if isinstance(value, dict):
        for k, v in value.items():
            refuse_nonfinite(f"{key}.{k}", v)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            refuse_nonfinite(f"{key}[{i}]", v)
