"""AutoAttack bench: our chain against the authors' AutoAttack, side by side in one process.

Same model, same images, same eps, same budget on both sides. The reference is the original code
(``pyautoattack`` 0.2.0, Croce and Hein, version "standard": APGD-CE, APGD-T and FAB-T with 9
target classes, Square with 5000 queries and the original p schedule; 100 iterations), its
iterations and queries set to the bench's budget. (torchattacks' ``AutoAttack(version=
"standard")`` is not that standard: 10 iterations and ``n_classes - 1`` targets.) Per case the
bench prints both robust accuracies and, image by image, how many images only one side leaves
robust.

Labels are the model's own clean predictions (the nets are randomly initialised: every image is
then "correctly classified" and attacked) and eps is such that APGD-CE breaks some images but not
all, so every attack of the chain gets work. Ours runs with the attacks' speed options (BatchNorm
folded, convolutions packed: the same function up to float rounding). After a warm-up of both on
2 images, printed per case: process CPU time of each side (steady under other jobs' load with one
thread, the default), the ratio, both robust accuracies, our robust accuracy after each attack,
and the images pushed through the model by each side (forward passes with and without a graph,
counted by a hook).

Where our time is saved: ours drops an image from the batch once it is broken (also between
the targets of APGD-T and FAB-T), classifies FAB iterates in the pass that takes their gradient
while few are misclassified, skips the gradient at the last iterate, takes FAB-T's step from one
logit difference (one backward pass), and does not send a Square proposal through the model when
it changes no pixel. With every image robust the passes are about equal and the difference is
the speed layer: BatchNorm folded and convolutions packed (one pack per input kind, whatever the
batch size, since dropping broken images changes it at almost every image).

Reproduce::

    python -c 'from featdenoise.benchmarks.autoattack import main; main()'          # reduced
    python -c 'from featdenoise.benchmarks.autoattack import main; main(["--full"])'  # standard
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from featdenoise.attacks import AutoAttack
from featdenoise.benchmarks.common import prepare
from featdenoise.evaluation.paired import discordant
from featdenoise.models import create_model
from featdenoise.runtime import optional

REDUCED = {"steps": 20, "n_queries": 200}
FULL = {"steps": 100, "n_queries": 5000}
QUICK = {"steps": 2, "n_queries": 10}  # a smoke run of the wiring


class PassCounter:
    """Counts images through ``model``'s forward, split by whether a graph is recorded."""

    def __init__(self, model: nn.Module):
        self.grad = self.nograd = 0
        self.handle = model.register_forward_pre_hook(self._hook)

    def _hook(self, module: nn.Module, inputs: tuple) -> None:
        n = int(inputs[0].shape[0])
        if torch.is_grad_enabled() and inputs[0].requires_grad:
            self.grad += n
        else:
            self.nograd += n

    def reset(self) -> tuple[int, int]:
        counts = (self.grad, self.nograd)
        self.grad = self.nograd = 0
        return counts


def original_chain(model: nn.Module, eps: float, steps: int, n_queries: int, seed: int = 0):
    """The authors' AutoAttack (``pyautoattack``, Croce and Hein; version "standard": APGD-CE,
    APGD-T and FAB-T with 9 targets, Square) with its iterations and queries set to the budget.
    Call ``chain.run_standard_evaluation(x, y, batch_size=len(x))[0]``."""
    pyautoattack = optional.pyautoattack("the AutoAttack bench")  # a dev extra
    chain = pyautoattack.AutoAttack(model, eps=eps, version="standard", seed=seed,
                                    device=next(model.parameters()).device)
    chain.apgd.n_iter = chain.apgd_targeted.n_iter = chain.fab.n_iter = steps
    chain.square.n_queries = n_queries
    return chain


def _cases(n_images: int) -> list[tuple[str, nn.Module, tuple[int, ...], int, float]]:
    torch.manual_seed(0)
    resnet50 = create_model("resnet50", num_classes=1000)
    small = create_model("small_resnet", in_channels=1, num_classes=10)
    # Randomly initialised nets: eps where APGD-CE breaks some images, not all (~1/3).
    return [("resnet50 64x64", resnet50, (n_images, 3, 64, 64), 1000, 1 / 255),
            ("small_resnet 28x28x1", small, (4 * n_images, 1, 28, 28), 10, 2 / 255)]


def fast_options() -> dict:
    """Our attacks' speed layer on (the default; spelled out so the bench says what it ran)."""
    return {"exact": False}


def _measure(fn: Callable[[], Any], counter: PassCounter) -> tuple[Any, tuple[float, float],
                                                                  tuple[int, int]]:
    """``fn()``'s result, its (process CPU, wall-clock) seconds, and the images it sent through
    the model (with a graph, without)."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    took = time.process_time() - cpu, time.perf_counter() - wall
    return out, took, counter.reset()


def bench_case(name: str, model: nn.Module, shape: tuple[int, ...], n_classes: int, eps: float,
               budget: dict, device: torch.device) -> tuple[float, list[str]]:
    """Run both chains once on one model; the CPU-time ratio (original / ours) and the two lines
    that report the case."""
    model = model.to(device).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(shape, generator=g).to(device)
    with torch.no_grad():
        y = model(x).argmax(1)  # the model's own predictions: every image is attacked
    ours = AutoAttack(model, eps=eps, version="standard", n_classes=n_classes, seed=0, **budget,
                      **fast_options())
    theirs = original_chain(model, eps, budget["steps"], budget["n_queries"])
    # Warm-up (one-time costs: first oneDNN primitives, the speed options' checks) on 2 images.
    AutoAttack(model, eps=eps, n_classes=n_classes, steps=2, n_queries=2, **fast_options())(
        x[:2], y[:2])
    original_chain(model, eps, steps=2, n_queries=2).run_standard_evaluation(
        x[:2], y[:2], batch_size=2)
    counter = PassCounter(model)
    try:
        (x_ours, records), t_ours, passes_ours = _measure(lambda: ours.run(x, y, seed=0), counter)
        x_theirs, t_theirs, passes_theirs = _measure(
            lambda: theirs.run_standard_evaluation(x, y, batch_size=len(x))[0], counter)
    finally:
        counter.handle.remove()
    with torch.no_grad():
        robust_ours = model(x_ours).argmax(1) == y
        robust_theirs = model(x_theirs).argmax(1) == y
    acc_ours, acc_theirs = robust_ours.float().mean().item(), robust_theirs.float().mean().item()
    only_ours, only_theirs = discordant(robust_ours, robust_theirs)
    inside = ((x_ours - x).abs().amax() <= eps + 1e-6).item()
    after = ", ".join(f"{k} {v:.0%}" for k, v in ours.robust_accuracy(records).items())
    ratio = t_theirs[0] / t_ours[0]
    return ratio, [
        f"{name:20s} n={shape[0]:<3d} eps {eps * 255:g}/255  CPU s: ours {t_ours[0]:7.1f}  "
        f"original {t_theirs[0]:7.1f}  ratio {ratio:5.2f}x  (wall {t_ours[1]:.1f} / "
        f"{t_theirs[1]:.1f})  robust acc: ours {acc_ours:.1%}, original {acc_theirs:.1%}; "
        f"robust only against ours / only against the original: {only_ours} / {only_theirs}",
        f"{'':20s} ours after each attack: {after}; in eps-box: {inside}; images through "
        f"forward (with graph / without): ours {passes_ours[0]} / {passes_ours[1]}, "
        f"original {passes_theirs[0]} / {passes_theirs[1]}"]


def run(args: argparse.Namespace) -> int:
    """Entry point (args: full, images, threads, device); prints one block per case (the one
    place that prints)."""
    device = prepare(args, "the AutoAttack bench")
    quick = bool(getattr(args, "quick", False))
    budget = QUICK if quick else FULL if args.full else REDUCED
    label = ("standard budget" if args.full and not quick else
             "REDUCED budget (standard: 100 iterations, 5000 queries: --full)")
    print(f"AutoAttack standard chain (APGD-CE, APGD-T x9, FAB-T x9, Square), "
          f"{budget['steps']} iterations, {budget['n_queries']} Square queries: {label}; "
          f"device {device}, {torch.get_num_threads()} threads; labels = clean predictions")
    cases = _cases(1 if quick else args.images)
    if quick:  # the wiring only: the original FAB on ResNet-50 alone takes minutes
        cases = [c for c in cases if not c[0].startswith("resnet50")]
    ratios = []
    for name, model, shape, k, eps in cases:
        ratio, lines = bench_case(name, model, shape, k, eps, budget, device)
        ratios.append(ratio)
        print("\n".join(lines))
    print(f"speed-up over the original (process CPU time): min {min(ratios):.2f}x "
          f"(target >= 1.30x at equal or lower robust accuracy)")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: ``--full`` (standard budget), ``--images N`` (ResNet-50 batch; the
    small net gets 4N), ``--threads``, ``--device``."""
    parser = argparse.ArgumentParser(prog="bench-autoattack", description=__doc__.split("\n")[0])
    parser.add_argument("--full", action="store_true", help="the standard budget (slow)")
    parser.add_argument("--images", type=int, default=8, help="ResNet-50 images (default 8)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: process CPU time is a steady measure on "
                             "a shared machine only with one thread; 0: torch's default)")
    parser.add_argument("--device", default="cpu")
    return run(parser.parse_args(argv))
