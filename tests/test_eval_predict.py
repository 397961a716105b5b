"""``featdenoise predict``: filename,label for every image of a folder (--eval-directory)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from featdenoise.data.files import read_labels_csv
from featdenoise.evaluation.predict import predict_folder


def _write_images(folder, sizes):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    names = []
    for i, (h, w) in enumerate(sizes):
        name = f"{chr(ord('e') - i)}{i}.png" if i % 2 else f"{chr(ord('e') - i)}{i}.jpg"
        arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(arr).save(folder / name, quality=95)
        names.append(name)
    (folder / "notes.txt").write_text("not an image")
    return sorted(names)


def _tiny_checkpoint(path):
    from featdenoise.models import create_model
    from featdenoise.training.checkpoint import save_weights

    kw = dict(in_channels=3, num_classes=10, width=4, blocks=[1, 1, 1])
    torch.manual_seed(1)
    model = create_model("small_resnet", **kw).eval()
    save_weights(str(path), model, "small_resnet", kw)
    return model


def _reference_predictions(model, folder, names, size):
    """Independent path: PIL bicubic resize, numpy -> tensor, one image at a time."""
    out = []
    for n in names:
        img = Image.open(folder / n).convert("RGB")
        if size is not None:
            img = img.resize((size, size), Image.BICUBIC)
        x = torch.from_numpy(np.array(img)).permute(2, 0, 1).float()[None] / 255
        with torch.no_grad():
            out.append(int(model(x).argmax(1)))
    return out


def test_predict_cli_writes_a_label_for_every_image(tmp_path, capsys):
    from featdenoise.cli import main

    names = _write_images(tmp_path / "imgs", [(20, 30), (32, 32), (17, 40), (50, 21), (32, 32)])
    model = _tiny_checkpoint(tmp_path / "m.safetensors")
    out = tmp_path / "pred.csv"
    rc = main(["predict", str(tmp_path / "imgs"), "--checkpoint", str(tmp_path / "m.safetensors"),
               "--out", str(out), "--size", "32", "--batch-size", "2", "--device", "cpu",
               "--no-progress"])
    assert rc == 0 and str(out) in capsys.readouterr().out
    lines = out.read_text().splitlines()
    assert [line.split(",")[0] for line in lines] == names  # sorted, no header, no .txt
    labels = [int(line.split(",")[1]) for line in lines]
    assert labels == _reference_predictions(model, tmp_path / "imgs", names, 32)
    assert read_labels_csv(str(out)) == {n.rsplit(".", 1)[0]: y for n, y in zip(names, labels,
                                                                                 strict=True)}


def test_predict_keeps_size_or_says_to_resize(tmp_path):
    from featdenoise.models import create_model

    model = create_model("small_resnet", in_channels=3, num_classes=10, width=4, blocks=[1, 1, 1])
    names = _write_images(tmp_path / "same", [(24, 24)] * 3)
    got_names, preds = predict_folder(model, str(tmp_path / "same"), size=None, device="cpu",
                                      progress=False)
    assert got_names == names
    assert preds == _reference_predictions(model.eval(), tmp_path / "same", names, None)
    _write_images(tmp_path / "mixed", [(24, 24), (30, 24)])
    with pytest.raises(ValueError, match="--size"):
        predict_folder(model, str(tmp_path / "mixed"), size=None, device="cpu", progress=False)
    with pytest.raises(FileNotFoundError):
        predict_folder(model, str(tmp_path / "absent"), device="cpu", progress=False)
