"""Runs that survive: a NaN/inf loss stops training at a named step with the last good checkpoint
intact; a full disk or a kill during a checkpoint write leaves the previous checkpoint loadable."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import EVAL_SETTINGS, TESTS, EvalNet, eval_data, tiny_run_config


def _small_state(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"model": {"w": torch.randn(64, 64, generator=g)}, "step": seed}


# --------------------------------------------------------------------------- NaN / inf loss
# A NaN loss is tested in test_loop.py (test_non_finite_loss_stops_with_step_and_keeps_last_
# checkpoint); here an infinite one, and the checkpoint must be byte-for-byte untouched.
@pytest.mark.parametrize("bad", [float("inf")])
def test_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint(
        tmp_path, monkeypatch, bad):
    from featdenoise.hub.checkpoints import CHECKPOINT, load_checkpoint
    from featdenoise.training import parts, train

    real_loss_fn = parts.loss_fn
    run = tmp_path / "run"
    ckpt_path = run / CHECKPOINT
    seen = {}

    def poisoned_loss_fn(*args, **kwargs):
        criterion = real_loss_fn(*args, **kwargs)
        calls = {"n": 0}

        def loss(logits, y):
            out = criterion(logits, y)
            calls["n"] += 1
            if calls["n"] == 3:  # the third update (global step 2) diverges
                seen["bytes"] = ckpt_path.read_bytes()  # the last good checkpoint, as it is now
                return out * bad
            return out

        return loss

    monkeypatch.setattr(parts, "loss_fn", poisoned_loss_fn)
    with pytest.raises(ValueError) as err:
        train(tiny_run_config(run))
    text = str(err.value)
    assert "\n" not in text and "step 2" in text, text
    # The checkpoint written after step 1 (the last good one) is exactly as it was ...
    assert ckpt_path.read_bytes() == seen["bytes"]
    saved = load_checkpoint(str(ckpt_path))
    assert saved["step"] == 2
    assert all(torch.isfinite(v).all() for v in saved["model"].values() if v.is_floating_point())
    # ... and no final weights were exported from the diverged model.
    assert not (run / "model.safetensors").exists()


# --------------------------------------------------------------------------- checkpoint writes
def test_full_disk_during_a_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    from featdenoise.hub import checkpoints as ckpt

    path = tmp_path / "checkpoint.pt"
    ckpt.atomic_save(_small_state(1), str(path))
    before = path.read_bytes()
    real_save = torch.save

    def disk_full(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)  # some bytes reach the disk, then it is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError):
        ckpt.atomic_save(_small_state(2), str(path))
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert ckpt.load_checkpoint(str(path))["step"] == 1
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p.name != "checkpoint.pt")
    assert leftovers == [], f"a failed write left {leftovers} behind"


def test_full_disk_during_training_is_one_line_and_keeps_the_checkpoint(tmp_path, monkeypatch,
                                                                        capsys):
    """``featdenoise train`` on a disk that fills up: exit status 2, one line naming the
    checkpoint and the cause, the previous checkpoint loadable and nothing half-written left."""
    import yaml

    from featdenoise.cli import main
    from featdenoise.hub.checkpoints import load_checkpoint

    run = tmp_path / "run"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(tiny_run_config(run)))
    real_save, calls = torch.save, {"n": 0}

    def fills_up(obj, f, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # the third checkpoint does not fit
            f.write(b"\0" * 100)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", fills_up)
    code = main(["train", "--config", str(cfg)])
    monkeypatch.undo()
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1, lines
    assert "checkpoint.pt" in lines[0] and "No space left" in lines[0], lines
    assert load_checkpoint(str(run / "checkpoint.pt"))["step"] == 2
    assert not [p.name for p in run.iterdir() if ".tmp" in p.name]


def test_rename_never_reached_keeps_the_previous_one(tmp_path, monkeypatch):
    from featdenoise.hub import checkpoints as ckpt

    path = tmp_path / "checkpoint.pt"
    ckpt.atomic_save(_small_state(1), str(path))

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # the process is stopped between the write and the rename

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ckpt.atomic_save(_small_state(2), str(path))
    monkeypatch.undo()
    assert ckpt.load_checkpoint(str(path))["step"] == 1


def test_exported_weights_write_is_atomic_too(tmp_path, monkeypatch):
    from featdenoise.hub import checkpoints as ckpt
    from featdenoise.models import create_model

    kwargs = dict(in_channels=1, num_classes=10, width=4, blocks=[1, 1, 1])
    model = create_model("small_resnet", **kwargs)
    path = tmp_path / "model.safetensors"
    ckpt.save_weights(str(path), model, "small_resnet", kwargs)
    before = path.read_bytes()

    def interrupted(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", interrupted)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    with pytest.raises(OSError):
        ckpt.save_weights(str(path), model, "small_resnet", kwargs)
    monkeypatch.undo()
    assert path.read_bytes() == before
    ckpt.load_model(str(path))  # still loadable


# --------------------------------------------------------------------------- evaluation kill






def test_sigkill_during_evaluation_then_resume_gives_the_same_numbers(tmp_path):
    """A real SIGKILL in the middle of the third batch of a white-box evaluation; rerunning the
    same call finishes the remaining batches and reports exactly the uninterrupted numbers."""
    from featdenoise.evaluation.engine import PARTS_DIR
    from featdenoise.evaluation.whitebox import evaluate_whitebox

    cut = tmp_path / "cut"
    # forward passes per batch: 1 clean + (2 + 1) + (4 + 1) for PGD-2 and PGD-4 -> 9
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(TESTS)!r})
        from helpers import EVAL_SETTINGS, EvalNet, eval_data
        from featdenoise.evaluation.whitebox import evaluate_whitebox
        evaluate_whitebox(EvalNet(kill_at=2 * 9 + 5), eval_data(), {str(cut)!r},
                          **EVAL_SETTINGS)
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert not (cut / "summary.json").exists()
    done = list((cut / PARTS_DIR).iterdir())
    # records are flushed per attack: batches 1-2 whole (clean, PGD-2, PGD-4 lines for 4 images
    # each), batch 3 up to its PGD-2, so the rerun redoes only batch 3's PGD-4 onwards
    assert done and sum(len(p.read_text().splitlines()) for p in done) == 2 * 3 * 4 + 2 * 4

    resumed = evaluate_whitebox(EvalNet(), eval_data(), str(cut), **EVAL_SETTINGS)
    full = evaluate_whitebox(EvalNet(), eval_data(), str(tmp_path / "full"), **EVAL_SETTINGS)
    assert resumed["num_images"] == full["num_images"] == 20
    assert resumed["clean"] == full["clean"]
    assert resumed["attacks"] == full["attacks"]
    assert 0 < full["attacks"][-1]["accuracy"] < full["clean"]["top1"]  # the attack did work
    outcomes = "outcomes.jsonl"
    assert (cut / outcomes).read_text() == (tmp_path / "full" / outcomes).read_text()


# --------------------------------------------------------------------------- training kill
def test_sigkill_mid_epoch_then_resume_gives_the_uninterrupted_weights(tmp_path, monkeypatch):
    """SIGKILL a training process in its second epoch while it is half-way through writing a
    checkpoint. The previous (mid-epoch) checkpoint must still load, and ``resume=auto`` must
    then end with exactly the weights of a run that was never killed (same seed, data order)."""
    from safetensors.torch import load_file

    from featdenoise.hub.checkpoints import CHECKPOINT, WEIGHTS, load_checkpoint
    from featdenoise.training import train
    from featdenoise.training.recipes import pgd

    def config(out):
        cfg = tiny_run_config(out, checkpoint_every=2)
        cfg["data"]["train_subset"] = 24  # 6 steps per epoch
        cfg["optim"]["epochs"] = 2
        return cfg

    killed = tmp_path / "killed"
    script = textwrap.dedent(f"""
        import os, signal, torch
        torch.set_num_threads({torch.get_num_threads()})
        from featdenoise.training import train

        real_save = torch.save

        def save_or_die(obj, f, *args, **kwargs):
            real_save(obj, f, *args, **kwargs)
            if isinstance(obj, dict) and obj.get("step") == 10:  # epoch 2, batch 4
                f.flush()
                f.truncate(f.tell() // 2)  # half of the new checkpoint is on disk
                os.kill(os.getpid(), signal.SIGKILL)

        torch.save = save_or_die
        train({config(killed)!r})
    """)
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    last = load_checkpoint(str(killed / CHECKPOINT))  # the previous checkpoint, intact
    assert (last["step"], last["epoch"], last["step_in_epoch"]) == (8, 1, 2)  # mid-epoch
    assert not (killed / WEIGHTS).exists()

    real_step, steps_run = pgd.train_step, []

    def counted_step(*args, **kwargs):
        state = kwargs.get("state") or next(a for a in args if hasattr(a, "step_in_epoch"))
        steps_run.append(state.step)
        return real_step(*args, **kwargs)

    monkeypatch.setattr(pgd, "train_step", counted_step)
    train(config(killed))  # resume=auto picks up checkpoint.pt
    assert steps_run == [8, 9, 10, 11]  # it really resumed: only the lost steps were redone
    monkeypatch.undo()
    train(config(tmp_path / "straight"))
    resumed = load_file(str(killed / WEIGHTS))
    straight = load_file(str(tmp_path / "straight" / WEIGHTS))
    assert resumed.keys() == straight.keys()
    for k in straight:
        assert torch.equal(resumed[k], straight[k]), k
    assert load_checkpoint(str(killed / CHECKPOINT))["step"] == 12
