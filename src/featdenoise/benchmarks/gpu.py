"""``featdenoise bench gpu``: time and peak memory of one PGD iteration on ResNet-152-denoise.

ResNet-152 with a denoising block after each stage (the paper's Sec. 4 network), 224 px images,
batch 32, one PGD iteration (eps 16/255, step 1/255), in four settings: strict fp32, TF32, bf16
autocast, and TF32 with the chunked instead of the fused attention for the Gaussian non-local op.
Each setting is warmed up once (cuDNN autotuning, kernel choice), then timed (wall-clock between
device synchronisations); on CUDA the peak memory beyond what was held before is printed too.

``--quick`` runs the same code on a tiny stand-in (a small denoising net, 16 px, batch 2), on
any device: the wiring in a second. The GPU checks of every CUDA path are tests
(``tests/gpu``, ``scripts/gpu_check.sh``).
"""

from __future__ import annotations

import argparse
import time

import torch

from featdenoise.attacks import PGD
from featdenoise.benchmarks.common import sync
from featdenoise.models import create_model
from featdenoise.runtime import backends
from featdenoise.runtime import distributed as dist

SETTINGS = (("fp32", False, False, "auto"), ("tf32", True, False, "auto"),
            ("bf16", True, True, "auto"), ("tf32+chunked", True, False, "chunked"))


def _net(name: str, tiny: bool, **kw) -> torch.nn.Module:
    """``name`` from the registry with 10 classes; the quick run's stand-in: a small denoising
    net (the same code paths at a size a CPU runs in a second)."""
    if tiny:
        return create_model("small_resnet_denoise", in_channels=3, width=8, **kw)
    return create_model(name, num_classes=10, **kw)


def pgd_r152(device: torch.device, px: int, batch: int, tiny: bool) -> str:
    """One line: per setting of :data:`SETTINGS` the milliseconds of one PGD iteration on
    ``[batch, 3, px, px]`` images (and the peak GiB on CUDA). TF32 is left on afterwards."""
    torch.manual_seed(0)
    x = torch.rand(batch, 3, px, px, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    rows = []
    for label, tf32, bf16, backend in SETTINGS:
        model = _net("resnet152_denoise", tiny, backend=backend).to(device).eval()
        if device.type == "cuda":
            backends.set_tf32(tf32)
            model = model.to(memory_format=torch.channels_last)
        pgd = PGD(model, eps=16 / 255, step_size=1 / 255, steps=1, seed=0, bf16=bf16)
        pgd(x, y)  # warm-up (cuDNN autotuning, kernel choice)
        sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        start = time.perf_counter()
        pgd(x, y)
        sync(device)
        took = time.perf_counter() - start
        mem = (f", peak {(torch.cuda.max_memory_allocated(device) - base) / 2**30:.2f} GiB"
               if device.type == "cuda" else "")
        rows.append(f"{label} {took * 1000:.0f} ms{mem}")
        del model, pgd
    if device.type == "cuda":
        backends.set_tf32(True)
    return f"[{batch},3,{px},{px}] one PGD iteration: " + "; ".join(rows)


def run(args: argparse.Namespace) -> int:
    """Entry point of ``featdenoise bench gpu`` (args: device, default cuda; quick)."""
    quick = bool(args.quick)
    device = dist.resolve_device(args.device or "cuda", "--device")
    if device.type != "cuda" and not quick:
        raise ValueError(f"--device {args.device}: bench gpu measures a CUDA GPU (ResNet-152 at "
                         f"224 px); use --quick for the tiny stand-in on a CPU")
    backends.configure(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    print(pgd_r152(device, 16 if quick else 224, 2 if quick else 32, quick), flush=True)
    return 0
