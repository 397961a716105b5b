"""The adversarial training loop (paper Sec. 5), as small functions with one comment per step.

:func:`train` runs a whole job from a :class:`featdenoise.training.config.Config`: it joins the
process group (torchrun) if there is one, builds the job (:func:`featdenoise.training.setup.
build_job`: data, model, optimizer, attack, resume), trains with per-step learning rates,
evaluates clean and PGD accuracy every ``run.eval_every`` epochs and with ``run.final_eval_steps``
at the end, and writes ``config.yaml``, ``metrics.jsonl``, TensorBoard logs, ``checkpoint.pt`` and
``model.safetensors`` into ``run.out_dir`` (main process only).

What each batch and each epoch end do beyond that is the job's recipe's (``attack.mode``:
:mod:`featdenoise.training.recipes`); the loop never branches on the mode.
"""

from __future__ import annotations

import os
import time

import torch
from tqdm import tqdm

from featdenoise.data.datasets import drop_skipped
from featdenoise.evaluation import engine
from featdenoise.evaluation.metrics import summarize
from featdenoise.evaluation.whitebox import attack_column
from featdenoise.hub import checkpoints as ckpt
from featdenoise.runtime import distributed as dist
from featdenoise.training import rundir
from featdenoise.training.config import Config, load_config
from featdenoise.training.metrics import MetricsLogger
from featdenoise.training.parts import LRSchedule
from featdenoise.training.setup import Job, TrainData, build_job
from featdenoise.training.step import State

# ---------------------------------------------------------------------------------------------
# Entry points


def train(config) -> str:
    """Run a training job and return its run directory.

    ``config``: a :class:`featdenoise.training.config.Config`, a nested dict of overrides of the
    defaults, or a YAML path. Works as a single process or under ``torchrun`` (one process per
    GPU or CPU worker); the process group is joined here and left at the end if this call
    created it.
    """
    cfg = _as_config(config)
    created = not dist.is_dist()
    device = dist.init(cfg.run.device, what="run.device")
    try:
        return fit(cfg, device)
    finally:
        if created:
            dist.shutdown()


def _as_config(config) -> Config:
    if isinstance(config, Config):
        return config
    if isinstance(config, dict):
        return load_config(base=config)
    return load_config(config)


def fit(cfg: Config, device: torch.device) -> str:
    """Train by ``cfg`` on ``device`` (process group already joined); see :func:`train`.

    The run folder is locked for the whole run (:func:`featdenoise.training.rundir.lock_run_dir`:
    a second run into it is refused). Ctrl-C (``KeyboardInterrupt``) saves a checkpoint at the
    current step when it can (one process) and is raised again with one line saying where
    training stopped and what was kept.
    """
    with rundir.lock_run_dir(cfg):
        return _fit(cfg, device)


def _fit(cfg: Config, device: torch.device) -> str:
    job = build_job(cfg, device)
    updated = _track_updates(job)
    stopped = False
    try:
        while job.state.epoch < cfg.optim.epochs and not stopped and not job.recipe.stopped:
            # One epoch (or its remainder after a resume), then its bookkeeping unless stopped
            # mid-epoch, in which case the position is checkpointed for the next run.
            stopped = _run_epoch(job)
            if stopped and job.state.step_in_epoch < job.data.steps_per_epoch:
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


# ---------------------------------------------------------------------------------------------
# One epoch


def _run_epoch(job: Job) -> bool:
    """Train the rest of the current epoch; True if ``run.stop_after`` stopped it early."""
    cfg, state, data = job.cfg, job.state, job.data
    # Epoch order: shuffle by (seed, epoch), skip the batches a resumed run already did.
    data.sampler.set_epoch(state.epoch)
    data.sampler.set_start(state.step_in_epoch * cfg.data.batch_size)
    data.train_set.set_epoch(state.epoch)
    job.bar.set_description(f"epoch {state.epoch + 1}/{cfg.optim.epochs}")
    for x, y in data.loader:
        # The readable images of the batch, on the device.
        x, y = _batch(job, x, y)
        # The recipe's update(s) on this batch.
        job.recipe.step(job.net, x, y, state, job.ctx)
        # Count the step.
        state.step += 1
        state.step_in_epoch += 1
        job.bar.update(1)
        # Periodic log line and checkpoint; a requested stop after this step.
        if _after_step(job):
            return True
    return False


def _batch(job: Job, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop unreadable files (counted and reported at the end of the epoch); a batch with no
    readable image trains on a stand-in (:func:`_stand_in`), so every process takes every step
    without agreeing first (no collective, no host sync per step). Returns it on the device."""
    x, y, n_bad = drop_skipped(x, y)
    job.state.sums["skipped"] += n_bad
    if len(y) == 0:
        x, y = _stand_in(job.data)
    x = x.to(job.device, non_blocking=True)
    if job.cfg.run.channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y.to(job.device, non_blocking=True)


def _stand_in(data: TrainData) -> tuple[torch.Tensor, torch.Tensor]:
    """The first readable image of this process's epoch order, as a batch of one.

    Used when every file of a batch is unreadable: the step still runs on every process (DDP
    needs every rank in every gradient all-reduce), on data that depends only on (seed, epoch,
    rank), so a resumed run takes the same step.
    """
    for i in data.sampler.epoch_order():
        x, y = data.train_set[i]
        if int(y) >= 0:
            return x[None], torch.tensor([int(y)])  # [1, C, H, W], [1]
    raise ValueError(f"no readable image among the {data.sampler.num_samples} training images of "
                     "this process; check data.root (data.strict=true names the bad files)")


def _after_step(job: Job) -> bool:
    """Log line every ``run.log_every`` steps, checkpoint every ``run.checkpoint_every``; True
    when ``run.stop_after`` asks to stop after this step."""
    r, state = job.cfg.run, job.state
    if state.step % r.log_every == 0:
        _log_train(state, job.ctx.schedule, job.logger, job.bar, job.device)
    if r.checkpoint_every and state.step % r.checkpoint_every == 0:
        job.save()
    return bool(r.stop_after and r.stop_after <= state.step < job.total_steps)


def _end_epoch(job: Job) -> None:
    """Flush metrics, report skipped files, evaluate every ``eval_every`` epochs, let the recipe
    check the epoch, checkpoint."""
    cfg, state = job.cfg, job.state
    # The epoch's last train record and its count of unreadable files.
    _log_train(state, job.ctx.schedule, job.logger, job.bar, job.device)
    if state.epoch_skipped and dist.is_main():
        tqdm.write(f"epoch {state.epoch + 1}: skipped {state.epoch_skipped} unreadable "
                   f"image file(s)")
    job.logger.log("epoch", state.step, state.epoch + 1, {"skipped_files": state.epoch_skipped})
    state.epoch_skipped = 0
    # Evaluation when due (the last epoch's is the final one).
    done = state.epoch + 1
    due = eval_steps_due(cfg, done) if done < cfg.optim.epochs else []
    if due:
        results = _evaluate(job, due, f"eval epoch {done}")
        job.logger.log("eval", state.step, done, results)
        if dist.is_main():
            tqdm.write(f"epoch {done}: " + _fmt(results))
    # The recipe's own check (Fast-AT: the overfitting guard).
    job.recipe.end_epoch(job.model, done, job.logger, state.step)
    # The next epoch starts here: checkpoint the position.
    state.epoch, state.step_in_epoch = done, 0
    job.save()


def _finish(job: Job) -> None:
    """Final weights (safetensors) and the final evaluation (clean + PGD-final_eval_steps)."""
    cfg = job.cfg
    if dist.is_main():
        ckpt.save_weights(os.path.join(cfg.run.out_dir, ckpt.WEIGHTS), job.model, cfg.model.name,
                          dict(cfg.model.kwargs), {"step": job.state.step})
    results = _evaluate(job, [cfg.run.final_eval_steps], "final eval")
    job.logger.log("final", job.state.step, job.state.epoch, results)
    if dist.is_main():
        tqdm.write("final: " + _fmt(results))


# ---------------------------------------------------------------------------------------------
# Evaluation and metrics


def _evaluate(job: Job, steps: list[int], desc: str) -> dict:
    return evaluate(job.net, job.data.val_set, steps=[k for k in steps if k > 0], cfg=job.cfg,
                    device=job.device, desc=desc)


def evaluate(model, dataset, *, steps: list[int], cfg: Config, device,
             desc: str = "eval") -> dict:
    """Clean and PGD accuracy over the validation set through the evaluation engine.

    ``steps``: PGD iteration counts (empty: clean only); eps and step size are the config's
    (:meth:`featdenoise.training.config.AttackConfig.unit_sizes`). Images, targets and random
    starts are the engine's (the same images as ``featdenoise eval --limit data.val_subset`` with
    the run's seed); each rank evaluates every ``world_size``-th batch and all ranks get every
    record. Returns ``{"clean_acc", "clean_top5", "n"}`` plus, per count k, ``pgd<k>_acc`` and
    ``pgd<k>_top5`` and, for a targeted attack, ``pgd<k>_success`` (fractions).
    """
    net = dist.unwrap(model)
    dist.sync_buffers(net)  # every process evaluates rank 0's network
    sizes, targeted = cfg.attack.unit_sizes(), cfg.attack.targeted
    names = [f"pgd{k}" for k in steps]
    columns = [attack_column(n, "pgd", steps=k, eps=sizes.eps, step_size=sizes.step_size,
                             targeted=targeted, bf16=cfg.run.bf16)
               for n, k in zip(names, steps, strict=True)]
    p = engine.plan(net, dataset, columns, batch_size=cfg.data.eval_batch_size
                    or cfg.data.batch_size, seed=cfg.run.seed, targeted=targeted)
    records = engine.run(net, p, None, desc=desc, device=device,
                         num_workers=cfg.data.workers,
                         progress=dist.is_main() and cfg.run.progress)
    s = summarize(records or [], names, targeted)  # in memory: every rank gets every record
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


def _log_train(state: State, schedule: LRSchedule, logger: MetricsLogger, bar: tqdm,
               device: torch.device) -> None:
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


# ---------------------------------------------------------------------------------------------
# Ctrl-C


def _track_updates(job: Job) -> dict:
    """``{"step": s}``: the global step whose SGD update was applied last (an optimizer hook), so
    an interrupt that lands between the update and the step counter is placed correctly."""
    mark: dict = {"step": None}

    def hook(optimizer, args, kwargs) -> None:
        mark["step"] = job.ctx.schedule.step

    job.ctx.optimizer.register_step_post_hook(hook)
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
