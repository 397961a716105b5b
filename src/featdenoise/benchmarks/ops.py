"""``featdenoise bench ops``: every denoising op (Sec. 4.2) against its straightforward version.

For each op and feature shape ``[N, C, H, W]`` it times forward + backward (gradients for the
input and the op's parameters) of our op (:mod:`featdenoise.models.denoise`) and of the
straightforward implementation, measured interleaved in one process, and their peak memory:

* non-local (Gaussian, dot): the materialised ``[N, HW, HW]`` matrix (official ``non_local_op``
  as written for the Gaussian; ``(theta^T phi) g`` for dot product);
* bilateral: ``F.unfold`` of the 3x3 neighbourhoods (a ``9x`` copy of the features);
* median: replicate padding + ``unfold`` + ``torch.median`` over the 9 values;
* mean: ``F.unfold`` + masked mean (ours is ``F.avg_pool2d``).

Shapes: the paper's 4 blocks (N=8; 256/512/1024/2048 channels at 56/28/14/7 px, after res2..res5
of an ImageNet ResNet) and the small-image networks (N=128; width 16/32/64 at 28/14/7 px for
Fashion-MNIST, 16 at 32 px for CIFAR-10). ``--quick`` uses N=2 / N=32 at the 2 largest shapes
of each kind and fewer repetitions.

Peak memory is the largest amount of memory held at any moment during one forward + backward,
beyond what existed before it (the input and the weights are not counted; activations,
temporaries and gradients are). On CPU it is computed from the allocation and free events of
``torch.profiler`` (``profile_memory=True``), replayed in time order; on CUDA it is
``torch.cuda.max_memory_allocated`` minus the memory allocated before the step.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import ProfilerActivity, profile
from tqdm import tqdm

from featdenoise.benchmarks.common import sync
from featdenoise.models.denoise import Bilateral, NonLocal, build_op, resolve_backend

PAPER_SHAPES = [(8, 256, 56), (8, 512, 28), (8, 1024, 14), (8, 2048, 7)]
SMALL_SHAPES = [(128, 16, 28), (128, 32, 14), (128, 64, 7), (128, 16, 32)]
OPS = ["nonlocal_gaussian", "nonlocal_dot", "bilateral_gaussian", "bilateral_dot", "median",
       "mean"]
# The targets for the Gaussian non-local: (N, C, px) -> (min speed ratio, min memory ratio)
TARGETS = {(8, 256, 56): (2.0, 4.0), (128, 16, 28): (2.0, 4.0)}
SAME_CODE = ("materialise", "pairwise")  # "ours via" values that run the straightforward code


# ---------------------------------------------------------------- straightforward versions


class _UnfoldBilateral(nn.Module):
    """Eq. (2) with ``F.unfold``: ``[N, C, 9, HW]`` copies of keys and values."""

    def __init__(self, ours: Bilateral):
        super().__init__()
        self.ours = ours  # shares theta/phi with our op

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        o = self.ours
        theta, phi = (o.theta(x), o.phi(x)) if o.embed else (x, x)
        d = theta.shape[1]
        valid = F.unfold(x.new_ones(1, 1, h, w), 3, padding=1).view(1, 9, h * w)
        k = F.unfold(phi, 3, padding=1).view(n, d, 9, h * w)  # [N, d, 9, HW]
        v = F.unfold(x, 3, padding=1).view(n, c, 9, h * w)  # [N, C, 9, HW]
        f = (theta.flatten(2).unsqueeze(2) * k).sum(1)  # [N, 9, HW]
        if o.softmax:
            f = (f / math.sqrt(d)).masked_fill(valid == 0, float("-inf")).softmax(1)
        else:
            f = f / valid.sum(1, keepdim=True)
        return (v * f.unsqueeze(1)).sum(2).view(n, c, h, w)


class _UnfoldMedian(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        p = F.pad(x, (1, 1, 1, 1), mode="replicate")
        patches = p.unfold(2, 3, 1).unfold(3, 3, 1).reshape(n, c, h, w, 9)
        return patches.median(dim=-1).values


class _UnfoldMean(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        count = F.unfold(x.new_ones(1, 1, h, w), 3, padding=1).sum(1).view(1, 1, h, w)
        return F.unfold(x, 3, padding=1).view(n, c, 9, h, w).sum(2) / count


def method(name: str, shape: tuple[int, int, int], device_type: str = "cpu") -> str:
    """How our op computes at ``(N, C, px)`` on that device: the column "ours via"."""
    n, c, px = shape
    hw = px * px
    if name == "nonlocal_gaussian":
        return resolve_backend("auto", n, hw, hw, c, device_type)
    if name == "nonlocal_dot":  # see NonLocal.forward (d = C without embedding)
        return "gram CxC" if c * c * 2 * hw <= hw * hw * 2 * c else "pairwise"
    return {"median": "min/max net", "mean": "avg_pool2d"}.get(name, "9 shifts")


def make_pair(name: str, channels: int) -> tuple[nn.Module, nn.Module]:
    """(our op, the straightforward op) computing the same function with shared weights."""
    ours = build_op(name, channels)
    base: nn.Module
    if isinstance(ours, NonLocal):  # the nonlocal_* ops
        base = NonLocal(channels, softmax=ours.softmax, embed=ours.embed, backend="materialise")
        base.load_state_dict(ours.state_dict())
    elif isinstance(ours, Bilateral):  # the bilateral_* ops
        base = _UnfoldBilateral(ours)
    elif name == "median":
        base = _UnfoldMedian()
    elif name == "mean":
        base = _UnfoldMean()
    else:
        raise ValueError(f"no straightforward version of {name!r} to compare with")
    return ours, base


# ---------------------------------------------------------------- measurement


def _step(op: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> None:
    """One forward + backward (input and parameter gradients)."""
    for p in op.parameters():
        p.grad = None
    xr = x.detach().requires_grad_()
    op(xr).backward(grad)


def time_step(op: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> float:
    """Wall-clock milliseconds of one forward + backward."""
    sync(x.device)
    start = time.perf_counter()
    _step(op, x, grad)
    sync(x.device)
    return (time.perf_counter() - start) * 1e3


def peak_memory_mib(fn: Callable[[], None], device: torch.device) -> float:
    """Peak MiB held during ``fn()`` beyond what was held before it (see module docstring)."""
    if device.type == "cuda":
        sync(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        sync(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # keep the profiler's start-up lines quiet
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    held = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        held += e.nbytes()
        peak = max(peak, held)
    return peak / 2**20


def measure(name: str, shape: tuple[int, int, int], device: torch.device, repeats: int,
            min_seconds: float = 1.0) -> dict:
    """Time and peak memory of our op and the straightforward one at ``[N, C, px, px]``.

    After one warm-up each, the two are run alternately ``repeats`` times, or more (up to 20)
    until about ``min_seconds`` of ours has run; the minimum of each is kept (noise from
    other processes only ever adds time, so the minimum is the most stable estimate).
    """
    n, c, px = shape
    torch.manual_seed(0)
    ours, base = (m.to(device) for m in make_pair(name, c))
    x = torch.randn(n, c, px, px, device=device)
    grad = torch.randn_like(x)
    first = time_step(ours, x, grad)  # warm-up
    time_step(base, x, grad)
    rounds = min(20, max(repeats, math.ceil(min_seconds * 1e3 / max(first, 1e-3))))
    times: dict[str, list[float]] = {"ours": [], "base": []}
    for _ in range(rounds):
        times["ours"].append(time_step(ours, x, grad))
        times["base"].append(time_step(base, x, grad))
    mem_ours = peak_memory_mib(lambda: _step(ours, x, grad), device)
    mem_base = peak_memory_mib(lambda: _step(base, x, grad), device)
    t_ours, t_base = min(times["ours"]), min(times["base"])
    via = method(name, shape, device.type)
    return dict(op=name, shape=f"{n}x{c}x{px}x{px}", key=shape, via=via,
                ours_ms=t_ours,
                base_ms=t_base, speed=t_base / t_ours, ours_mib=mem_ours, base_mib=mem_base,
                memory=mem_base / max(mem_ours, 1e-9), rounds=rounds)


def format_table(rows: list[dict]) -> str:
    head = (f"{'op':<19} {'N x C x H x W':<15} {'ours via':<12} {'ours ms':>9} {'straight ms':>11} "
            f"{'speed x':>7} {'ours MiB':>9} {'straight MiB':>12} {'memory x':>8}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['op']:<19} {r['shape']:<15} {r['via']:<12} {r['ours_ms']:9.1f} "
                     f"{r['base_ms']:11.1f} "
                     f"{r['speed']:7.2f} {r['ours_mib']:9.1f} {r['base_mib']:12.1f} "
                     f"{r['memory']:8.2f}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Entry point of ``featdenoise bench ops``: prints the table and the targets' status.

    ``args``: ``quick`` (smaller N, 4 shapes, >= 2 repetitions), ``repeats`` (minimum timed runs
    per case, default 3; cheap cases run more, up to 20),
    ``threads`` (torch CPU threads), ``device`` (``cpu`` or ``cuda``).
    """
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available; use --device cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (2 if args.quick else 3)
    if args.quick:
        shapes = [(2, c, px) for _, c, px in PAPER_SHAPES[:2]] + \
                 [(32, c, px) for _, c, px in SMALL_SHAPES[:2]]
    else:
        shapes = PAPER_SHAPES + SMALL_SHAPES
    cases = [(op, s) for s in shapes for op in OPS]
    print(f"featdenoise bench ops: device={device}, threads={torch.get_num_threads()}, "
          f"repeats>={repeats} (min), forward+backward of the op alone")
    rows = []
    for name, shape in tqdm(cases, desc="ops", unit="case", leave=False):
        rows.append(measure(name, shape, device, repeats, 0.3 if args.quick else 1.0))
    print(format_table(rows), flush=True)
    print("speed x = straightforward ms / ours ms; memory x = straightforward MiB / ours MiB.")
    print("ours via materialise / pairwise: the same code as the straightforward version (a "
          "score tensor <= 32 MiB, or C > HW for dot product); those ratios show the noise.")
    print("peak MiB: " + ("torch.cuda.max_memory_allocated" if device.type == "cuda" else
                          "torch.profiler allocation/free events replayed in time order")
          + " during one forward+backward, beyond the memory held before it.")
    for r in rows:
        target = TARGETS.get(r["key"]) if r["op"] == "nonlocal_gaussian" else None
        if target:
            met = r["speed"] >= target[0] and r["memory"] >= target[1]
            print(f"target {'met' if met else 'MISSED'}: {r['op']} {r['shape']}: speed x "
                  f"{r['speed']:.2f} (goal >= {target[0]}), memory x {r['memory']:.2f} "
                  f"(goal >= {target[1]})")
        if r["speed"] < 1.0 and r["via"] not in SAME_CODE:
            print(f"note: {r['op']} {r['shape']} measured slower than straightforward "
                  f"(speed x {r['speed']:.2f})")
    return 0
