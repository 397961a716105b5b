"""A small file cannot cost huge memory or time, and bad sizes are one line, not a traceback.

Each bad file is crafted here: a safetensors whose metadata names a network of terabytes, a
training checkpoint doing the same, an npz whose header declares a 200000 x 200000 array, a zip
member that claims more than deflate can unpack, a decompression-bomb PNG; and the flags and
folders that used to end in a traceback (negative sizes, mixed image sizes, truncated files).
"""

from __future__ import annotations

import io
import json
import resource
import struct
import time
import zipfile
import zlib

import numpy as np
import pytest
import torch
from numpy.lib import format as npy

from featdenoise.cli import main
from featdenoise.hub.checkpoints import Position, load_model, save_checkpoint, save_weights
from featdenoise.models import create_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _one_line(err: BaseException) -> str:
    text = str(err)
    assert "\n" not in text, f"error is not one line: {text!r}"
    return text


class _Cheap:
    """Asserts the process's peak memory grows by little in the block, and that it ends at all
    (``seconds`` is a guard against building the huge thing, minutes long, not a speed goal)."""

    def __init__(self, seconds: float = 30.0, megabytes: float = 200.0):
        self.seconds, self.megabytes = seconds, megabytes

    def __enter__(self):
        self.start = time.perf_counter()
        self.rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        return self

    def __exit__(self, *exc):
        took = time.perf_counter() - self.start
        grew = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - self.rss) / 1024
        assert took < self.seconds, f"took {took:.1f} s"
        assert grew < self.megabytes, f"peak memory grew by {grew:.0f} MiB"
        return False


def _tiny():
    return create_model("small_resnet", in_channels=1, num_classes=10, width=4)


# --- model files whose metadata names a huge network ------------------------------------------


@pytest.mark.parametrize("width", [1_000_000, 2_000])
def test_safetensors_naming_a_huge_network_is_refused_before_it_is_built(tmp_path, width):
    m = _tiny()
    path = tmp_path / "model.safetensors"
    save_weights(str(path), m, m.model_name, {**m.model_kwargs, "width": width})
    assert path.stat().st_size < 100_000
    with _Cheap(), pytest.raises(ValueError, match="do not fit the model it names") as err:
        load_model(path)
    line = _one_line(err.value)
    assert str(path) in line and f"{width}" in line and "linear.weight" in line


def test_checkpoint_pt_naming_a_huge_network_is_refused_before_it_is_built(tmp_path):
    m = _tiny()
    path = tmp_path / "checkpoint.pt"
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    save_checkpoint(str(path), model=m, model_name=m.model_name,
                    model_kwargs={**m.model_kwargs, "width": 1_000_000}, optimizer=opt,
                    position=Position(epoch=0, step_in_epoch=0, step=0, schedule_step=0),
                    config={})
    with _Cheap(), pytest.raises(ValueError, match="do not fit") as err:
        load_model(tmp_path)  # the run folder
    assert str(path) in _one_line(err.value)


def test_a_tensor_of_another_dtype_or_a_missing_key_is_named(tmp_path):
    from safetensors.torch import save_file

    m = _tiny()
    state = {k: v.contiguous() for k, v in m.state_dict().items()}
    meta = {"model": m.model_name, "model_kwargs": json.dumps(m.model_kwargs)}
    state["linear.bias"] = state["linear.bias"].double()
    save_file(state, tmp_path / "dtype.safetensors", metadata=meta)
    with pytest.raises(ValueError, match=r"linear\.bias \(10,\) float64 vs \(10,\) float32"):
        load_model(tmp_path / "dtype.safetensors")
    del state["linear.bias"]
    save_file(state, tmp_path / "missing.safetensors", metadata=meta)
    with pytest.raises(ValueError, match=r"1 missing.*linear\.bias"):
        load_model(tmp_path / "missing.safetensors")


def test_good_files_still_load_to_the_same_weights(tmp_path):
    m = _tiny()
    save_weights(str(tmp_path / "model.safetensors"), m, m.model_name, m.model_kwargs)
    back = load_model(tmp_path / "model.safetensors")
    for (k, a), b in zip(m.state_dict().items(), back.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    assert not any(p.is_meta for p in back.parameters())


def test_converted_safetensors_naming_a_huge_network_is_refused(tmp_path):
    from safetensors.torch import save_file

    from featdenoise.hub.tensorpack import load_converted

    m = _tiny()
    path = tmp_path / "converted.safetensors"
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, path,
              metadata={"model": m.model_name,
                        "model_kwargs": json.dumps({**m.model_kwargs, "width": 1_000_000})})
    with _Cheap(), pytest.raises(ValueError, match="do not fit") as err:
        load_converted(path)
    assert str(path) in _one_line(err.value)


def test_tensorpack_names_asking_for_a_million_blocks_cost_nothing(tmp_path):
    from featdenoise.hub.tensorpack import load_tensorpack

    path = tmp_path / "names.npz"
    np.savez(path, **{f"group{g}/block999999/conv1/W": np.zeros(1, np.float32)
                      for g in range(4)})
    with _Cheap(), pytest.raises(ValueError, match="does not match the official ResNet"):
        load_tensorpack(path, "ResNet")


def test_eval_cli_refuses_the_huge_safetensors_in_one_line(tmp_path, capsys):
    m = _tiny()
    path = tmp_path / "model.safetensors"
    save_weights(str(path), m, m.model_name, {**m.model_kwargs, "width": 1_000_000})
    with _Cheap():
        code = main(["eval", "--checkpoint", str(path), "--data", "fashion_mnist",
                     "--out", str(tmp_path / "ev"), "--device", "cpu", "--no-progress"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and str(path) in lines[0], lines


# --- npz and zip members that declare more than they store ------------------------------------


def _forged_npz(path, shape=(200_000, 200_000), dtype="<f8", name="W.npy", payload=16):
    head = io.BytesIO()
    npy.write_array_header_1_0(head, {"descr": dtype, "fortran_order": False, "shape": shape})
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(name, head.getvalue() + b"\0" * payload)
    return path


def test_npz_whose_header_declares_a_huge_array_is_refused_before_reading(tmp_path):
    from featdenoise.runtime.safeio import read_npz

    path = _forged_npz(tmp_path / "bomb.npz")
    assert path.stat().st_size < 300
    with _Cheap(), pytest.raises(ValueError, match="declares shape") as err:
        read_npz(path)
    line = _one_line(err.value)
    assert str(path) in line and "'W'" in line and "(200000, 200000)" in line


@pytest.mark.parametrize("shape, payload", [((4,), 8), ((2,), 64)])
def test_npz_declared_and_stored_sizes_must_agree_both_ways(tmp_path, shape, payload):
    from featdenoise.runtime.safeio import read_npz

    with pytest.raises(ValueError, match="declares shape"):
        read_npz(_forged_npz(tmp_path / "x.npz", shape=shape, payload=payload))


def test_bare_npy_with_a_forged_header_is_refused(tmp_path):
    from featdenoise.runtime.safeio import read_npz

    path = tmp_path / "bomb.npy"
    head = io.BytesIO()
    npy.write_array_header_1_0(head, {"descr": "<f4", "fortran_order": False,
                                      "shape": (100_000, 100_000)})
    path.write_bytes(head.getvalue() + b"\0" * 8)
    with _Cheap(), pytest.raises(ValueError, match="declares shape"):
        read_npz(path)


def _lying_zip(path, name: str, claimed: int) -> None:
    """A deflated zip member whose headers claim ``claimed`` uncompressed bytes."""
    data = zlib.compress(b"\0" * 100)[2:-4]  # raw deflate
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr(name, b"\0" * 100)
    raw = bytearray(path.read_bytes())
    # Patch the uncompressed size in the local header (offset 22) and the central one (24).
    raw[22:26] = struct.pack("<I", claimed)
    cd = raw.rindex(b"PK\x01\x02")
    raw[cd + 24:cd + 28] = struct.pack("<I", claimed)
    path.write_bytes(bytes(raw))
    assert len(data) < 100


def test_zip_member_claiming_more_than_deflate_allows_is_refused(tmp_path):
    from featdenoise.runtime.safeio import read_npz, safe_torch_load

    _lying_zip(tmp_path / "a.npz", "W.npy", 4_000_000_000)
    with _Cheap(), pytest.raises(ValueError, match="more than its compression allows"):
        read_npz(tmp_path / "a.npz")
    _lying_zip(tmp_path / "a.pt", "archive/data/0", 4_000_000_000)
    with _Cheap(), pytest.raises(ValueError, match="more than its compression allows") as err:
        safe_torch_load(tmp_path / "a.pt")
    assert "archive/data/0" in _one_line(err.value)


def test_genuine_npz_files_still_read(tmp_path):
    from featdenoise.runtime.safeio import read_npz

    np.savez(tmp_path / "a.npz", a=np.arange(6).reshape(2, 3), b=np.zeros((0, 4)))
    np.savez_compressed(tmp_path / "b.npz", a=np.zeros((300, 300), np.float32))
    np.save(tmp_path / "c.npy", np.ones(5))
    assert read_npz(tmp_path / "a.npz")["a"].shape == (2, 3)
    assert read_npz(tmp_path / "a.npz")["b"].shape == (0, 4)
    assert read_npz(tmp_path / "b.npz")["a"].shape == (300, 300)
    assert read_npz(tmp_path / "c.npy")["arr_0"].shape == (5,)


def test_convert_cli_refuses_the_forged_npz_in_one_line(tmp_path, capsys):
    path = _forged_npz(tmp_path / "R152.npz")
    with _Cheap():
        code = main(["convert", str(path), str(tmp_path / "out.safetensors"),
                     "--arch", "ResNet"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "declares shape" in lines[0], lines
    assert not (tmp_path / "out.safetensors").exists()


# --- images: decompression bombs, sizes and size flags -----------------------------------------


def _model_and_folder(tmp_path):
    from helpers import folder_dataset, tiny_checkpoint

    folder, labels = folder_dataset(tmp_path, n=4)
    return tiny_checkpoint(tmp_path), folder, labels


@pytest.mark.parametrize("side", [15, 30])  # above the limit; above twice it (Pillow's own error)
def test_a_decompression_bomb_png_is_one_line_in_predict_and_the_loaders(tmp_path, capsys,
                                                                         monkeypatch, side):
    from PIL import Image

    from featdenoise.data.datasets import load_rgb
    from featdenoise.data.files import load_image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # a 15x15 PNG stands in for 20000x20000
    ck, folder, _ = _model_and_folder(tmp_path)
    bomb = tmp_path / "bomb"
    bomb.mkdir()
    Image.new("RGB", (side, side)).save(bomb / "b.png")
    for load in (load_rgb, load_image):
        with pytest.raises(ValueError, match="above Pillow's limit of 100") as err:
            load(str(bomb / "b.png"))
        assert "b.png" in _one_line(err.value) and f"{side * side} pixels" in str(err.value)
    code = main(["predict", "--checkpoint", str(ck), str(bomb), "--out", str(tmp_path / "p.csv"),
                 "--no-progress"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "b.png" in lines[0] and "decompression" in lines[0]
    assert not (tmp_path / "p.csv").exists()


def test_imagenet_folder_skips_or_names_a_bomb(tmp_path, monkeypatch):
    from PIL import Image

    from featdenoise.data.datasets import SKIPPED_LABEL, ImageFolderDataset

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    for split in ("train", "val"):
        (tmp_path / split / "n01").mkdir(parents=True)
        Image.new("RGB", (30, 30)).save(tmp_path / split / "n01" / "big.png")
    with pytest.raises(ValueError, match="big.png declares 900 pixels"):
        ImageFolderDataset(str(tmp_path), "val", lambda im: im, 8, strict=True)[0]
    with pytest.warns(UserWarning, match="big.png"):
        x, y = ImageFolderDataset(str(tmp_path), "val", lambda im: im, 8)[0]
    assert y == SKIPPED_LABEL and x.shape == (3, 8, 8)


@pytest.mark.parametrize("command", ["predict", "eval", "blackbox"])
def test_mixed_image_sizes_are_one_line_naming_both_files(tmp_path, capsys, command):
    from PIL import Image

    ck, folder, labels = _model_and_folder(tmp_path)
    Image.new("RGB", (20, 30)).save(folder / "im03.png")
    argv = {
        "predict": ["predict", "--checkpoint", ck, folder, "--out", tmp_path / "p.csv"],
        "eval": ["eval", "--checkpoint", ck, "--data", "folder", "--data-root", folder,
                 "--labels", labels, "--steps", "1", "--out", tmp_path / "ev", "--device", "cpu"],
        "blackbox": ["blackbox", "--checkpoint", ck, "--clean-dir", folder, "--labels", labels,
                     "--source-attacks", "fgsm", "--out", tmp_path / "bb", "--device", "cpu"],
    }[command]
    code = main([str(a) for a in argv] + ["--no-progress"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1, lines
    assert "differ in size" in lines[0] and "im00.png: 8x8" in lines[0] \
        and "im03.png: 20x30" in lines[0]
    if command == "predict":  # the way out the message offers works
        assert main([str(a) for a in argv] + ["--size", "8", "--no-progress"]) == 0


@pytest.mark.parametrize("argv", [
    ["predict", "--size", "-3"], ["predict", "--size", "x"], ["predict", "--batch-size", "0"],
    ["predict", "--workers", "-1"], ["eval", "--batch-size", "-1"], ["eval", "--image-size", "0"],
    ["eval", "--limit", "0"], ["eval", "--restarts", "0"], ["eval", "--aa-targets", "-2"],
    ["blackbox", "--source-steps", "0"], ["visualize", "--steps", "-1"],
    ["visualize", "--channel", "-1"], ["convert", "--size", "0"],
    ["bench", "ops", "--threads", "0"], ["demo", "--threads", "-4"], ["ablate", "--limit", "0"],
])
def test_negative_or_zero_counts_are_refused_by_the_flag(capsys, argv):
    with pytest.raises(SystemExit) as stop:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2
    assert f"argument {argv[-2]}: expected " in err[-1] and repr(argv[-1]) in err[-1]


def test_library_image_sizes_must_be_positive(tmp_path):
    from featdenoise.data.files import ImageFiles, load_image

    _, folder, _ = _model_and_folder(tmp_path)
    for size in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="size must be a positive number of pixels"):
            load_image(str(folder / "im00.png"), size=size)
        with pytest.raises(ValueError, match="size must be a positive number of pixels"):
            ImageFiles(str(folder), size=size)
    assert load_image(str(folder / "im00.png"), size=5).shape == (3, 5, 5)
