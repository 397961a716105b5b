"""Building a training job (:class:`Job`) from a config: checks, data, model, optimizer,
schedule, resume, the run folder, wrappers and the recipe of ``attack.mode``.

Nothing is written into the run directory until the run is accepted: a refused or failed set-up
leaves the folder (and a finished run in it) exactly as it was.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import cast

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from featdenoise.data.datasets import SeededDataset, build_dataset
from featdenoise.hub import checkpoints as ckpt
from featdenoise.hub.build import build_model, check_model
from featdenoise.models import model_in_channels
from featdenoise.runtime import backends
from featdenoise.runtime import distributed as dist
from featdenoise.training import parts, resume, rundir
from featdenoise.training.config import Config
from featdenoise.training.metrics import MetricsLogger
from featdenoise.training.recipes import Recipe, recipe_class
from featdenoise.training.step import State, StepContext


@dataclass
class TrainData:
    """The run's images: the seeded, sharded training set and its loader (full batches of
    ``data.batch_size`` per process), and the validation set."""

    train_set: SeededDataset
    loader: DataLoader
    sampler: dist.TrainSampler
    val_set: Dataset
    steps_per_epoch: int  # full batches per process per epoch


@dataclass
class Job:
    """Everything one training run holds (built by :func:`build_job`)."""

    ctx: StepContext  # config, device, loss, optimizer, schedule
    data: TrainData
    model: nn.Module  # the plain module: checkpoints, attack, evaluation
    net: nn.Module  # what the update runs: DDP and/or compiled wrapper of ``model``
    recipe: Recipe  # what attack.mode does with each batch and after each epoch
    logger: MetricsLogger
    bar: tqdm
    state: State
    saved_step: int | None = None  # global step of the newest checkpoint (None: none exists)

    @property
    def cfg(self) -> Config:
        return self.ctx.cfg

    @property
    def device(self) -> torch.device:
        return self.ctx.device

    @property
    def total_steps(self) -> int:
        return self.data.steps_per_epoch * self.cfg.optim.epochs

    @property
    def checkpoint_path(self) -> str:
        return os.path.join(self.cfg.run.out_dir, ckpt.CHECKPOINT)

    def save(self) -> None:
        """Checkpoint from the unwrapped model, written by the main process only (every process
        calls it: the recipe's state may be a collective)."""
        extra = self.recipe.state_dict()
        dist.sync_buffers(self.model)
        if dist.is_main():
            s = self.state
            ckpt.save_checkpoint(
                self.checkpoint_path, model=dist.unwrap(self.model),
                model_name=self.cfg.model.name, model_kwargs=dict(self.cfg.model.kwargs),
                optimizer=self.ctx.optimizer, config=self.cfg.to_dict(), extra=extra or None,
                position=ckpt.Position(epoch=s.epoch, step_in_epoch=s.step_in_epoch, step=s.step,
                                       schedule_step=self.ctx.schedule.step))
        dist.barrier()
        self.saved_step = self.state.step


def _build_data(cfg: Config) -> tuple[SeededDataset, Dataset]:
    """Training set (seeded augmentation) and validation set of ``cfg.data``."""
    d = cfg.data
    train_set = build_dataset(d.name, d.root, "train", augment=d.augment,
                              image_size=d.image_size, strict=d.strict, subset=d.train_subset,
                              subset_seed=cfg.run.seed)
    val_set = build_dataset(d.name, d.root, "val", augment=False, image_size=d.image_size,
                            strict=d.strict, subset=d.val_subset, subset_seed=cfg.run.seed)
    return SeededDataset(train_set, cfg.run.seed), val_set


def _data(cfg: Config, device: torch.device) -> TrainData:
    """The data sets, this process's shard of the training set and its loader."""
    train_set, val_set = _build_data(cfg)
    d = cfg.data
    sampler = dist.TrainSampler(train_set, seed=cfg.run.seed)
    if sampler.num_samples < d.batch_size:
        raise ValueError(f"data.batch_size={d.batch_size} exceeds the {sampler.num_samples} "
                         f"training images of this process; lower it or raise data.train_subset")
    # Page-locked batches for asynchronous copies to a GPU; workers kept alive across epochs and
    # evaluations (start-up of d.workers processes per epoch otherwise).
    # A private generator: the loader's base seed must not consume the training RNG.
    gen = torch.Generator().manual_seed(cfg.run.seed)
    loader = DataLoader(train_set, batch_size=d.batch_size, sampler=sampler, drop_last=True,
                        generator=gen, num_workers=d.workers, pin_memory=device.type == "cuda",
                        persistent_workers=d.workers > 0)
    steps = parts.steps_per_epoch_for(sampler.num_samples, d.batch_size)
    return TrainData(train_set, loader, sampler, val_set, steps)


def _build_model(cfg: Config, device: torch.device) -> nn.Module:
    """The network of ``cfg.model`` on ``device``, with the run's CUDA numerics."""
    # CUDA numerics of the run: TF32, cuDNN autotuning or deterministic kernels (no-op on CPU).
    backends.configure(device, tf32=cfg.run.tf32, deterministic=cfg.run.deterministic)
    torch.manual_seed(cfg.run.seed)  # identical initial weights on every process
    m = cfg.model
    model = build_model(m.name, dict(m.kwargs), denoise=dict(m.denoise), normalize=m.normalize,
                        init=m.init).to(device)
    if cfg.run.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def _check_model_fits_data(cfg: Config, model: nn.Module, dataset) -> None:
    """One line naming the config key when the data's channels or classes cannot fit the model
    (checked once the data set is built, before anything is written or trained)."""
    x, _ = dataset[0]  # [C, H, W]
    channels = int(x.shape[0])
    want = model_in_channels(model, default=None)
    if want is not None and want != channels:
        raise ValueError(f"model.kwargs.in_channels={want} does not fit data.name="
                         f"{cfg.data.name}: its images have {channels} channel(s); set "
                         f"model.kwargs.in_channels={channels}")
    classes = list(getattr(dataset, "classes", []) or [])
    if classes and all(isinstance(c, int) for c in classes):
        needed = max(classes) + 1  # labels are the class indices themselves
    else:
        needed = len(classes)
    k = getattr(model, "num_classes", None)
    if k is not None and needed > int(k):
        raise ValueError(f"model.kwargs.num_classes={int(k)} does not fit data.name="
                         f"{cfg.data.name}: it has {needed} classes; set "
                         f"model.kwargs.num_classes={needed}")


def _training_parts(cfg: Config, device: torch.device,
                    data: TrainData) -> tuple[nn.Module, StepContext]:
    """Model (checked against the data), optimizer (decay on conv/fc weights only), per-step
    schedule (scaled by the global batch) and loss."""
    model = _build_model(cfg, device)
    _check_model_fits_data(cfg, model, data.val_set)
    optimizer = parts.build_optimizer(model, cfg.optim)
    global_batch = cfg.data.batch_size * dist.world_size()
    schedule = parts.LRSchedule(optimizer, data.steps_per_epoch, cfg.optim, global_batch)
    criterion = parts.loss_fn(cfg.optim.label_smoothing)
    return model, StepContext(cfg, device, criterion, optimizer, schedule)


def _accept(cfg: Config, stale: list[str], resumed: str | None, state: State) -> MetricsLogger:
    """Write the run directory (main process only): stale files of an earlier run deleted
    (``run.resume=never``), the resolved config, a fresh metrics file when starting from
    scratch, TensorBoard logs. Returns the metrics logger."""
    run_dir = cfg.run.out_dir
    if dist.is_main():
        removed = rundir.prepare_run_dir(cfg, stale)
        if removed:
            tqdm.write(f"run.resume=never: deleted the earlier run's "
                       f"{', '.join(os.path.relpath(p, run_dir) for p in removed)} in {run_dir}")
    dist.barrier()
    logger = MetricsLogger(run_dir, enabled=dist.is_main(), tensorboard=cfg.run.tensorboard)
    if resumed is not None:
        logger.log("resume", state.step, state.epoch, {"from": resumed})
    return logger


def _wrap(cfg: Config, model: nn.Module, device: torch.device) -> tuple[nn.Module, nn.Module]:
    """``(net, attack_net)``: DDP for the update, ``torch.compile`` if asked; the attack sees
    the plain module (compiled too if asked)."""
    net, attack_net = dist.wrap_model(model, device), model
    if cfg.run.compile:
        # torch.compile of a module is a module (an OptimizedModule wrapping it).
        net, attack_net = cast(nn.Module, torch.compile(net)), cast(nn.Module, torch.compile(model))
    return net, attack_net


def build_job(cfg: Config, device: torch.device) -> Job:
    """Check everything, then build data, model, optimizer, schedule, resume if asked, write the
    run directory, wrap the model and build the recipe (see the module docstring)."""
    # Checks that read only: the checkpoint to resume from, the model name and kwargs, and what
    # the run folder already holds (files of another program or stale exports: refused).
    resumed = resume.resume_path(cfg)
    check_model(cfg)
    stale = rundir.check_run_dir(cfg, resumed)
    # Data: seeded augmentation, sharded samplers.
    data = _data(cfg, device)
    # Model, optimizer, schedule, loss; the position.
    model, ctx = _training_parts(cfg, device, data)
    state = State(targeted=cfg.attack.targeted)
    # Resume: weights, optimizer, schedule, position and RNG states from the last checkpoint.
    extra = resume.restore(resumed, model, state, ctx) if resumed is not None else {}
    # Accepted: now the run directory is written.
    logger = _accept(cfg, stale, resumed, state)
    # Wrappers, then the recipe of attack.mode (its adversary runs on attack_net) and its state.
    net, attack_net = _wrap(cfg, model, device)
    job_recipe = recipe_class(cfg).build(cfg, model, attack_net, data.val_set, device)
    job_recipe.load_state_dict(extra, device)
    total_steps = data.steps_per_epoch * cfg.optim.epochs
    bar = tqdm(total=total_steps, initial=state.step, unit="step", dynamic_ncols=True,
               disable=not (dist.is_main() and cfg.run.progress))
    return Job(ctx, data, model, net, job_recipe, logger, bar, state,
               saved_step=state.step if resumed is not None else None)
