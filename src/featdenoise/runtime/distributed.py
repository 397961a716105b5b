"""Everything that knows about processes and ranks (Sec. 5: synchronized SGD over many GPUs).

Launched by ``torchrun`` (which sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``...),
:func:`init` joins the process group with NCCL on CUDA and gloo on CPU; as a plain process it
does nothing, and every helper here then degrades to the one-process case (all-reduce is a no-op,
``is_main()`` is True). The rest of the code base never reads the rank directly.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import re
from typing import cast

import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler, Sampler

from featdenoise.runtime.atomic import atomic_write

# Seconds a collective may wait before the job fails (NCCL watchdog, gloo). Sized to the
# longest wait in this code base: an evaluation sweep gives ranks batches of up to 1110 PGD
# iterations x restarts, and a rank with one batch more than another waits that long at the
# final barrier. Override with the environment variable or ``init(timeout=...)``.
DEFAULT_TIMEOUT_S = 2 * 3600
TIMEOUT_ENV = "FEATDENOISE_DIST_TIMEOUT"
_DEVICE_RE = re.compile(r"^(auto|cpu|cuda)(:(\d+))?$")


def timeout_seconds(timeout: float | None = None) -> float:
    """The collective timeout: ``timeout``, else ``$FEATDENOISE_DIST_TIMEOUT``, else 2 hours."""
    if timeout is None:
        raw = os.environ.get(TIMEOUT_ENV)
        if raw is None:
            return float(DEFAULT_TIMEOUT_S)
        try:
            timeout = float(raw)
        except ValueError:
            raise ValueError(f"{TIMEOUT_ENV}={raw!r} is not a number of seconds") from None
    if not timeout > 0:
        raise ValueError(f"the process-group timeout must be > 0 seconds, got {timeout}")
    return float(timeout)


def resolve_device(device: str = "auto", what: str = "device") -> torch.device:
    """Check a device string and map it to this process's device (no process group joined).

    ``device``: "auto" (CUDA if available, else CPU), "cpu", "cuda" (GPU ``LOCAL_RANK``) or
    "cuda:N". ``what`` names the option in error messages (``--device``, ``run.device``).
    Under torchrun with several processes per node, "cuda:N" would put them all on GPU N: it is
    refused (use "cuda", or ``CUDA_VISIBLE_DEVICES`` to choose the GPUs); with one process per
    node it is allowed. Raises ``ValueError`` with one line naming the value.
    """
    m = _DEVICE_RE.match(str(device))
    if m is None or (m.group(1) != "cuda" and m.group(2)):
        raise ValueError(f"{what} {device!r} is not a device: use auto, cpu, cuda or cuda:N")
    kind, index = m.group(1), m.group(3)
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(f"{what} {device!r} asks for a GPU but PyTorch sees no CUDA device; "
                         f"use cpu (or install a CUDA build of torch for this GPU)")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if index is None:
        index = local_rank
    else:
        index = int(index)
        if int(os.environ.get("LOCAL_WORLD_SIZE", 1)) > 1:
            raise ValueError(f"{what} {device!r} would put all {os.environ['LOCAL_WORLD_SIZE']} "
                             f"processes of this node on one GPU; use cuda (each process "
                             f"takes GPU LOCAL_RANK) and CUDA_VISIBLE_DEVICES to pick GPUs")
    count = torch.cuda.device_count()
    if index >= count:
        raise ValueError(f"{what} {device!r}: GPU {index} does not exist, this node has {count}"
                         + (" (LOCAL_RANK picks the GPU under torchrun)" if m.group(3) is None
                            else ""))
    return torch.device("cuda", index)


def init(device: str = "auto", *, what: str = "device",
         timeout: float | None = None) -> torch.device:
    """Join the process group if launched by torchrun; return the device this process uses.

    ``device``: see :func:`resolve_device` (on CUDA each process takes GPU ``LOCAL_RANK``);
    ``what``: the option's name for error messages; ``timeout``: seconds a collective may wait
    (:func:`timeout_seconds`). NCCL on CUDA, gloo on CPU.
    """
    dev = resolve_device(device, what)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, device_id=dev if dev.type == "cuda" else None,
                                timeout=datetime.timedelta(seconds=timeout_seconds(timeout)))
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


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s ``obj`` (any picklable value) on every process; ``obj`` on one process."""
    if not is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


_ERRORS = {"ValueError": ValueError, "FileNotFoundError": FileNotFoundError, "OSError": OSError}


def decide_on_main(fn):
    """``fn()`` evaluated on rank 0 only; its result on every process.

    For decisions that read local files (does ``checkpoint.pt`` exist?): with a run folder on
    each node's own disk, ranks asking for themselves could disagree and then run loops of
    different lengths, which hangs the job. A ``ValueError`` or ``OSError`` raised by ``fn`` on
    rank 0 is raised on every process, so all stop together.
    """
    if not is_dist():
        return fn()
    box: list = [None]
    if is_main():
        try:
            box[0] = ("ok", fn())
        except (ValueError, OSError) as err:
            box[0] = ("error", type(err).__name__ if type(err).__name__ in _ERRORS else
                      "OSError", str(err))
    dist.broadcast_object_list(box, src=0)
    if box[0][0] == "error":
        raise _ERRORS[box[0][1]](box[0][2])
    return box[0][1]


def file_digest(path: str) -> str | None:
    """SHA-256 of a file's bytes (hex), or None if there is no such file."""
    if not os.path.isfile(path):
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _stat(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def share_file(path: str) -> int:
    """Make rank 0's file ``path`` (the same string on every process) readable, byte for byte,
    at ``path`` on every process; returns the number of processes that received a copy.

    A process whose file has rank 0's size and modification time (a shared file system) keeps
    it without reading it; the others compare SHA-256 digests with rank 0's, and those whose file
    is missing (a per-node run folder on a local disk) or differs receive rank 0's bytes and
    write them atomically. Every process must call it (a collective); a no-op on one process.
    """
    if not is_dist():
        return 0
    main_stat = broadcast_object(_stat(path))
    if main_stat is None:
        raise FileNotFoundError(f"{path}: rank 0 cannot read the file it chose")
    same = [None] * world_size()
    dist.all_gather_object(same, _stat(path) == main_stat)
    if all(same):
        return 0
    mine = file_digest(path) if is_main() or not same[rank()] else None
    main_digest = broadcast_object(mine)
    needs = [None] * world_size()
    dist.all_gather_object(needs, not same[rank()] and mine != main_digest)
    if not any(needs):
        return 0
    data = None
    if is_main():
        with open(path, "rb") as f:
            data = f.read()
    data = broadcast_object(data)
    if needs[rank()]:
        with atomic_write(path, "wb") as f:
            f.write(data)
    barrier()
    return sum(bool(n) for n in needs)


def all_reduce_sum(values: list | torch.Tensor, device=None) -> list[float]:
    """Sum numbers over all processes (float64); returns the same numbers on one process.

    ``values``: numbers and/or 0-d tensors (e.g. running sums kept on a GPU); they are stacked
    where they live and read back once, after the reduction.
    """
    if isinstance(values, torch.Tensor):
        t = values.detach().to(torch.float64).flatten()
    else:
        where = next((v.device for v in values if isinstance(v, torch.Tensor)), None)
        t = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=where).detach().reshape(())
                         for v in values]) if len(values) else torch.zeros(0, dtype=torch.float64)
    if is_dist():
        if dist.get_backend() == "nccl":
            t = t.to(device or torch.device("cuda", torch.cuda.current_device()))
        else:
            t = t.cpu()
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
            model = cast(torch.nn.Module, model._orig_mod)
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

    def epoch_order(self) -> list[int]:
        """This process's whole share of the current epoch, in order (``set_start`` ignored)."""
        return list(super().__iter__())

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


def rank_world(by_hand_rank: int | None, by_hand_world: int | None) -> tuple[int, int, bool]:
    """``(rank, world_size, collective)`` of an evaluation shard.

    Given both numbers, a shard run by hand (no collectives: ``collective`` False); given
    neither, this process's rank in torch.distributed (``collective`` when a group is joined).
    """
    if by_hand_rank is not None or by_hand_world is not None:
        if by_hand_rank is None or by_hand_world is None or \
                not 0 <= by_hand_rank < by_hand_world:
            raise ValueError(f"give both rank and world_size with 0 <= rank < world_size, "
                             f"got rank={by_hand_rank}, world_size={by_hand_world}")
        return int(by_hand_rank), int(by_hand_world), False
    return rank(), world_size(), is_dist()
