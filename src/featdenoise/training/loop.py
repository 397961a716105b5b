"""The adversarial training loop (paper Sec. 5), as small functions with one comment per step.

:func:`train` runs a whole job from a :class:`featdenoise.config.Config`: it joins the process
group (torchrun) if there is one, builds data, model, optimizer and attack, resumes from the run
directory's checkpoint when asked, trains with per-step learning rates, evaluates clean and PGD
accuracy every ``run.eval_every`` epochs and with ``run.final_eval_steps`` at the end, and writes
``config.yaml``, ``metrics.jsonl``, TensorBoard logs, ``checkpoint.pt`` and ``model.safetensors``
into ``run.out_dir`` (main process only).
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from featdenoise.config import Config, load_config, save_config
from featdenoise.data.datasets import SeededDataset, build_dataset, drop_skipped
from featdenoise.runtime import backends
from featdenoise.runtime import distributed as dist
from featdenoise.training import checkpoint as ckpt
from featdenoise.training import recipe
from featdenoise.training.logging import MetricsLogger


class NonFiniteLossError(ValueError):
    """The training loss became NaN or infinite; no update with a non-finite gradient reached
    the weights or a checkpoint."""


@dataclass
class State:
    """Where training stands: the next step to run is ``step`` (global), ``step_in_epoch`` of
    ``epoch``; counters for the running averages since the last log line."""

    epoch: int = 0
    step_in_epoch: int = 0
    step: int = 0
    sums: dict = field(default_factory=lambda: {"loss": 0.0, "correct": 0.0, "hit": 0.0,
                                                "n": 0.0, "skipped": 0.0})
    epoch_skipped: int = 0
    tick: float = field(default_factory=time.perf_counter)
    # First global step whose gradients were not finite, as a tensor on the training device
    # (-1: none); read on the host only at check steps (see train_step).
    nonfinite: torch.Tensor | None = None


# ---------------------------------------------------------------------------------------------
# Set-up


def _as_config(config) -> Config:
    if isinstance(config, Config):
        return config
    if isinstance(config, dict):
        return load_config(base=config)
    return load_config(config)


def _build_data(cfg: Config):
    d = cfg.data
    train_set = build_dataset(d.name, d.root, "train", augment=d.augment,
                              image_size=d.image_size, strict=d.strict, subset=d.train_subset,
                              subset_seed=cfg.run.seed)
    val_set = build_dataset(d.name, d.root, "val", augment=False, image_size=d.image_size,
                            strict=d.strict, subset=d.val_subset, subset_seed=cfg.run.seed)
    return SeededDataset(train_set, cfg.run.seed), val_set


def _loaders(cfg: Config, train_set, val_set, device):
    d = cfg.data
    sampler = dist.TrainSampler(train_set, seed=cfg.run.seed)
    if sampler.num_samples < d.batch_size:
        raise ValueError(f"data.batch_size={d.batch_size} exceeds the {sampler.num_samples} "
                         f"training images of this process; lower it or raise data.train_subset")
    # Page-locked batches for asynchronous copies to a GPU; workers kept alive across epochs and
    # evaluations (start-up of d.workers processes per epoch otherwise).
    common = dict(num_workers=d.workers, pin_memory=device.type == "cuda",
                  persistent_workers=d.workers > 0)
    # A private generator: the loader's base seed must not consume the training RNG.
    gen = torch.Generator().manual_seed(cfg.run.seed)
    train_loader = DataLoader(train_set, batch_size=d.batch_size, sampler=sampler,
                              drop_last=True, generator=gen, **common)
    val_loader = DataLoader(val_set, batch_size=d.eval_batch_size or d.batch_size,
                            sampler=dist.ShardSampler(len(val_set)), **common)
    return train_loader, val_loader, sampler


def _build_model(cfg: Config, device):
    from featdenoise.models import create_model

    # CUDA numerics of the run: TF32, cuDNN autotuning or deterministic kernels (no-op on CPU).
    backends.configure(device, tf32=cfg.run.tf32, deterministic=cfg.run.deterministic)
    torch.manual_seed(cfg.run.seed)  # identical initial weights on every process
    model = create_model(cfg.model.name, **dict(cfg.model.kwargs)).to(device)
    if cfg.run.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def _autocast(cfg: Config, device):
    if not cfg.run.bf16:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def _to_device(x, y, cfg: Config, device):
    x = x.to(device, non_blocking=True)
    if cfg.run.channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y.to(device, non_blocking=True)


def _resume_path(cfg: Config) -> str | None:
    """The checkpoint to resume from, decided by rank 0 and the same file on every process.

    Each rank asking for itself could disagree when ``run.out_dir`` is on each node's own disk
    (rank 0 resumes, the others restart at step 0, loops differ in length and the job hangs).
    Rank 0 decides (:func:`resume_decision`), every process gets its path, and a process whose
    copy is missing or differs receives rank 0's bytes, so all resume from the same step.
    """
    path = dist.decide_on_main(lambda: resume_decision(cfg))
    if path is not None:
        dist.share_file(path)
    return path


def resume_decision(cfg: Config) -> str | None:
    """``run.resume`` as read on this process: ``auto`` -> ``out_dir/checkpoint.pt`` if it is a
    file, else None; ``never`` -> None; a path -> that path (FileNotFoundError if missing)."""
    r = cfg.run.resume
    if r == "never":
        return None
    if r == "auto":
        path = os.path.join(cfg.run.out_dir, ckpt.CHECKPOINT)
        return path if os.path.isfile(path) else None
    if not os.path.isfile(r):
        raise FileNotFoundError(f"run.resume={r}: no such checkpoint file")
    return r


def _check_compatible(saved: dict, cfg: Config, path: str) -> None:
    now = cfg.to_dict()
    for section in ("model", "optim", "attack"):
        if saved.get(section) != now[section]:
            raise ValueError(f"checkpoint {path} was written with a different '{section}' config; "
                             f"use a new run.out_dir or run.resume=never")
    if saved["data"]["batch_size"] != now["data"]["batch_size"]:
        raise ValueError(f"checkpoint {path} used data.batch_size={saved['data']['batch_size']}; "
                         f"resume with the same batch size")


# ---------------------------------------------------------------------------------------------
# Steps


def train_step(model, attack, criterion, optimizer, schedule, x, y, state: State, cfg: Config,
               device) -> None:
    """One synchronized SGD step on an adversarial-only minibatch.

    No host synchronisation on ordinary steps: loss and accuracy sums stay on the device until
    the log step all-reduces them. Non-finite gradients (a NaN or infinite loss on any process:
    DDP's all-reduce spreads it to every process's gradients, so all processes agree without an
    extra collective) are zeroed on the device before the update, so they never reach the
    weights, and the step is remembered; the host reads that flag only on steps followed by a
    log line, a ``checkpoint_every`` checkpoint or ``stop_after``, and then stops with
    :class:`NonFiniteLossError`. Trade-off: between the bad step and that check (at most
    ``run.log_every - 1`` steps) updates carry no gradient (momentum and weight decay still act),
    and an end-of-epoch checkpoint in that window holds those finite weights.
    """
    # Attack randomness (coin, targets, random start) is a function of (seed, step, rank), so a
    # resumed run, whatever its world size, draws exactly what the interrupted one would have.
    torch.manual_seed((cfg.run.seed * 1_000_003 + state.step) * 4099 + dist.rank())
    # Learning rate for this global step (warm-up and milestones are functions of the step).
    schedule.apply(state.step)
    # Craft the adversarial batch: targeted PGD, BN in inference mode (the attack switches it).
    with _autocast(cfg, device):
        x_adv, target, _ = attack(x, y)
    # Update on the adversarial images only, BN in training mode.
    model.train()
    with _autocast(cfg, device):
        logits = model(x_adv)
        loss = criterion(logits.float(), y)
    # Backward (DDP averages gradients across processes).
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    # Non-finite gradients are zeroed on the device and their step remembered (no host sync).
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if state.nonfinite is None:
        state.nonfinite = torch.full((), -1, dtype=torch.int64, device=device)
    if grads:
        bad = ~torch.nn.utils.get_total_norm(grads).isfinite()  # one fused reduction
        for g in grads:
            g.masked_fill_(bad, 0.0)
        first = state.nonfinite < 0
        state.nonfinite.masked_fill_(bad & first, state.step)
    # SGD step.
    optimizer.step()
    # Running metrics, summed on the device (read at log steps).
    with torch.no_grad():
        pred = logits.argmax(1)
        s = state.sums
        s["loss"] += loss.detach().float() * len(y)
        s["correct"] += (pred == y).sum()
        s["hit"] += (pred == target).sum() if target is not None else 0.0
        s["n"] += len(y)
    _check_finite(state, cfg)


def _check_due(step: int, cfg: Config) -> bool:
    """True when global step ``step`` is followed by a log line, a periodic checkpoint or a stop."""
    r, after = cfg.run, step + 1
    return (after % r.log_every == 0 or (r.checkpoint_every and after % r.checkpoint_every == 0)
            or r.stop_after == after)


def _check_finite(state: State, cfg: Config) -> None:
    """Raise :class:`NonFiniteLossError` at a check step if a step had non-finite gradients."""
    if not _check_due(state.step, cfg) or state.nonfinite is None:
        return
    bad = int(state.nonfinite)  # the one host sync, at check steps only
    if bad < 0:
        return
    path = os.path.join(cfg.run.out_dir, ckpt.CHECKPOINT)
    saved = "no checkpoint has been written yet"
    if os.path.isfile(path):
        try:
            step = ckpt.load_checkpoint(path)["step"]
            saved = (f"{path} holds step {step} (finite weights: the non-finite update was "
                     f"not applied)")
        except (ValueError, OSError):
            saved = f"{path} exists but cannot be read"
    raise NonFiniteLossError(
        f"non-finite training loss or gradient at step {bad} (stopped at step {state.step}, "
        f"epoch {state.epoch}); {saved}: lower optim.lr or check the data")


def evaluate(model, loader, *, steps: int, eps: float, step_size: float, cfg: Config, device,
             seed: int = 0, desc: str = "eval") -> dict:
    """Clean and targeted-PGD accuracy over the whole validation set, each image counted once.

    Returns ``{"clean_acc", "adv_acc", "attack_success", "n"}`` (fractions; ``adv_*`` only when
    ``steps > 0``), all-reduced over processes. PGD starts at a random point (official eval).
    """
    net = dist.unwrap(model)
    dist.sync_buffers(net)  # every process evaluates rank 0's network
    was_training = net.training
    net.eval()
    pgd = None
    if steps > 0:
        from featdenoise.attacks import PGD

        pgd = PGD(net, eps=eps, step_size=step_size, steps=steps, targeted=cfg.attack.targeted,
                  random_start=True)
    sums = [0.0, 0.0, 0.0, 0.0]  # clean correct, adv correct, target hits, images
    bar = tqdm(loader, desc=desc, leave=False, disable=not (dist.is_main() and cfg.run.progress))
    # Private RNG so evaluation neither depends on nor disturbs the training random stream.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed * 1000 + dist.rank())
        for x, y in bar:
            x, y, _ = drop_skipped(x, y)
            if len(y) == 0:
                continue
            x, y = _to_device(x, y, cfg, device)
            with torch.no_grad(), _autocast(cfg, device):
                sums[0] += (net(x).argmax(1) == y).sum().item()
            if pgd is not None:
                with _autocast(cfg, device):
                    x_adv = pgd(x, y)
                with torch.no_grad(), _autocast(cfg, device):
                    pred = net(x_adv).argmax(1)
                sums[1] += (pred == y).sum().item()
                sums[2] += (pred == pgd.last_target).sum().item()
            sums[3] += len(y)
    net.train(was_training)
    clean, adv, hit, n = dist.all_reduce_sum(sums, device)
    out = {"clean_acc": clean / max(n, 1), "n": int(n)}
    if pgd is not None:
        out.update(adv_acc=adv / max(n, 1), attack_success=hit / max(n, 1), attack_steps=steps)
    return out


def _log_train(state: State, schedule, logger: MetricsLogger, bar, device) -> None:
    """All-reduce the running sums, write one train record, update the bar, reset the sums."""
    s = state.sums
    loss, correct, hit, n, skipped = dist.all_reduce_sum(
        [s["loss"], s["correct"], s["hit"], s["n"], s["skipped"]], device)
    now = time.perf_counter()
    state.epoch_skipped += int(skipped)
    state.sums = {k: 0.0 for k in s}
    if n == 0:
        return
    values = {"loss": loss / max(n, 1), "adv_acc": correct / max(n, 1),
              "attack_success": hit / max(n, 1), "lr": schedule.lr(),
              "img_per_s": n / max(now - state.tick, 1e-9)}
    logger.log("train", state.step, state.epoch, values)
    bar.set_postfix({"img/s": f"{values['img_per_s']:.0f}", "loss": f"{values['loss']:.3f}",
                     "adv_acc": f"{values['adv_acc']:.3f}", "lr": f"{values['lr']:.3g}"})
    state.tick = now


def _save(path, model, cfg, optimizer, schedule, state: State) -> None:
    """Checkpoint from the unwrapped model, on the main process only."""
    dist.sync_buffers(model)
    if dist.is_main():
        ckpt.save_checkpoint(path, model=dist.unwrap(model), model_name=cfg.model.name,
                             model_kwargs=dict(cfg.model.kwargs), optimizer=optimizer,
                             schedule_step=schedule.step, epoch=state.epoch,
                             step_in_epoch=state.step_in_epoch, step=state.step,
                             config=cfg.to_dict())
    dist.barrier()


# ---------------------------------------------------------------------------------------------
# The job


@dataclass
class Job:
    """Everything one training run holds (built by :func:`_setup`)."""

    cfg: Config
    device: torch.device
    model: torch.nn.Module  # the plain module: checkpoints, attack, evaluation
    net: torch.nn.Module  # what the update runs: DDP and/or compiled wrapper of ``model``
    attack: recipe.TrainAttack
    criterion: torch.nn.Module
    optimizer: torch.optim.Optimizer
    schedule: recipe.LRSchedule
    train_set: SeededDataset
    train_loader: DataLoader
    val_loader: DataLoader
    sampler: dist.TrainSampler
    logger: MetricsLogger
    bar: tqdm
    state: State
    steps_per_epoch: int
    total_steps: int

    @property
    def checkpoint_path(self) -> str:
        return os.path.join(self.cfg.run.out_dir, ckpt.CHECKPOINT)

    def save(self) -> None:
        _save(self.checkpoint_path, self.model, self.cfg, self.optimizer, self.schedule,
              self.state)

    def evaluate(self, steps: int, desc: str) -> dict:
        c = self.cfg
        return evaluate(self.net, self.val_loader, steps=steps, eps=c.attack.eps / 255,
                        step_size=c.attack.step_size / 255, cfg=c, device=self.device,
                        seed=c.run.seed, desc=desc)


def _setup(cfg: Config, device) -> Job:
    """Build run directory, data, model, optimizer, schedule, attack; resume if asked."""
    run_dir = cfg.run.out_dir
    # Run directory: resolved config, metrics and TensorBoard logs (main process only); a run
    # that starts from scratch starts a fresh metrics file.
    resume = _resume_path(cfg)
    if dist.is_main():
        save_config(cfg, run_dir)
        metrics_path = os.path.join(run_dir, "metrics.jsonl")
        if resume is None and os.path.exists(metrics_path):
            os.remove(metrics_path)
    dist.barrier()
    logger = MetricsLogger(run_dir, enabled=dist.is_main(), tensorboard=cfg.run.tensorboard)
    # Data: seeded augmentation, sharded samplers.
    train_set, val_set = _build_data(cfg)
    train_loader, val_loader, sampler = _loaders(cfg, train_set, val_set, device)
    steps_per_epoch = recipe.steps_per_epoch_for(sampler.num_samples, cfg.data.batch_size)
    global_batch = cfg.data.batch_size * dist.world_size()
    # Model, optimizer (decay on conv/fc weights only), per-step schedule, loss.
    model = _build_model(cfg, device)
    optimizer = recipe.build_optimizer(model, cfg.optim)
    schedule = recipe.LRSchedule(optimizer, steps_per_epoch, cfg.optim, global_batch)
    criterion = recipe.loss_fn(cfg.optim.label_smoothing)
    state = State()
    # Resume: weights, optimizer, schedule, position and RNG states from the last checkpoint.
    if resume is not None:
        saved = ckpt.load_checkpoint(resume)
        _check_compatible(saved["config"], cfg, resume)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        schedule.load_state_dict(saved["schedule"])
        state.epoch, state.step_in_epoch, state.step = (saved["epoch"], saved["step_in_epoch"],
                                                        saved["step"])
        if dist.world_size() == 1:
            ckpt.set_rng_state(saved["rng"])
        logger.log("resume", state.step, state.epoch, {"from": resume})
    # Wrappers: DDP for the update, torch.compile if asked; the attack sees the plain module.
    net = dist.wrap_model(model, device)
    attack_net = model
    if cfg.run.compile:
        net, attack_net = torch.compile(net), torch.compile(model)
    attack = recipe.TrainAttack(attack_net, cfg.attack.steps, cfg.attack.eps / 255,
                                cfg.attack.step_size / 255, cfg.attack.clean_start_prob,
                                cfg.attack.targeted, fold_bn=not cfg.run.compile,
                                prepack=not cfg.run.compile)
    total_steps = steps_per_epoch * cfg.optim.epochs
    bar = tqdm(total=total_steps, initial=state.step, unit="step", dynamic_ncols=True,
               disable=not (dist.is_main() and cfg.run.progress))
    return Job(cfg, device, model, net, attack, criterion, optimizer, schedule, train_set,
               train_loader, val_loader, sampler, logger, bar, state, steps_per_epoch,
               total_steps)


def _run_epoch(job: Job) -> bool:
    """Train the rest of the current epoch; True if ``run.stop_after`` stopped it early."""
    cfg, state = job.cfg, job.state
    # Epoch order: shuffle by (seed, epoch), skip the batches a resumed run already did.
    job.sampler.set_epoch(state.epoch)
    job.sampler.set_start(state.step_in_epoch * cfg.data.batch_size)
    job.train_set.set_epoch(state.epoch)
    job.bar.set_description(f"epoch {state.epoch + 1}/{cfg.optim.epochs}")
    for x, y in job.train_loader:
        # Drop unreadable files (counted and reported at the end of the epoch).
        x, y, n_bad = drop_skipped(x, y)
        state.sums["skipped"] += n_bad
        # A batch with no readable image skips the step on every process alike.
        empty = len(y) == 0
        if dist.world_size() > 1:
            empty = dist.all_reduce_sum([float(empty)], job.device)[0] > 0
        if not empty:
            x, y = _to_device(x, y, cfg, job.device)
            train_step(job.net, job.attack, job.criterion, job.optimizer, job.schedule, x, y,
                       state, cfg, job.device)
        state.step += 1
        state.step_in_epoch += 1
        job.bar.update(1)
        # Periodic log line and checkpoint; a requested stop after this step.
        if state.step % cfg.run.log_every == 0:
            _log_train(state, job.schedule, job.logger, job.bar, job.device)
        if cfg.run.checkpoint_every and state.step % cfg.run.checkpoint_every == 0:
            job.save()
        if cfg.run.stop_after and cfg.run.stop_after <= state.step < job.total_steps:
            return True
    return False


def _end_epoch(job: Job) -> None:
    """Flush metrics, report skipped files, evaluate every ``eval_every`` epochs, checkpoint."""
    cfg, state = job.cfg, job.state
    _log_train(state, job.schedule, job.logger, job.bar, job.device)
    if state.epoch_skipped and dist.is_main():
        tqdm.write(f"epoch {state.epoch + 1}: skipped {state.epoch_skipped} unreadable "
                   f"image file(s)")
    job.logger.log("epoch", state.step, state.epoch + 1, {"skipped_files": state.epoch_skipped})
    state.epoch_skipped = 0
    done = state.epoch + 1
    if cfg.run.eval_every and done % cfg.run.eval_every == 0 and done < cfg.optim.epochs:
        metrics = job.evaluate(cfg.run.eval_attack_steps, f"eval epoch {done}")
        job.logger.log("eval", state.step, done, metrics)
        if dist.is_main():
            tqdm.write(f"epoch {done}: " + _fmt(metrics))
    state.epoch, state.step_in_epoch = done, 0
    job.save()


def _finish(job: Job) -> None:
    """Final weights (safetensors) and the final evaluation (clean + PGD-final_eval_steps)."""
    cfg = job.cfg
    if dist.is_main():
        ckpt.save_weights(os.path.join(cfg.run.out_dir, ckpt.WEIGHTS), job.model, cfg.model.name,
                          dict(cfg.model.kwargs), {"step": job.state.step})
    metrics = job.evaluate(cfg.run.final_eval_steps, "final eval")
    job.logger.log("final", job.state.step, job.state.epoch, metrics)
    if dist.is_main():
        tqdm.write("final: " + _fmt(metrics))


def fit(cfg: Config, device) -> str:
    """Train by ``cfg`` on ``device`` (process group already joined); see :func:`train`."""
    job = _setup(cfg, device)
    stopped = False
    while job.state.epoch < cfg.optim.epochs and not stopped:
        # One epoch (or its remainder after a resume), then its bookkeeping unless stopped
        # mid-epoch, in which case the position is checkpointed for the next run.
        stopped = _run_epoch(job)
        if stopped and job.state.step_in_epoch < job.steps_per_epoch:
            job.save()
        else:
            _end_epoch(job)
    job.bar.close()
    # Every process holds rank 0's BN statistics from here on; finish unless stopped early.
    dist.sync_buffers(job.model)
    if not stopped:
        _finish(job)
    job.logger.close()
    return cfg.run.out_dir


def _fmt(metrics: dict) -> str:
    parts = [f"clean acc {metrics['clean_acc']:.4f}"]
    if "adv_acc" in metrics:
        parts.append(f"PGD-{metrics['attack_steps']} acc {metrics['adv_acc']:.4f} "
                     f"(attack success {metrics['attack_success']:.4f})")
    return ", ".join(parts) + f" on {metrics['n']} images"


def train(config) -> str:
    """Run a training job and return its run directory.

    ``config``: a :class:`featdenoise.config.Config`, a nested dict of overrides of the defaults,
    or a YAML path. Works as a single process or under ``torchrun`` (one process per GPU or CPU
    worker); the process group is joined here and left at the end if this call created it.
    """
    cfg = _as_config(config)
    created = not dist.is_dist()
    device = dist.init(cfg.run.device)
    try:
        return fit(cfg, device)
    finally:
        if created:
            dist.shutdown()
