"""Black-box evaluation: all-or-nothing arithmetic, adversarial folders matched by name, transfer
attacks, the blackbox CLI."""

from __future__ import annotations

import json
import os

import pytest
import torch
from torch import nn

from featdenoise.data.files import ImageFiles, match_files, read_labels_csv, save_image
from featdenoise.evaluation.blackbox import (
    all_or_nothing,
    evaluate_blackbox,
    folder_attackers,
    transfer_attackers,
)

K = 4


class Quadrants(nn.Module):
    """Class k = brightest quadrant of an 8x8 image (any channel count): a linear template model."""

    num_classes = K

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = x.mean(1).unfold(1, 4, 4).unfold(2, 4, 4).sum((-1, -2))  # [N, 8, 8] -> [N, 2, 2]
        return q.flatten(1)  # [N, 4]: quadrants in row-major order


def _image(label: int, margin: float) -> torch.Tensor:
    x = torch.full((3, 8, 8), 0.25)
    r, c = divmod(label, 2)
    x[:, 4 * r:4 * r + 4, 4 * c:4 * c + 4] += margin
    return x


def _clean_folder(root, n=8):
    folder = root / "clean"
    lines = []
    for i in range(n):
        save_image(_image(i % K, 0.2 + 0.05 * i), str(folder / f"img_{i}.png"))
        lines.append(f"img_{i}.png,{i % K}")
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    return folder, root / "labels.csv"


# --------------------------------------------------------------------------- all-or-nothing
def test_all_or_nothing_by_hand():
    r = all_or_nothing({"a": [1, 1, 0, 1, 1], "b": [True, False, False, True, True],
                        "c": [1, 1, 1, 0, 1]})
    assert r["n"] == 5
    assert r["per_attacker"] == {"a": 0.8, "b": 0.6, "c": 0.8}
    assert r["all_or_nothing"] == pytest.approx(0.4)  # images 0 and 4 survive every attacker
    assert all_or_nothing({"only": [1, 0]})["all_or_nothing"] == 0.5


def test_all_or_nothing_rejects_ragged_or_empty_input():
    with pytest.raises(ValueError, match="different numbers"):
        all_or_nothing({"a": [1, 1], "b": [1]})
    with pytest.raises(ValueError):
        all_or_nothing({})


# --------------------------------------------------------------------------- folders
def test_adversarial_folders_are_matched_by_file_name(tmp_path):
    clean, labels = _clean_folder(tmp_path)
    ds = ImageFiles(str(clean), labels=read_labels_csv(str(labels)))
    ids = [f"img_{i}" for i in range(8)]
    # attacker 1 (.bmp files, other names order): fools images 1 and 6 (other quadrant bright)
    # attacker 2: fools images 1 and 3; its folder also holds an extra unrelated file
    fooled = {"atk1": {1, 6}, "atk2": {1, 3}}
    for name, bad in fooled.items():
        for i in range(8):
            ext = ".bmp" if name == "atk1" else ".png"
            x = _image((i + 1) % K, 0.6) if i in bad else ds[i][0]
            save_image(x, str(tmp_path / name / f"img_{i}{ext}"))
    save_image(_image(0, 0.5), str(tmp_path / "atk2" / "unrelated.png"))
    assert match_files(ids, str(tmp_path / "atk1"))["img_6"] == "img_6.bmp"
    attackers = folder_attackers([str(tmp_path / "atk1"), str(tmp_path / "atk2")])
    s = evaluate_blackbox(Quadrants(), ds, str(tmp_path / "out"), attackers, batch_size=3,
                          device="cpu", progress=False)
    assert s["clean"] == 1.0 and s["num_images"] == 8
    assert s["per_attacker"] == {"dir:atk1": 0.75, "dir:atk2": 0.75}
    assert s["all_or_nothing"] == 5 / 8  # images 1, 3, 6 fall to one attacker or the other
    recs = [json.loads(x) for x in open(tmp_path / "out" / "outcomes.jsonl")]
    assert [r["id"] for r in recs] == ids
    assert [r["pred_dir:atk1"] != r["label"] for r in recs] == [i in {1, 6} for i in range(8)]
    # the fooling images are far outside an eps-box of 32/255; the distance is reported
    assert s["max_linf_255"]["dir:atk1"] > 32
    table = open(tmp_path / "out" / "table.md").read()
    assert "all-or-nothing" in table and "62.5" in table


def test_clip_eps_projects_folder_images(tmp_path):
    clean, labels = _clean_folder(tmp_path, n=4)
    ds = ImageFiles(str(clean), labels=read_labels_csv(str(labels)))
    for i in range(4):
        save_image(_image((i + 1) % K, 0.7), str(tmp_path / "far" / f"img_{i}.png"))
    att = folder_attackers([str(tmp_path / "far")])
    loose = evaluate_blackbox(Quadrants(), ds, str(tmp_path / "o1"), att, device="cpu",
                              progress=False)
    clipped = evaluate_blackbox(Quadrants(), ds, str(tmp_path / "o2"), att, clip_eps=True,
                                eps=2 / 255, device="cpu", progress=False)
    assert loose["per_attacker"]["dir:far"] == 0.0
    assert clipped["per_attacker"]["dir:far"] == 1.0  # 2/255 cannot flip these margins


def test_missing_adversarial_files(tmp_path):
    clean, labels = _clean_folder(tmp_path, n=4)
    ds = ImageFiles(str(clean), labels=read_labels_csv(str(labels)))
    save_image(_image(1, 0.7), str(tmp_path / "partial" / "img_0.png"))  # fools image 0 only
    with pytest.raises(ValueError, match="lacks 3 of the 4 evaluated"):
        evaluate_blackbox(Quadrants(), ds, str(tmp_path / "o0"),
                          folder_attackers([str(tmp_path / "partial")]), device="cpu",
                          progress=False)
    assert not os.path.exists(tmp_path / "o0")  # refused before anything was written
    att = folder_attackers([str(tmp_path / "partial")], allow_missing=True)
    s = evaluate_blackbox(Quadrants(), ds, str(tmp_path / "o"), att, device="cpu",
                          progress=False)
    assert s["per_attacker"]["dir:partial"] == 0.75  # the clean image stands in for the rest
    assert s["missing"] == {"dir:partial": 3}  # and every substitution is counted
    recs = [json.loads(x) for x in open(tmp_path / "o" / "outcomes.jsonl")]
    assert [r["missing_dir:partial"] for r in recs] == [False, True, True, True]


def test_missing_files_are_counted_against_the_evaluated_subset(tmp_path):
    """--save-adv with --limit, read back with --adv-dirs and the same --limit: only the
    evaluated images must be there."""
    g = torch.Generator().manual_seed(0)
    y = torch.arange(40) % K
    x = torch.stack([_image(int(c), 0.2 + 0.3 * float(torch.rand(1, generator=g))) for c in y])
    ds = torch.utils.data.TensorDataset(x, y)
    att = transfer_attackers([("src", Quadrants())], ["fgsm"])
    evaluate_blackbox(Quadrants(), ds, str(tmp_path / "a"), att, eps=0.1, limit=6,
                      device="cpu", progress=False, save_adv=str(tmp_path / "adv"))
    assert len(os.listdir(tmp_path / "adv" / "src_fgsm")) == 6
    back = folder_attackers([str(tmp_path / "adv" / "src_fgsm")])
    s = evaluate_blackbox(Quadrants(), ds, str(tmp_path / "b"), back, eps=0.1, limit=6,
                          device="cpu", progress=False)
    assert s["num_images"] == 6 and s["missing"] == {"dir:src_fgsm": 0}


# --------------------------------------------------------------------------- transfer
def test_transfer_attacks_from_a_source_model(tmp_path):
    clean, labels = _clean_folder(tmp_path)
    ds = ImageFiles(str(clean), labels=read_labels_csv(str(labels)))
    attackers = transfer_attackers([("src", Quadrants())], ["pgd", "fgsm", "mifgsm"], steps=5)
    out = str(tmp_path / "t")
    s = evaluate_blackbox(Quadrants(), ds, out, attackers, eps=0.25, batch_size=4,
                          device="cpu", progress=False)
    assert set(s["per_attacker"]) == {"src:pgd", "src:fgsm", "src:mifgsm"}
    recs = [json.loads(x) for x in open(os.path.join(out, "outcomes.jsonl"))]
    # recount independently: an image survives only if every attacker's version is correct
    every = sum(all(r[f"pred_{a}"] == r["label"] for a in s["per_attacker"]) for r in recs)
    assert s["all_or_nothing"] == every / len(recs)
    assert s["all_or_nothing"] <= min(s["per_attacker"].values())
    # the source is the defended model itself here, so eps 0.25 breaks the low-margin images
    assert s["per_attacker"]["src:pgd"] < 1.0
    assert json.load(open(os.path.join(out, "settings.json")))["attackers"][0]["steps"] == 5
    with pytest.raises(ValueError, match="unknown source attack"):
        transfer_attackers([("src", Quadrants())], ["cw"])


def test_blackbox_cli_with_clean_and_adversarial_folders(tmp_path, capsys):
    from featdenoise.cli import main
    from featdenoise.hub.checkpoints import save_weights
    from featdenoise.models import create_model

    clean, labels = _clean_folder(tmp_path, n=5)
    for i in range(5):
        save_image(_image(i % K, 0.2), str(tmp_path / "adv" / f"img_{i}.png"))
    kw = dict(in_channels=3, num_classes=K, width=4, blocks=[1, 1, 1])
    torch.manual_seed(0)
    save_weights(str(tmp_path / "m.safetensors"), create_model("small_resnet", **kw),
                 "small_resnet", kw)
    rc = main(["blackbox", "--checkpoint", str(tmp_path / "m.safetensors"), "--clean-dir",
               str(clean), "--labels", str(labels), "--adv-dirs", str(tmp_path / "adv"),
               "--source", str(tmp_path / "m.safetensors"), "--source-attacks", "fgsm,ifgsm",
               "--source-steps", "2", "--out", str(tmp_path / "bb"), "--device", "cpu",
               "--no-progress"])
    assert rc == 0
    s = json.load(open(tmp_path / "bb" / "summary.json"))
    assert set(s["per_attacker"]) == {"m:fgsm", "m:ifgsm", "dir:adv"}
    assert s["eps_255"] == 32 and s["num_images"] == 5
    assert 0 <= s["all_or_nothing"] <= min(s["per_attacker"].values()) <= 1
    assert "all-or-nothing" in capsys.readouterr().out


def test_a_source_model_for_other_channels_is_one_clear_error(tmp_path, capsys):
    """A 3-channel source on gray data: refused in one line before anything runs."""
    from featdenoise.cli import main
    from featdenoise.hub.checkpoints import save_weights
    from featdenoise.models import create_model

    for name, c in (("gray", 1), ("rgb", 3)):
        kw = dict(in_channels=c, num_classes=10, width=4, blocks=[1, 1, 1])
        save_weights(str(tmp_path / f"{name}.safetensors"), create_model("small_resnet", **kw),
                     "small_resnet", kw)
    rc = main(["blackbox", "--checkpoint", str(tmp_path / "gray.safetensors"), "--data",
               "fashion_mnist", "--limit", "4", "--source", str(tmp_path / "rgb.safetensors"),
               "--out", str(tmp_path / "bb"), "--device", "cpu", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "3-channel" in err[0] and "--source" in err[0]
    assert not (tmp_path / "bb").exists()


def test_saved_transfer_images_read_back_as_an_adversarial_folder(tmp_path):
    """--save-adv writes one folder per transfer attacker, named by image id (here the dataset
    index), which folder_attackers matches back to a dataset without file names."""
    g = torch.Generator().manual_seed(0)
    y = torch.arange(8) % K
    margins = 0.2 + 0.3 * torch.rand(8, generator=g)
    x = torch.stack([_image(int(c), float(m)) for c, m in zip(y, margins, strict=True)])
    ds = torch.utils.data.TensorDataset(x, y)
    att = transfer_attackers([("src", Quadrants())], ["ifgsm"], steps=3)
    first = evaluate_blackbox(Quadrants(), ds, str(tmp_path / "a"), att, eps=0.2, device="cpu",
                              progress=False, save_adv=str(tmp_path / "adv"))
    saved = tmp_path / "adv" / "src_ifgsm"
    assert sorted(os.listdir(saved)) == sorted(f"{i}.png" for i in range(8))
    back = folder_attackers([str(saved)])
    again = evaluate_blackbox(Quadrants(), ds, str(tmp_path / "b"), back, eps=0.2,
                              device="cpu", progress=False)
    assert again["max_linf_255"]["dir:src_ifgsm"] <= 0.2 * 255 + 0.5 + 1e-6
    a = [json.loads(r)["pred_src:ifgsm"] for r in open(tmp_path / "a" / "outcomes.jsonl")]
    b = [json.loads(r)["pred_dir:src_ifgsm"] for r in open(tmp_path / "b" / "outcomes.jsonl")]
    assert sum(p == q for p, q in zip(a, b, strict=True)) >= 7  # 8-bit rounding may flip one
    assert first["per_attacker"]["src:ifgsm"] < 1.0
