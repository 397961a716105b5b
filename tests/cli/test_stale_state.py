"""Bad input, stale state and overwritten files: one line, nothing lost, nothing stale.

Five classes, each fixed in the layer that owns it and each tested here with the inputs that were
reported and at least one more of the same kind:

1. stale state in a run folder (``featdenoise.training.rundir``): a refused or failed ``train``
   leaves a finished run byte for byte as it was; ``run.resume=never`` deletes the old exports;
2. files destroyed without being asked (``featdenoise.runtime.atomic``): no command writes over
   its own inputs (any spelling, symlink or hard link), a read-only file, or a file of another
   program;
3. tracebacks turned into one line (exit status 2) naming the file or value;
4. (config values: ``tests/training/test_config.py``) plus ``--print-config`` checking the model;
5. misleading messages: ``--out`` that is a file or a folder, ``predict FILE``, label -1,
   conflicting label rows, Ctrl-C in the middle of an epoch.
"""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import (
    OFFICIAL,
    one_error,
    png,
    run_cli,
    snapshot,
    tiny_epoch_config,
    write_idx_folder,
)

from featdenoise.cli import main

FIXTURES = OFFICIAL










@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> tuple[Path, Path]:
    """(a finished run folder, its config file): config.yaml, metrics.jsonl, checkpoint.pt and
    model.safetensors of a 4-step run. Tests copy it before touching it."""
    from featdenoise.training import train

    root = tmp_path_factory.mktemp("finished")
    data = write_idx_folder(root / "fmnist", n=24)
    run = root / "run"
    train(tiny_epoch_config(run, data))
    cfg = root / "c.yaml"
    cfg.write_text(yaml.safe_dump(tiny_epoch_config(run, data)))
    return run, cfg


def _copy_run(finished_run, tmp_path) -> tuple[Path, Path]:
    """A private copy of the finished run and a config file that points at it."""
    run, cfg = finished_run
    mine = tmp_path / "run"
    shutil.copytree(run, mine)
    tree = yaml.safe_load(cfg.read_text())
    tree["run"]["out_dir"] = str(mine)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tree))
    return mine, path


# =========================================================================== 1. stale state
@pytest.mark.parametrize("override, words", [
    # refused by a check (data set vs model) before anything is written
    ("model.kwargs.in_channels=3", "model.kwargs.in_channels=3 does not fit"),
    # refused while resuming: another optimiser recipe than the checkpoint's
    ("optim.lr=0.5", "different 'optim' config"),
    # refused by the loaders: a batch larger than the data
    ("data.batch_size=64", "data.batch_size=64 exceeds"),
])
def test_refused_train_leaves_a_finished_run_byte_for_byte(finished_run, tmp_path, capsys,
                                                           override, words):
    run, cfg = _copy_run(finished_run, tmp_path)
    before = snapshot(run)
    line = one_error(capsys, "train", "--config", cfg, override)
    assert words in line
    assert snapshot(run) == before  # config.yaml included


def test_failed_train_leaves_the_config_of_the_finished_run(finished_run, tmp_path, capsys,
                                                             monkeypatch):
    """A failure after the checks (here the data set cannot be read) changes nothing either."""
    from featdenoise.training import setup

    run, cfg = _copy_run(finished_run, tmp_path)
    before = snapshot(run)

    def unreadable(cfg):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(setup, "_build_data", unreadable)
    line = one_error(capsys, "train", "--config", cfg, "run.resume=never")
    assert "Input/output error" in line
    assert snapshot(run) == before


def test_resume_never_deletes_the_stale_exports_of_the_finished_run(finished_run, tmp_path,
                                                                    capsys):
    """``run.resume=never`` into a finished run: its model.safetensors is gone before the new
    run trains, so a run stopped early leaves no stale network for ``load_model(dir)``."""
    from featdenoise.hub.checkpoints import load_checkpoint, load_model

    run, cfg = _copy_run(finished_run, tmp_path)
    old = load_model(run)
    code = main(["train", "--config", str(cfg), "run.resume=never", "run.stop_after=1",
                 "optim.lr=0.5"])
    said = capsys.readouterr().out
    assert code == 0
    assert not (run / "model.safetensors").exists()
    assert load_checkpoint(str(run / "checkpoint.pt"))["step"] == 1
    new = load_model(run)  # now the checkpoint of the new run, not the stale export
    assert any(not torch.equal(a, b) for a, b in zip(old.state_dict().values(),
                                                     new.state_dict().values(), strict=True))
    assert yaml.safe_load((run / "config.yaml").read_text())["optim"]["lr"] == 0.5
    assert (f"run.resume=never: deleted the earlier run's checkpoint.pt, model.safetensors, "
            f"metrics.jsonl in {run}") in said


def test_weights_without_a_checkpoint_are_not_silently_trained_over(finished_run, tmp_path,
                                                                    capsys):
    run, cfg = _copy_run(finished_run, tmp_path)
    (run / "checkpoint.pt").unlink()
    before = snapshot(run)
    line = one_error(capsys, "train", "--config", cfg)
    assert "model.safetensors of an earlier run but no checkpoint.pt" in line
    assert "run.resume=never" in line
    assert snapshot(run) == before


@pytest.mark.parametrize("name, content", [
    ("config.yaml", b"my notes: do not lose\n"),
    ("model.safetensors", b"not ours at all"),
    ("metrics.jsonl", b"lab book\n"),
])
def test_files_of_another_program_in_the_run_folder_are_refused(finished_run, tmp_path, capsys,
                                                                name, content):
    run, cfg = _copy_run(finished_run, tmp_path)
    (run / name).write_bytes(content)
    before = snapshot(run)
    line = one_error(capsys, "train", "--config", cfg, "run.resume=never")
    assert f"refusing to replace {run / name}" in line and "not written by featdenoise" in line
    assert snapshot(run) == before


def test_run_config_given_as_config_file_is_an_input(finished_run, tmp_path, capsys):
    """``train --config RUN/config.yaml`` may resume with the same values (the file is not
    rewritten: its bytes would not change) but not overwrite its own input with new ones."""
    run, _ = _copy_run(finished_run, tmp_path)
    own = run / "config.yaml"
    tree = yaml.safe_load(own.read_text())
    tree["run"]["out_dir"] = str(run)
    own.write_text(yaml.safe_dump(tree, sort_keys=False))
    before = snapshot(run)
    line = one_error(capsys, "train", "--config", own, "run.stop_after=1", "run.resume=never")
    assert f"refusing to write output {own}: it is an input of this command" in line
    assert snapshot(run) == before


# =========================================================================== 2. overwritten files
@pytest.fixture
def npz(tmp_path) -> Path:
    path = tmp_path / "R.npz"
    shutil.copy(FIXTURES / "resnet_1111" / "checkpoint.npz", path)
    return path


def _spellings(npz: Path) -> dict[str, str]:
    link = npz.parent / "link.npz"
    link.symlink_to(npz)
    hard = npz.parent / "hard.npz"
    os.link(npz, hard)
    sub = npz.parent / "sub"
    sub.mkdir()
    return {"same": str(npz), "symlink": str(link), "hard link": str(hard),
            "relative": f"sub/../{npz.name}"}


@pytest.mark.parametrize("how", ["same", "symlink", "hard link", "relative"])
def test_convert_never_writes_over_its_input(npz, capsys, monkeypatch, how):
    monkeypatch.chdir(npz.parent)
    out = _spellings(npz)[how]
    before = npz.read_bytes()
    line = one_error(capsys, "convert", "--arch", "ResNet", npz, out)
    assert "it is an input of this command" in line and out in line
    assert npz.read_bytes() == before


def test_convert_library_call_refuses_its_input_too(npz):
    from featdenoise.hub.tensorpack import convert_tensorpack

    before = npz.read_bytes()
    with pytest.raises(ValueError, match="input of this command"):
        convert_tensorpack(npz, npz, "ResNet")
    assert npz.read_bytes() == before


def test_convert_refuses_read_only_and_foreign_outputs_but_replaces_its_own(npz, tmp_path,
                                                                           capsys):
    notes = tmp_path / "notes.safetensors"
    notes.write_bytes(b"someone else's file")
    line = one_error(capsys, "convert", "--arch", "ResNet", npz, notes)
    assert f"refusing to replace {notes}" in line and "not written by featdenoise" in line
    assert notes.read_bytes() == b"someone else's file"

    out = tmp_path / "R.safetensors"
    assert run_cli(capsys, "convert", "--arch", "ResNet", npz, out)[0] == 0
    assert run_cli(capsys, "convert", "--arch", "ResNet", npz, out)[0] == 0  # ours: replaced
    out.chmod(stat.S_IRUSR | stat.S_IRGRP)
    before = out.read_bytes()
    line = one_error(capsys, "convert", "--arch", "ResNet", npz, out)
    assert f"refusing to replace {out}: it is read-only" in line
    assert out.read_bytes() == before


def test_atomic_write_keeps_an_input_unless_the_bytes_are_the_same(tmp_path):
    from featdenoise.runtime.atomic import atomic_write, command_inputs

    src = tmp_path / "in.txt"
    src.write_text("original")
    hard = tmp_path / "hard.txt"
    os.link(src, hard)
    inode = src.stat().st_ino
    with command_inputs([str(src)]):
        with pytest.raises(ValueError, match="input of this command"):
            with atomic_write(hard) as f:
                f.write("new")
        with atomic_write(src) as f:  # identical bytes: nothing to replace, nothing lost
            f.write("original")
    assert src.read_text() == "original" and src.stat().st_ino == inode
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hard.txt", "in.txt"]
    with atomic_write(src) as f:  # outside the command: an ordinary atomic replace
        f.write("new")
    assert src.read_text() == "new"


# =========================================================================== 3. one line
@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 truncated zip", "half"])
def test_truncated_or_empty_npz_is_one_line_for_convert_and_eval(npz, tmp_path, capsys,
                                                                 content):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(npz.read_bytes()[: len(npz.read_bytes()) // 2] if content == "half"
                    else content)
    line = one_error(capsys, "convert", "--arch", "ResNet", bad, tmp_path / "o.safetensors")
    assert str(bad) in line
    line = one_error(capsys, "eval", "--official", bad, "--arch", "ResNet", "--data",
                      "fashion_mnist", "--out", tmp_path / "ev")
    assert str(bad) in line
    assert not (tmp_path / "o.safetensors").exists()


def _weights_with_kwargs(path: Path, kwargs_text: str) -> Path:
    from safetensors.torch import save_file

    from featdenoise.models import create_model

    model = create_model("small_resnet", in_channels=1, width=4, blocks=[1, 1, 1])
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path),
              metadata={"model": "small_resnet", "model_kwargs": kwargs_text})
    return path


@pytest.mark.parametrize("kwargs_text, words", [
    ("[1, 4]", "metadata 'model_kwargs' must be a JSON object, got list"),
    ("{in_channels: 1", "metadata 'model_kwargs' is not valid JSON"),
    ('"width=4"', "metadata 'model_kwargs' must be a JSON object, got str"),
    ('{"width": "four"}', "the model it names cannot be built"),
])
def test_bad_model_kwargs_metadata_is_one_line_naming_the_file(tmp_path, capsys, kwargs_text,
                                                               words):
    from featdenoise.hub.checkpoints import load_model
    from featdenoise.hub.tensorpack import load_converted

    path = _weights_with_kwargs(tmp_path / "m.safetensors", kwargs_text)
    for loader in (load_model, load_converted):
        with pytest.raises(ValueError) as err:
            loader(path)
        text = str(err.value)
        assert "\n" not in text and str(path) in text and words in text, text
    line = one_error(capsys, "eval", "--checkpoint", path, "--data", "fashion_mnist", "--out",
                      tmp_path / "ev")
    assert str(path) in line


@pytest.mark.parametrize("images", ["", ",", "a,b"])
def test_visualize_with_no_image_indices_is_one_line(tmp_path, capsys, images):
    line = one_error(capsys, "visualize", "--checkpoint", tmp_path / "none", "--data",
                      "fashion_mnist", "--images", images)
    assert "--images" in line and f"{images!r}" in line


@pytest.mark.parametrize("override, words", [
    ("model.kwargs.in_channels=3",
     "model.kwargs.in_channels=3 does not fit data.name=fashion_mnist: its images have 1 "
     "channel(s); set model.kwargs.in_channels=1"),
    ("model.kwargs.num_classes=5",
     "model.kwargs.num_classes=5 does not fit data.name=fashion_mnist: it has 10 classes; set "
     "model.kwargs.num_classes=10"),
])
def test_train_model_that_does_not_fit_the_data_is_one_line(tmp_path, capsys, override, words):
    data = write_idx_folder(tmp_path / "fmnist", n=24)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(tiny_epoch_config(tmp_path / "run", data)))
    line = one_error(capsys, "train", "--config", cfg, override)
    assert words in line
    assert not (tmp_path / "run").exists()  # refused before anything was written


# =========================================================================== 4. --print-config
@pytest.mark.parametrize("override, words", [
    ("model.name=small_resnt", "config key 'model.name': unknown model 'small_resnt'"),
    ("model.kwargs.widht=4", "config key 'model.kwargs': model 'small_resnet' does not take "
                             "widht"),
])
def test_print_config_checks_the_model_as_train_does(tmp_path, capsys, override, words):
    data = write_idx_folder(tmp_path / "fmnist", n=24)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(tiny_epoch_config(tmp_path / "run", data)))
    assert words in one_error(capsys, "train", "--config", cfg, override, "--print-config")
    assert words in one_error(capsys, "train", "--config", cfg, override)


def test_print_config_shows_yaml_floats_as_numbers(tmp_path, capsys):
    data = write_idx_folder(tmp_path / "fmnist", n=24)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(tiny_epoch_config(tmp_path / "run", data)))
    code = main(["train", "--config", str(cfg), "optim.weight_decay=1e-4", "run.seed=1e3",
                 "--print-config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert code == 0 and printed["optim"]["weight_decay"] == 1e-4 and printed["run"]["seed"] == 1000


# =========================================================================== 5. messages
def test_out_that_is_an_existing_file_is_one_line_everywhere(tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.write_text("keep me")
    line = one_error(capsys, "visualize", "--checkpoint", tmp_path / "none", "--data",
                      "fashion_mnist", "--out", taken)
    assert f"--out {taken} is an existing file, not a folder" in line
    data = write_idx_folder(tmp_path / "fmnist", n=24)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(tiny_epoch_config(tmp_path / "run", data)))
    line = one_error(capsys, "train", "--config", cfg, "--out", taken)
    assert f"run.out_dir {taken} is an existing file, not a folder" in line
    line = one_error(capsys, "train", "--config", cfg, "--out", taken / "sub")
    assert f"{taken} is an existing file, not a folder" in line
    assert taken.read_text() == "keep me"


def test_os_errors_for_a_file_in_the_way_are_said_in_words():
    import errno

    from featdenoise.cli.app import describe_os_error

    err = FileExistsError(errno.EEXIST, "File exists", "reports/x")
    assert describe_os_error(err).startswith("reports/x: a file is in the way where a folder")


def _image_folder(root: Path) -> Path:
    root.mkdir()
    for i in range(3):
        png(root / f"img{i}.png", 40 * i, size=8)
    return root


def _tiny_checkpoint(tmp_path: Path) -> Path:
    from featdenoise.hub.checkpoints import save_weights
    from featdenoise.models import create_model

    kwargs = dict(in_channels=3, num_classes=10, width=4, blocks=[1, 1, 1])
    path = tmp_path / "m.safetensors"
    save_weights(str(path), create_model("small_resnet", **kwargs), "small_resnet", kwargs)
    return path


def test_predict_out_folder_and_input_file_are_named(tmp_path, capsys):
    images = _image_folder(tmp_path / "imgs")
    model = _tiny_checkpoint(tmp_path)
    folder = tmp_path / "outdir"
    folder.mkdir()
    line = one_error(capsys, "predict", images, "--checkpoint", model, "--out", folder)
    assert f"--out {folder} is an existing folder; give a file path" in line
    line = one_error(capsys, "predict", images / "img0.png", "--checkpoint", model)
    assert f"DIR {images / 'img0.png'} is a file" in line and str(images) in line
    # the user's labels file (with a header: not a predictions file) is not replaced ...
    labels = tmp_path / "labels.csv"
    labels.write_text("filename,label\nimg0.png,3\n")
    line = one_error(capsys, "predict", images, "--checkpoint", model, "--out", labels)
    assert f"refusing to replace {labels}" in line
    assert labels.read_text() == "filename,label\nimg0.png,3\n"
    # ... an earlier predictions file is
    out = tmp_path / "p.csv"
    for _ in range(2):
        assert main(["predict", str(images), "--checkpoint", str(model), "--out", str(out),
                     "--no-progress"]) == 0
    assert len(out.read_text().splitlines()) == 4  # the header row and 3 images


@pytest.mark.parametrize("rows, words", [
    ("a.png,-1\n", "labels.csv:1: label -1 is not a class index"),
    ("filename,label\na.png,1\nb.png,2\na.png,3\n",
     "labels.csv: image 'a' has label 1 on line 2 and label 3 on line 4"),
    ("a.png,1\nsub/a.jpg,2\n", "labels.csv: image 'a' has label 1 on line 1 and label 2 on line 2"),
])
def test_label_csv_negative_or_conflicting_rows_are_refused(tmp_path, rows, words):
    from featdenoise.data.files import read_labels_csv

    path = tmp_path / "labels.csv"
    path.write_text(rows)
    with pytest.raises(ValueError) as err:
        read_labels_csv(str(path))
    assert words in str(err.value) and "\n" not in str(err.value)


def test_label_csv_identical_duplicates_are_accepted(tmp_path):
    from featdenoise.data.files import read_labels_csv

    path = tmp_path / "labels.csv"
    path.write_text("a.png,1\nb.png,0\na.png,1\n")
    assert read_labels_csv(str(path)) == {"a": 1, "b": 0}


def test_label_minus_one_through_eval_is_not_called_missing(tmp_path, capsys):
    images = _image_folder(tmp_path / "imgs")
    labels = tmp_path / "labels.csv"
    labels.write_text("img0.png,1\nimg1.png,-1\nimg2.png,2\n")
    line = one_error(capsys, "eval", "--checkpoint", _tiny_checkpoint(tmp_path), "--data",
                      "folder", "--data-root", images, "--labels", labels, "--out",
                      tmp_path / "ev")
    assert "labels.csv:2: label -1 is not a class index" in line and "no label" not in line


def _interrupting_train_step(monkeypatch, at_call: int, after_update: bool):
    """Make the ``at_call``-th training step raise KeyboardInterrupt (before it runs, or after
    its SGD update but before the step is counted)."""
    from featdenoise.training.recipes import pgd

    real, calls = pgd.train_step, {"n": 0}

    def step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == at_call and not after_update:
            raise KeyboardInterrupt
        real(*args, **kwargs)
        if calls["n"] == at_call:
            raise KeyboardInterrupt

    monkeypatch.setattr(pgd, "train_step", step)


def test_ctrl_c_with_checkpoint_every_0_saves_the_position(tmp_path, capsys, monkeypatch):
    """Ctrl-C in the middle of an epoch with ``run.checkpoint_every=0``: a checkpoint of the
    exact position is saved and one line says so. Interrupted before step 3 runs, or right after
    the update of step 2 (before it is counted), the run saves step 2 with the same weights
    either way (resuming from a saved position is tested in test_loop.py)."""
    from featdenoise.hub.checkpoints import load_checkpoint

    data = write_idx_folder(tmp_path / "fmnist", n=24)
    saved = []
    for after_update in (False, True):
        run = tmp_path / f"run{int(after_update)}"
        cfg = tmp_path / f"c{int(after_update)}.yaml"
        cfg.write_text(yaml.safe_dump(tiny_epoch_config(run, data)))
        _interrupting_train_step(monkeypatch, at_call=2 if after_update else 3,
                                 after_update=after_update)
        code, lines = run_cli(capsys, "train", "--config", cfg)
        monkeypatch.undo()
        assert code == 130 and len(lines) == 1, lines
        assert lines[0] == (f"featdenoise train: interrupted at step 2 of 4 (epoch 1, batch 2); "
                            f"checkpoint saved to {run / 'checkpoint.pt'}: continue with --resume")
        saved.append(load_checkpoint(str(run / "checkpoint.pt")))
        assert (saved[-1]["step"], saved[-1]["step_in_epoch"], saved[-1]["epoch"]) == (2, 2, 0)
        assert not (run / "model.safetensors").exists()
    for key, value in saved[0]["model"].items():
        assert torch.equal(value, saved[1]["model"][key]), key


def test_ctrl_c_that_cannot_save_says_what_is_lost(tmp_path, capsys, monkeypatch):
    from featdenoise.hub import checkpoints as checkpoint

    data = write_idx_folder(tmp_path / "fmnist", n=24)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(tiny_epoch_config(tmp_path / "run", data)))
    _interrupting_train_step(monkeypatch, at_call=2, after_update=False)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_checkpoint", disk_full)
    code, lines = run_cli(capsys, "train", "--config", cfg)
    assert code == 130 and len(lines) == 1, lines
    assert "interrupted at step 1 of 4" in lines[0]
    assert "could not save a checkpoint ([Errno 28] No space left on device)" in lines[0]
    assert "no checkpoint exists, so the 1 step(s) trained are lost" in lines[0]


def test_predictions_file_check_reads_without_failing_on_binary(tmp_path):
    from featdenoise.data.files import is_predictions_csv

    blob = tmp_path / "x.csv"
    blob.write_bytes(np.arange(256, dtype=np.uint8).tobytes())
    assert not is_predictions_csv(str(blob))
    ok = tmp_path / "p.csv"
    ok.write_text("filename,featdenoise_prediction\na.png,1\nb.png,0\n")
    assert is_predictions_csv(str(ok))
