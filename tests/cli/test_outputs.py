"""Where commands write, who holds a folder, what a restart deletes, and labels with a BOM.

Four classes, each fixed in the layer that owns it (:mod:`featdenoise.runtime.outdir` for the
first three) and tested here with the reported inputs and more of the same kind:

1. writes outside the named folder or over the user's files: names derived from inputs (``.``,
   ``..``, separators, collisions), output folders that are inputs, links, predictions files that
   overwrite a labels file;
2. one process per run or evaluation folder (a lock naming the holder; stale locks taken over);
3. ``--restart`` plans and checks every deletion before deleting anything;
4. label CSVs with a UTF-8 byte-order mark.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import (
    folder_dataset,
    one_error,
    png,
    run_cli,
    snapshot,
    tiny_checkpoint,
    tiny_epoch_config,
    write_idx_folder,
)

from featdenoise.cli import main
from featdenoise.runtime import outdir

pytestmark = pytest.mark.usefixtures("one_thread")


def _eval_args(folder: Path, labels: Path, *models, out) -> list[str]:
    """``featdenoise eval`` of ``models`` on the image folder: 1 PGD step, 4 images, the CPU."""
    ck = [a for m in models for a in ("--checkpoint", str(m))]
    return ["eval", *ck, "--data", "folder", "--data-root", str(folder), "--labels",
            str(labels), "--steps", "1", "--eps", "8", "--batch-size", "4", "--out", str(out),
            "--device", "cpu", "--no-progress"]


@pytest.fixture
def two_models(tmp_path) -> tuple[Path, Path, Path, Path]:
    """(image folder, labels CSV, run folder net_a, run folder net_b) under ``tmp_path``."""
    folder, labels = folder_dataset(tmp_path, n=4)
    return folder, labels, tiny_checkpoint(tmp_path, "net_a"), tiny_checkpoint(tmp_path, "net_b")


# =========================================================================== 1. where writes go
@pytest.mark.parametrize("name, safe", [
    (".", "model"), ("..", "model"), ("", "model"), ("a/b", "a_b"), ("../../etc", "_.._etc"),
    ("a\\b", "a_b"), ("src:pgd", "src_pgd"), (".hidden", "hidden"), ("ok-1_2.v3", "ok-1_2.v3"),
])
def test_safe_name_is_one_path_component_never_dot_or_dotdot(name, safe):
    got = outdir.safe_name(name)
    assert got == safe
    assert got not in ("", ".", "..") and os.sep not in got and "/" not in got


def test_unique_names_sanitise_and_number_collisions():
    assert outdir.unique_names(["a", "a", "A", "..", ".", "b/c", "b_c"]) == \
        ["a", "a-2", "A-3", "model", "model-2", "b_c", "b_c-2"]


def test_display_name_comes_from_the_resolved_path(tmp_path, monkeypatch):
    from featdenoise.hub.loading import model_name_from_path

    run = tmp_path / "runs" / "net_x"
    (run / "eval").mkdir(parents=True)
    (run / "model.safetensors").write_bytes(b"")
    monkeypatch.chdir(run / "eval")
    assert outdir.display_name("..") == "net_x" == model_name_from_path("..")
    monkeypatch.chdir(run)
    assert model_name_from_path(".") == "net_x" == model_name_from_path("model.safetensors")


@pytest.mark.parametrize("spec", ["..", "."])
def test_eval_of_dot_models_stays_in_out(two_models, monkeypatch, capsys, spec):
    """Reported: run from inside a run folder, ``--checkpoint ..`` wrote settings, summary, parts
    and table into the parent of --out; ``--checkpoint .`` had its table overwritten by the
    merged one."""
    folder, labels, net_a, net_b = two_models
    here = net_a / "eval" if spec == ".." else net_a
    here.mkdir(exist_ok=True)
    monkeypatch.chdir(here)
    before = sorted(p.name for p in here.iterdir())
    assert main(_eval_args(folder, labels, spec, net_b, out="OUT")) == 0
    assert sorted(p.name for p in here.iterdir()) == sorted([*before, "OUT"])
    out = here / "OUT"
    assert {p.name for p in out.iterdir() if p.is_dir()} == {"net_a", "net_b"}
    own = (out / "net_a" / "table.md").read_text()
    merged = (out / "table.md").read_text()
    assert "| net_a |" in own and "net_b" not in own
    assert "| net_a |" in merged and "| net_b |" in merged
    capsys.readouterr()


def test_eval_models_with_one_name_get_two_folders(tmp_path, capsys):
    folder, labels = folder_dataset(tmp_path, n=4)
    a = tiny_checkpoint(tmp_path / "x", "net")
    b = tiny_checkpoint(tmp_path / "y", "net")
    assert main(_eval_args(folder, labels, a, b, out=tmp_path / "ev")) == 0
    assert sorted(p.name for p in (tmp_path / "ev").iterdir() if p.is_dir()) == ["net", "net-2"]
    assert "| net-2 |" in (tmp_path / "ev" / "table.md").read_text()
    capsys.readouterr()


def test_eval_per_model_folder_that_is_an_input_is_refused(two_models, tmp_path, capsys):
    """``--out`` the folder holding both run folders: ``OUT/net_a`` would be the model itself."""
    folder, labels, net_a, net_b = two_models
    before = snapshot(net_a)
    line = one_error(capsys, *_eval_args(folder, labels, net_a, net_b, out=tmp_path))
    assert f"--out {net_a} is an input of this command" in line
    assert snapshot(net_a) == before and not (tmp_path / "settings.json").exists()


def test_eval_per_model_folder_that_is_a_link_is_refused(two_models, tmp_path, capsys):
    folder, labels, net_a, net_b = two_models
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "ev").mkdir()
    (tmp_path / "ev" / "net_a").symlink_to(elsewhere)
    line = one_error(capsys, *_eval_args(folder, labels, net_a, net_b, out=tmp_path / "ev"))
    assert f"{tmp_path / 'ev' / 'net_a'}: it is a symbolic link" in line
    assert list(elsewhere.iterdir()) == []


def test_output_folder_that_is_an_input_is_refused_by_every_command(tmp_path, capsys):
    """eval, eval --plot, blackbox (--out and --save-adv), visualize, demo: an --out that is (any
    spelling of) a folder the command reads is refused before anything is loaded or written."""
    folder, labels = folder_dataset(tmp_path, n=4)
    net = tiny_checkpoint(tmp_path, "net")
    data = write_idx_folder(tmp_path / "fmnist", n=4)
    adv = tmp_path / "adv"
    adv.mkdir()
    spelled = str(folder / ".." / folder.name)
    cases = [
        (_eval_args(folder, labels, net, out=spelled), spelled),
        (["eval", "--plot", str(net), "--out", str(net)], str(net)),
        (["blackbox", "--checkpoint", str(net), "--clean-dir", str(folder), "--labels",
          str(labels), "--adv-dirs", str(adv), "--out", str(adv)], str(adv)),
        (["blackbox", "--checkpoint", str(net), "--clean-dir", str(folder), "--labels",
          str(labels), "--adv-dirs", str(adv), "--out", str(tmp_path / "bb"),
          "--save-adv", str(folder)], str(folder)),
        (["visualize", "--checkpoint", str(net), "--data", "fashion_mnist", "--data-root",
          str(data), "--out", str(data)], str(data)),
        (["demo", "--data-root", str(data), "--out", str(data)], str(data)),
    ]
    before = snapshot(tmp_path)
    for argv, shown in cases:
        line = one_error(capsys, *argv)
        assert f"{shown} is an input of this command" in line, (argv, line)
    assert snapshot(tmp_path) == before


def _images(root: Path, n: int = 2) -> Path:
    root.mkdir()
    for i in range(n):
        png(root / f"img{i}.png", 50 * i, size=8)
    return root


def test_predict_never_replaces_a_labels_file(tmp_path, capsys):
    """Reported: ``predict --out labels.csv`` replaced the user's headerless ground truth."""
    images = _images(tmp_path / "imgs")
    model = tiny_checkpoint(tmp_path, "net") / "model.safetensors"
    for text in ("img0.png,3\nimg1.png,1\n", "img0,3\n", "\ufeffimg0.png,3\n", ""):
        labels = tmp_path / "labels.csv"
        labels.write_text(text)
        line = one_error(capsys, "predict", images, "--checkpoint", model, "--out", labels)
        assert f"refusing to replace {labels}" in line
        assert labels.read_text() == text
    # ours (the header row) is replaced; the official headerless form is written only once
    out = tmp_path / "p.csv"
    for _ in range(2):
        assert run_cli(capsys, "predict", images, "--checkpoint", model, "--out", out,
                    "--no-progress")[0] == 0
    assert out.read_text().splitlines()[0] == "filename,featdenoise_prediction"
    bare = tmp_path / "bare.csv"
    assert run_cli(capsys, "predict", images, "--checkpoint", model, "--out", bare, "--no-header",
                "--no-progress")[0] == 0
    assert bare.read_text().splitlines()[0].startswith("img0.png,")
    text = bare.read_text()
    line = one_error(capsys, "predict", images, "--checkpoint", model, "--out", bare,
                      "--no-header")
    assert f"refusing to replace {bare}" in line and bare.read_text() == text


def test_predict_out_that_is_an_input_is_refused(tmp_path, capsys):
    images = _images(tmp_path / "imgs")
    model = tiny_checkpoint(tmp_path, "net") / "model.safetensors"
    before = model.read_bytes()
    line = one_error(capsys, "predict", images, "--checkpoint", model, "--out", model)
    assert "it is an input of this command" in line and model.read_bytes() == before


def test_predictions_written_by_the_library_refuse_a_foreign_file(tmp_path):
    from featdenoise.data.files import read_labels_csv, write_labels_csv

    theirs = tmp_path / "theirs.csv"
    theirs.write_text("a.png,1\n")
    with pytest.raises(ValueError, match="not written by featdenoise"):
        write_labels_csv(str(theirs), ["b.png"], [2])
    assert theirs.read_text() == "a.png,1\n"
    ours = tmp_path / "ours.csv"
    write_labels_csv(str(ours), ["a.png", "b.png"], [1, 2])
    write_labels_csv(str(ours), ["c.png"], [0])
    assert read_labels_csv(str(ours)) == {"c": 0}  # the header row is not a label


# ===================================================================== 2. one process per folder
def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _hold(folder: Path, pid: int, **extra) -> Path:
    """A lock file as a run of process ``pid`` leaves it in ``folder``."""
    import socket

    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / outdir.LOCK_FILE
    lock.write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "since": 0, **extra}))
    return lock


@pytest.fixture
def train_config(tmp_path) -> tuple[Path, Path]:
    """(run folder, config file of a 4-step run into it)."""
    data = write_idx_folder(tmp_path / "fmnist", n=24)
    run = tmp_path / "run"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(tiny_epoch_config(run, data)))
    return run, cfg


def test_second_train_into_a_held_run_folder_is_refused(train_config, capsys):
    """Reported: two trains into one run.out_dir both ran, over each other's checkpoints."""
    run, cfg = train_config
    lock = _hold(run, os.getppid())  # a live process holds the folder
    before = snapshot(run)
    line = one_error(capsys, "train", "--config", cfg)
    assert f"run.out_dir {run} is in use by another featdenoise run (pid {os.getppid()}" in line
    assert snapshot(run) == before and lock.exists()


@pytest.mark.parametrize("how", ["killed", "pid reused", "unreadable"])
def test_a_stale_run_lock_is_taken_over_and_released(train_config, capsys, how):
    run, cfg = train_config
    if how == "killed":
        _hold(run, _dead_pid())
    elif how == "pid reused":  # a live pid, but not the process that took the lock
        _hold(run, os.getppid(), started="not-its-start-time")
    else:
        run.mkdir()
        (run / outdir.LOCK_FILE).write_text("{half a record")
    assert run_cli(capsys, "train", "--config", cfg)[0] == 0
    assert (run / "model.safetensors").exists() and not (run / outdir.LOCK_FILE).exists()


def test_a_refused_train_releases_its_lock_and_leaves_no_folder(tmp_path, capsys):
    data = write_idx_folder(tmp_path / "fmnist", n=24)
    cfg = tmp_path / "c.yaml"
    tree = tiny_epoch_config(tmp_path / "new", data)
    tree["model"]["name"] = "no_such_model"
    cfg.write_text(yaml.safe_dump(tree))
    one_error(capsys, "train", "--config", cfg)
    assert not (tmp_path / "new").exists()


def test_lock_refuses_while_held_and_frees_on_release(tmp_path):
    other = outdir.FolderLock(str(tmp_path / "f"), "folder")
    _hold(tmp_path / "f", os.getppid())
    with pytest.raises(ValueError, match=f"in use by another featdenoise run \\(pid "
                                         f"{os.getppid()}"):
        other.acquire()
    (tmp_path / "f" / outdir.LOCK_FILE).unlink()
    with outdir.FolderLock(str(tmp_path / "f")) as lock:
        held = json.loads(Path(lock.path).read_text())
        assert held["pid"] == os.getpid()
    assert not (tmp_path / "f" / outdir.LOCK_FILE).exists()


def test_an_evaluation_folder_held_by_another_run_is_refused(two_models, tmp_path, capsys):
    folder, labels, net_a, _ = two_models
    out = tmp_path / "ev"
    _hold(out, os.getppid())
    line = one_error(capsys, *_eval_args(folder, labels, net_a, out=out))
    assert f"evaluation folder {out} is in use by another featdenoise run" in line
    assert sorted(p.name for p in out.iterdir()) == [outdir.LOCK_FILE]
    # a hand-run shard waits for a run of the whole folder, not for another shard
    from featdenoise.evaluation.identity import folder_lock

    with pytest.raises(ValueError, match="in use"):
        folder_lock(str(out), 1).acquire()
    (out / outdir.LOCK_FILE).unlink()
    with folder_lock(str(out), 0), folder_lock(str(out), 1):  # two shards at once
        with pytest.raises(ValueError, match="in use"):  # the whole folder waits for them
            folder_lock(str(out), None).acquire()
    assert main(_eval_args(folder, labels, net_a, out=out)) == 0
    assert not any(p.name.startswith(outdir.LOCK_FILE) for p in out.iterdir())
    capsys.readouterr()


def _lock_worker(rank, world, port, folders, held):
    from helpers import as_rank

    from featdenoise.runtime import distributed as dist

    as_rank(rank, world, port)
    os.chdir(folders[rank])  # each "node" its own disk: the same relative run folder
    dist.init("cpu")
    try:
        with outdir.lock_on_main("run", "run.out_dir"):
            seen = os.path.exists(os.path.join("run", outdir.LOCK_FILE))
        Path("seen.txt").write_text(str(seen))
        with held(), outdir.lock_on_main("run", "run.out_dir"):
            pass
    except ValueError as err:
        Path("error.txt").write_text(str(err))
    finally:
        dist.shutdown()


class _HeldBy:
    """Writes a live holder's lock into rank 0's run folder when called (a picklable stand-in for
    another run starting there)."""

    def __init__(self, folder: str, pid: int):
        self.folder, self.pid = folder, pid

    def __call__(self):
        import contextlib

        if os.getcwd() == self.folder:
            _hold(Path(self.folder) / "run", self.pid)
        return contextlib.nullcontext()


def test_under_torchrun_only_rank_0_takes_the_lock_and_every_rank_hears_a_refusal(tmp_path):
    import torch.multiprocessing as mp
    from helpers import free_port

    folders = [str(tmp_path / "node0"), str(tmp_path / "node1")]
    for f in folders:
        os.makedirs(f)
    cwd = os.getcwd()
    try:
        mp.start_processes(_lock_worker, args=(2, free_port(), folders,
                                               _HeldBy(folders[0], os.getpid())),
                           nprocs=2, join=True, start_method="fork")
    finally:
        os.chdir(cwd)
    assert [Path(f, "seen.txt").read_text() for f in folders] == ["True", "False"]
    assert not os.path.exists(os.path.join(folders[1], "run", outdir.LOCK_FILE))
    errors = [Path(f, "error.txt").read_text() for f in folders]
    assert errors[0] == errors[1] and f"pid {os.getpid()}" in errors[0]


# =========================================================================== 3. restart
@pytest.fixture
def finished_eval(two_models, tmp_path, capsys) -> tuple[list[str], Path]:
    """(the eval command line at another eps, its finished evaluation folder at eps 8)."""
    folder, labels, net_a, _ = two_models
    out = tmp_path / "ev"
    args = _eval_args(folder, labels, net_a, out=out)
    assert main(args) == 0
    capsys.readouterr()
    return [*args[:args.index("--eps") + 1], "4", *args[args.index("--eps") + 2:],
            "--restart"], out


def test_restart_with_parts_a_link_deletes_nothing(finished_eval, tmp_path, capsys):
    """Reported: ``--restart`` deleted settings and records, then failed on rmtree of a link."""
    argv, out = finished_eval
    kept = tmp_path / "kept"
    (out / "parts").rename(kept)
    (out / "parts").symlink_to(kept)
    before, theirs = snapshot(out), snapshot(kept)
    line = one_error(capsys, *argv)
    assert f"--restart: refusing to remove {out / 'parts'}: it is a symbolic link" in line
    assert "nothing was deleted" in line
    assert snapshot(out) == before and snapshot(kept) == theirs


@pytest.mark.parametrize("spoil", ["link inside parts", "foreign table", "foreign record",
                                   "summary a link"])
def test_restart_checks_every_deletion_first(finished_eval, tmp_path, capsys, spoil):
    argv, out = finished_eval
    outside = tmp_path / "precious.txt"
    outside.write_text("keep")
    if spoil == "link inside parts":
        (out / "parts" / "extra.jsonl").symlink_to(outside)
    elif spoil == "foreign table":
        (out / "table.md").write_text("# my notes\n")
    elif spoil == "foreign record":
        (out / "parts" / "notes.txt").write_text("not a record\n")
    else:
        (out / "summary.json").unlink()
        (out / "summary.json").symlink_to(outside)
    before = snapshot(out)
    line = one_error(capsys, *argv)
    assert line.startswith("featdenoise eval: error: --restart: refusing to remove")
    assert "nothing was deleted" in line
    assert snapshot(out) == before and outside.read_text() == "keep"


def test_restart_of_an_evaluation_of_ours_starts_over(finished_eval, capsys):
    argv, out = finished_eval
    assert main(argv) == 0
    settings = json.loads((out / "settings.json").read_text())
    assert settings["eps_255"] == 4
    capsys.readouterr()


def test_resume_into_records_folder_that_is_a_link_is_refused(finished_eval, tmp_path, capsys):
    argv, out = finished_eval
    argv = [a for a in argv if a != "--restart"]
    argv[argv.index("--eps") + 1] = "8"
    (out / "summary.json").unlink()
    (out / "outcomes.jsonl").unlink()
    kept = tmp_path / "kept"
    (out / "parts").rename(kept)
    (out / "parts").symlink_to(kept)
    theirs = snapshot(kept)
    line = one_error(capsys, *argv)
    assert f"{out / 'parts'}: it is a symbolic link" in line and snapshot(kept) == theirs


def test_plan_removal_refuses_before_removing(tmp_path):
    folder = tmp_path / "f"
    folder.mkdir()
    (folder / "a.txt").write_text("ours")
    (folder / "b.txt").write_text("theirs")
    ours = {"a.txt": lambda p: Path(p).read_text() == "ours",
            "b.txt": lambda p: Path(p).read_text() == "ours", "absent": lambda p: True}
    with pytest.raises(ValueError, match=f"refusing to remove {folder / 'b.txt'}"):
        outdir.plan_removal(str(folder), ours)
    assert sorted(p.name for p in folder.iterdir()) == ["a.txt", "b.txt"]
    planned = outdir.plan_removal(str(folder), {"a.txt": ours["a.txt"]})
    outdir.remove_planned(planned)
    assert [p.name for p in folder.iterdir()] == ["b.txt"]


def test_demo_deletes_only_its_own_earlier_results(tmp_path, capsys):
    """The demo rewrote runs/, eval/ and feature_noise/ of --out wholesale: a user's folder or
    file there was deleted without a word. Now each of its own folders is checked first."""
    data = write_idx_folder(tmp_path / "fmnist", n=4)
    out = tmp_path / "report"
    (out / "runs" / "mine").mkdir(parents=True)
    (out / "runs" / "mine" / "keep.txt").write_text("mine")
    (out / "runs" / "clean").mkdir()
    (out / "runs" / "clean" / "notes.txt").write_text("also mine")
    before = snapshot(out)
    line = one_error(capsys, "demo", "--data-root", data, "--out", out, "--quick")
    assert f"demo: refusing to remove {out / 'runs' / 'clean'}: it was not written" in line
    assert "nothing was deleted" in line and snapshot(out) == before


def test_finished_run_and_evaluation_folders_are_recognised_as_ours(train_config, two_models,
                                                                   tmp_path, capsys):
    from featdenoise.evaluation.records import is_own_evaluation
    from featdenoise.training.rundir import is_own_run_dir

    run, cfg = train_config
    assert run_cli(capsys, "train", "--config", cfg)[0] == 0
    folder, labels, net_a, _ = two_models
    assert main(_eval_args(folder, labels, net_a, out=tmp_path / "ev")) == 0
    capsys.readouterr()
    assert is_own_run_dir(str(run)) and is_own_evaluation(str(tmp_path / "ev"))
    (run / "notes.txt").write_text("mine")
    (tmp_path / "ev" / "parts" / "notes.txt").write_text("mine")
    assert not is_own_run_dir(str(run)) and not is_own_evaluation(str(tmp_path / "ev"))


# =========================================================================== 4. labels with a BOM
@pytest.mark.parametrize("text", ["\ufeffimg0.png,2\nimg1.png,0\n",
                                  "\ufefffilename,label\nimg0.png,2\nimg1.png,0\n"])
def test_labels_csv_with_a_byte_order_mark(tmp_path, text):
    """Reported: "no label for img0.png" although it is listed (the BOM was part of its name)."""
    from featdenoise.data.files import read_labels_csv

    path = tmp_path / "labels.csv"
    path.write_text(text, encoding="utf-8")
    assert read_labels_csv(str(path)) == {"img0": 2, "img1": 0}


def test_eval_reads_labels_with_a_byte_order_mark(two_models, tmp_path, capsys):
    folder, labels, net_a, _ = two_models
    bom = tmp_path / "bom.csv"  # headerless: the mark sticks to the first image's name
    bom.write_bytes(b"\xef\xbb\xbf" + labels.read_bytes().split(b"\n", 1)[1])
    assert main(_eval_args(folder, bom, net_a, out=tmp_path / "ev")) == 0
    assert json.loads((tmp_path / "ev" / "summary.json").read_text())["num_images"] == 4
    capsys.readouterr()
