"""The sanity checks of an evaluation, one function each (Carlini et al. 2019, Sec. 5), with their
result type and thresholds.

Every check is ``check(probe, budget) -> CheckResult``: it measures with the
:class:`~featdenoise.evaluation.sanity.probe.Probe` (which runs PGD at a setting once, so the
checks that read the evaluation's own PGD run share it) and judges with the :class:`Budget`.
:data:`CHECKS` lists them in the order they run. Accuracies are fractions of the images checked.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from featdenoise.evaluation.sanity.probe import Probe
from featdenoise.runtime.seeds import derive_seed


@dataclass
class CheckResult:
    """Outcome of one sanity check.

    Attributes:
        name: short identifier (``"gradient"``, ``"unbounded"``, ...).
        passed: True when the evaluation behaves as a sound one must.
        numbers: the measurements behind the verdict (accuracies are fractions in [0, 1]).
        message: one line that says what was measured and, on failure, what it suggests.
    """

    name: str
    passed: bool
    numbers: dict[str, float] = field(default_factory=dict)
    message: str = ""

    def line(self) -> str:
        """One printable line: ``PASS  name  message``."""
        return f"{'PASS' if self.passed else 'FAIL'}  {self.name:<16} {self.message}"


@dataclass(frozen=True)
class SanityOptions:
    """The settings of :func:`featdenoise.evaluation.sanity.run_sanity` besides eps and steps.

    Attributes:
        step_size: fixed PGD step; default ``2.5 * eps / steps`` (Madry et al.), scaled with eps
            in the eps sweep.
        targeted: attack a random wrong class (the paper's setting) or the label.
        restarts: independent random starts compared with one start (the ``restarts`` check).
        unbounded_steps: iterations of the eps = 1 attack (default ``max(steps, 20)``).
        max_images: how many images of the loader to use (None: all).
        seed: seeds the targets, the attack's random starts and the noise.
        tolerance: slack, as a fraction of the images, for "accuracy does not increase"
            (at least one image is always allowed).
        min_grad_fraction: fraction of images that must have a finite non-zero input gradient.
        unbounded_max_accuracy, unbounded_min_success: the thresholds of "~0" and "~100%".
        exact: run the attacks without the speed layer (:mod:`featdenoise.accel`).
    """

    step_size: float | None = None
    targeted: bool = True
    restarts: int = 3
    unbounded_steps: int | None = None
    max_images: int | None = 256
    seed: int = 0
    tolerance: float = 0.02
    min_grad_fraction: float = 0.9
    unbounded_max_accuracy: float = 0.05
    unbounded_min_success: float = 0.95
    exact: bool = False


@dataclass(frozen=True)
class Budget:
    """The evaluation under check: its ``eps`` and PGD ``steps``, the fixed ``step`` every PGD
    run scales from, the ``slack`` of "accuracy does not increase" (a fraction of the images),
    and the options with the thresholds."""

    eps: float
    steps: int
    step: float
    slack: float
    options: SanityOptions


def check_gradient(probe: Probe, b: Budget) -> CheckResult:
    """Input gradients are finite and non-zero (zero gradients = shattered / masked gradients)."""
    n, need = probe.n, b.options.min_grad_fraction
    usable, zero, nonfinite = probe.gradients()
    frac = usable / n
    msg = f"{usable}/{n} images ({frac:.1%}) have a finite non-zero input gradient"
    if frac < need:
        msg += (f"; {zero} zero, {nonfinite} NaN/inf (need >= {need:.0%}): "
                "gradients are masked, the attack cannot follow them")
    return CheckResult("gradient", frac >= need, {"images": n, "usable": usable, "zero": zero,
                                                  "nonfinite": nonfinite, "fraction": frac}, msg)


def _monotone_check(
    name: str, what: str, settings: Sequence[float], accs: Sequence[float], slack: float,
    fmt: str,
) -> CheckResult:
    """Pass when accuracy never rises by more than ``slack`` as the setting grows."""
    rises = [accs[i + 1] - accs[i] for i in range(len(accs) - 1)]
    worst = max(rises) if rises else 0.0
    passed = worst <= slack
    series = ", ".join(f"{what}={s:{fmt}}: {a:.1%}" for s, a in zip(settings, accs, strict=True))
    msg = f"accuracy {series}"
    if not passed:
        msg += f" -> rises by {worst:.1%} (> {slack:.1%} allowed): the attack is not converging"
    numbers = {f"acc_{what}_{s:{fmt}}": a for s, a in zip(settings, accs, strict=True)}
    numbers["max_rise"] = worst
    return CheckResult(name, passed, numbers, msg)


def check_more_iterations(probe: Probe, b: Budget) -> CheckResult:
    """More iterations with the same step size never help the defender."""
    iters = sorted({max(1, b.steps // 4), max(1, b.steps // 2), b.steps})
    accs = [probe.pgd(b.eps, k, b.step)[0] for k in iters]
    res = _monotone_check("more_iterations", "steps", iters, accs, b.slack, "d")
    res.numbers["images"] = probe.n
    return res


def check_larger_eps(probe: Probe, b: Budget) -> CheckResult:
    """A larger eps never helps the defender (step size scaled with eps)."""
    epss = sorted({min(1.0, b.eps * r) for r in (0.25, 0.5, 1.0, 2.0)})
    accs = [probe.pgd(e, b.steps, b.step if e == b.eps else b.step * e / b.eps)[0] for e in epss]
    res = _monotone_check("larger_eps", "eps", epss, accs, b.slack, ".4g")
    res.numbers["images"] = probe.n
    return res


def check_unbounded(probe: Probe, b: Budget) -> CheckResult:
    """The unbounded attack: the whole [0, 1] box reaches any class."""
    o = b.options
    steps = o.unbounded_steps if o.unbounded_steps is not None else max(b.steps, 20)
    acc, succ, _ = probe.pgd(1.0, steps, 2.5 / steps)
    ok_acc = acc <= o.unbounded_max_accuracy
    ok_succ = (not probe.targeted) or succ >= o.unbounded_min_success
    msg = f"eps=1, {steps} steps: accuracy {acc:.1%} (need <= {o.unbounded_max_accuracy:.0%})"
    if probe.targeted:
        msg += f", targeted success {succ:.1%} (need >= {o.unbounded_min_success:.0%})"
    if not (ok_acc and ok_succ):
        msg += ": even an unlimited attack fails, so gradients are masked or the attack is broken"
    return CheckResult("unbounded", ok_acc and ok_succ, {"images": probe.n, "accuracy": acc,
                                                         "success": succ, "steps": steps}, msg)


def check_pgd_vs_noise(probe: Probe, b: Budget) -> CheckResult:
    """PGD must beat random noise of the same size on the attacker's own terms.

    At least twice the best noise's change of the attack loss, and no worse on the attacker's
    rate (targeted: success; untargeted: accuracy). Accuracy alone does not judge a targeted
    attack: it aims at one class, while noise may push an image to any wrong class.
    """
    clean_acc, _, clean_loss = probe.clean()
    acc, succ, loss = probe.pgd(b.eps, b.steps, b.step)
    uni_acc, uni_succ, uni_loss = probe.noise(b.eps, "uniform")
    sgn_acc, sgn_succ, sgn_loss = probe.noise(b.eps, "sign")
    gain_pgd = clean_loss - loss
    gain_noise = max(clean_loss - uni_loss, clean_loss - sgn_loss, 0.0)
    loss_wins = gain_pgd > 2.0 * gain_noise + 1e-6
    if probe.targeted:
        rate_ok = succ >= max(uni_succ, sgn_succ)
        rates = (f"targeted success: uniform noise {uni_succ:.1%}, sign noise {sgn_succ:.1%}, "
                 f"PGD-{b.steps} {succ:.1%}")
    else:
        rate_ok = acc <= min(uni_acc, sgn_acc)
        rates = (f"accuracy: uniform noise {uni_acc:.1%}, sign noise {sgn_acc:.1%}, "
                 f"PGD-{b.steps} {acc:.1%}")
    passed = loss_wins and rate_ok
    msg = f"{rates}; attack-loss gain PGD {gain_pgd:.3g} vs noise {gain_noise:.3g}"
    if not passed:
        msg += ": PGD is no better than random noise of the same size (masked gradients?)"
    numbers = {"images": probe.n, "clean": clean_acc, "uniform_noise": uni_acc,
               "sign_noise": sgn_acc, "pgd": acc, "pgd_success": succ,
               "uniform_noise_success": uni_succ, "sign_noise_success": sgn_succ,
               "loss_gain_pgd": gain_pgd, "loss_gain_noise": gain_noise}
    return CheckResult("pgd_vs_noise", passed, numbers, msg)


def check_restarts(probe: Probe, b: Budget) -> CheckResult:
    """Single-start PGD against the per-image worst case of ``restarts`` independent starts.

    Each run has its own random start (seeds ``(seed, "restart", r)``). ``acc_1`` is the mean
    single-start accuracy, ``acc_R`` the fraction of images correct under every run, and the
    drop ``acc_1 - acc_R`` is compared with the binomial standard error of a single-start
    accuracy on these images, ``se = sqrt(acc_1 (1 - acc_1) / n)``: the check fails when the drop
    exceeds ``max(2 se, tolerance)`` plus one image. If R independent random starts lower
    accuracy by more than sampling noise explains, one start overestimates robustness (a
    start-dependent model).
    """
    restarts = b.options.restarts
    per_run = [probe.pgd_correct(b.eps, b.steps, b.step, derive_seed(probe.seed, "restart", r))
               for r in range(restarts)]
    n = len(per_run[0])
    acc_1 = sum(sum(c) for c in per_run) / (n * restarts)
    acc_r = sum(1 for flags in zip(*per_run, strict=True) if all(flags)) / n
    drop = acc_1 - acc_r
    se = math.sqrt(max(acc_1 * (1 - acc_1), 0.0) / n)
    allowed = max(2 * se, b.options.tolerance) + 1.0 / n
    passed = drop <= allowed + 1e-9
    msg = (f"PGD-{b.steps} accuracy: one random start {acc_1:.1%} (mean of {restarts}), worst "
           f"of {restarts} starts {acc_r:.1%}, drop {drop:.1%} (allowed {allowed:.1%})")
    if not passed:
        msg += (": robustness depends on the random start, so single-start PGD overestimates "
                f"it; evaluate with --restarts {restarts} or more")
    return CheckResult("restarts", passed, {"images": n, "acc_1": acc_1,
                                            f"acc_{restarts}": acc_r, "drop": drop,
                                            "allowed": allowed, "restarts": restarts}, msg)


CHECKS: dict[str, Callable[[Probe, Budget], CheckResult]] = {
    "gradient": check_gradient,
    "more_iterations": check_more_iterations,
    "larger_eps": check_larger_eps,
    "unbounded": check_unbounded,
    "pgd_vs_noise": check_pgd_vs_noise,
    "restarts": check_restarts,
}
"""Every check, in the order it runs (the order of the results)."""

ATTACK_CHECKS = tuple(name for name in CHECKS if name != "gradient")
"""The checks that run PGD (after ``gradient``), in order."""
