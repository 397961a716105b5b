"""Helpers shared by the test modules (no test module imports another): paths, small files in
the standard formats, in-process CLI runs, two-process set-up, and tiny models, datasets and
training configs whose numbers the tests know.

Pytest puts ``tests/`` on ``sys.path`` (``pythonpath`` in pyproject.toml), so a test module says
``from helpers import ...``; so does a worker process it starts.
"""

from __future__ import annotations

import gzip
import os
import signal
import socket
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from featdenoise.cli import main
from featdenoise.hub import checkpoints as ckpt
from featdenoise.runtime import distributed as dist
from featdenoise.training.config import load_config

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
OFFICIAL = TESTS / "fixtures" / "official"  # the authors' TF networks' reference outputs


def write_idx(path, array: np.ndarray) -> None:
    """Write ``array`` (any shape, values 0..255) as a gzipped IDX file of unsigned bytes."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def write_random_fashion_mnist(folder, n_train: int, n_test: int, seed: int = 0) -> None:
    """A Fashion-MNIST-format folder (``folder`` must exist) of random 28x28 images and random
    labels 0..9: ``n_train`` in the train files, ``n_test`` in the t10k files."""
    rng = np.random.default_rng(seed)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, n))


def write_idx_folder(root: Path, n: int = 24) -> Path:
    """A tiny Fashion-MNIST folder: the four gzipped IDX files with ``n`` random images each."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix in ("train", "t10k"):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return root


def png(path: Path, value: int = 128, size: int = 20) -> Path:
    Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(path)
    return path


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes (to prove nothing changed)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the process group's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def as_rank(rank: int, world: int, port: int) -> None:
    """In a worker process: the environment torchrun would give rank ``rank`` of ``world`` on
    this machine, and one torch thread (two workers share the 2 cores)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)


def run_cli(capsys, *argv: str) -> tuple[int, list[str]]:
    """Run ``featdenoise ARGV`` in-process -> (exit status, the lines written to stderr)."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as stop:  # argparse's own errors
        code = stop.code
    return code, capsys.readouterr().err.strip().splitlines()


def one_error(capsys, *argv: str) -> str:
    """The command fails with exit status 2 and exactly one line on stderr; that line."""
    code, lines = run_cli(capsys, *argv)
    assert code == 2 and len(lines) == 1, (code, lines)
    return lines[0]


CONVBN_CLASSES = 5


class ConvBNNet(nn.Module):
    """Conv-BN pairs as children (foldable), optionally a pair whose BN runs BEFORE its conv."""

    def __init__(self, swapped: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.swapped = swapped
        self.conv = nn.Conv2d(3, 3, 3, padding=1, bias=True)
        self.bn = nn.BatchNorm2d(3)
        self.head = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=False),
                                  nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                                  nn.Linear(64, CONVBN_CLASSES))
        for bn in (self.bn, self.head[1]):
            with torch.no_grad():
                bn.running_mean.uniform_(-0.5, 0.5)
                bn.running_var.uniform_(0.3, 3.0)
                bn.weight.uniform_(0.5, 2.0)
                bn.bias.uniform_(-0.5, 0.5)
        self.num_classes = CONVBN_CLASSES

    def forward(self, x):
        h = self.conv(self.bn(x)) if self.swapped else self.bn(self.conv(x))
        return self.head(torch.relu(h))


def images(n: int = 6, size: int = 8) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(1))


def logits_and_grad(model: nn.Module, x: torch.Tensor):
    """Logits and the input gradient of their sum of squares (a loss that mixes all classes)."""
    x = x.detach().requires_grad_(True)
    out = model(x)
    (g,) = torch.autograd.grad(out.pow(2).sum(), x)
    return out.detach(), g


def fit_with_noise(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int,
                   batch: int, noise: float, lr: float, generator: torch.Generator) -> nn.Module:
    """Adam on shuffled batches of ``x`` [N, C, H, W] in [0, 1], each with uniform noise of
    +-``noise`` (a little robustness, so some images survive an attack); returns ``model`` in
    eval mode. ``generator`` draws the order and the noise."""
    opt = torch.optim.Adam(model.parameters(), lr)
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=generator)
        for i in range(0, len(x), batch):
            b = perm[i:i + batch]
            shaken = (x[b] + (torch.rand(x[b].shape, generator=generator) * 2 - 1) * noise)
            loss = nn.functional.cross_entropy(model(shaken.clamp(0, 1)), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


QUADRANT_CLASSES = 4  # classes


class Quadrants(nn.Module):
    """Class k = brightest quadrant of an 8x8 grey image; a linear model an attack can fool.

    Logit k is the sum of quadrant k, so a pixel budget eps moves a logit gap by at most
    2 * 16 * eps: images with a small brightness margin flip at eps 0.25, bright ones do not.
    """

    num_classes = QUADRANT_CLASSES

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(64, QUADRANT_CLASSES, bias=False)
        w = torch.zeros(QUADRANT_CLASSES, 8, 8)
        for k in range(QUADRANT_CLASSES):
            r, c = divmod(k, 2)
            w[k, 4 * r:4 * r + 4, 4 * c:4 * c + 4] = 1.0
        with torch.no_grad():
            self.linear.weight.copy_(w.flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1))  # [N, 1, 8, 8] -> [N, 64] -> [N, QUADRANT_CLASSES]


class QuadrantData(torch.utils.data.Dataset):
    """``n`` images ``[1, 8, 8]`` in [0, 1]; label = bright quadrant, brightness margin varies."""

    def __init__(self, n: int = 14, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.y = torch.arange(n) % QUADRANT_CLASSES
        self.x = 0.2 + 0.1 * torch.rand(n, 1, 8, 8, generator=g)
        margin = 0.2 + 0.5 * torch.rand(n, generator=g)
        for i in range(n):
            r, c = divmod(int(self.y[i]), 2)
            self.x[i, 0, 4 * r:4 * r + 4, 4 * c:4 * c + 4] += margin[i]

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i], int(self.y[i])


def folder_dataset(root, n=6):
    """A flat folder of PNGs and a labels CSV from :class:`QuadrantData` (3 channels)."""
    from featdenoise.data.files import save_image

    data = QuadrantData(n)
    folder = root / "images"
    lines = []
    for i in range(n):
        x, y = data[i]
        save_image(x.expand(3, -1, -1), str(folder / f"im{i:02d}.png"))
        lines.append(f"im{i:02d}.png,{y}")
    (root / "labels.csv").write_text("filename,label\n" + "\n".join(lines) + "\n")
    return folder, root / "labels.csv"


def tiny_checkpoint(root, name="net"):
    from featdenoise.hub.checkpoints import save_weights
    from featdenoise.models import create_model

    kw = dict(in_channels=3, num_classes=QUADRANT_CLASSES, width=4, blocks=[1, 1, 1])
    torch.manual_seed(0)
    model = create_model("small_resnet", **kw)
    os.makedirs(root / name, exist_ok=True)
    save_weights(str(root / name / "model.safetensors"), model, "small_resnet", kw)
    return root / name


def tiny_run_config(out_dir: Path, data: Path | None = None, **run) -> dict:
    """A few steps of a 1-channel small ResNet on 16 images of a tiny Fashion-MNIST folder
    (``data``, or one written beside ``out_dir``); ``run`` overrides the run section."""
    if data is None:
        data = out_dir.parent / "fmnist"
        if not data.exists():
            write_idx_folder(data, n=24)
    return {
        "model": {"name": "small_resnet",
                  "kwargs": {"in_channels": 1, "num_classes": 10, "width": 4, "blocks": [1, 1, 1]}},
        "data": {"name": "fashion_mnist", "root": str(data), "train_subset": 16,
                 "val_subset": 8, "batch_size": 4, "workers": 0},
        "attack": {"steps": 1, "eps": 8.0, "step_size": 2.0},
        "optim": {"epochs": 1, "lr": 0.05, "base_batch": 4, "warmup_epochs": 0,
                  "milestones": [10]},
        "run": {"out_dir": str(out_dir), "checkpoint_every": 1, "eval_every": 0,
                "final_eval_steps": 0, "log_every": 1, "tensorboard": False,
                "progress": False, "device": "cpu", **run},
    }


def tiny_epoch_config(out_dir: Path, data: Path, **run) -> dict:
    """4 steps (one epoch) of a tiny small ResNet on 16 Fashion-MNIST-like images, checkpoints
    only at the epoch end."""
    return tiny_run_config(out_dir, data, **{"checkpoint_every": 0, **run})


def write_learnable_idx_folder(folder, n_train=48, n_val=10, seed=0):
    """Four Fashion-MNIST IDX .gz files; labels depend on the mean brightness (learnable)."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_val)):
        x = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        y = (x.reshape(n, -1).mean(1) > 127.5).astype(np.uint8)
        write_idx(os.path.join(folder, f"{prefix}-images-idx3-ubyte.gz"), x)
        write_idx(os.path.join(folder, f"{prefix}-labels-idx1-ubyte.gz"), y)


def tiny_config(tmp_path, *extra):
    data = tmp_path / "fmnist"
    if not data.exists():
        write_learnable_idx_folder(data)
    return load_config(None, [
        "model.name=small_resnet", "model.kwargs={in_channels: 1, width: 4, blocks: [1, 1, 1]}",
        "data.name=fashion_mnist", f"data.root={data}", "data.batch_size=8", "data.workers=0",
        "data.augment=true", "attack.steps=2", "attack.eps=16", "attack.step_size=4",
        "optim.epochs=2", "optim.milestones=[1]", "optim.base_batch=8",
        f"run.out_dir={tmp_path / 'run'}", "run.eval_every=1", "run.eval_attack_steps=1",
        "run.final_eval_steps=2", "run.log_every=2", "run.checkpoint_every=4",
        "run.progress=false", "run.tensorboard=false", *extra])


def run_weights(run_dir):
    from safetensors.torch import load_file

    return load_file(os.path.join(run_dir, ckpt.WEIGHTS))


def train_worker(rank, world, port, cfg_dict, out_dir):
    as_rank(rank, world, port)
    from featdenoise.training import loop as lp
    from featdenoise.training.config import from_dict

    real_eval = lp.evaluate

    def spy(model, loader, **kw):  # record this rank's final weights before the final eval
        if kw.get("desc") == "final eval":
            state = dist.unwrap(model).state_dict()
            torch.save(state, os.path.join(out_dir, f"rank{dist.rank()}.pt"))
        return real_eval(model, loader, **kw)

    lp.evaluate = spy
    lp.train(from_dict(cfg_dict))


def train_two_ranks(cfg, out_dir: Path) -> tuple[dict, dict]:
    """Train ``cfg`` (a Config) on two gloo processes; each rank's final weights, as
    :func:`train_worker` saved them into ``out_dir``."""
    import torch.multiprocessing as mp

    # fork: the children inherit the imported modules (spawn re-imports torch: much slower).
    mp.start_processes(train_worker, args=(2, free_port(), cfg.to_dict(), str(out_dir)),
                       nprocs=2, join=True, start_method="fork")
    return (torch.load(out_dir / "rank0.pt", weights_only=True),
            torch.load(out_dir / "rank1.pt", weights_only=True))


class EvalNet(torch.nn.Module):
    """A fixed random linear classifier of 1x6x6 images; optionally SIGKILLs its own process
    at its ``kill_at``-th forward pass (the crash the test survives)."""

    num_classes = 4

    def __init__(self, kill_at: int | None = None):
        super().__init__()
        torch.manual_seed(0)
        self.linear = torch.nn.Linear(36, 4)
        self.kill_at, self.calls = kill_at, 0

    def forward(self, x):
        self.calls += 1
        if self.kill_at is not None and self.calls >= self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return self.linear(x.flatten(1)) * 4.0


def eval_data() -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(1)
    x = torch.rand(20, 1, 6, 6, generator=g)
    return torch.utils.data.TensorDataset(x, torch.arange(20) % 4)


EVAL_SETTINGS = dict(steps=[2, 4], eps=0.1, step_size=0.02, batch_size=4, seed=5,
                     device="cpu", progress=False)
