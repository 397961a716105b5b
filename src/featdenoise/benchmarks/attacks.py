"""``featdenoise bench attacks``: our PGD against torchattacks' PGD, side by side in one process.

Same model, same batch, same settings (10 steps, untargeted, eps 16/255, step 1.6/255, clean
start so the two results can be compared pixel by pixel). Runs alternate (ours, theirs, ours, ...)
so load on a shared machine hits both alike; the median time of each is reported with images/s
and the ratio (target: ours >= 1.2x). Achieved GFLOP/s counts a PGD step as 2x the forward FLOPs
(:class:`torch.utils.flop_counter.FlopCounterMode` on the forward): the forward plus a backward
that computes input gradients only, which is all either implementation computes. It is printed
against the machine's large-matmul GFLOP/s measured here.

Where the speed comes from (``featdenoise.attacks.base``, ``fold.py``, ``prepack.py``): each
eval-mode BatchNorm is folded into its convolution for the attack (one pass fewer forward and
backward per layer); each convolution runs on weights packed once for oneDNN instead of reordered
at every call, forward and backward (at small batches the deep layers are bound by reading
weights); both are kept per model while it is unchanged. On one thread with batches < 16 the
attack also runs on a channels-last copy of the images (there PyTorch runs 1x1 convolutions as
GEMMs, which are much faster on NHWC data). Both implementations compute input gradients only
(``torch.autograd.grad`` prunes the weight-gradient work in both) on the same model. On a CPU the
ratio is taken on process CPU time (steady under other jobs' load); wall-clock is printed too.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from featdenoise.attacks import PGD
from featdenoise.models import create_model

EPS = 16 / 255
STEPS = 10


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device) -> float:
    """Wall-clock seconds of ``fn()``."""
    return _timed_both(fn, device)[0]


def _timed_both(fn, device: torch.device) -> tuple[float, float]:
    """(wall-clock, process CPU) seconds of ``fn()``. CPU time is the steadier measure on a
    shared machine when torch runs one thread (other processes' load does not count)."""
    _sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    _sync(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def matmul_gflops(device: torch.device, n: int, repeats: int = 5) -> float:
    """Best GFLOP/s of an ``[n, n] @ [n, n]`` float32 matmul (2 n^3 FLOPs) on ``device``
    (per second of process CPU time on a CPU, divided by the threads; wall-clock on a GPU)."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    torch.mm(a, b)  # warm-up
    clock = 1 if device.type == "cpu" else 0
    best = min(_timed_both(lambda: torch.mm(a, b), device)[clock] for _ in range(repeats))
    if device.type == "cpu":
        best /= torch.get_num_threads()
    return 2 * n**3 / best / 1e9


def forward_flops(model: nn.Module, x: torch.Tensor) -> int:
    """FLOPs of one forward pass on ``x`` (FlopCounterMode: 2 per multiply-add)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return int(counter.get_total_flops())


def _cases(quick: bool) -> list[tuple[str, nn.Module, tuple[int, ...], int]]:
    torch.manual_seed(0)
    resnet50 = create_model("resnet50", num_classes=1000)
    small = create_model("small_resnet", in_channels=1, num_classes=10)
    if quick:
        return [("resnet50 64x64", resnet50, (4, 3, 64, 64), 1000),
                ("small_resnet 28x28x1", small, (32, 1, 28, 28), 10)]
    return [("resnet50 64x64", resnet50, (8, 3, 64, 64), 1000),
            ("resnet50 64x64", resnet50, (16, 3, 64, 64), 1000),
            ("resnet50 64x64", resnet50, (32, 3, 64, 64), 1000),
            ("small_resnet 28x28x1", small, (128, 1, 28, 28), 10)]


def bench_case(name: str, model: nn.Module, shape: tuple[int, ...], num_classes: int,
               device: torch.device, repeats: int, peak: float) -> float:
    """Time ours and torchattacks on one model/batch; print one line; return the speed ratio."""
    import torchattacks

    model = model.to(device).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(shape, generator=g).to(device)
    y = torch.randint(0, num_classes, shape[:1], generator=g).to(device)
    # Ours with its speed options on (BatchNorm folded, convolutions packed; both off by default
    # for bit-level parity with the official attacker).
    ours = PGD(model, eps=EPS, steps=STEPS, targeted=False, random_start=False, step_rule="paper",
               fold_bn=True, prepack=True)
    theirs = torchattacks.PGD(model, eps=EPS, alpha=ours.step, steps=STEPS, random_start=False)

    adv_ours, adv_theirs = ours(x, y), theirs(x, y)  # warm-up, and the agreement check
    agree = ((adv_ours - adv_theirs).abs() <= 1e-5).float().mean().item()
    t_ours, t_theirs = [], []
    for _ in range(repeats):  # alternate, so machine load hits both alike
        t_ours.append(_timed_both(lambda: ours(x, y), device))
        t_theirs.append(_timed_both(lambda: theirs(x, y), device))
    n = shape[0]
    total = 2 * forward_flops(model, x) * STEPS  # forward + input-gradient backward
    ratios = []
    for i, clock in enumerate(("wall", "cpu")):
        # CPU time of all threads / threads: the time the work would take on idle cores.
        scale = torch.get_num_threads() if clock == "cpu" else 1
        med_ours = statistics.median(t[i] for t in t_ours) / scale
        med_theirs = statistics.median(t[i] for t in t_theirs) / scale
        ratios.append(med_theirs / med_ours)
        print(f"{name:20s} b{n:<4d} {clock:4s}  ours {n / med_ours:7.1f} img/s  torchattacks "
              f"{n / med_theirs:7.1f} img/s  ratio {ratios[-1]:5.2f}x  |  GFLOP/s ours "
              f"{total / med_ours / 1e9:6.1f} ({100 * total / med_ours / 1e9 / peak:4.1f}% of "
              f"matmul), torchattacks {total / med_theirs / 1e9:6.1f}")
    print(f"{name:20s} same adversarial pixels (|diff| <= 1e-5): {agree:.2%}")
    return ratios[1] if device.type == "cpu" else ratios[0]


def run(args: argparse.Namespace) -> int:
    """Entry point of ``featdenoise bench attacks`` (args: quick, repeats, threads, device)."""
    try:
        import torchattacks  # noqa: F401
    except ImportError:
        raise ValueError("bench attacks compares against torchattacks; install it with "
                         "`pip install torchattacks==3.5.1` (a dev dependency)") from None
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    quick = bool(args.quick)
    repeats = args.repeats or (1 if quick else 5)
    peak = matmul_gflops(device, 1024 if quick else 2048)
    print(f"PGD {STEPS} steps, untargeted, eps 16/255, step {max(1, 16 / STEPS):g}/255, clean "
          f"start, ours with fold_bn=True, prepack=True; device {device}, "
          f"{torch.get_num_threads()} threads, {repeats} repeats (median); "
          f"matmul {peak:.1f} GFLOP/s")
    ratios = []
    for name, model, shape, num_classes in _cases(quick):
        ratios.append(bench_case(name, model, shape, num_classes, device, repeats, peak))
    clock = "CPU-time" if device.type == "cpu" else "wall-clock"
    print(f"speed-up over torchattacks ({clock}): min {min(ratios):.2f}x (target >= 1.20x)")
    return 0
