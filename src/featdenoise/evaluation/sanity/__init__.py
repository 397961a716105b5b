"""Evaluation sanity checks: can this robustness number be trusted?

An attack can look strong, and a defence robust, only because the gradients it follows are
useless (rounded, saturated, NaN): "obfuscated gradients" (Athalye, Carlini & Wagner, ICML 2018).
Carlini et al. (2019, "On Evaluating Adversarial Robustness", Sec. 5) list checks that every
evaluation should pass; :func:`run_sanity` runs the ones that need nothing but the model, the
attack and a few images, and returns one :class:`CheckResult` per check:

``gradient``         the input gradient of the attack loss is finite and non-zero for most images;
``more_iterations``  accuracy does not increase with more PGD iterations (same step size);
``larger_eps``       accuracy does not increase with a larger eps;
``unbounded``        an unbounded attack (eps = 1, the whole [0, 1] box) drives accuracy to ~0
                     and targeted success to ~100%;
``pgd_vs_noise``     PGD beats random noise of the same size (uniform in the eps-box and random
                     signs of magnitude eps);
``restarts``         the worst case over R independent random starts is not much below one start
                     (else single-start PGD overestimates robustness).

A gradient-masked model (for example one that rounds its input) fails ``gradient``,
``unbounded`` and ``pgd_vs_noise``; a normally trained one passes all of them.

The checks are :mod:`.checks` (one function each), their measurements :mod:`.probe`.
Pixels are float RGB in [0, 1], NCHW; ``eps`` and step sizes are on that scale (16/255 is the
paper's 16). Accuracies are fractions of the images checked (``numbers["images"]``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from featdenoise.attacks import draw_targets
from featdenoise.evaluation.options import check_keywords, field_names, pick
from featdenoise.evaluation.sanity.checks import (
    ATTACK_CHECKS,
    CHECKS,
    Budget,
    CheckResult,
    SanityOptions,
)
from featdenoise.evaluation.sanity.probe import Probe, collect
from featdenoise.runtime.finite import NonFiniteError, finite_float
from featdenoise.runtime.modes import eval_mode
from featdenoise.runtime.seeds import generator

__all__ = ["ATTACK_CHECKS", "CheckResult", "SanityOptions", "format_report", "run_sanity"]


def format_report(results: Iterable[CheckResult]) -> str:
    """A printable PASS/FAIL report, one line per check and a last summary line."""
    results = list(results)
    lines = [r.line() for r in results]
    failed = [r.name for r in results if not r.passed]
    if failed:
        lines.append(
            f"sanity: {len(failed)} of {len(results)} checks FAILED ({', '.join(failed)}); "
            "the robustness numbers of this evaluation should not be trusted "
            "(possible gradient masking or a broken attack)"
        )
    else:
        lines.append(f"sanity: all {len(results)} checks passed")
    return "\n".join(lines)


def _validate(eps: float, steps: int, o: SanityOptions) -> None:
    floats = dict(step_size=o.step_size, tolerance=o.tolerance,
                  min_grad_fraction=o.min_grad_fraction,
                  unbounded_max_accuracy=o.unbounded_max_accuracy,
                  unbounded_min_success=o.unbounded_min_success)
    for name, value in floats.items():
        if value is not None:
            finite_float(f"sanity: {name}", value)
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and 0 < eps <= 1):
        raise ValueError(
            f"sanity: eps={eps!r} is outside (0, 1]; give it on the [0, 1] pixel scale "
            "(16/255 = 0.0627 is the paper's 16)"
        )
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"sanity: steps={steps!r} must be an integer >= 1")
    if not isinstance(o.restarts, int) or o.restarts < 2:
        raise ValueError(f"sanity: restarts={o.restarts!r} must be an integer >= 2 to compare "
                         "with 1")
    if o.max_images is not None and o.max_images < 1:
        raise ValueError(f"sanity: max_images={o.max_images!r} must be >= 1 (or None for all)")


def run_sanity(model: nn.Module, loader: Iterable, eps: float, steps: int,
               device: str | torch.device = "cpu", *, options: SanityOptions | None = None,
               **settings) -> list[CheckResult]:
    """Run the Athalye et al. (2018) / Carlini et al. (2019) sanity checks of an evaluation.

    Args:
        model: classifier taking [N, C, H, W] float pixels in [0, 1] and returning logits [N, K];
            put on ``device`` by the caller. It is used in eval mode; its mode is restored.
        loader: iterable of ``(x, y)`` batches (x [N, C, H, W] in [0, 1], y [N] int labels).
        eps: L-inf budget of the evaluation on the [0, 1] scale (16/255 is the paper's 16).
        steps: PGD iterations of the evaluation; the iteration check also runs steps//4 and
            steps//2 with the same step size.
        device: where the images are moved.
        options: the other settings (:class:`SanityOptions`: ``step_size`` (``2.5 * eps /
            steps``), ``targeted`` (True), ``restarts`` (3), ``unbounded_steps``
            (``max(steps, 20)``), ``max_images`` (256), ``seed`` (0), ``tolerance`` (0.02),
            ``min_grad_fraction`` (0.9), ``unbounded_max_accuracy`` (0.05),
            ``unbounded_min_success`` (0.95), ``exact`` (False)).
        **settings: fields of :class:`SanityOptions` given as keywords (they win over
            ``options``); any other keyword is a ``TypeError``.

    Returns:
        One :class:`CheckResult` per check, in the order listed in the module docstring;
        print them with :func:`format_report`.
    """
    check_keywords("run_sanity", settings, field_names(SanityOptions))
    o = pick(SanityOptions, settings, options)
    _validate(eps, steps, o)
    batches = collect(loader, o.max_images, torch.device(device))
    with eval_mode(model):  # every module's mode restored exactly, even if mixed
        num_classes = getattr(model, "num_classes", None)
        if num_classes is None:
            with torch.no_grad():
                num_classes = int(model(batches[0][0][:1]).shape[1])
        if num_classes < 2:
            raise ValueError(f"sanity: the model has {num_classes} class(es); need at least 2")
        gen = generator(o.seed, "sanity-targets")
        targets = [draw_targets(y.cpu(), num_classes, gen).to(y.device) for _, y in batches]
        probe = Probe(model, batches, targets, o.targeted, o.seed, o.exact)
        step = o.step_size if o.step_size is not None else 2.5 * eps / steps
        slack = max(o.tolerance, 1.0 / probe.n) + 1e-9
        return _checks(probe, Budget(eps, steps, step, slack, o))


def _checks(probe: Probe, budget: Budget) -> list[CheckResult]:
    """Every check of :data:`~.checks.CHECKS` in order; once an attack meets NaN / inf, the
    checks it could not run fail, saying why."""
    probe.clean()  # NaN clean logits are an error, not a failed check
    results = [CHECKS["gradient"](probe, budget)]
    for k, name in enumerate(ATTACK_CHECKS):
        try:
            results.append(CHECKS[name](probe, budget))
        except NonFiniteError as err:
            # The attack met NaN / inf (e.g. the NaN input gradients the first check counts):
            # the checks it could not run fail, saying why, instead of reporting numbers made of
            # NaN.
            results += [CheckResult(rest, False, {"images": probe.n}, f"not run: {err}")
                        for rest in ATTACK_CHECKS[k:]]
            break
    return results
