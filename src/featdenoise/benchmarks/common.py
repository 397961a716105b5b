"""Set-up shared by the benches: the torchattacks check, threads and device, and the clocks."""

from __future__ import annotations

import argparse
import time

import torch

from featdenoise.runtime import optional


def sync(device: torch.device) -> None:
    """Wait for the GPU's queued work (nothing to wait for on a CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    """Wall-clock seconds of ``fn()``."""
    return timed_both(fn, device)[0]


def timed_both(fn, device: torch.device) -> tuple[float, float]:
    """(wall-clock, process CPU) seconds of ``fn()``. CPU time is the steadier measure on a
    shared machine when torch runs one thread (other processes' load does not count)."""
    sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    sync(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def prepare(args: argparse.Namespace, what: str) -> torch.device:
    """Check torchattacks is installed (one line naming ``what`` if not), set ``args.threads``
    torch threads, and return ``args.device``: the start of every bench against torchattacks."""
    try:
        optional.torchattacks(what)
    except ValueError:
        raise ValueError(f"{what} compares against torchattacks; install it with "
                         "`pip install torchattacks==3.5.1` (a dev dependency)") from None
    if args.threads:
        torch.set_num_threads(args.threads)
    return torch.device(args.device)
