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

Pixels are float RGB in [0, 1], NCHW; ``eps`` and step sizes are on that scale (16/255 is the
paper's 16). Accuracies are fractions of the images checked (``numbers["images"]``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from featdenoise.attacks import draw_targets
from featdenoise.models.registry import model_label
from featdenoise.runtime.finite import NonFiniteError, check_finite_logits, finite_float
from featdenoise.runtime.seeds import derive_seed, generator


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


def _validate(eps: float, steps: int, restarts: int, max_images: int | None,
              floats: dict | None = None) -> None:
    for name, value in (floats or {}).items():
        if value is not None:
            finite_float(f"sanity: {name}", value)
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and 0 < eps <= 1):
        raise ValueError(
            f"sanity: eps={eps!r} is outside (0, 1]; give it on the [0, 1] pixel scale "
            "(16/255 = 0.0627 is the paper's 16)"
        )
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"sanity: steps={steps!r} must be an integer >= 1")
    if not isinstance(restarts, int) or restarts < 2:
        raise ValueError(f"sanity: restarts={restarts!r} must be an integer >= 2 to compare with 1")
    if max_images is not None and max_images < 1:
        raise ValueError(f"sanity: max_images={max_images!r} must be >= 1 (or None for all)")


def _collect(
    loader: Iterable, max_images: int | None, device: torch.device
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Take up to ``max_images`` (x [N,C,H,W] in [0,1], y [N]) from the loader, in loader order."""
    batches, n = [], 0
    for batch in loader:
        x, y = batch[0], torch.as_tensor(batch[1])
        keep = y >= 0  # label -1 marks an unreadable file the dataset skipped
        x, y = x[keep], y[keep]
        if max_images is not None:
            x, y = x[: max_images - n], y[: max_images - n]
        if len(x) == 0:
            continue
        if not torch.is_floating_point(x) or x.dim() != 4:
            raise ValueError(
                f"sanity: expected float image batches [N, C, H, W] in [0, 1], got "
                f"{tuple(x.shape)} of {x.dtype}"
            )
        batches.append((x.to(device), y.long().to(device)))
        n += len(x)
        if max_images is not None and n >= max_images:
            break
    if n == 0:
        raise ValueError("sanity: the data loader yielded no images; check the --data folder")
    return batches


class _Runner:
    """Runs one attack setting or noise over all collected batches with fixed targets."""

    def __init__(self, model: nn.Module, batches, targets, targeted: bool, seed: int,
                 exact: bool = False):
        self.model = model
        self.exact = exact
        self.batches = batches
        self.targets = targets  # one LongTensor [N] per batch: the wrong class to aim at
        self.targeted = targeted
        self.seed = seed
        self.n = sum(len(x) for x, _ in batches)

    @torch.no_grad()
    def _score(self, per_batch_x) -> tuple[float, float, float]:
        """(accuracy, targeted success, mean attack loss) of the model on the given images.

        The attack loss is the cross-entropy to the target when targeted, minus the
        cross-entropy to the label otherwise: lower is better for the attacker."""
        from featdenoise.evaluation import metrics

        correct, hit, loss = [], [], 0.0
        for (_, y), t, xa in zip(self.batches, self.targets, per_batch_x, strict=True):
            logits = self.model(xa)
            check_finite_logits(logits, model_label(self.model))  # no accuracy made of NaN
            out = metrics.outcomes(logits, y, t)
            correct.append(out["correct"].cpu())
            hit.append(out["target_hit"].cpu())
            if self.targeted:
                loss += float(F.cross_entropy(logits.float(), t, reduction="sum"))
            else:
                loss -= float(F.cross_entropy(logits.float(), y, reduction="sum"))
        return (
            float(metrics.accuracy(torch.cat(correct))),
            float(metrics.success_rate(torch.cat(hit))),
            loss / self.n,
        )

    def clean(self) -> tuple[float, float, float]:
        return self._score([x for x, _ in self.batches])

    def pgd(self, eps: float, steps: int, step_size: float, restarts: int = 1,
            seed: int | None = None, per_image: bool = False):
        """(accuracy, targeted success, attack loss) under PGD with a fixed step size;
        ``per_image``: the list of per-image correctness instead."""
        from featdenoise.attacks import PGD

        eps = min(float(eps), 1.0)
        attack = PGD(
            self.model,
            eps=eps,
            step_size=step_size,
            steps=steps,
            targeted=self.targeted,
            random_start=True,
            restarts=restarts,
            step_rule="fixed",
            seed=self.seed if seed is None else seed,
            exact=self.exact,
        )
        advs = []
        for (x, y), t in zip(self.batches, self.targets, strict=True):
            x_adv = attack.attack(x, y, target=t if self.targeted else None).detach()
            # A broken attack must not pass the checks by leaving the threat model.
            if (x_adv - x).abs().max().item() > eps + 1e-5 or x_adv.min() < 0 or x_adv.max() > 1:
                raise RuntimeError(
                    f"sanity: the attack left the eps={eps:.4g} box or [0, 1]; fix the attack first"
                )
            advs.append(x_adv)
        if per_image:
            with torch.no_grad():
                return [bool(c) for (_, y), xa in zip(self.batches, advs, strict=True)
                        for c in (self.model(xa).argmax(1) == y).tolist()]
        return self._score(advs)

    def noise(self, eps: float, kind: str) -> tuple[float, float, float]:
        """(accuracy, success, attack loss) under ``uniform`` or ``sign`` noise of size eps."""
        gen = generator(self.seed, "noise", kind)
        noisy = []
        for x, _ in self.batches:
            if kind == "uniform":
                delta = (torch.rand(x.shape, generator=gen) * 2 - 1) * eps
            else:
                delta = (torch.randint(0, 2, x.shape, generator=gen).float() * 2 - 1) * eps
            noisy.append((x + delta.to(x.device, x.dtype)).clamp(0, 1))
        return self._score(noisy)

    def gradients(self) -> tuple[int, int, int]:
        """Counts of images whose input gradient is (usable, zero, non-finite)."""
        usable = zero = nonfinite = 0
        for (x, y), t in zip(self.batches, self.targets, strict=True):
            x = x.clone().requires_grad_(True)
            logits = self.model(x)
            goal = t if self.targeted else y
            loss = F.cross_entropy(logits.float(), goal, reduction="sum")
            (grad,) = torch.autograd.grad(loss, x)
            flat = grad.detach().flatten(1)  # [N, C*H*W]
            finite = torch.isfinite(flat).all(dim=1) & torch.isfinite(logits.detach()).all(dim=1)
            nonzero = flat.abs().amax(dim=1) > 0
            usable += int((finite & nonzero).sum())
            zero += int((finite & ~nonzero).sum())
            nonfinite += int((~finite).sum())
        return usable, zero, nonfinite


def _restarts_check(run: _Runner, eps: float, steps: int, step: float, restarts: int,
                    tolerance: float) -> CheckResult:
    """Single-start PGD against the per-image worst case of ``restarts`` independent starts.

    Each run has its own random start (seeds ``(seed, "restart", r)``). ``acc_1`` is the mean
    single-start accuracy, ``acc_R`` the fraction of images correct under every run, and the
    drop ``acc_1 - acc_R`` is compared with the binomial standard error of a single-start
    accuracy on these images, ``se = sqrt(acc_1 (1 - acc_1) / n)``: the check fails when the drop
    exceeds ``max(2 se, tolerance)`` plus one image. (The authors' released models lost about 5
    points of robust accuracy to 100 restarts.)
    """
    per_run = [run.pgd(eps, steps, step, seed=derive_seed(run.seed, "restart", r),
                       per_image=True) for r in range(restarts)]
    n = len(per_run[0])
    acc_1 = sum(sum(c) for c in per_run) / (n * restarts)
    acc_r = sum(1 for flags in zip(*per_run, strict=True) if all(flags)) / n
    drop = acc_1 - acc_r
    se = math.sqrt(max(acc_1 * (1 - acc_1), 0.0) / n)
    allowed = max(2 * se, tolerance) + 1.0 / n
    passed = drop <= allowed + 1e-9
    msg = (f"PGD-{steps} accuracy: one random start {acc_1:.1%} (mean of {restarts}), worst of "
           f"{restarts} starts {acc_r:.1%}, drop {drop:.1%} (allowed {allowed:.1%})")
    if not passed:
        msg += (": robustness depends on the random start, so single-start PGD overestimates "
                f"it; evaluate with --restarts {restarts} or more")
    return CheckResult("restarts", passed, {"images": n, "acc_1": acc_1,
                                            f"acc_{restarts}": acc_r, "drop": drop,
                                            "allowed": allowed, "restarts": restarts}, msg)


def _monotone_check(
    name: str, what: str, settings: list[float], accs: list[float], slack: float, fmt: str
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


def run_sanity(
    model: nn.Module,
    loader: Iterable,
    eps: float,
    steps: int,
    device: str | torch.device = "cpu",
    *,
    step_size: float | None = None,
    targeted: bool = True,
    restarts: int = 3,
    unbounded_steps: int | None = None,
    max_images: int | None = 256,
    seed: int = 0,
    tolerance: float = 0.02,
    min_grad_fraction: float = 0.9,
    unbounded_max_accuracy: float = 0.05,
    unbounded_min_success: float = 0.95,
    exact: bool = False,
) -> list[CheckResult]:
    """Run the Athalye et al. (2018) / Carlini et al. (2019) sanity checks of an evaluation.

    Args:
        model: classifier taking [N, C, H, W] float pixels in [0, 1] and returning logits [N, K];
            put on ``device`` by the caller. It is used in eval mode; its mode is restored.
        loader: iterable of ``(x, y)`` batches (x [N, C, H, W] in [0, 1], y [N] int labels).
        eps: L-inf budget of the evaluation on the [0, 1] scale (16/255 is the paper's 16).
        steps: PGD iterations of the evaluation; the iteration check also runs steps//4 and
            steps//2 with the same step size.
        device: where the images are moved.
        step_size: fixed PGD step; default ``2.5 * eps / steps`` (Madry et al.), scaled with eps
            in the eps sweep.
        targeted: attack a random wrong class (the paper's setting) or the label.
        restarts: independent random starts compared with one start (see ``restarts``).
        unbounded_steps: iterations of the eps = 1 attack (default ``max(steps, 20)``).
        max_images: how many images of the loader to use (None: all).
        seed: seeds the targets, the attack's random starts and the noise.
        tolerance: slack, as a fraction of the images, for "accuracy does not increase"
            (at least one image is always allowed).
        min_grad_fraction: fraction of images that must have a finite non-zero input gradient.
        unbounded_max_accuracy / unbounded_min_success: the thresholds of "~0" and "~100%".
        exact: run the attacks without the speed layer (:mod:`featdenoise.accel`).

    Returns:
        One :class:`CheckResult` per check, in the order listed in the module docstring;
        print them with :func:`format_report`.
    """
    _validate(eps, steps, restarts, max_images, dict(
        step_size=step_size, tolerance=tolerance, min_grad_fraction=min_grad_fraction,
        unbounded_max_accuracy=unbounded_max_accuracy,
        unbounded_min_success=unbounded_min_success))
    device = torch.device(device)
    batches = _collect(loader, max_images, device)
    n = sum(len(x) for x, _ in batches)
    num_classes = getattr(model, "num_classes", None)

    modes = [(m, m.training) for m in model.modules()]  # restored exactly, even if mixed
    model.eval()
    try:
        gen = generator(seed, "sanity-targets")
        with torch.no_grad():
            if num_classes is None:
                num_classes = int(model(batches[0][0][:1]).shape[1])
        if num_classes < 2:
            raise ValueError(f"sanity: the model has {num_classes} class(es); need at least 2")
        targets = [draw_targets(y.cpu(), num_classes, gen).to(y.device) for _, y in batches]
        run = _Runner(model, batches, targets, targeted, seed, exact)
        return _checks(
            run,
            n,
            eps,
            steps,
            step_size,
            restarts,
            unbounded_steps,
            tolerance,
            min_grad_fraction,
            unbounded_max_accuracy,
            unbounded_min_success,
        )
    finally:
        for m, mode in modes:
            m.training = mode


def _checks(
    run: _Runner,
    n,
    eps,
    steps,
    step_size,
    restarts,
    unbounded_steps,
    tolerance,
    min_grad_fraction,
    unbounded_max_accuracy,
    unbounded_min_success,
) -> list[CheckResult]:
    slack = max(tolerance, 1.0 / n) + 1e-9
    base_step = step_size if step_size is not None else 2.5 * eps / steps
    results: list[CheckResult] = []
    clean_acc, _, clean_loss = run.clean()

    # 1. Gradients: finite and non-zero (zero gradients = shattered / masked gradients).
    usable, zero, nonfinite = run.gradients()
    frac = usable / n
    msg = f"{usable}/{n} images ({frac:.1%}) have a finite non-zero input gradient"
    if frac < min_grad_fraction:
        msg += (
            f"; {zero} zero, {nonfinite} NaN/inf (need >= {min_grad_fraction:.0%}): "
            "gradients are masked, the attack cannot follow them"
        )
    results.append(
        CheckResult(
            "gradient",
            frac >= min_grad_fraction,
            {"images": n, "usable": usable, "zero": zero, "nonfinite": nonfinite, "fraction": frac},
            msg,
        )
    )

    try:
        _attack_checks(run, results, n, eps, steps, base_step, restarts, unbounded_steps,
                       tolerance, slack, clean_acc, clean_loss, unbounded_max_accuracy,
                       unbounded_min_success)
    except NonFiniteError as err:
        # The attack met NaN / inf (e.g. the NaN input gradients the first check counts): the
        # checks it could not run fail, saying why, instead of reporting numbers made of NaN.
        done = {r.name for r in results}
        results += [CheckResult(name, False, {"images": n}, f"not run: {err}")
                    for name in ATTACK_CHECKS if name not in done]
    return results


ATTACK_CHECKS = ("more_iterations", "larger_eps", "unbounded", "pgd_vs_noise", "restarts")
"""The checks that run PGD (after ``gradient``), in order."""


def _attack_checks(run: _Runner, results: list[CheckResult], n, eps, steps, base_step, restarts,
                   unbounded_steps, tolerance, slack, clean_acc, clean_loss,
                   unbounded_max_accuracy, unbounded_min_success) -> None:
    """Append the results of :data:`ATTACK_CHECKS` to ``results``, one by one."""
    # 2. More iterations with the same step size never help the defender.
    iters = sorted({max(1, steps // 4), max(1, steps // 2), steps})
    by_iters = {k: run.pgd(eps, k, base_step) for k in iters}
    res = _monotone_check(
        "more_iterations", "steps", iters, [by_iters[k][0] for k in iters], slack, "d"
    )
    res.numbers["images"] = n
    results.append(res)
    acc_eval, succ_eval, loss_eval = by_iters[steps]

    # 3. A larger eps never helps the defender (step size scaled with eps).
    ratios = [0.25, 0.5, 1.0, 2.0]
    epss = sorted({min(1.0, eps * r) for r in ratios})
    by_eps = {
        e: (acc_eval if e == eps else run.pgd(e, steps, base_step * e / eps)[0]) for e in epss
    }
    res = _monotone_check("larger_eps", "eps", epss, [by_eps[e] for e in epss], slack, ".4g")
    res.numbers["images"] = n
    results.append(res)

    # 4. The unbounded attack: the whole [0, 1] box reaches any class.
    ub_steps = unbounded_steps if unbounded_steps is not None else max(steps, 20)
    ub_acc, ub_succ, _ = run.pgd(1.0, ub_steps, 2.5 / ub_steps)
    ok_acc = ub_acc <= unbounded_max_accuracy
    ok_succ = (not run.targeted) or ub_succ >= unbounded_min_success
    msg = f"eps=1, {ub_steps} steps: accuracy {ub_acc:.1%} (need <= {unbounded_max_accuracy:.0%})"
    if run.targeted:
        msg += f", targeted success {ub_succ:.1%} (need >= {unbounded_min_success:.0%})"
    if not (ok_acc and ok_succ):
        msg += ": even an unlimited attack fails, so gradients are masked or the attack is broken"
    results.append(
        CheckResult(
            "unbounded",
            ok_acc and ok_succ,
            {"images": n, "accuracy": ub_acc, "success": ub_succ, "steps": ub_steps},
            msg,
        )
    )

    # 5. PGD must beat random noise of the same size on the attacker's own terms: at least twice
    # the best noise's change of the attack loss, and no worse on the attacker's rate (targeted:
    # success; untargeted: accuracy). Accuracy alone does not judge a targeted attack: it aims at
    # one class, while noise may push an image to any wrong class.
    uni_acc, uni_succ, uni_loss = run.noise(eps, "uniform")
    sgn_acc, sgn_succ, sgn_loss = run.noise(eps, "sign")
    noise_acc = min(uni_acc, sgn_acc)
    gain_pgd = clean_loss - loss_eval
    gain_noise = max(clean_loss - uni_loss, clean_loss - sgn_loss, 0.0)
    loss_wins = gain_pgd > 2.0 * gain_noise + 1e-6
    if run.targeted:
        rate_ok = succ_eval >= max(uni_succ, sgn_succ)
        rates = (
            f"targeted success: uniform noise {uni_succ:.1%}, sign noise {sgn_succ:.1%}, "
            f"PGD-{steps} {succ_eval:.1%}"
        )
    else:
        rate_ok = acc_eval <= noise_acc
        rates = (
            f"accuracy: uniform noise {uni_acc:.1%}, sign noise {sgn_acc:.1%}, "
            f"PGD-{steps} {acc_eval:.1%}"
        )
    passed = loss_wins and rate_ok
    msg = f"{rates}; attack-loss gain PGD {gain_pgd:.3g} vs noise {gain_noise:.3g}"
    if not passed:
        msg += ": PGD is no better than random noise of the same size (masked gradients?)"
    results.append(
        CheckResult(
            "pgd_vs_noise",
            passed,
            {
                "images": n,
                "clean": clean_acc,
                "uniform_noise": uni_acc,
                "sign_noise": sgn_acc,
                "pgd": acc_eval,
                "pgd_success": succ_eval,
                "uniform_noise_success": uni_succ,
                "sign_noise_success": sgn_succ,
                "loss_gain_pgd": gain_pgd,
                "loss_gain_noise": gain_noise,
            },
            msg,
        )
    )

    # 6. Random restarts: if R independent random starts lower accuracy by more than sampling
    # noise explains, one start overestimates robustness (a start-dependent model).
    results.append(_restarts_check(run, eps, steps, base_step, restarts, tolerance))
