"""``featdenoise bench train``: the cost of adversarial training, as ratios measured side by side.

1. Overhead of the training loop: one adversarial training step with ``n`` PGD steps
   (:func:`featdenoise.training.recipes.pgd.train_step`: attack with BN in inference mode,
   update, SGD)
   against ``n + 1`` times one clean forward+backward on the same model and batch.
   Goal: ratio <= 1.10 (the attack's passes need no weight gradients, so <= 1 is possible).
2. Cost of denoising: one adversarial training step of ResNet-50 + 4 non-local Gaussian denoising
   blocks against plain ResNet-50 at 112 x 112. Goal: ratio <= 1.15 (the official code took 1.73x:
   90 vs 52 hours).

Timings alternate between the two sides of each ratio and report medians, so a loaded machine
slows both alike.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from featdenoise.benchmarks.common import timed
from featdenoise.models import create_model, model_num_classes
from featdenoise.training import parts
from featdenoise.training.config import load_config
from featdenoise.training.recipes.pgd import train_step
from featdenoise.training.step import State, StepContext

GOALS = {"loop": 1.10, "denoise": 1.15}


def _setup(name: str, kwargs: dict, steps: int, batch: int, size: int, channels: int,
           device: torch.device) -> tuple[Callable[[], None], Callable[[], None]]:
    """``(adversarial_step, clean_step)`` of model ``name`` on one random batch ``[batch,
    channels, size, size]``: one adversarial training step with PGD-``steps`` (eps 16/255, step
    1/255) and one clean forward+backward."""
    torch.manual_seed(0)
    model = create_model(name, **kwargs).to(device).train()
    cfg = load_config(None, [f"attack.steps={steps}", "run.progress=false",
                             "run.tensorboard=false"])
    optimizer = parts.build_optimizer(model, cfg.optim)
    schedule = parts.LRSchedule(optimizer, 100, cfg.optim, batch)
    criterion = parts.loss_fn(cfg.optim.label_smoothing)
    attack = parts.TrainAttack(model, steps, 16 / 255, 1 / 255, 0.2)
    x = torch.rand(batch, channels, size, size, device=device)
    y = torch.randint(0, model_num_classes(model), (batch,), device=device)
    state = State()
    ctx = StepContext(cfg, device, criterion, optimizer, schedule)

    def adversarial_step():
        train_step(model, attack, x, y, state, ctx)

    def clean_step():
        model.train()
        loss = criterion(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()

    return adversarial_step, clean_step


def _side_by_side(a: Callable[[], None], b: Callable[[], None], repeats: int,
                  device: torch.device) -> tuple[float, float]:
    """Median wall-clock seconds of ``a()`` and ``b()``, alternating, after one warm-up call
    each."""
    a()
    b()
    ta, tb = [], []
    for _ in range(repeats):
        ta.append(timed(a, device))
        tb.append(timed(b, device))
    return statistics.median(ta), statistics.median(tb)


def bench_loop(device: torch.device, repeats: int, quick: bool) -> dict:
    """Case 1: adversarial step vs (n + 1) clean forward+backward passes."""
    name, size = "small_resnet", 32
    kw: dict = dict(width=16) if quick else dict(width=32, blocks=[2, 2, 2])
    steps, batch = (3, 32) if quick else (5, 64)
    adv, clean = _setup(name, kw, steps, batch, size, 3, device)
    t_adv, t_clean = _side_by_side(adv, clean, repeats, device)
    return {"case": f"loop: {name} {kw} batch {batch} {size}px, PGD-{steps}",
            "a": t_adv, "b": (steps + 1) * t_clean, "ratio": t_adv / ((steps + 1) * t_clean),
            "goal": GOALS["loop"], "labels": (f"adversarial step (PGD-{steps})",
                                              f"{steps + 1} x clean fwd+bwd")}


def flop_ratio(size: int = 112) -> float:
    """Forward FLOPs of ResNet-50 +4 non-local Gaussian over ResNet-50 at ``size`` px (counted by
    ``torch.utils.flop_counter``; a machine-independent lower bound on the time ratio)."""
    flops = []
    for name in ("resnet50_denoise", "resnet50"):
        model = create_model(name, num_classes=1000).eval()
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(torch.rand(1, 3, size, size))
        flops.append(counter.get_total_flops())
    return flops[0] / flops[1]


def bench_denoise(device: torch.device, repeats: int, quick: bool) -> dict:
    """Case 2: adversarial step of ResNet-50 + 4 non-local Gaussian vs ResNet-50 at 112 px."""
    steps = 1 if quick else 2
    batch = 2 if device.type == "cpu" else 32
    kw = dict(num_classes=1000)
    base, _ = _setup("resnet50", kw, steps, batch, 112, 3, device)
    den, _ = _setup("resnet50_denoise", dict(kw, denoise="nonlocal_gaussian"), steps, batch,
                    112, 3, device)
    t_den, t_base = _side_by_side(den, base, repeats, device)
    return {"case": f"denoise: ResNet-50 +4 nonlocal_gaussian vs ResNet-50, batch {batch} 112px, "
                    f"PGD-{steps}",
            "a": t_den, "b": t_base, "ratio": t_den / t_base, "goal": GOALS["denoise"],
            "labels": ("ResNet-50 +4 denoise step", "ResNet-50 step")}


def run(args: argparse.Namespace) -> int:
    """Entry point of ``featdenoise bench train`` (args: quick, repeats, threads, device)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    quick = bool(args.quick)
    repeats = args.repeats or (2 if quick else 5)
    print(f"featdenoise bench train: device {device}, {torch.get_num_threads()} threads, "
          f"{repeats} repeats (medians){', quick' if quick else ''}")
    ok = True
    for bench in (bench_loop, bench_denoise):
        r = bench(device, repeats, quick)
        met = r["ratio"] <= r["goal"]
        ok &= met
        print(f"  {r['case']}")
        print(f"    {r['labels'][0]}: {r['a'] * 1e3:.1f} ms   {r['labels'][1]}: "
              f"{r['b'] * 1e3:.1f} ms   ratio {r['ratio']:.3f} (goal <= {r['goal']:.2f}) "
              f"{'OK' if met else 'ABOVE GOAL'}")
    for size in (112, 224):
        print(f"  forward FLOPs, ResNet-50 +4 nonlocal_gaussian / ResNet-50 at {size}px: "
              f"{flop_ratio(size):.3f}")
    return 0
