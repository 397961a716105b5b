"""The adversarial training loop (paper Sec. 5), as small functions with one comment per step.

:func:`train` runs a whole job from a :class:`featdenoise.training.config.Config`: it joins the process
group (torchrun) if there is one, builds data, model, optimizer and attack, resumes from the run
directory's checkpoint when asked, trains with per-step learning rates, evaluates clean and PGD
accuracy every ``run.eval_every`` epochs and with ``run.final_eval_steps`` at the end, and writes
``config.yaml``, ``metrics.jsonl``, TensorBoard logs, ``checkpoint.pt`` and ``model.safetensors``
into ``run.out_dir`` (main process only).

``attack.mode`` picks the recipe: ``pgd`` (the paper's, :func:`train_step`), ``free`` or ``fast``
(:mod:`featdenoise.training.cheap`: Free-AT's replayed minibatches, Fast-AT's FGSM step and its
per-epoch overfitting check).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from featdenoise.data.datasets import SeededDataset, build_dataset, drop_skipped
from featdenoise.hub import checkpoints as ckpt
from featdenoise.models import model_in_channels
from featdenoise.runtime import backends
from featdenoise.runtime import distributed as dist
from featdenoise.runtime.seeds import derive_seed
from featdenoise.training import cheap, recipe, rundir
from featdenoise.training.config import Config, check_model, load_config
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
    targeted: bool = True
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


def _loaders(cfg: Config, train_set, device):
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
    return train_loader, sampler


def _build_model(cfg: Config, device):
    from featdenoise.hub.build import build_model

    # CUDA numerics of the run: TF32, cuDNN autotuning or deterministic kernels (no-op on CPU).
    backends.configure(device, tf32=cfg.run.tf32, deterministic=cfg.run.deterministic)
    torch.manual_seed(cfg.run.seed)  # identical initial weights on every process
    m = cfg.model
    model = build_model(m.name, dict(m.kwargs), denoise=dict(m.denoise), normalize=m.normalize,
                        init=m.init).to(device)
    if cfg.run.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def _autocast(cfg: Config, device):
    return recipe.autocast(cfg.run.bf16, device)


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
    now, defaults = cfg.to_dict(), Config().to_dict()
    for section in ("model", "optim", "attack"):
        # Keys added after the checkpoint was written take their defaults (same recipe).
        old = saved.get(section)
        if isinstance(old, dict) and section != "model":
            old = {**defaults[section], **old}
        if old != now[section]:
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
    torch.manual_seed(derive_seed(cfg.run.seed, "train-step", state.step, dist.rank()))
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
    recipe.zero_nonfinite_grads(model, state, device)
    # SGD step.
    optimizer.step()
    # Running metrics, summed on the device (read at log steps).
    recipe.add_running_metrics(state.sums, loss, logits, y, target)
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


def evaluate(model, dataset, *, steps: list[int], cfg: Config, device,
             desc: str = "eval") -> dict:
    """Clean and PGD accuracy over the validation set through the evaluation engine.

    ``steps``: PGD iteration counts (empty: clean only). Images, targets and random starts are the
    engine's (the same images as ``featdenoise eval --limit data.val_subset`` with the run's
    seed); each rank evaluates every ``world_size``-th batch and all ranks get every record.
    Returns ``{"clean_acc", "clean_top5", "n"}`` plus, per count k, ``pgd<k>_acc`` and
    ``pgd<k>_top5`` and, for a targeted attack, ``pgd<k>_success`` (fractions).
    """
    from featdenoise.evaluation import engine, metrics
    from featdenoise.evaluation.whitebox import attack_column

    net = dist.unwrap(model)
    dist.sync_buffers(net)  # every process evaluates rank 0's network
    a, targeted = cfg.attack, cfg.attack.targeted
    names = [f"pgd{k}" for k in steps]
    columns = [attack_column(n, "pgd", steps=k, eps=a.eps / 255, step_size=a.step_size / 255,
                             targeted=targeted, bf16=cfg.run.bf16)
               for n, k in zip(names, steps, strict=True)]
    p = engine.plan(net, dataset, columns, batch_size=cfg.data.eval_batch_size
                    or cfg.data.batch_size, seed=cfg.run.seed, targeted=targeted)
    records = engine.run(net, p, None, desc=desc, device=device,
                         num_workers=cfg.data.workers,
                         progress=dist.is_main() and cfg.run.progress)
    s = metrics.summarize(records, names, targeted)
    out = {"clean_acc": s["clean"]["top1"], "clean_top5": s["clean"]["top5"],
           "n": s["num_images"]}
    for entry in s["attacks"]:
        out[f"{entry['name']}_acc"] = entry["accuracy"]
        out[f"{entry['name']}_top5"] = entry["top5"]
        if targeted:
            out[f"{entry['name']}_success"] = entry["success_rate"]
    return out


def eval_steps_due(cfg: Config, epoch: int) -> list[int]:
    """PGD iteration counts to evaluate after ``epoch`` epochs (1-based), before the last one:
    ``eval_attack_steps`` every ``eval_every`` epochs and each ``[steps, every]`` sweep."""
    r = cfg.run
    if not r.eval_every:
        return []
    due = {k for k, every in r.eval_sweeps if epoch % every == 0}
    if epoch % r.eval_every == 0:
        due.add(r.eval_attack_steps)
    return sorted(due)  # 0: clean only


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
    values = {"loss": loss / max(n, 1), "adv_acc": correct / max(n, 1), "lr": schedule.lr(),
              "img_per_s": n / max(now - state.tick, 1e-9)}
    if state.targeted:  # an untargeted attack has no target to hit
        values["attack_success"] = hit / max(n, 1)
    logger.log("train", state.step, state.epoch, values)
    bar.set_postfix({"img/s": f"{values['img_per_s']:.0f}", "loss": f"{values['loss']:.3f}",
                     "adv_acc": f"{values['adv_acc']:.3f}", "lr": f"{values['lr']:.3g}"})
    state.tick = now


def _save(path, model, cfg, optimizer, schedule, state: State, extra: dict | None = None) -> None:
    """Checkpoint from the unwrapped model, on the main process only."""
    dist.sync_buffers(model)
    if dist.is_main():
        ckpt.save_checkpoint(path, model=dist.unwrap(model), model_name=cfg.model.name,
                             model_kwargs=dict(cfg.model.kwargs), optimizer=optimizer,
                             schedule_step=schedule.step, epoch=state.epoch,
                             step_in_epoch=state.step_in_epoch, step=state.step,
                             config=cfg.to_dict(), extra=extra)
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
    val_set: torch.utils.data.Dataset
    sampler: dist.TrainSampler
    logger: MetricsLogger
    bar: tqdm
    state: State
    steps_per_epoch: int
    total_steps: int
    saved_step: int | None = None  # global step of the newest checkpoint (None: none exists)
    free: cheap.FreeState | None = None  # attack.mode=free: the carried perturbation
    guard: cheap.OverfitGuard | None = None  # attack.mode=fast: the overfitting check
    check: tuple | None = None  # its held-out batch (x, y)

    @property
    def checkpoint_path(self) -> str:
        return os.path.join(self.cfg.run.out_dir, ckpt.CHECKPOINT)

    def save(self) -> None:
        extra = {}
        if self.free is not None:
            extra["free_delta"] = self.free.state_dict()  # a collective: every rank calls it
        if self.guard is not None:
            extra["overfit_guard"] = self.guard.state_dict()
        _save(self.checkpoint_path, self.model, self.cfg, self.optimizer, self.schedule,
              self.state, extra or None)
        self.saved_step = self.state.step

    def evaluate(self, steps: list[int], desc: str) -> dict:
        return evaluate(self.net, self.val_set, steps=[k for k in steps if k > 0],
                        cfg=self.cfg, device=self.device, desc=desc)


def _check_model_fits_data(cfg: Config, model: torch.nn.Module, dataset) -> None:
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


def _setup(cfg: Config, device) -> Job:
    """Check everything, then build run directory, data, model, optimizer, schedule, attack and
    resume if asked. Nothing is written into the run directory until the run is accepted: a
    refused or failed set-up leaves the folder (and a finished run in it) exactly as it was."""
    run_dir = cfg.run.out_dir
    # Checks that read only: the checkpoint to resume from, the model name and kwargs, and what
    # the run folder already holds (files of another program or stale exports: refused).
    resume = _resume_path(cfg)
    check_model(cfg)
    stale = rundir.check_run_dir(cfg, resume)
    # Data: seeded augmentation, sharded samplers.
    train_set, val_set = _build_data(cfg)
    train_loader, sampler = _loaders(cfg, train_set, device)
    steps_per_epoch = recipe.steps_per_epoch_for(sampler.num_samples, cfg.data.batch_size)
    global_batch = cfg.data.batch_size * dist.world_size()
    # Model (checked against the data), optimizer (decay on conv/fc weights only), per-step
    # schedule, loss.
    model = _build_model(cfg, device)
    _check_model_fits_data(cfg, model, val_set)
    optimizer = recipe.build_optimizer(model, cfg.optim)
    schedule = recipe.LRSchedule(optimizer, steps_per_epoch, cfg.optim, global_batch)
    criterion = recipe.loss_fn(cfg.optim.label_smoothing)
    state = State(targeted=cfg.attack.targeted)
    # The cheaper recipes' state: Free-AT's perturbation, Fast-AT's overfitting guard.
    mode = cfg.attack.mode
    free = cheap.FreeState() if mode == "free" else None
    guard = None
    if mode == "fast" and cfg.attack.overfit_drop > 0:
        guard = cheap.OverfitGuard(cfg.attack.overfit_drop)
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
        extra = saved.get("extra") or {}
        if free is not None and "free_delta" in extra:
            free.load_state_dict(extra["free_delta"], device)
        if guard is not None and "overfit_guard" in extra:
            guard.load_state_dict(extra["overfit_guard"])
    # Accepted: now the run directory is written (main process only): stale files of an earlier
    # run deleted (run.resume=never), the resolved config, a fresh metrics file when starting
    # from scratch, TensorBoard logs.
    if dist.is_main():
        removed = rundir.prepare_run_dir(cfg, stale)
        if removed:
            tqdm.write(f"run.resume=never: deleted the earlier run's "
                       f"{', '.join(os.path.relpath(p, run_dir) for p in removed)} in {run_dir}")
    dist.barrier()
    logger = MetricsLogger(run_dir, enabled=dist.is_main(), tensorboard=cfg.run.tensorboard)
    if resume is not None:
        logger.log("resume", state.step, state.epoch, {"from": resume})
    # Wrappers: DDP for the update, torch.compile if asked; the attack sees the plain module.
    net = dist.wrap_model(model, device)
    attack_net = model
    if cfg.run.compile:
        net, attack_net = torch.compile(net), torch.compile(model)
    if mode == "fast":
        attack = cheap.FastAttack(attack_net, cfg.attack.eps / 255,
                                  cfg.attack.fast_step() / 255, cfg.attack.targeted,
                                  exact=cfg.run.compile)
    else:  # pgd (free crafts its perturbation inside its own step)
        attack = recipe.TrainAttack(attack_net, cfg.attack.steps, cfg.attack.eps / 255,
                                    cfg.attack.step_size / 255, cfg.attack.clean_start_prob,
                                    cfg.attack.targeted, exact=cfg.run.compile)
    total_steps = steps_per_epoch * cfg.optim.epochs
    bar = tqdm(total=total_steps, initial=state.step, unit="step", dynamic_ncols=True,
               disable=not (dist.is_main() and cfg.run.progress))
    return Job(cfg, device, model, net, attack, criterion, optimizer, schedule, train_set,
               train_loader, val_set, sampler, logger, bar, state, steps_per_epoch,
               total_steps, saved_step=state.step if resume is not None else None,
               free=free, guard=guard,
               check=cheap.check_batch(val_set, cfg.attack.check_images, device)
               if guard is not None else None)


def _stand_in(job: Job) -> tuple[torch.Tensor, torch.Tensor]:
    """The first readable image of this process's epoch order, as a batch of one.

    Used when every file of a batch is unreadable: the step still runs on every process (DDP
    needs every rank in every gradient all-reduce), on data that depends only on (seed, epoch,
    rank), so a resumed run takes the same step.
    """
    for i in job.sampler.epoch_order():
        x, y = job.train_set[i]
        if int(y) >= 0:
            return x[None], torch.tensor([int(y)])  # [1, C, H, W], [1]
    raise ValueError(f"no readable image among the {job.sampler.num_samples} training images of "
                     "this process; check data.root (data.strict=true names the bad files)")


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
        # A batch with no readable image trains on a stand-in, so every process takes every
        # step without agreeing first (no collective, no host sync per step).
        if len(y) == 0:
            x, y = _stand_in(job)
        x, y = _to_device(x, y, cfg, job.device)
        if job.free is not None:
            cheap.free_step(job.net, job.free, job.criterion, job.optimizer, job.schedule,
                            x, y, state, cfg, job.device, job.model.num_classes)
            _check_finite(state, cfg)
        else:
            train_step(job.net, job.attack, job.criterion, job.optimizer, job.schedule, x,
                       y, state, cfg, job.device)
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
    due = eval_steps_due(cfg, done) if done < cfg.optim.epochs else []
    if due:
        metrics = job.evaluate(due, f"eval epoch {done}")
        job.logger.log("eval", state.step, done, metrics)
        if dist.is_main():
            tqdm.write(f"epoch {done}: " + _fmt(metrics))
    if job.guard is not None:
        _guard_epoch(job, done)
    state.epoch, state.step_in_epoch = done, 0
    job.save()


def _guard_epoch(job: Job, done: int) -> None:
    """Fast-AT's check after epoch ``done``: PGD accuracy on the held-out batch; on a collapse
    the best weights go back into the model and training stops (kept in the checkpoint)."""
    acc = cheap.pgd_accuracy(job.model, *job.check, job.cfg, done)
    stop = job.guard.update(acc, done, job.model)
    job.logger.log("overfit_check", job.state.step, done,
                   {"pgd_acc": acc, "best_pgd_acc": job.guard.best_acc,
                    "best_epoch": job.guard.best_epoch, "stopped": stop})
    if stop:
        job.model.load_state_dict(job.guard.best_model)
        if dist.is_main():
            tqdm.write(f"epoch {done}: PGD-{job.cfg.attack.check_steps} accuracy {acc:.4f} on "
                       f"the check batch fell more than {job.cfg.attack.overfit_drop:.2f} below "
                       f"the best {job.guard.best_acc:.4f} (epoch {job.guard.best_epoch}): "
                       f"catastrophic overfitting; stopped, keeping epoch "
                       f"{job.guard.best_epoch}'s weights")


def _finish(job: Job) -> None:
    """Final weights (safetensors) and the final evaluation (clean + PGD-final_eval_steps)."""
    cfg = job.cfg
    if dist.is_main():
        ckpt.save_weights(os.path.join(cfg.run.out_dir, ckpt.WEIGHTS), job.model, cfg.model.name,
                          dict(cfg.model.kwargs), {"step": job.state.step})
    metrics = job.evaluate([cfg.run.final_eval_steps], "final eval")
    job.logger.log("final", job.state.step, job.state.epoch, metrics)
    if dist.is_main():
        tqdm.write("final: " + _fmt(metrics))


def _track_updates(job: Job) -> dict:
    """``{"step": s}``: the global step whose SGD update was applied last (an optimizer hook), so
    an interrupt that lands between the update and the step counter is placed correctly."""
    mark: dict = {"step": None}

    def hook(optimizer, args, kwargs) -> None:
        mark["step"] = job.schedule.step

    job.optimizer.register_step_post_hook(hook)
    return mark


def _save_on_interrupt(job: Job, updated: dict) -> str:
    """After Ctrl-C: checkpoint the current position if possible; say exactly what is kept."""
    state = job.state
    if updated["step"] is not None and updated["step"] == state.step:
        # The update of this step was applied but not yet counted: the weights are one step on.
        state.step += 1
        state.step_in_epoch += 1
    where = (f"step {state.step} of {job.total_steps} (epoch {state.epoch + 1}, batch "
             f"{state.step_in_epoch})")
    if job.saved_step == state.step:
        return f"interrupted at {where}; the checkpoint {job.checkpoint_path} is up to date: " \
               "continue with --resume"
    if job.saved_step is None:
        kept = f"no checkpoint exists, so the {state.step} step(s) trained are lost"
    else:
        kept = (f"the checkpoint of step {job.saved_step} in {job.checkpoint_path} is kept; "
                f"steps {job.saved_step + 1} to {state.step} are lost")
    if dist.world_size() > 1:  # saving needs every process, and each is being stopped
        return f"interrupted at {where}; not saved (several processes): {kept}"
    try:
        job.save()
    except (Exception, KeyboardInterrupt) as err:
        text = str(err).strip().splitlines()
        return (f"interrupted at {where}; could not save a checkpoint "
                f"({text[0] if text else type(err).__name__}): {kept}")
    return f"interrupted at {where}; checkpoint saved to {job.checkpoint_path}: continue with " \
           "--resume"


def fit(cfg: Config, device) -> str:
    """Train by ``cfg`` on ``device`` (process group already joined); see :func:`train`.

    The run folder is locked for the whole run (:func:`featdenoise.training.rundir.lock_run_dir`:
    a second run into it is refused). Ctrl-C (``KeyboardInterrupt``) saves a checkpoint at the
    current step when it can (one process) and is raised again with one line saying where
    training stopped and what was kept.
    """
    with rundir.lock_run_dir(cfg):
        return _fit(cfg, device)


def _fit(cfg: Config, device) -> str:
    job = _setup(cfg, device)
    updated = _track_updates(job)
    stopped = False
    try:
        while (job.state.epoch < cfg.optim.epochs and not stopped
               and not (job.guard is not None and job.guard.stopped)):
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
    except KeyboardInterrupt:
        job.bar.close()
        raise KeyboardInterrupt(_save_on_interrupt(job, updated)) from None
    finally:
        job.logger.close()
    return cfg.run.out_dir


def _fmt(metrics: dict) -> str:
    parts = [f"clean acc {metrics['clean_acc']:.4f}"]
    for key in sorted((k for k in metrics if k.startswith("pgd") and k.endswith("_acc")),
                      key=lambda k: int(k[3:-4])):
        name = key[:-4]
        text = f"PGD-{name[3:]} acc {metrics[key]:.4f} top-5 {metrics[name + '_top5']:.4f}"
        if name + "_success" in metrics:
            text += f" (attack success {metrics[name + '_success']:.4f})"
        parts.append(text)
    return ", ".join(parts) + f" on {metrics['n']} images"


def train(config) -> str:
    """Run a training job and return its run directory.

    ``config``: a :class:`featdenoise.training.config.Config`, a nested dict of overrides of the defaults,
    or a YAML path. Works as a single process or under ``torchrun`` (one process per GPU or CPU
    worker); the process group is joined here and left at the end if this call created it.
    """
    cfg = _as_config(config)
    created = not dist.is_dist()
    device = dist.init(cfg.run.device, what="run.device")
    try:
        return fit(cfg, device)
    finally:
        if created:
            dist.shutdown()
