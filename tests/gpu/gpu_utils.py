"""Helpers of the GPU checks (``tests/gpu``): errors against float64, host-sync counts, a
synthetic training step, random images, a fake Fashion-MNIST folder and its training config,
checksums compared across ranks."""

from __future__ import annotations

import gzip
import os
import struct
import warnings
from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch import nn

from featdenoise.runtime import distributed as dist

# The ``setting`` fixture's parameters (``indirect=True``): a CUDA GPU at the real sizes, or the
# CPU at tiny sizes (a dry run; ``CPU_SLOW``: one that takes longer than a few seconds).
CUDA = pytest.param("cuda", marks=pytest.mark.needs_cuda, id="cuda")
CPU = pytest.param("cpu", id="cpu")
CPU_SLOW = pytest.param("cpu", marks=pytest.mark.slow, id="cpu")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative L2 error of ``a`` against the reference ``b`` (float64, on the CPU)."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def count_syncs(device: torch.device, fn: Callable[[], None]) -> tuple[int, str]:
    """Host synchronisations inside ``fn`` (CUDA sync debug mode "warn"), first location; on a
    CPU ``fn`` just runs (no count)."""
    if device.type != "cuda":
        fn()
        return 0, ""
    fn()  # warm-up: lazy initialisation may synchronise once
    torch.cuda.synchronize(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    where = f" (first: {syncs[0].filename}:{syncs[0].lineno})" if syncs else ""
    return len(syncs), where


def train_parts(model: nn.Module, device: torch.device, steps: int = 2, bf16: bool = False):
    """A training step on ``model`` with synthetic settings: ``(step(x, y), its attack)``."""
    from featdenoise.training import parts
    from featdenoise.training.config import load_config
    from featdenoise.training.recipes import pgd
    from featdenoise.training.step import State, StepContext

    cfg = load_config(None, [f"attack.steps={steps}", "attack.step_size=4", "run.log_every=1000",
                             "run.checkpoint_every=0", f"run.bf16={str(bf16).lower()}"])
    optimizer = parts.build_optimizer(model, cfg.optim)
    schedule = parts.LRSchedule(optimizer, 100, cfg.optim, 32)
    attack = parts.TrainAttack(model, steps, 16 / 255, 4 / 255, 0.2, True)
    criterion = parts.loss_fn(0.1)
    state, ctx = State(), StepContext(cfg, device, criterion, optimizer, schedule)

    def step(x, y):
        pgd.train_step(model, attack, x, y, state, ctx)

    return step, attack


class Images(torch.utils.data.Dataset):
    """``n`` random ``[3, px, px]`` images in [0, 1] with random labels 0..9 (seed 0)."""

    def __init__(self, n: int, px: int):
        g = torch.Generator().manual_seed(0)
        self.x = torch.rand(n, 3, px, px, generator=g)
        self.y = torch.randint(0, 10, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


def _write_idx(path: str, array: np.ndarray) -> None:
    """A gzip IDX file (the Fashion-MNIST format) of uint8 ``array``."""
    array = np.asarray(array, dtype=np.uint8)
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I",
                                                                   *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.tobytes())


def fake_fashion_mnist(folder: str, n_train: int = 64, n_val: int = 16) -> str:
    """A folder of Fashion-MNIST-format files with random images (labels from brightness)."""
    rng = np.random.default_rng(0)
    os.makedirs(folder, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_val)):
        x = rng.integers(0, 256, size=(n, 28, 28))
        y = (x.reshape(n, -1).mean(1) > 127.5).astype(np.uint8) + rng.integers(0, 5, n) * 2
        _write_idx(os.path.join(folder, f"{prefix}-images-idx3-ubyte.gz"), x)
        _write_idx(os.path.join(folder, f"{prefix}-labels-idx1-ubyte.gz"), y)
    return folder


def train_cfg(data: str, out: str, device: torch.device, *extra: str):
    """A 2-epoch Fashion-MNIST training config of a small denoising net on ``device`` (smaller
    on a CPU), evaluated each epoch, checkpointed every 3 steps; ``extra`` overrides."""
    from featdenoise.training.config import load_config

    cuda = device.type == "cuda"
    width = "width: 8" if cuda else "width: 4, blocks: [1, 1, 1]"
    return load_config(None, [
        "model.name=small_resnet_denoise", f"model.kwargs={{in_channels: 1, {width}}}",
        "data.name=fashion_mnist", f"data.root={data}", "data.batch_size=8", "data.workers=0",
        "data.augment=true", f"attack.steps={2 if cuda else 1}", "attack.step_size=4",
        "optim.epochs=2",
        "optim.milestones=[1]", "optim.base_batch=8", f"run.out_dir={out}",
        "run.eval_every=1", "run.eval_attack_steps=1", "run.final_eval_steps=1",
        "run.log_every=2", "run.checkpoint_every=3", "run.progress=false",
        "run.tensorboard=false", f"run.device={device.type}", *extra])


def weights(run_dir: str) -> dict:
    """The model state of ``run_dir``'s checkpoint."""
    from featdenoise.hub import checkpoints as ckpt

    return ckpt.load_checkpoint(os.path.join(run_dir, ckpt.CHECKPOINT))["model"]


def checksums(model: nn.Module) -> tuple[list[float], list[float]]:
    """Sums (float64) of each parameter and each floating-point buffer of ``model``."""
    params = [float(p.detach().double().sum()) for p in model.parameters()]
    buffers = [float(b.detach().double().sum()) for b in model.buffers()
               if b.is_floating_point()]
    return params, buffers


def same_on_every_rank(values: list[float]) -> bool:
    """Whether every rank of the process group holds the same ``values``."""
    gathered = [None] * dist.world_size()
    torch.distributed.all_gather_object(gathered, values)
    return all(g == gathered[0] for g in gathered)
