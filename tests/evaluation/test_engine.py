"""The evaluation engine: same numbers as before it, one image set everywhere, identity on resume,
in-memory runs for training, validation before writing, metrics by hand."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

from featdenoise.evaluation import engine, metrics
from featdenoise.evaluation.blackbox import evaluate_blackbox, transfer_attackers
from featdenoise.evaluation.whitebox import attack_column, evaluate_whitebox

DATA = Path(__file__).resolve().parent  # engine_expected.json


def _expected_module():
    spec = importlib.util.spec_from_file_location("engine_expected", DATA / "engine_expected.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _records(out: Path) -> list[dict]:
    with open(out / engine.OUTCOMES_FILE) as f:
        return [json.loads(line) for line in f]


# ------------------------------------------------------------------- the numbers did not move
def test_same_per_image_outcomes_as_before_the_engine(tmp_path):
    """Records stored by the pre-engine code (tests/evaluation/engine_expected.py) for a seeded tiny
    model: images, targets, clean and attacked predictions must be the same."""
    exp = _expected_module()
    expected = json.loads((DATA / "engine_expected.json").read_text())
    model, src, ds = exp.setup()
    for targeted in (True, False):
        out = tmp_path / f"wb{targeted}"
        evaluate_whitebox(model, ds, str(out), targeted=targeted, exact=True, **exp.WHITEBOX)
        got = _records(out)
        want = expected[f"whitebox_targeted={targeted}"]
        assert len(got) == len(want) == 30
        for g, w in zip(got, want, strict=True):
            assert {k: g[k] for k in w} == w  # every old field, same value (new fields added)
    att = transfer_attackers([("src", src)], ["pgd", "fgsm"], **exp.TRANSFER)
    evaluate_blackbox(model, ds, str(tmp_path / "bb"), att, exact=True, **exp.BLACKBOX)
    for g, w in zip(_records(tmp_path / "bb"), expected["blackbox"], strict=True):
        assert {k: g[k] for k in w} == w


# ------------------------------------------------------------------- one image set
def test_eval_blackbox_and_training_pick_the_same_images(tmp_path, capsys):
    """``eval --limit 64``, ``blackbox --limit 64`` and training's ``data.val_subset=64`` with the
    same seed evaluate the same image ids, and the two commands agree on clean accuracy."""
    from featdenoise.cli import main
    from featdenoise.data.datasets import build_dataset
    from featdenoise.data.files import dataset_image_ids
    from featdenoise.hub.checkpoints import save_weights
    from featdenoise.models import create_model

    kw = dict(in_channels=1, width=4, blocks=[1, 1, 1])
    torch.manual_seed(0)
    save_weights(str(tmp_path / "m.safetensors"), create_model("small_resnet", **kw),
                 "small_resnet", kw)
    common = ["--checkpoint", str(tmp_path / "m.safetensors"), "--data", "fashion_mnist",
              "--limit", "64", "--seed", "5", "--batch-size", "64", "--device", "cpu",
              "--no-progress"]
    assert main(["eval", *common, "--steps", "1", "--out", str(tmp_path / "ev")]) == 0
    assert main(["blackbox", *common, "--source", str(tmp_path / "m.safetensors"),
                 "--source-attacks", "fgsm", "--out", str(tmp_path / "bb")]) == 0
    capsys.readouterr()
    ev, bb = _records(tmp_path / "ev"), _records(tmp_path / "bb")
    assert [r["id"] for r in ev] == [r["id"] for r in bb]
    val = build_dataset("fashion_mnist", split="val", subset=64, subset_seed=5)
    assert dataset_image_ids(val) == [r["id"] for r in ev]
    s_ev = json.loads((tmp_path / "ev" / "summary.json").read_text())
    s_bb = json.loads((tmp_path / "bb" / "summary.json").read_text())
    assert s_ev["clean"]["top1"] == s_bb["clean"]


# ------------------------------------------------------------------- identity on resume
class _Lin(torch.nn.Module):
    num_classes = 3

    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.fc = torch.nn.Linear(12, 3)

    def forward(self, x):
        return self.fc(x.flatten(1))  # [N, 1, 3, 4] -> [N, 3]


def _data(n: int = 10):
    g = torch.Generator().manual_seed(0)
    return torch.utils.data.TensorDataset(torch.rand(n, 1, 3, 4, generator=g),
                                          torch.arange(n) % 3)


SET = dict(steps=[2], eps=0.1, step_size=0.02, batch_size=4, device="cpu", progress=False)


@pytest.mark.parametrize("finished", [True, False], ids=["finished", "half-finished"])
def test_another_model_is_refused_in_a_folder_holding_an_evaluation(tmp_path, finished):
    out = str(tmp_path / "E")
    a, b = _Lin(0), _Lin(1)
    evaluate_whitebox(a, _data(), out, name="a", max_batches=None if finished else 1, **SET)
    before = {p: (Path(out) / p).read_bytes() for p in os.listdir(out) if p.endswith(".json")}
    refused = r"holds another evaluation \(model\.weights_sha256:.*--restart"
    with pytest.raises(ValueError, match=refused):
        evaluate_whitebox(b, _data(), out, name="b", **SET)
    after = {p: (Path(out) / p).read_bytes() for p in os.listdir(out) if p.endswith(".json")}
    assert after == before  # nothing rewritten, no row named b
    # retrained weights under the same name and class are another model too
    with torch.no_grad():
        a.fc.weight.add_(0.01)
    with pytest.raises(ValueError, match="model.weights_sha256"):
        evaluate_whitebox(a, _data(), out, name="a", **SET)
    # an explicit restart starts over with b only
    s = evaluate_whitebox(b, _data(), out, name="b", restart=True, **SET)
    fresh = evaluate_whitebox(b, _data(), str(tmp_path / "F"), name="b", **SET)
    assert s["name"] == "b" and s["attacks"] == fresh["attacks"] and s["clean"] == fresh["clean"]
    assert _records(Path(out)) == _records(tmp_path / "F")


def test_other_images_are_refused_and_the_same_evaluation_resumes(tmp_path):
    out = str(tmp_path / "E")
    evaluate_whitebox(_Lin(0), _data(), out, max_batches=1, **SET)
    with pytest.raises(ValueError, match="ids_digest|num_images"):
        evaluate_whitebox(_Lin(0), _data(9), out, **SET)
    # the name and the speed switch are not part of the identity
    s = evaluate_whitebox(_Lin(0), _data(), out, name="renamed", exact=True, **SET)
    assert s["num_images"] == 10


def test_blackbox_refuses_another_defended_model(tmp_path):
    att = transfer_attackers([("s", _Lin(2))], ["fgsm"])
    evaluate_blackbox(_Lin(0), _data(), str(tmp_path / "B"), att, device="cpu", progress=False)
    with pytest.raises(ValueError, match="model"):
        evaluate_blackbox(_Lin(1), _data(), str(tmp_path / "B"), att, device="cpu",
                          progress=False)


@pytest.mark.parametrize("bad", [dict(batch_size=0), dict(steps=[0]), dict(eps=2.0),
                                 dict(limit=0), dict(restarts=0), dict(attack="cw")])
def test_arguments_are_checked_before_anything_is_written(tmp_path, bad):
    out = tmp_path / "never"
    with pytest.raises(ValueError):
        evaluate_whitebox(_Lin(0), _data(), str(out), **{**SET, **bad})
    assert not out.exists()


def test_an_existing_file_as_out_is_one_clear_error(tmp_path):
    (tmp_path / "f").write_text("mine")
    with pytest.raises(ValueError, match="existing file"):
        evaluate_whitebox(_Lin(0), _data(), str(tmp_path / "f"), **SET)
    assert (tmp_path / "f").read_text() == "mine"


# ------------------------------------------------------------------- in memory (training)
def test_in_memory_run_equals_the_on_disk_records(tmp_path):
    model, data = _Lin(0), _data()
    cols = [attack_column("pgd2", "pgd", steps=2, eps=0.1, step_size=0.02)]
    p = engine.plan(model, data, cols, batch_size=4, seed=7)
    mem = engine.run(model, p, None, device="cpu", progress=False)
    disk = engine.run(model, p, str(tmp_path / "d"), device="cpu", progress=False)
    assert mem == disk and len(mem) == 10
    assert all("top5_pgd2" in r and r["target"] != r["label"] for r in mem)


def test_training_evaluation_goes_through_the_engine(tmp_path):
    """Training's evaluation gives what evaluate_whitebox gives on the same images."""
    from featdenoise.training.config import load_config
    from featdenoise.training.loop import evaluate

    cfg = load_config(base={"attack": {"eps": 25.5, "step_size": 5.1, "targeted": True},
                            "data": {"batch_size": 4, "workers": 0},
                            "run": {"seed": 7, "progress": False}})
    model, data = _Lin(0), _data()
    got = evaluate(model, data, steps=[2], cfg=cfg, device=torch.device("cpu"))
    s = evaluate_whitebox(model, data, str(tmp_path / "w"), steps=[2], eps=0.1,
                          step_size=0.02, batch_size=4, seed=7, device="cpu", progress=False)
    assert got["n"] == s["num_images"] == 10
    assert got["clean_acc"] == s["clean"]["top1"] and got["clean_top5"] == s["clean"]["top5"]
    a = s["attacks"][0]
    assert (got["pgd2_acc"], got["pgd2_top5"], got["pgd2_success"]) == \
        (a["accuracy"], a["top5"], a["success_rate"])


def test_official_evaluation_cadence():
    from featdenoise.training.config import load_config
    from featdenoise.training.loop import eval_steps_due

    cfg = load_config(base={"run": {"eval_every": 1, "eval_attack_steps": 10}})
    assert eval_steps_due(cfg, 3) == [10]
    assert eval_steps_due(cfg, 10) == [10, 100]
    assert eval_steps_due(cfg, 20) == [10, 50, 100]
    cfg = load_config(base={"run": {"eval_every": 0}})
    assert eval_steps_due(cfg, 20) == []  # final evaluation only
    with pytest.raises(ValueError, match="eval_sweeps"):
        load_config(base={"run": {"eval_sweeps": [[50]]}})


# ------------------------------------------------------------------- metrics by hand
def test_metrics_by_hand():
    recs = [
        {"label": 0, "target": 1, "pred_clean": 0, "top5_clean": True, "pred_a": 0, "pred_b": 1,
         "top5_a": True},
        {"label": 1, "target": 2, "pred_clean": 1, "top5_clean": True, "pred_a": 2, "pred_b": 1,
         "top5_a": True},
        {"label": 2, "target": 0, "pred_clean": 2, "top5_clean": True, "pred_a": 2, "pred_b": 2,
         "top5_a": False},
        {"label": 1, "target": 0, "pred_clean": 0, "top5_clean": False, "pred_a": 1, "pred_b": 1,
         "top5_a": True},
        {"label": 3, "skipped": True},
    ]
    s = metrics.summarize(recs, ["a"], targeted=True)
    assert s["num_images"] == 4 and s["skipped_images"] == 1
    assert s["attacks"] == [{"name": "a", "n": 4, "accuracy": 0.75, "success_rate": 0.25,
                             "top5": 0.75}]
    # robust after a: images 0, 2 (image 3 is wrong clean); after b as well: image 2 only
    assert metrics.robust_after_each(recs, ["a", "b"]) == [0.5, 0.25]
    aon = metrics.all_or_nothing({"a": [1, 0, 1, 1], "b": [0, 1, 1, 1]})
    assert aon["all_or_nothing"] == 0.5 and aon["per_attacker"] == {"a": 0.75, "b": 0.75}


def test_rates_state_their_denominator():
    logits = torch.tensor([[3.0, 0, 0], [0, 3.0, 0], [0, 0, 3.0], [3.0, 0, 0]])
    y = torch.tensor([0, 2, 2, 1])
    target = torch.tensor([1, 1, 0, 0])
    out = metrics.outcomes(logits, y, target)
    assert out["correct"].tolist() == [True, False, True, False]
    assert out["target_hit"].tolist() == [False, True, False, True]
    acc = metrics.accuracy(out["correct"])
    assert (acc.count, acc.total) == (2, 4) and acc.value == 0.5
    assert str(acc) == "50.0% (2/4)"
    rate = metrics.success_rate(out["target_hit"]) + metrics.success_rate(torch.tensor([True]))
    assert str(rate) == "60.0% (3/5)"
    assert not metrics.outcomes(logits, y)["target_hit"].any()
    assert str(sum([acc, acc])) == "50.0% (4/8)"
    assert str(metrics.Rate(412, 1000)) == "41.2% (412/1000)"
