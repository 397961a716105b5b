"""AutoAttack through the evaluation engine: chain bookkeeping, resume, shards, CLI."""

from __future__ import annotations

import json
import os

import torch
from helpers import OFFICIAL, QuadrantData, Quadrants, folder_dataset
from helpers import QUADRANT_CLASSES as K

from featdenoise.evaluation import engine
from featdenoise.evaluation.autoattack import broken_by
from featdenoise.evaluation.whitebox import evaluate_whitebox

AA = {"steps": 4, "n_queries": 30, "n_target_classes": K - 1}
SET = dict(eps=0.25, batch_size=4, seed=1, device="cpu", progress=False)


def _records(out) -> list[dict]:
    with open(os.path.join(out, engine.OUTCOMES_FILE)) as f:
        return [json.loads(line) for line in f]


def test_each_attack_runs_only_on_images_every_earlier_one_failed_on(tmp_path):
    out = str(tmp_path / "aa")
    s = evaluate_whitebox(Quadrants(), QuadrantData(12), out, attack=None, autoattack=AA, **SET)
    names = s["autoattack"]["names"]
    assert names == ["apgd-ce", "apgd-t", "fab-t", "square"]
    recs = _records(out)
    for r in recs:
        alive = r["pred_clean"] == r["label"]
        for name in names:
            assert r[f"ran_{name}"] == alive  # attacked iff nothing broke it before
            if r[f"ran_{name}"] and r[f"pred_{name}"] != r["label"]:
                assert r[f"iter_{name}"] is not None and r[f"margin_{name}"] < 0
            alive = alive and r[f"pred_{name}"] == r["label"]
    # robust accuracy never rises along the chain and matches a recount from the records
    after = s["autoattack"]["robust_accuracy"]
    assert all(b <= a for a, b in zip(after, after[1:], strict=False))
    assert after[-1] == sum(broken_by(r, names) is None for r in recs) / len(recs)
    assert 0 < after[-1] < s["clean"]["top1"]  # the chain broke some images, not all
    counts = s["autoattack"]["broken_by"]
    assert sum(counts.values()) + round(after[-1] * len(recs)) == len(recs)  # each image once
    assert "AutoAttack" in open(os.path.join(out, "table.md")).read()


def test_autoattack_resumes_and_shards_to_the_one_process_records(tmp_path):
    data = QuadrantData(12)
    full = evaluate_whitebox(Quadrants(), data, str(tmp_path / "full"), attack=None,
                             autoattack=AA, **SET)
    cut = str(tmp_path / "cut")
    assert evaluate_whitebox(Quadrants(), data, cut, attack=None, autoattack=AA,
                             max_batches=1, **SET) is None
    resumed = evaluate_whitebox(Quadrants(), data, cut, attack=None, autoattack=AA, **SET)
    assert resumed["autoattack"] == full["autoattack"]
    assert _records(cut) == _records(str(tmp_path / "full"))
    sh = str(tmp_path / "sh")
    for rank in (1, 0):
        assert evaluate_whitebox(Quadrants(), data, sh, attack=None, autoattack=AA, rank=rank,
                                 world_size=2, **SET) is None or rank == 0
    assert _records(sh) == _records(str(tmp_path / "full"))


def test_eval_cli_runs_pgd_and_autoattack_on_the_same_images(tmp_path, capsys):
    from featdenoise.cli import main
    from featdenoise.hub.checkpoints import save_weights
    from featdenoise.models import create_model

    folder, labels = folder_dataset(tmp_path, n=6)
    kw = dict(in_channels=3, num_classes=K, width=4, blocks=[1, 1, 1])
    torch.manual_seed(0)
    save_weights(str(tmp_path / "m.safetensors"), create_model("small_resnet", **kw),
                 "small_resnet", kw)
    rc = main(["eval", "--checkpoint", str(tmp_path / "m.safetensors"), "--data", "folder",
               "--data-root", str(folder), "--labels", str(labels), "--steps", "2",
               "--attack", "pgd,autoattack", "--aa-steps", "3", "--aa-queries", "20",
               "--eps", "8", "--out", str(tmp_path / "ev"), "--device", "cpu", "--no-progress"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "PGD-2" in out and "AutoAttack" in out
    s = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert s["autoattack"]["steps"] == 3 and s["autoattack"]["n"] == 6
    recs = _records(str(tmp_path / "ev"))
    assert all("pred_pgd2" in r and "pred_square" in r for r in recs)
    # a subset, in chain order whatever the order typed
    rc = main(["eval", "--checkpoint", str(tmp_path / "m.safetensors"), "--data", "folder",
               "--data-root", str(folder), "--labels", str(labels), "--attack",
               "square,apgd-ce", "--aa-steps", "3", "--aa-queries", "20", "--eps", "8",
               "--out", str(tmp_path / "ev2"), "--device", "cpu", "--no-progress"])
    assert rc == 0
    s2 = json.loads((tmp_path / "ev2" / "summary.json").read_text())
    assert s2["autoattack"]["names"] == ["apgd-ce", "square"] and s2["attacks"] == []


def test_autoattack_on_an_official_checkpoint_with_1000_classes(tmp_path, capsys):
    """``--official NPZ --arch`` (the authors' format, 1000 classes) runs AutoAttack through
    the CLI, RobustBench's eps 4 here."""

    from featdenoise.cli import main
    from featdenoise.data.files import save_image

    npz = OFFICIAL / "resnet_1111" / "checkpoint.npz"
    g = torch.Generator().manual_seed(0)
    lines = []
    for i in range(2):
        save_image(torch.rand(3, 64, 64, generator=g), str(tmp_path / "img" / f"im{i}.png"))
        lines.append(f"im{i}.png,{17 + 400 * i}")
    (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n")
    rc = main(["eval", "--official", str(npz), "--arch", "ResNet", "--blocks", "1,1,1,1",
               "--data", "folder", "--data-root", str(tmp_path / "img"), "--labels",
               str(tmp_path / "labels.csv"), "--attack", "autoattack", "--eps", "4",
               "--aa-steps", "2", "--aa-targets", "2", "--aa-queries", "5", "--batch-size", "2",
               "--out", str(tmp_path / "aa"), "--device", "cpu", "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    s = json.loads((tmp_path / "aa" / "summary.json").read_text())
    assert s["num_classes"] == 1000 and s["eps_255"] == 4 and s["autoattack"]["n"] == 2
    assert s["autoattack"]["n_target_classes"] == 2
