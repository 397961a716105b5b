"""White-box evaluation: per-image records, summary arithmetic, resume, sharding, report, CLI."""

from __future__ import annotations

import json
import os

import pytest
import torch
from helpers import QUADRANT_CLASSES as K
from helpers import QuadrantData, Quadrants, folder_dataset, tiny_checkpoint
from torch import nn

from featdenoise.evaluation import report
from featdenoise.evaluation.engine import OUTCOMES_FILE, PARTS_DIR, image_targets
from featdenoise.evaluation.metrics import summarize
from featdenoise.evaluation.whitebox import evaluate_whitebox

SETTINGS = dict(steps=[1, 5], eps=0.25, step_size=0.05, batch_size=4, seed=3, device="cpu",
                progress=False)


def _records(out_dir: str) -> list[dict]:
    with open(os.path.join(out_dir, OUTCOMES_FILE)) as f:
        return [json.loads(line) for line in f]


def _numbers(summary: dict) -> dict:
    """The parts of a summary that must not depend on how the run was split."""
    return {"clean": summary["clean"], "attacks": summary["attacks"],
            "num_images": summary["num_images"]}


def test_summary_agrees_with_per_image_outcomes(tmp_path):
    data = QuadrantData()
    out = str(tmp_path / "run")
    s = evaluate_whitebox(Quadrants(), data, out, **SETTINGS)
    for name in ("summary.json", "table.md", "accuracy_vs_iterations.png", "settings.json"):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    recs = _records(out)
    assert [r["index"] for r in recs] == list(range(len(data)))
    assert s["num_images"] == len(data) and s["clean"]["n"] == len(data)
    # Independent recount from the per-image file.
    labels = [int(data[i][1]) for i in range(len(data))]
    assert [r["label"] for r in recs] == labels
    assert s["clean"]["top1"] == 1.0  # the template model classifies every clean image
    for a in s["attacks"]:
        preds = [r[f"pred_{a['name']}"] for r in recs]
        acc = sum(p == y for p, y in zip(preds, labels, strict=True)) / len(data)
        hit = sum(p == r["target"] for p, r in zip(preds, recs, strict=True)) / len(data)
        assert a["accuracy"] == pytest.approx(acc) and a["success_rate"] == pytest.approx(hit)
        assert 0 <= a["accuracy"] <= 1 and 0 <= a["success_rate"] <= 1
        assert a["accuracy"] + a["success_rate"] <= 1 + 1e-9  # a hit target is a wrong label
        assert a["n"] == len(data)
    # The attack works on the low-margin images but not on all of them.
    assert 0 < s["attacks"][-1]["accuracy"] < 1
    assert all(r["target"] != r["label"] and 0 <= r["target"] < K for r in recs)
    table = open(os.path.join(out, "table.md")).read()
    assert "PGD-5" in table and f"{100 * s['attacks'][-1]['accuracy']:.1f}" in table


def test_untargeted_success_is_misclassification(tmp_path):
    s = evaluate_whitebox(Quadrants(), QuadrantData(8), str(tmp_path / "u"), targeted=False,
                          **SETTINGS)
    recs = _records(str(tmp_path / "u"))
    assert all(r["target"] == -1 for r in recs)
    for a in s["attacks"]:
        assert a["success_rate"] == pytest.approx(1 - a["accuracy"])


def test_targets_depend_only_on_image_id():
    ids = [f"img{i}" for i in range(300)]
    y = torch.arange(300) % 7
    t = image_targets(ids, y, 7, seed=1)
    assert (t != y).all() and t.min() >= 0 and t.max() < 7
    # every wrong class offset occurs (uniform over the K-1 wrong classes)
    assert set(((t - y) % 7).tolist()) == set(range(1, 7))
    # the same image gets the same target in another batch, order or company
    perm = torch.randperm(300, generator=torch.Generator().manual_seed(0))
    t2 = image_targets([ids[i] for i in perm], y[perm], 7, seed=1)
    assert torch.equal(t2, t[perm])
    assert not torch.equal(image_targets(ids, y, 7, seed=2), t)


def test_interrupted_evaluation_resumes_to_the_same_numbers(tmp_path):
    data = QuadrantData()
    full = evaluate_whitebox(Quadrants(), data, str(tmp_path / "full"), **SETTINGS)
    out = str(tmp_path / "cut")
    assert evaluate_whitebox(Quadrants(), data, out, max_batches=2, **SETTINGS) is None
    part = os.path.join(out, PARTS_DIR, "outcomes-rank0.jsonl")
    lines = open(part).read().splitlines(keepends=True)
    assert len(lines) == 2 * 4 * 3  # two batches of 4: clean + 2 attacks, flushed per column
    # A kill in the middle of writing: the last record is cut in half.
    with open(part, "w") as f:
        f.write("".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2])
    resumed = evaluate_whitebox(Quadrants(), data, out, **SETTINGS)
    assert _numbers(resumed) == _numbers(full)
    assert _records(out) == _records(str(tmp_path / "full"))


def test_shards_merge_to_the_one_process_result(tmp_path):
    data = QuadrantData()
    full = evaluate_whitebox(Quadrants(), data, str(tmp_path / "full"), **SETTINGS)
    out = str(tmp_path / "sharded")
    assert evaluate_whitebox(Quadrants(), data, out, rank=1, world_size=3, **SETTINGS) is None
    assert evaluate_whitebox(Quadrants(), data, out, rank=0, world_size=3, **SETTINGS) is None
    merged = evaluate_whitebox(Quadrants(), data, out, rank=2, world_size=3, **SETTINGS)
    assert _numbers(merged) == _numbers(full)
    recs = _records(out)
    assert len({r["index"] for r in recs}) == len(recs) == len(data)  # each image once
    assert recs == _records(str(tmp_path / "full"))


def test_resume_with_other_settings_is_refused(tmp_path):
    out = str(tmp_path / "r")
    evaluate_whitebox(Quadrants(), QuadrantData(4), out, **SETTINGS)
    other = dict(SETTINGS, eps=0.1)
    with pytest.raises(ValueError, match="eps"):
        evaluate_whitebox(Quadrants(), QuadrantData(4), out, **other)


def test_summarize_by_hand():
    recs = [
        {"label": 0, "target": 1, "pred_clean": 0, "top5_clean": True, "pred_pgd10": 1},
        {"label": 1, "target": 2, "pred_clean": 1, "top5_clean": True, "pred_pgd10": 1},
        {"label": 2, "target": 0, "pred_clean": 1, "top5_clean": False, "pred_pgd10": 3},
        {"label": 3, "target": 0, "pred_clean": 3, "top5_clean": True, "pred_pgd10": 0},
        {"label": 3, "skipped": True},
    ]
    s = summarize(recs, ["pgd10"], targeted=True)
    assert s["num_images"] == 4 and s["skipped_images"] == 1
    assert s["clean"] == {"top1": 0.75, "top5": 0.75, "n": 4}
    assert s["attacks"] == [{"name": "pgd10", "accuracy": 0.25, "success_rate": 0.5, "n": 4}]
    u = summarize(recs, ["pgd10"], targeted=False)
    assert u["attacks"][0]["success_rate"] == 0.75


def test_report_without_matplotlib_writes_the_table_and_says_why_no_plot(tmp_path, monkeypatch,
                                                                         caplog):
    """matplotlib is the ``plots`` extra: without it the table is still written, the plot is
    None and one warning names the extra; drawing a picture is one line naming it too."""
    from featdenoise.runtime import optional

    summary = {"name": "net", "num_images": 4, "targeted": True, "eps_255": 16, "attack": "pgd",
               "clean": {"top1": 0.5, "top5": 1.0},
               "attacks": [{"name": "pgd10", "steps": 10, "accuracy": 0.25, "success_rate": 0.5,
                            "n": 4}]}
    monkeypatch.setattr(optional, "installed", lambda module: module != "matplotlib")
    with caplog.at_level("WARNING", logger="featdenoise"):
        paths = report.write_report([summary], str(tmp_path))
    assert paths["plot"] is None and not (tmp_path / report.PLOT_FILE).exists()
    assert "| net |" in open(paths["table"]).read()
    assert any("featdenoise[plots]" in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError, match=r"^the pictures: no_such_plotting_lib is not installed; "
                                         r"pip install x$"):
        optional.require("no_such_plotting_lib", "the pictures", "pip install x")


def test_report_merges_models_into_one_table_and_plot(tmp_path):
    def summ(name, steps, accs):
        return {"name": name, "num_images": 10, "targeted": True, "eps_255": 16, "attack": "pgd",
                "clean": {"top1": 0.9, "top5": 1.0},
                "attacks": [{"name": f"pgd{s}", "steps": s, "accuracy": a, "success_rate": 0.1,
                             "n": 10} for s, a in zip(steps, accs, strict=True)]}

    a, b = summ("baseline", [10, 100], [0.5, 0.3]), summ("denoise", [10, 1000], [0.6, 0.45])
    for name, s in (("a", a), ("b", b)):
        os.makedirs(tmp_path / name)
        with open(tmp_path / name / "summary.json", "w") as f:
            json.dump(s, f)
    paths = report.merge_runs([str(tmp_path / "a"), str(tmp_path / "b")], str(tmp_path / "m"))
    table = open(paths["table"]).read().splitlines()
    assert "PGD-10" in table[0] and "PGD-100" in table[0] and "PGD-1000" in table[0]
    assert table[0].index("PGD-100 ") < table[0].index("PGD-1000")
    row_a = next(r for r in table if r.startswith("| baseline"))
    assert row_a.endswith("| 30.0 / 10.0 | - |")  # no 1000-step result for the baseline
    assert os.path.getsize(paths["plot"]) > 1000
    assert len(json.load(open(paths["summaries"]))) == 2
    # runs at another eps are not silently merged into the same table
    c = summ("other-eps", [10], [0.2])
    c["eps_255"] = 8
    os.makedirs(tmp_path / "c")
    with open(tmp_path / "c" / "summary.json", "w") as f:
        json.dump(c, f)
    with pytest.raises(ValueError, match="differ in eps"):
        report.merge_runs([str(tmp_path / "a"), str(tmp_path / "c")], str(tmp_path / "m2"))
    assert not os.path.exists(tmp_path / "m2")


# ------------------------------------------------------------------------------------- CLI




def test_eval_cli_writes_results_and_merges_plots(tmp_path, capsys):
    from featdenoise.cli import main

    folder, labels = folder_dataset(tmp_path)
    ck1, ck2 = tiny_checkpoint(tmp_path, "net_a"), tiny_checkpoint(tmp_path, "net_b")
    args = ["eval", "--checkpoint", str(ck1), "--checkpoint", str(ck2), "--data", "folder",
            "--data-root", str(folder), "--labels", str(labels), "--steps", "1,2", "--eps", "8",
            "--batch-size", "4", "--out", str(tmp_path / "ev"), "--device", "cpu",
            "--no-progress"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "net_a" in out and "net_b" in out and "PGD-2" in out
    for name in ("net_a", "net_b"):
        s = report.load_summary(str(tmp_path / "ev" / name))
        assert s["num_images"] == 6 and s["eps_255"] == 8 and s["targeted"] is True
        assert [a["steps"] for a in s["attacks"]] == [1, 2]
        ids = [r["id"] for r in _records(str(tmp_path / "ev" / name))]
        assert ids == [f"im{i:02d}" for i in range(6)]
    assert os.path.isfile(tmp_path / "ev" / "accuracy_vs_iterations.png")
    assert main(["eval", "--plot", str(tmp_path / "ev" / "net_a"), str(tmp_path / "ev" / "net_b"),
                 "--out", str(tmp_path / "merged")]) == 0
    table = (tmp_path / "merged" / "table.md").read_text()
    assert "| net_a | 6 |" in table and "| net_b | 6 |" in table
    # --exact: the same per-image outcomes, and the choice is recorded
    exact = [a if a != str(tmp_path / "ev") else str(tmp_path / "ex") for a in args] + ["--exact"]
    assert main(exact) == 0
    for name in ("net_a", "net_b"):
        with open(tmp_path / "ex" / name / "settings.json") as f:
            assert json.load(f)["exact"] is True
        assert _records(str(tmp_path / "ex" / name)) == _records(str(tmp_path / "ev" / name))


def test_eval_cli_errors_are_one_clear_line(tmp_path, capsys):
    from featdenoise.cli import main

    assert main(["eval", "--data", "folder", "--out", str(tmp_path / "o")]) == 2
    assert "--checkpoint" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(tmp_path / "nope"), "--data", "fashion_mnist",
                 "--out", str(tmp_path / "o")]) == 2
    assert "nope" in capsys.readouterr().err


def test_eval_sanity_flag_calls_the_sanity_checks(tmp_path, monkeypatch, capsys):
    from featdenoise.cli import main
    from featdenoise.evaluation import sanity

    calls = []

    def fake_run_sanity(model, loader, eps, steps, device, **kw):
        calls.append((eps, steps, sum(len(y) for _, y in loader)))
        return [sanity.CheckResult("gradient", False, {}, "zero gradients")]

    monkeypatch.setattr(sanity, "run_sanity", fake_run_sanity)
    folder, labels = folder_dataset(tmp_path, n=4)
    ck = tiny_checkpoint(tmp_path)
    rc = main(["eval", "--checkpoint", str(ck), "--data", "folder", "--data-root", str(folder),
               "--labels", str(labels), "--steps", "3,9", "--out", str(tmp_path / "ev"),
               "--device", "cpu", "--sanity", "--no-progress"])
    assert rc == 1
    assert calls == [(pytest.approx(16 / 255), 3, 4)]
    assert "FAIL" in capsys.readouterr().out
    assert not os.path.exists(tmp_path / "ev" / "summary.json")  # not evaluated


def test_speed_layer_gives_the_same_numbers(tmp_path):
    """The default speed layer (BN folded, packed convolutions) moves nothing beyond rounding."""
    from featdenoise.models import create_model

    torch.manual_seed(0)
    model = create_model("small_resnet", in_channels=1, num_classes=K, width=4, blocks=[1, 1, 1])
    with torch.no_grad():  # non-trivial BatchNorm statistics, so folding changes the weights
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
    data = QuadrantData(8)
    exact = evaluate_whitebox(model, data, str(tmp_path / "exact"), exact=True, **SETTINGS)
    fast = evaluate_whitebox(model, data, str(tmp_path / "fast"), **SETTINGS)
    assert _numbers(fast) == _numbers(exact)
    assert [r["pred_pgd5"] for r in _records(str(tmp_path / "fast"))] == \
        [r["pred_pgd5"] for r in _records(str(tmp_path / "exact"))]
    with open(tmp_path / "exact" / "settings.json") as f:
        assert json.load(f)["exact"] is True
