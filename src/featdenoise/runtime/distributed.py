"""Everything that knows about processes and ranks (Sec. 5: synchronized SGD over many GPUs).

Launched by ``torchrun`` (which sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``...),
:func:`init` joins the process group with NCCL on CUDA and gloo on CPU; as a plain process it
does nothing, and every helper here then degrades to the one-process case (all-reduce is a no-op,
``is_main()`` is True). The rest of the code base never reads the rank directly.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler, Sampler


def init(device: str = "auto") -> torch.device:
    """Join the process group if launched by torchrun; return the device this process uses.

    ``device``: "auto" (CUDA if available, else CPU), "cpu", "cuda" or "cuda:N". On CUDA each
    process takes GPU ``LOCAL_RANK``.
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"run.device={device} but no CUDA device is available; use run.device=cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device == "cuda":
        device = f"cuda:{local_rank}"
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, device_id=dev if dev.type == "cuda" else None)
    return dev


def shutdown() -> None:
    """Leave the process group (if any)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def launched_as_main() -> bool:
    """True unless this process was started by torchrun with a rank other than 0 (valid before
    :func:`init` and after :func:`shutdown`, e.g. for messages printed by the CLI)."""
    return int(os.environ.get("RANK", 0)) == 0


def is_main() -> bool:
    """True on the process that writes logs and checkpoints (rank 0)."""
    return rank() == 0


def barrier() -> None:
    if is_dist():
        dist.barrier()


def all_reduce_sum(values: list[float] | torch.Tensor, device=None) -> list[float]:
    """Sum numbers over all processes (float64); returns the same numbers on one process."""
    t = torch.as_tensor(values, dtype=torch.float64)
    if is_dist():
        if dist.get_backend() == "nccl":
            t = t.to(device or torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.cpu().tolist()


def all_reduce_mean(values: list[float], device=None) -> list[float]:
    """Average numbers over all processes."""
    return [v / world_size() for v in all_reduce_sum(values, device)]


def sync_buffers(model: torch.nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every process.

    DDP broadcasts buffers at the start of each forward, so after the last update every process
    holds statistics of its own last batch; call this before evaluating or saving so that all
    processes evaluate, and the checkpoint holds, the same network as rank 0.
    """
    if not is_dist():
        return
    for buf in unwrap(model).buffers():
        if dist.get_backend() == "nccl" or buf.device.type == "cpu":
            dist.broadcast(buf.data, src=0)


def wrap_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel around ``model`` when several processes run; else ``model``."""
    if not is_dist():
        return model
    ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module inside DDP and/or ``torch.compile`` wrappers (for checkpoints, attacks)."""
    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


class TrainSampler(DistributedSampler):
    """``DistributedSampler`` (shuffled per epoch with ``set_epoch``, remainder dropped) that can
    start part-way through an epoch: :meth:`set_start` skips the first ``k`` samples of this rank's
    share, so a resumed run sees exactly the batches the interrupted one had not yet seen."""

    def __init__(self, dataset, seed: int = 0):
        super().__init__(dataset, num_replicas=world_size(), rank=rank(), shuffle=True,
                         seed=seed, drop_last=True)
        self.start = 0

    def set_start(self, k: int) -> None:
        self.start = k

    def __iter__(self):
        indices = list(super().__iter__())
        return iter(indices[self.start:])

    def __len__(self) -> int:
        return self.num_samples - self.start


class ShardSampler(Sampler):
    """Evaluation sharding: rank r of w takes indices r, r + w, r + 2w, ... in order.

    Every index is visited by exactly one process whatever the world size: no dropped remainder
    (the official code drops it) and no padding duplicates (``DistributedSampler`` pads). Shards
    differ in length by at most one; sums of correct counts are all-reduced afterwards.
    """

    def __init__(self, n: int, num_replicas: int | None = None, rank_: int | None = None):
        self.n = n
        self.world = world_size() if num_replicas is None else num_replicas
        self.rank = rank() if rank_ is None else rank_

    def __iter__(self):
        return iter(range(self.rank, self.n, self.world))

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world))


def all_gather_objects(items: list) -> list:
    """The concatenation of every process's ``items`` (picklable), rank order; ``items`` alone
    on one process."""
    if not is_dist():
        return list(items)
    out: list = [None] * world_size()
    dist.all_gather_object(out, list(items))
    return [x for part in out for x in part]
