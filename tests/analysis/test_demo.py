"""The demo (``make demo``) end to end on a small real Fashion-MNIST subset, with a tiny budget."""

from __future__ import annotations

import dataclasses
import gzip
import json
import os

import numpy as np
import pytest
from helpers import write_idx

from featdenoise.analysis import demo
from featdenoise.analysis.demo_report import results_table

FMNIST = "/usr/share/datasets/fashion-mnist"


def _read_idx(path: str) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)


@pytest.fixture()
def fmnist_subset(tmp_path):
    """The first 512 training and 64 test images of the real Fashion-MNIST, in its own folder."""
    if not os.path.isfile(os.path.join(FMNIST, "train-images-idx3-ubyte.gz")):
        pytest.skip(f"Fashion-MNIST is not installed in {FMNIST} (`make data` installs it)")
    root = tmp_path / "fmnist"
    root.mkdir()
    for prefix, n in (("train", 512), ("t10k", 64)):
        for kind in ("images-idx3", "labels-idx1"):
            name = f"{prefix}-{kind}-ubyte.gz"
            write_idx(root / name, _read_idx(os.path.join(FMNIST, name))[:n])
    return str(root)


def test_quick_demo_writes_report_with_all_networks(fmnist_subset, tmp_path):
    budget = dataclasses.replace(demo.QUICK, train_images=128, batch_size=32, eval_images=16,
                                 eval_batch_size=16, eval_steps=(1, 2), viz_images=1,
                                 aa_images=8, aa_budget=(2, 2, 10))
    out = tmp_path / "report"
    path = demo.run_demo(str(out), data_root=fmnist_subset, threads=1, progress=False,
                         budget=budget)
    assert path == str(out / "report.md")
    text = (out / "report.md").read_text()
    for name in ("clean", "adv-baseline", "adv-denoise"):
        assert f"| {name} | 16 |" in text
    assert "PGD-2 targeted acc / succ" in text and "PGD-2 untargeted acc" in text
    assert "AutoAttack acc (8 images)" in text and "reduced budget" in text
    pictures = [line.split("(")[1].rstrip(")") for line in text.splitlines()
                if line.startswith("![")]
    assert "accuracy_vs_iterations.png" in pictures
    assert any(p.startswith("feature_noise/adv-denoise/") for p in pictures)
    for p in pictures:
        assert (out / p).read_bytes()[:4] == b"\x89PNG", p
    res = json.loads((out / "results.json").read_text())
    for pair in res["summaries"].values():
        aa = pair["autoattack"]["autoattack"]
        assert aa["n"] == 8 and aa["names"] == ["apgd-ce", "apgd-t", "fab-t", "square"]
        assert aa["final"] <= pair["autoattack"]["clean"]["top1"]
        for mode in ("targeted", "untargeted"):
            s = pair[mode]
            assert s["num_images"] == 16 and s["eps"] == pytest.approx(0.1)
            assert s["targeted"] == (mode == "targeted")
            assert all(0 <= a["accuracy"] <= 1 for a in s["attacks"])
    # The denoising net's pictures include the maps right before/after each denoising op.
    assert "stage2_denoise.after" in res["feature_noise"]["adv-denoise"]
    # a rerun deletes every folder the demo wrote, each first recognised as the demo's own
    from featdenoise.runtime import outdir

    planned = outdir.plan_removal(str(out), demo._stale(str(out)))
    assert len(planned) == 3 + 3 * 3 + 2  # runs, evaluations (2 PGD + AutoAttack), pictures


def test_results_table_layout():
    def summ(acc):
        return {"num_images": 10, "clean": {"top1": 0.9},
                "attacks": [{"steps": 10, "accuracy": acc, "success_rate": 0.25}]}

    table = results_table({"net": {"targeted": summ(0.5), "untargeted": summ(0.125)}}, (10,))
    assert table.splitlines()[2] == "| net | 10 | 90.0 | 50.0 / 25.0 | 12.5 |"
    aa = {"autoattack": {"final": 0.375, "n": 8}}
    table = results_table({"net": {"targeted": summ(0.5), "untargeted": summ(0.125),
                                        "autoattack": aa}}, (10,))
    assert "AutoAttack acc (8 images)" in table.splitlines()[0]
    assert table.splitlines()[2].endswith("| 12.5 | 37.5 |")


def test_demo_names_the_missing_dataset(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        demo.run_demo(str(tmp_path / "r"), data_root=str(tmp_path), quick=True)


def test_demo_command_options_reach_run_demo(monkeypatch, tmp_path, capsys):
    from featdenoise import cli

    seen = {}
    monkeypatch.setattr(demo, "run_demo", lambda **kw: seen.update(kw) or "report.md")
    rc = cli.main(["demo", "--quick", "--out", str(tmp_path), "--threads", "1", "--seed", "3",
                   "--no-progress"])
    assert rc == 0
    assert seen == {"out_dir": str(tmp_path), "quick": True, "data_root": None, "threads": 1,
                    "seed": 3, "progress": False}
    assert capsys.readouterr().out.splitlines()[-1] == "report: report.md"  # printed last
    assert 1 <= demo.default_threads() <= 2
