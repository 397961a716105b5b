"""Feature-noise pictures and distances (paper Sec. 3): featdenoise.analysis.viz and
`featdenoise visualize`."""

from __future__ import annotations

import gzip
import json
import math
import os

import numpy as np
import pytest
import torch
from helpers import write_random_fashion_mnist

from featdenoise.analysis import viz
from featdenoise.models import create_model

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _tiny_denoise_net(seed: int = 0):
    torch.manual_seed(seed)
    return create_model("small_resnet_denoise", in_channels=1, width=4).eval()


def test_relative_l2_matches_hand_computation():
    clean = torch.tensor([[3.0, 4.0], [1.0, 0.0]])  # norms 5 and 1
    adv = torch.tensor([[3.0, 0.0], [1.0, 2.0]])  # differences (0,-4) and (0,2)
    d = viz.relative_l2(clean, adv)
    assert d.tolist() == pytest.approx([4 / 5, 2 / 1])
    # Random 4-D maps against a plain numpy loop over images.
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(3, 2, 5, 5, generator=g), torch.randn(3, 2, 5, 5, generator=g)
    want = [math.sqrt(float(((b[i] - a[i]).numpy() ** 2).sum()))
            / math.sqrt(float((a[i].numpy() ** 2).sum())) for i in range(3)]
    assert viz.relative_l2(a, b).tolist() == pytest.approx(want, rel=1e-5)
    assert viz.relative_l2(a, a).tolist() == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="shapes differ"):
        viz.relative_l2(a, b[:, :1])


def test_capture_features_hooks_stages_and_denoising_ops():
    model = _tiny_denoise_net()
    x = torch.rand(2, 1, 28, 28)
    feats = viz.capture_features(model, x)
    for name in ("stage1", "stage2", "stage3", "stage2_denoise"):
        assert name in feats
    # "Right before" the op is the block's input (the stage output for placement "stages"),
    # "right after" is the op applied to it, computed here directly.
    torch.testing.assert_close(feats["stage2_denoise.before"], feats["stage2"])
    with torch.no_grad():
        want = model.stage2_denoise.op(feats["stage2"])
    torch.testing.assert_close(feats["stage2_denoise.after"], want)
    assert feats["stage3"].shape == (2, 16, 7, 7)
    # Hooks are removed afterwards.
    assert all(not m._forward_hooks for m in model.modules())
    noise = viz.feature_noise(feats, viz.capture_features(model, x))
    assert all(v["mean"] == 0.0 for v in noise.values())


def test_pick_channel_finds_the_changed_channel():
    clean = torch.ones(2, 5, 4, 4)
    adv = clean.clone()
    adv[:, 3] += 0.5
    adv[:, 1] += 0.1
    assert viz.pick_channel(clean, adv) == 3


def test_visualize_writes_pictures_and_finite_distances(tmp_path):
    model = _tiny_denoise_net()
    x, y = torch.rand(2, 1, 28, 28), torch.tensor([3, 7])
    res = viz.visualize(model, x, y, str(tmp_path),
                        attack=viz.NoiseAttack(eps=0.1, steps=2, step_size=0.05))
    assert res["stage"] == "stage2"
    names = sorted(os.path.basename(p) for p in res["pictures"])
    assert names == ["stage1_denoise.png", "stage2.png", "stage2_denoise.png",
                     "stage3_denoise.png"]
    for p in res["pictures"]:
        with open(p, "rb") as f:
            assert f.read(8) == PNG_MAGIC
    d = res["distances"]
    assert all(math.isfinite(v["mean"]) and v["mean"] >= 0 for v in d.values())
    assert d["stage2"]["mean"] > 0  # the attack moved the features
    saved = json.loads((tmp_path / "distances.json").read_text())
    assert saved["distances"]["stage2"]["mean"] == pytest.approx(d["stage2"]["mean"])
    assert "stage2_denoise (after op)" in (tmp_path / "distances.md").read_text()
    with pytest.raises(ValueError, match="unknown stage"):
        viz.visualize(model, x, y, str(tmp_path), stage="res9", attack=viz.NoiseAttack(steps=1))
    with pytest.raises(ValueError, match="out of range"):
        viz.visualize(model, x, y, str(tmp_path), channel=99, attack=viz.NoiseAttack(steps=1))
    # A second run replaces its own files ...
    viz.visualize(model, x, y, str(tmp_path),
                  attack=viz.NoiseAttack(eps=0.1, steps=1, step_size=0.05))


@pytest.mark.parametrize("theirs", ["distances.md", "stage2.png", "distances.json"])
def test_visualize_never_replaces_a_file_it_did_not_write(tmp_path, theirs):
    """... but a user's file of the same name in --out is refused, byte for byte unchanged."""
    model = _tiny_denoise_net()
    x, y = torch.rand(1, 1, 28, 28), torch.tensor([3])
    mine = b"\x89PNG not drawn here" if theirs.endswith(".png") else b"my notes\n"
    (tmp_path / theirs).write_bytes(mine)
    with pytest.raises(ValueError, match=theirs):
        viz.visualize(model, x, y, str(tmp_path),
                      attack=viz.NoiseAttack(eps=0.1, steps=1, step_size=0.05))
    assert (tmp_path / theirs).read_bytes() == mine


def test_visualize_command_on_a_checkpoint(tmp_path, capsys):
    from featdenoise.cli import main
    from featdenoise.hub.checkpoints import save_weights

    model = _tiny_denoise_net()
    ckpt = tmp_path / "model.safetensors"
    save_weights(str(ckpt), model, "small_resnet_denoise", {"in_channels": 1, "width": 4})
    data = tmp_path / "fmnist"
    data.mkdir()
    write_random_fashion_mnist(data, 8, 8)
    out = tmp_path / "viz"
    rc = main(["visualize", "--checkpoint", str(ckpt), "--data", "fashion_mnist",
               "--data-root", str(data), "--images", "0,5", "--stage", "stage3",
               "--eps", "25", "--steps", "2", "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "rel. L2 distance" in text and "stage3_denoise (before op)" in text
    assert (out / "stage3.png").is_file()
    assert json.loads((out / "distances.json").read_text())["labels"] == \
        [int(v) for v in np.frombuffer(gzip.open(data / "t10k-labels-idx1-ubyte.gz").read()[8:],
                                       np.uint8)[[0, 5]]]
    assert main(["visualize", "--checkpoint", str(ckpt), "--data", "fashion_mnist",
                 "--data-root", str(data), "--images", "8", "--out", str(out)]) == 2
