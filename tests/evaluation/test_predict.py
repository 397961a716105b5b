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
    from featdenoise.hub.checkpoints import save_weights
    from featdenoise.models import create_model

    kw = dict(in_channels=3, num_classes=10, width=4, blocks=[1, 1, 1])
    torch.manual_seed(1)
    model = create_model("small_resnet", **kw).eval()
    save_weights(str(path), model, "small_resnet", kw)
    return model


def _reference_inputs(folder, names, size, method="cv2"):
    """Independent path, as the official ``--eval-directory``: the decoded 8-bit image through
    ``cv2.resize(img, (size, size), interpolation=cv2.INTER_CUBIC)`` (or Pillow bicubic), RGB,
    divided by 255; ``[N, 3, size, size]``."""
    import cv2

    xs = []
    for n in names:
        arr = np.array(Image.open(folder / n).convert("RGB"))
        if size is not None and method == "cv2":
            arr = cv2.resize(arr, (size, size), interpolation=cv2.INTER_CUBIC)
        elif size is not None:
            arr = np.array(Image.fromarray(arr).resize((size, size), Image.BICUBIC))
        xs.append(torch.from_numpy(arr).permute(2, 0, 1).float() / 255)
    return torch.stack(xs)


def _reference_predictions(model, folder, names, size, method="cv2"):
    """Independent path (:func:`_reference_inputs`), one image at a time."""
    out = []
    for x in _reference_inputs(folder, names, size, method):
        with torch.no_grad():
            out.append(int(model(x[None]).argmax(1)))
    return out


class _Recorder(torch.nn.Module):
    """Wraps a model and keeps every batch of logits it returns."""

    def __init__(self, model):
        super().__init__()
        self.model, self.logits = model, []

    def forward(self, x):
        y = self.model(x)
        self.logits.append(y.detach().clone())
        return y


def test_predict_logits_are_those_of_cv2_resized_inputs(tmp_path):
    """Odd-sized files -> the logits of cv2.resize(img, (224, 224), INTER_CUBIC) / 255 inputs."""
    from featdenoise.models import create_model

    sizes = [(37, 53), (301, 199), (224, 224), (15, 241)]
    names = _write_images(tmp_path / "imgs", sizes)
    torch.manual_seed(2)
    model = create_model("small_resnet", in_channels=3, num_classes=10, width=4,
                         blocks=[1, 1, 1]).eval()
    rec = _Recorder(model).eval()
    got_names, preds = predict_folder(rec, str(tmp_path / "imgs"), size=224, device="cpu",
                                      batch_size=len(sizes), progress=False)
    assert got_names == names
    ref_x = _reference_inputs(tmp_path / "imgs", names, 224)
    with torch.no_grad():
        ref = model(ref_x)
    torch.testing.assert_close(rec.logits[0], ref, rtol=0, atol=0)
    assert preds == ref.argmax(1).tolist()
    # the Pillow path feeds different pixels (antialiased a = -0.5 bicubic)
    rec.logits.clear()
    predict_folder(rec, str(tmp_path / "imgs"), size=224, device="cpu", batch_size=len(sizes),
                   progress=False, resize_method="pil")
    pil_x = _reference_inputs(tmp_path / "imgs", names, 224, "pil")
    assert not torch.equal(pil_x, ref_x)
    with torch.no_grad():
        torch.testing.assert_close(rec.logits[0], model(pil_x), rtol=0, atol=0)


def test_predict_cli_writes_a_label_for_every_image(tmp_path, capsys):
    from featdenoise.cli import main

    names = _write_images(tmp_path / "imgs", [(21, 31), (32, 32), (17, 41), (51, 21), (224, 99)])
    model = _tiny_checkpoint(tmp_path / "m.safetensors")
    out = tmp_path / "pred.csv"
    rc = main(["predict", str(tmp_path / "imgs"), "--checkpoint", str(tmp_path / "m.safetensors"),
               "--out", str(out), "--size", "224", "--batch-size", "2", "--device", "cpu",
               "--no-progress"])
    assert rc == 0 and str(out) in capsys.readouterr().out
    header, *lines = out.read_text().splitlines()
    assert header == "filename,featdenoise_prediction"  # marks the file as ours
    assert [line.split(",")[0] for line in lines] == names  # sorted, no .txt
    labels = [int(line.split(",")[1]) for line in lines]
    assert labels == _reference_predictions(model, tmp_path / "imgs", names, 224)
    assert read_labels_csv(str(out)) == {n.rsplit(".", 1)[0]: y for n, y in zip(names, labels,
                                                                                 strict=True)}


def test_predict_cli_resize_pil(tmp_path):
    from featdenoise.cli import main

    names = _write_images(tmp_path / "imgs", [(61, 45), (33, 97), (50, 50)])
    model = _tiny_checkpoint(tmp_path / "m.safetensors")
    out = tmp_path / "pred.csv"
    rc = main(["predict", str(tmp_path / "imgs"), "--checkpoint", str(tmp_path / "m.safetensors"),
               "--out", str(out), "--size", "24", "--resize", "pil", "--device", "cpu",
               "--no-progress"])
    assert rc == 0
    labels = [int(line.split(",")[1]) for line in out.read_text().splitlines()[1:]]
    assert labels == _reference_predictions(model, tmp_path / "imgs", names, 24, "pil")


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
