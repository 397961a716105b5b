"""Bad input gets one clear line naming the file or value and what to do; odd images are converted.

Covers: missing or empty dataset folders, corrupt or truncated images (skipped and counted, or a
strict error naming the file), grayscale / palette / CMYK / 16-bit / alpha images, official
checkpoints given with the wrong arch or depth, checkpoints of another model, out-of-range eps and
steps, unknown op / model names and unknown config keys (library and CLI).
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import png, run_cli, write_idx_folder
from PIL import Image


def _one_line(err: BaseException) -> str:
    text = str(err)
    assert text and "\n" not in text, f"error is not one line: {text!r}"
    return text


def _cli(capsys, *argv: str) -> tuple[int, str]:
    """Run ``featdenoise ARGV`` in-process -> (exit status, stderr), argparse's errors included."""
    code, lines = run_cli(capsys, *argv)
    return code, "\n".join(lines)


# --------------------------------------------------------------------------- dataset folders
@pytest.mark.parametrize("name", ["fashion_mnist", "cifar10", "imagenet"])
def test_missing_dataset_folder_names_the_path(tmp_path, name):
    from featdenoise.data.datasets import build_dataset

    root = tmp_path / "no-such-folder"
    with pytest.raises(FileNotFoundError) as err:
        build_dataset(name, root=str(root), split="val")
    assert "no-such-folder" in _one_line(err.value)


@pytest.mark.parametrize("name", ["fashion_mnist", "cifar10", "imagenet"])
def test_empty_dataset_folder_is_a_clear_error(tmp_path, name):
    from featdenoise.data.datasets import build_dataset

    root = tmp_path / "empty"
    root.mkdir()
    if name == "imagenet":  # the layout is there, the images are not
        (root / "train" / "n01440764").mkdir(parents=True)
        (root / "val" / "n01440764").mkdir(parents=True)
    with pytest.raises(FileNotFoundError) as err:
        build_dataset(name, root=str(root), split="val")
    assert "empty" in _one_line(err.value)


# --------------------------------------------------------------------------- image files


def _imagenet_folder(root: Path) -> dict[str, Path]:
    """train/val with two classes; val/a holds a corrupt and a truncated file."""
    for split in ("train", "val"):
        for c, v in (("a", 60), ("b", 200)):
            (root / split / c).mkdir(parents=True)
            png(root / split / c / "ok.png", v)
    bad = root / "val" / "a" / "corrupt.jpg"
    bad.write_bytes(b"this is not an image at all" * 10)
    full = root / "val" / "b" / "full.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(
        full, quality=95)
    truncated = root / "val" / "b" / "truncated.jpg"
    truncated.write_bytes(full.read_bytes()[: len(full.read_bytes()) // 2])
    full.unlink()
    return {"corrupt": bad, "truncated": truncated}


def _train_overrides(out: Path, *extra: str) -> list[str]:
    return ["model.name=small_resnet",
            "model.kwargs={in_channels: 3, num_classes: 2, width: 4, blocks: [1, 1, 1]}",
            "data.name=imagenet", "data.image_size=16", "data.batch_size=2", "data.workers=0",
            "attack.steps=0", "optim.epochs=1", "optim.base_batch=2", "optim.warmup_epochs=0",
            "optim.milestones=[5]", f"run.out_dir={out}", "run.eval_every=0",
            "run.final_eval_steps=0", "run.progress=false", "run.tensorboard=false",
            "run.device=cpu", *extra]


def test_corrupt_images_are_skipped_counted_and_reported_at_the_end_of_the_epoch(tmp_path,
                                                                                   capsys):
    """Training over a folder with a corrupt and a truncated file does not stop: both are
    skipped, counted in metrics.jsonl and reported once at the end of the epoch; with
    ``data.strict=true`` the first one stops the run with an error naming it."""
    from featdenoise.training import train
    from featdenoise.training.config import load_config
    from featdenoise.training.metrics import read_metrics

    data = tmp_path / "data"
    bad = _imagenet_folder(data)
    for c, v in (("a", 80), ("b", 180)):  # 6 good training images, 2 bad ones
        png(data / "train" / c / "more.png", v)
    for which in bad.values():
        shutil.copy(which, data / "train" / "a" / which.name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run = train(load_config(None, _train_overrides(tmp_path / "run", f"data.root={data}")))
    epoch = [r for r in read_metrics(run) if r["kind"] == "epoch"]
    assert len(epoch) == 1 and epoch[0]["skipped_files"] == 2, epoch
    assert "skipped 2 unreadable" in capsys.readouterr().out

    strict = _train_overrides(tmp_path / "strict", f"data.root={data}", "data.strict=true")
    with pytest.raises(ValueError) as err:
        train(load_config(None, strict))
    text = _one_line(err.value)
    assert "corrupt.jpg" in text or "truncated.jpg" in text


@pytest.mark.parametrize("which", ["corrupt", "truncated"])
def test_strict_mode_names_the_bad_file(tmp_path, which):
    from featdenoise.data.datasets import build_dataset

    bad = _imagenet_folder(tmp_path)
    ds = build_dataset("imagenet", root=str(tmp_path), split="val", image_size=16, strict=True)
    index = [p for p, _ in ds.samples].index(str(bad[which]))
    with pytest.raises(ValueError) as err:
        ds[index]
    assert str(bad[which]) in _one_line(err.value)


def _mode_images(folder: Path) -> dict[str, tuple[Path, tuple[int, int, int]]]:
    """One file per awkward mode -> (path, the RGB value its pixels must become)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    p = folder / "gray.png"
    Image.fromarray(np.full((8, 8), 90, np.uint8), "L").save(p)
    out["L"] = (p, (90, 90, 90))
    p = folder / "gray_alpha.png"
    Image.fromarray(np.dstack([np.full((8, 8), 50, np.uint8), np.full((8, 8), 7, np.uint8)]),
                    "LA").save(p)
    out["LA"] = (p, (50, 50, 50))
    p = folder / "rgba.png"
    Image.fromarray(np.tile(np.array([10, 20, 30, 0], np.uint8), (8, 8, 1)), "RGBA").save(p)
    out["RGBA"] = (p, (10, 20, 30))  # alpha is dropped, not composited
    p = folder / "palette.png"
    Image.fromarray(np.full((8, 8, 3), (200, 100, 0), np.uint8)).convert(
        "P", palette=Image.Palette.ADAPTIVE).save(p)
    out["P"] = (p, (200, 100, 0))
    p = folder / "cmyk.tif"
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(p)  # pure red ink
    out["CMYK"] = (p, (255, 0, 0))
    p = folder / "gray16.png"
    Image.fromarray(np.full((8, 8), 32896, np.uint16)).save(p)  # 32896 / 65535 * 255 = 128
    with Image.open(p) as im:
        assert im.mode.startswith("I")  # really stored as 16-bit
    out["I;16"] = (p, (128, 128, 128))
    return out


def test_image_modes_are_converted_to_8bit_rgb(tmp_path):
    from featdenoise.data.datasets import load_rgb

    for mode, (path, rgb) in _mode_images(tmp_path).items():
        img = load_rgb(str(path))
        assert img.mode == "RGB", mode
        px = np.asarray(img)
        assert px.shape == (8, 8, 3), mode
        assert np.abs(px.astype(int) - np.array(rgb)).max() <= 1, (mode, px[0, 0], rgb)


def test_image_modes_in_a_dataset_folder_give_3_channel_tensors(tmp_path):
    from featdenoise.data.datasets import build_dataset

    images = _mode_images(tmp_path / "val" / "n0")
    (tmp_path / "train" / "n0").mkdir(parents=True)
    png(tmp_path / "train" / "n0" / "x.png")
    ds = build_dataset("imagenet", root=str(tmp_path), split="val", image_size=8, strict=True)
    assert len(ds) == len(images)
    for i in range(len(ds)):
        x, label = ds[i]
        assert x.shape == (3, 8, 8) and x.dtype == torch.float32 and label == 0
        assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0


def test_folder_images_are_converted_like_dataset_images(tmp_path):
    """``predict`` and ``blackbox --adv-dirs`` read loose files: the same conversions apply
    (a 16-bit PNG must not saturate to white)."""
    from featdenoise.data.files import load_image

    for mode, (path, rgb) in _mode_images(tmp_path).items():
        x = load_image(str(path))  # [3, H, W] in [0, 1]
        assert x.shape == (3, 8, 8), mode
        got = (x[:, 0, 0] * 255).round().tolist()
        assert max(abs(g - r) for g, r in zip(got, rgb, strict=True)) <= 1, (mode, got, rgb)


def test_predict_on_a_folder_with_a_corrupt_image_names_it(tmp_path, capsys):
    from featdenoise.hub.checkpoints import save_weights
    from featdenoise.models import create_model

    kwargs = dict(in_channels=3, num_classes=10, width=4, blocks=[1, 1, 1])
    save_weights(str(tmp_path / "model.safetensors"), create_model("small_resnet", **kwargs),
                 "small_resnet", kwargs)
    folder = tmp_path / "images"
    folder.mkdir()
    png(folder / "a.png", size=16)
    (folder / "b.png").write_bytes(b"not an image" * 8)
    code, stderr = _cli(capsys, "predict", str(folder), "--checkpoint",
                        str(tmp_path / "model.safetensors"), "--size", "16", "--out",
                        str(tmp_path / "p.csv"), "--device", "cpu", "--no-progress")
    lines = stderr.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "b.png" in lines[0], stderr


# Official checkpoints given with the wrong --arch / --depth (every missing, unexpected and
# mis-shaped variable named) are tested in test_tensorpack.py
# (test_wrong_arch_or_depth_fails_clearly, test_every_offender_is_named); an npz holding
# pickled objects is refused in test_untrusted_files.py.


# --------------------------------------------------------------------------- another model's file
def test_checkpoint_of_another_model_is_a_clear_error(tmp_path, capsys):
    from safetensors.torch import save_file

    from featdenoise.hub.checkpoints import load_model

    # A plain state dict of some other network (no featdenoise metadata).
    other = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten())
    plain = tmp_path / "other.pt"
    torch.save(other.state_dict(), plain)
    with pytest.raises(ValueError) as err:
        load_model(str(plain))
    assert "other.pt" in _one_line(err.value)
    st = tmp_path / "other.safetensors"
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(st))
    with pytest.raises(ValueError) as err:
        load_model(str(st))
    assert "other.safetensors" in _one_line(err.value)
    code, stderr = _cli(capsys, "eval", "--checkpoint", str(plain), "--data", "cifar10",
                        "--data-root", str(tmp_path), "--out", str(tmp_path / "ev"),
                        "--device", "cpu", "--no-progress")
    assert code == 2 and "other.pt" in stderr and len(stderr.strip().splitlines()) == 1


def test_checkpoint_whose_weights_do_not_fit_its_model_lists_them(tmp_path):
    from featdenoise.hub.checkpoints import load_model
    from featdenoise.models import create_model

    kwargs = dict(in_channels=1, num_classes=10, width=4, blocks=[1, 1, 1])
    wide = create_model("small_resnet", **{**kwargs, "width": 8})
    torch.save({"model": wide.state_dict(), "model_name": "small_resnet",
                "model_kwargs": kwargs}, tmp_path / "checkpoint.pt")
    with pytest.raises(ValueError) as err:
        load_model(str(tmp_path / "checkpoint.pt"))
    text = str(err.value)
    assert "checkpoint.pt" in text.splitlines()[0]
    assert "small_resnet" in text and "shape" in text


# --------------------------------------------------------------------------- values and names
@pytest.mark.parametrize("kwargs, value", [
    ({"eps": -0.01}, "-0.01"), ({"eps": 1.5}, "1.5"), ({"eps": float("nan")}, "nan"),
    ({"steps": -1}, "-1"), ({"step_size": 0.0}, "0"), ({"restarts": 0}, "0"),
])
def test_attack_settings_out_of_range(kwargs, value):
    from featdenoise.attacks import PGD

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
    with pytest.raises(ValueError) as err:
        PGD(model, **kwargs)
    assert value in _one_line(err.value)


@pytest.mark.parametrize("name", ["fgsm", "ifgsm", "mifgsm"])
def test_every_attack_refuses_eps_outside_0_1(name):
    from featdenoise.attacks import build_attack

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
    for eps in (-0.1, 2.0):
        with pytest.raises(ValueError) as err:
            build_attack(name, model, eps=eps)
        assert str(eps) in _one_line(err.value)


def test_unknown_model_and_op_names():
    from featdenoise.models import create_model
    from featdenoise.models.denoise import DenoisingBlock

    with pytest.raises(ValueError) as err:
        create_model("resnet51")
    assert "resnet51" in _one_line(err.value) and "resnet50" in str(err.value)
    with pytest.raises(ValueError) as err:
        create_model("small_resnet_denoise", denoise="gaussian_nonlocal", width=4)
    assert "gaussian_nonlocal" in _one_line(err.value) and "nonlocal_gaussian" in str(err.value)
    with pytest.raises(ValueError) as err:  # a misspelt op is an error even where unused
        create_model("small_resnet", denoise="median3", width=4)
    assert "median3" in _one_line(err.value)
    with pytest.raises(ValueError) as err:
        DenoisingBlock(8, op="median3")
    assert "median3" in _one_line(err.value)
    with pytest.raises(ValueError) as err:
        create_model("small_resnet", widht=4)
    assert "widht" in _one_line(err.value)


@pytest.mark.parametrize("override, words", [
    ("optim.lrr=0.1", ["optim.lrr", "optim.lr"]),
    ("atack.eps=8", ["atack.eps"]),
    ("attack.eps=-1", ["attack.eps", "-1"]),
    ("attack.eps=300", ["attack.eps", "300"]),
    ("attack.steps=-1", ["attack.steps", "-1"]),
    ("optim.lr=fast", ["optim.lr", "fast"]),
])
def test_config_errors_are_one_line(override, words):
    from featdenoise.training.config import load_config

    with pytest.raises(ValueError) as err:
        load_config(overrides=[override])
    text = _one_line(err.value)
    for w in words:
        assert w in text


def test_config_file_with_an_unknown_key_or_broken_yaml(tmp_path):
    from featdenoise.training.config import load_config

    bad_key = tmp_path / "bad_key.yaml"
    bad_key.write_text("model:\n  name: small_resnet\n  widht: 4\n")
    with pytest.raises(ValueError) as err:
        load_config(str(bad_key))
    assert "model.widht" in _one_line(err.value)
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: [unclosed\n  name: x\n")
    with pytest.raises(ValueError) as err:
        load_config(str(broken))
    assert "broken.yaml" in _one_line(err.value)
    with pytest.raises(FileNotFoundError) as err:
        load_config(str(tmp_path / "missing.yaml"))
    assert "missing.yaml" in _one_line(err.value)


@pytest.mark.parametrize("argv, words", [
    (["--eps", "-1"], ["-1"]),
    (["--eps", "300"], ["300"]),
    (["--steps", "-5"], ["-5"]),
])
def test_cli_eval_bad_values_exit_2_with_one_line(tmp_path, capsys, argv, words):
    from featdenoise.hub.checkpoints import save_weights
    from featdenoise.models import create_model

    kwargs = dict(in_channels=1, num_classes=10, width=4, blocks=[1, 1, 1])
    save_weights(str(tmp_path / "model.safetensors"), create_model("small_resnet", **kwargs),
                 "small_resnet", kwargs)
    code, stderr = _cli(capsys, "eval", "--checkpoint", str(tmp_path / "model.safetensors"),
                        "--data", "fashion_mnist", "--limit", "4", "--batch-size", "4",
                        "--out", str(tmp_path / "ev"), "--device", "cpu", "--no-progress", *argv)
    lines = stderr.strip().splitlines()
    assert code == 2, stderr
    assert len(lines) == 1 and lines[0].startswith("featdenoise eval: error:"), stderr
    for w in words:
        assert w in lines[0]


def test_cli_train_unknown_model_or_op_exit_2(tmp_path, capsys):
    from featdenoise.cli.app import COMMANDS

    if not any(getattr(r, "__module__", "").endswith(".train") for r in COMMANDS):
        pytest.skip("featdenoise train is not registered in this build")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model:\n  name: small_resnet\n")
    data = write_idx_folder(tmp_path / "fmnist", n=8)
    for override, word in (("optim.lrr=0.1", "optim.lrr"), ("model.name=resnet51", "resnet51"),
                           ("model.name=small_resnet_denoise", "median3")):
        extra = ["model.kwargs.denoise=median3"] if "median3" == word else []
        code, stderr = _cli(capsys, "train", "--config", str(cfg), override, *extra,
                            f"run.out_dir={tmp_path / 'run'}", "data.name=fashion_mnist",
                            f"data.root={data}",
                            "data.train_subset=8", "data.val_subset=8", "data.batch_size=4",
                            "data.workers=0", "optim.epochs=1", "run.progress=false",
                            "run.tensorboard=false", "attack.steps=0",
                            "model.kwargs.in_channels=1", "model.kwargs.width=4")
        lines = stderr.strip().splitlines()
        assert code == 2, (override, stderr)
        assert len(lines) == 1 and word in lines[0], (override, stderr)


def test_a_batch_of_only_unreadable_files_trains_on_a_stand_in_without_a_collective():
    """Every process takes every step: an all-unreadable batch is replaced by the first readable
    image of the process's epoch order (no all-reduce to agree on skipping; resume-safe)."""
    from types import SimpleNamespace

    from featdenoise.runtime.distributed import TrainSampler
    from featdenoise.training.loop import _stand_in

    class Data(torch.utils.data.Dataset):
        def __init__(self, readable):
            self.readable = readable

        def __len__(self):
            return 8

        def __getitem__(self, i):
            return torch.full((1, 2, 2), float(i)), (i % 3 if i in self.readable else -1)

    sampler = TrainSampler(Data({5, 6}), seed=0)
    sampler.set_epoch(1)
    sampler.set_start(4)  # a resumed position does not change the stand-in
    job = SimpleNamespace(sampler=sampler, train_set=Data({5, 6}))
    first = next(i for i in sampler.epoch_order() if i in (5, 6))
    x, y = _stand_in(job)
    assert x.shape == (1, 1, 2, 2) and float(x.flatten()[0]) == first and int(y) == first % 3
    job.train_set = Data(set())
    with pytest.raises(ValueError, match="no readable image"):
        _stand_in(job)


@pytest.mark.parametrize("command", ["eval", "blackbox", "visualize", "ablate"])
def test_every_eps_flag_is_bounded_where_it_is_parsed(capsys, command):
    """--eps is refused as typed by argparse, before any model, data or folder is touched."""
    code, lines = run_cli(capsys, command, "--eps", "300", "--out", "never-made")
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"featdenoise {command}: error: --eps 300 is outside (0, 255]")
    assert not Path("never-made").exists()
