"""Nothing runs code from a file: checkpoints, npz dumps and dataset pickles that would execute
code when unpickled are refused, with one clear line naming the file, and the code never runs."""

from __future__ import annotations

import ast
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import ROOT

from featdenoise.runtime.safeio import read_npz, restricted_pickle_load, safe_torch_load


class _Payload:
    """Unpickling this object calls ``open(marker, "w")``: it creates the marker file.

    Any other callable (``os.system``...) could stand in its place; a file is harmless and
    observable.
    """

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _evil_checkpoint(path: Path, marker: Path) -> Path:
    """A checkpoint-shaped dict with the payload hidden among real tensors."""
    torch.save({"model": {"w": torch.ones(2)}, "model_name": "small_resnet",
                "extra": _Payload(marker)}, path)
    return path


def _one_line(err: BaseException) -> str:
    text = str(err)
    assert "\n" not in text, f"error is not one line: {text!r}"
    return text


def test_the_payload_really_runs_code_when_unpickled(tmp_path):
    # Guards the other tests: a plain unpickler does execute the payload.
    marker = tmp_path / "pwned"
    path = _evil_checkpoint(tmp_path / "evil.pt", marker)
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_safe_torch_load_refuses_a_code_pickle(tmp_path):
    marker = tmp_path / "pwned"
    path = _evil_checkpoint(tmp_path / "evil.pt", marker)
    with pytest.raises(ValueError, match="refused") as err:
        safe_torch_load(path)
    assert str(path) in _one_line(err.value)
    assert not marker.exists()


def test_safe_torch_load_reads_plain_checkpoints_and_names_missing_or_broken_files(tmp_path):
    good = tmp_path / "good.pt"
    torch.save({"model": {"w": torch.arange(3.0)}, "step": 7, "name": "x"}, good)
    state = safe_torch_load(good)
    assert state["step"] == 7 and torch.equal(state["model"]["w"], torch.arange(3.0))

    with pytest.raises(FileNotFoundError, match="missing.pt"):
        safe_torch_load(tmp_path / "missing.pt")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:40])
    with pytest.raises(ValueError, match="truncated.pt") as err:
        safe_torch_load(truncated)
    _one_line(err.value)


def test_training_checkpoint_loaders_refuse_a_code_pickle(tmp_path):
    from featdenoise.hub.checkpoints import load_checkpoint, load_model

    marker = tmp_path / "pwned"
    path = _evil_checkpoint(tmp_path / "checkpoint.pt", marker)
    for loader in (load_checkpoint, load_model):
        with pytest.raises(Exception) as err:  # noqa: B017 - any refusal; the marker is the test
            loader(str(path))
        assert not isinstance(err.value, AssertionError)
        assert not marker.exists(), f"{loader.__name__} executed code from the checkpoint"
    # Run directories are read the same way.
    with pytest.raises(Exception):  # noqa: B017
        load_model(str(tmp_path))
    assert not marker.exists()


def test_npz_with_object_arrays_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "weights.npz"
    obj = np.empty(1, dtype=object)
    obj[0] = _Payload(marker)
    np.savez(path, **{"conv0/W:0": np.zeros((3, 3, 3, 8), np.float32), "evil": obj})

    with pytest.raises(ValueError, match="evil") as err:
        read_npz(path)
    assert str(path) in _one_line(err.value)
    assert not marker.exists()

    from featdenoise.hub.tensorpack import load_tensorpack

    with pytest.raises(ValueError, match=str(path)):
        load_tensorpack(path, "ResNet", depth=50)
    assert not marker.exists()


def test_read_npz_reads_plain_arrays(tmp_path):
    path = tmp_path / "plain.npz"
    np.savez(path, a=np.arange(4, dtype=np.float32), b=np.eye(2))
    out = read_npz(path)
    assert list(out) == ["a", "b"]
    np.testing.assert_array_equal(out["a"], np.arange(4, dtype=np.float32))
    np.testing.assert_array_equal(out["b"], np.eye(2))


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_restricted_pickle_reads_cifar_style_batches(tmp_path, protocol):
    batch = {b"data": np.arange(2 * 3072, dtype=np.uint8).reshape(2, 3072) % 251,
             b"labels": [3, 7], b"batch_label": b"testing batch 1 of 1",
             b"filenames": [b"a.png", b"b.png"]}
    path = tmp_path / "test_batch"
    with open(path, "wb") as f:
        pickle.dump(batch, f, protocol=protocol)
    out = restricted_pickle_load(path)
    np.testing.assert_array_equal(out[b"data"], batch[b"data"])
    assert out[b"labels"] == [3, 7] and out[b"filenames"] == [b"a.png", b"b.png"]


def test_restricted_pickle_refuses_code(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "test_batch"
    with open(path, "wb") as f:
        pickle.dump({b"data": np.zeros((1, 3072), np.uint8), b"labels": _Payload(marker)}, f)
    with pytest.raises(ValueError, match="refused") as err:
        restricted_pickle_load(path)
    assert str(path) in _one_line(err.value) and "open" in str(err.value)
    assert not marker.exists()


def test_cifar10_folder_with_a_code_pickle_is_refused(tmp_path):
    from featdenoise.data.datasets import build_dataset

    marker = tmp_path / "pwned"
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((1, 3072), np.uint8), b"labels": _Payload(marker)}, f)
    with pytest.raises(ValueError, match="test_batch") as err:
        build_dataset("cifar10", root=str(tmp_path), split="val")
    _one_line(err.value)
    assert not marker.exists()


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else "?"


def test_no_source_file_unpickles_unsafely():
    """Every ``torch.load`` passes ``weights_only=True``, every ``np.load`` leaves pickles
    disallowed, ``pickle.load`` appears only in the restricted unpickler, YAML is read with
    ``safe_load``, and nothing calls ``eval``/``exec`` or another loader that runs code (read
    with ``ast``, so calls spread over several lines count too)."""
    src = ROOT / "src" / "featdenoise"
    offenders = []
    files = sorted(src.rglob("*.py"))
    assert len(files) > 10
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if not isinstance(node, ast.Call):
                continue
            name = _dotted(node.func)
            kw = {k.arg: k.value for k in node.keywords}
            where = f"{path.relative_to(src)}:{node.lineno} {name}"
            if name == "torch.load":
                flag = kw.get("weights_only")
                if not (isinstance(flag, ast.Constant) and flag.value is True):
                    offenders.append(f"{where} without weights_only=True")
            if name in ("np.load", "numpy.load"):
                flag = kw.get("allow_pickle")
                safe = flag is None or (isinstance(flag, ast.Constant) and flag.value is False)
                if not safe:
                    offenders.append(f"{where} with allow_pickle not False")
            if name in ("pickle.load", "pickle.loads", "pickle.Unpickler") \
                    and path.name != "safeio.py":
                offenders.append(f"{where}: use featdenoise.runtime.safeio.restricted_pickle_load")
            if name in ("yaml.load", "yaml.unsafe_load", "yaml.full_load", "yaml.load_all",
                        "eval", "exec", "torch.jit.load", "marshal.loads", "joblib.load",
                        "dill.load", "shelve.open"):
                offenders.append(f"{where}: can run code from its input (use yaml.safe_load)")
    assert not offenders, "unsafe loading:\n" + "\n".join(offenders)


def test_cli_refuses_a_code_pickle_with_one_line(tmp_path, capsys):
    from featdenoise.cli import main

    marker = tmp_path / "pwned"
    path = _evil_checkpoint(tmp_path / "checkpoint.pt", marker)
    code = main(["eval", "--checkpoint", str(path), "--data", "fashion_mnist",
                 "--out", str(tmp_path / "ev"), "--device", "cpu", "--no-progress"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and str(path) in lines[0], lines
    assert not marker.exists()


def test_truncated_or_foreign_safetensors_is_one_line(tmp_path):
    from safetensors.torch import save_file

    from featdenoise.runtime.safeio import read_safetensors

    good = tmp_path / "w.safetensors"
    save_file({"a": torch.arange(6.0).reshape(2, 3)}, str(good), metadata={"model": "x"})
    tensors, meta = read_safetensors(good)
    assert torch.equal(tensors["a"], torch.arange(6.0).reshape(2, 3)) and meta == {"model": "x"}
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-8])
    foreign = tmp_path / "foreign.safetensors"
    foreign.write_bytes(b"PK\x03\x04 this is a zip, not safetensors" * 4)
    for bad in (truncated, foreign):
        with pytest.raises(ValueError) as err:
            read_safetensors(bad)
        assert str(bad) in _one_line(err.value)


def test_model_loader_names_a_truncated_safetensors_file(tmp_path):
    from featdenoise.hub.checkpoints import load_model, save_weights
    from featdenoise.models import create_model

    kwargs = dict(in_channels=1, num_classes=10, width=4, blocks=[1, 1, 1])
    path = tmp_path / "model.safetensors"
    save_weights(str(path), create_model("small_resnet", **kwargs), "small_resnet", kwargs)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError) as err:
        load_model(str(path))
    assert str(path) in _one_line(err.value)
