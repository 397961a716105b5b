"""``featdenoise bench attacks``: our default PGD against torchattacks' PGD, side by side.

Same model, same batch, same settings (10 steps, 3 with ``--quick``; untargeted, eps 16/255, step
1.6/255, clean start, so the results can be compared pixel by pixel), on a plain conv+BN CNN
(32x32) and on ResNet-50 at 64x64. Four attacks run alternately (ours as a user writes it,
``PGD(model, ...)`` with no options; ours with ``exact=True``; torchattacks; torchattacks inside
:func:`featdenoise.accel.inference_grad`), so load on a shared machine hits all alike; the median
time of each is reported with images/s, the ratios and the share of identical pixels (target: ours
>= 1.5x torchattacks with >= 99.9% identical pixels). Achieved GFLOP/s counts a PGD step as 2x the
forward FLOPs (:class:`torch.utils.flop_counter.FlopCounterMode` on the forward): the forward plus
a backward that computes input gradients only, which is all either implementation
computes. It is printed against the machine's large-matmul GFLOP/s measured here.

Where the speed comes from (:mod:`featdenoise.accel`, on by default in every attack): each
eval-mode BatchNorm is folded into its convolution (one pass fewer forward and backward per
layer); each convolution runs on weights packed once for oneDNN instead of reordered at every
call, forward and backward (at small batches the deep layers are bound by reading weights); both
are kept per model while it is unchanged. The ``exact=True`` row shows what is left without them:
the attack's own bookkeeping (input gradients only, no per-step mean over the batch). On one
thread with batches < 16 our attack also runs on a channels-last copy of the images (there
PyTorch runs 1x1 convolutions as GEMMs, which are much faster on NHWC data). On a CPU the ratio
is taken on process CPU time (steady under other jobs' load; on a loaded machine prefer
``--threads 1``, since idle OpenMP threads spin and their waiting counts as CPU time); wall-clock
is printed too.
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from featdenoise import accel
from featdenoise.attacks import PGD
from featdenoise.benchmarks import autoattack
from featdenoise.benchmarks.common import prepare, timed_both
from featdenoise.models import create_model
from featdenoise.runtime import optional

EPS = 16 / 255
STEPS = 10
QUICK_STEPS = 3  # a smoke run


def matmul_gflops(device: torch.device, n: int, repeats: int = 5) -> float:
    """Best GFLOP/s of an ``[n, n] @ [n, n]`` float32 matmul (2 n^3 FLOPs) on ``device``
    (per second of process CPU time on a CPU, divided by the threads; wall-clock on a GPU)."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    torch.mm(a, b)  # warm-up
    clock = 1 if device.type == "cpu" else 0
    best = min(timed_both(lambda: torch.mm(a, b), device)[clock] for _ in range(repeats))
    if device.type == "cpu":
        best /= torch.get_num_threads()
    return 2 * n**3 / best / 1e9


def forward_flops(model: nn.Module, x: torch.Tensor) -> int:
    """FLOPs of one forward pass on ``x`` (FlopCounterMode: 2 per multiply-add)."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return int(counter.get_total_flops())


def convbn_cnn(num_classes: int = 10, widths: tuple[int, ...] = (32, 64, 128)) -> nn.Module:
    """A plain all-convolutional CNN for 32x32 RGB: per width a 3x3 conv, BatchNorm, ReLU and a
    3x3 stride-2 conv, BatchNorm, ReLU (downsampling by strides, as ResNets do); global average
    pool and a linear head. Logits ``[N, num_classes]``."""
    layers: list[nn.Module] = []
    c = 3
    for w in widths:
        for stride in (1, 2):
            layers += [nn.Conv2d(c, w, 3, stride=stride, padding=1, bias=False),
                       nn.BatchNorm2d(w), nn.ReLU()]
            c = w
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, num_classes)]
    model = nn.Sequential(*layers)
    with torch.no_grad():  # trained-looking BatchNorm statistics
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                mean, var = m.running_mean, m.running_var
                assert mean is not None and var is not None  # track_running_stats (the default)
                mean.uniform_(-0.1, 0.1)
                var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)
    return model


def _cases(quick: bool) -> list[tuple[str, nn.Module, tuple[int, ...], int]]:
    torch.manual_seed(0)
    cnn = convbn_cnn()
    resnet50 = create_model("resnet50", num_classes=1000)
    if quick:  # a smoke run: small batches
        return [("conv+BN CNN 32x32", cnn, (8, 3, 32, 32), 10),
                ("resnet50 32x32", resnet50, (2, 3, 32, 32), 1000)]
    return [("conv+BN CNN 32x32", cnn, (64, 3, 32, 32), 10),
            ("resnet50 64x64", resnet50, (16, 3, 64, 64), 1000),
            ("resnet50 64x64", resnet50, (32, 3, 64, 64), 1000)]


def _agree(a: torch.Tensor, b: torch.Tensor) -> float:
    """Share of pixels equal within 1e-5 (float32 rounding of the same steps)."""
    return ((a - b).abs() <= 1e-5).float().mean().item()


@dataclass(frozen=True)
class CaseResult:
    """One case of the bench: the lines it prints and the ratios the summary line takes the
    minimum of (CPU time on a CPU, wall-clock on a GPU)."""

    lines: list[str]
    speedup: float  # torchattacks' time / ours
    accel_speedup: float  # torchattacks' time / torchattacks' inside accel.inference_grad
    agreement: float  # share of identical adversarial pixels, ours vs torchattacks


def bench_case(name: str, model: nn.Module, shape: tuple[int, ...], num_classes: int,
               device: torch.device, repeats: int, peak: float,
               steps: int = STEPS) -> CaseResult:
    """Time the four attacks on one model/batch ``shape``; ``peak`` is the matmul GFLOP/s the
    achieved rate is compared with."""
    torchattacks = optional.torchattacks()
    model = model.to(device).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(shape, generator=g).to(device)
    y = torch.randint(0, num_classes, shape[:1], generator=g).to(device)
    ours = PGD(model, eps=EPS, steps=steps, targeted=False, random_start=False)
    exact = PGD(model, eps=EPS, steps=steps, targeted=False, random_start=False, exact=True)
    theirs = torchattacks.PGD(model, eps=EPS, alpha=ours.step, steps=steps, random_start=False)

    def theirs_accel():
        with accel.inference_grad(model):
            return theirs(x, y)

    runs = {"ours": lambda: ours(x, y), "exact": lambda: exact(x, y),
            "theirs": lambda: theirs(x, y), "theirs_accel": theirs_accel}
    adv = {k: fn() for k, fn in runs.items()}  # warm-up (packs, checks), and the agreement
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in runs}
    for _ in range(repeats):  # alternate, so machine load hits all alike
        for k, fn in runs.items():
            times[k].append(timed_both(fn, device))
    total = 2 * forward_flops(model, x) * steps  # forward + input-gradient backward
    med = {}
    for i, clock in enumerate(("wall", "cpu")):
        # CPU time of all threads / threads: the time the work would take on idle cores.
        scale = torch.get_num_threads() if clock == "cpu" else 1
        med[clock] = {k: statistics.median(t[i] for t in v) / scale for k, v in times.items()}
    lines = _case_lines(name, shape[0], med, total, peak, device)
    agree = _agree(adv["ours"], adv["theirs"])
    lines.append(f"{name:18s} same adversarial pixels (|diff| <= 1e-5): ours vs torchattacks "
                 f"{agree:.2%}, torchattacks in accel vs plain "
                 f"{_agree(adv['theirs_accel'], adv['theirs']):.2%}, ours exact vs torchattacks "
                 f"{_agree(adv['exact'], adv['theirs']):.2%}")
    m = med["cpu" if device.type == "cpu" else "wall"]
    return CaseResult(lines, m["theirs"] / m["ours"], m["theirs"] / m["theirs_accel"], agree)


def _case_lines(name: str, n: int, med: dict[str, dict[str, float]], total: float, peak: float,
                device: torch.device) -> list[str]:
    """Per clock the rates of ours and torchattacks, then torchattacks in accel and ours exact,
    for case ``name`` at batch size ``n``; ``med``: clock -> attack -> median seconds;
    ``total``: FLOPs of the attack; ``peak``: the matmul GFLOP/s."""
    label = f"{name:18s} b{n:<4d}"
    lines = []
    for clock, m in med.items():
        lines.append(
            f"{label} {clock:4s}  ours {n / m['ours']:7.1f} img/s  torchattacks "
            f"{n / m['theirs']:7.1f} img/s  ratio {m['theirs'] / m['ours']:5.2f}x  |  GFLOP/s "
            f"ours {total / m['ours'] / 1e9:6.1f} ({100 * total / m['ours'] / 1e9 / peak:4.1f}%"
            f" of matmul), torchattacks {total / m['theirs'] / 1e9:6.1f}")
    clock = "cpu" if device.type == "cpu" else "wall"
    m = med[clock]
    lines.append(f"{label} {clock:4s}  torchattacks inside accel.inference_grad "
                 f"{n / m['theirs_accel']:7.1f} img/s  speed-up "
                 f"{m['theirs'] / m['theirs_accel']:5.2f}x  |  ours exact=True "
                 f"{n / m['exact']:7.1f} img/s, {m['theirs'] / m['exact']:5.2f}x torchattacks")
    return lines


def run(args: argparse.Namespace) -> int:
    """Entry point of ``featdenoise bench attacks`` (args: quick, repeats, threads, device); the
    one place that prints (then the AutoAttack bench's own lines)."""
    device = prepare(args, "bench attacks")
    quick = bool(args.quick)
    repeats = args.repeats or (1 if quick else 5)
    peak = matmul_gflops(device, 1024 if quick else 2048)
    steps = QUICK_STEPS if quick else STEPS
    print(f"PGD {steps} steps, untargeted, eps 16/255, step {max(1, 16 / steps):g}/255, clean "
          f"start, ours as PGD(model, ...) with no options; device {device}, "
          f"{torch.get_num_threads()} threads, {repeats} repeats (median); "
          f"matmul {peak:.1f} GFLOP/s")
    results = []
    for name, model, shape, num_classes in _cases(quick):
        results.append(bench_case(name, model, shape, num_classes, device, repeats, peak, steps))
        print("\n".join(results[-1].lines))
    clock = "CPU-time" if device.type == "cpu" else "wall-clock"
    print(f"speed-up over torchattacks ({clock}): min {min(r.speedup for r in results):.2f}x "
          f"(target >= 1.50x), identical pixels min {min(r.agreement for r in results):.2%} "
          "(target >= 99.90%)")
    print(f"torchattacks inside accel.inference_grad ({clock}): min "
          f"{min(r.accel_speedup for r in results):.2f}x faster than plain")
    if getattr(args, "autoattack", True):
        print()
        autoattack.run(argparse.Namespace(full=getattr(args, "full", False), images=8,
                                          threads=args.threads, device=args.device,
                                          quick=quick))
    return 0
