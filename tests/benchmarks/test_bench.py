"""The benchmark commands: they run end to end, and what they measure that is not timing holds.

Timings are never asserted (machines are noisy); memory, agreement and FLOP counts are
deterministic and are.
"""

import re

import pytest
import torch

from featdenoise.benchmarks import ops as bench_ops
from featdenoise.cli import main


def test_gaussian_nonlocal_peak_memory_stays_below_one_score_matrix():
    """Issue target: the Gaussian non-local never materialises the HW x HW scores for a batch."""
    n, c, px = 2, 16, 56
    r = bench_ops.measure("nonlocal_gaussian", (n, c, px), torch.device("cpu"), repeats=1,
                          min_seconds=0.0)
    scores_mib = n * (px * px) ** 2 * 4 / 2**20  # float32 [N, HW, HW]: 75 MiB
    assert r["via"] not in bench_ops.SAME_CODE
    assert r["ours_mib"] < scores_mib <= r["base_mib"]
    assert r["memory"] >= 4.0


@pytest.mark.parametrize("name", bench_ops.OPS)
def test_each_op_pair_is_measured(name):
    r = bench_ops.measure(name, (2, 8, 7), torch.device("cpu"), repeats=1, min_seconds=0.0)
    assert r["ours_ms"] > 0 and r["base_ms"] > 0 and r["rounds"] >= 1
    assert r["ours_mib"] >= 0 and r["base_mib"] > 0


def test_bench_attacks_quick_agrees_with_torchattacks(capsys):
    pytest.importorskip("torchattacks")
    assert main(["bench", "attacks", "--quick", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    agree = re.findall(r"same adversarial pixels .*: ours vs torchattacks ([\d.]+)%, "
                       r"torchattacks in accel vs plain ([\d.]+)%, ours exact vs torchattacks "
                       r"([\d.]+)%", out)
    assert len(agree) == 2
    for ours, theirs_accel, exact in agree:
        assert float(exact) == 100.0  # exact: the same rule and the same arithmetic
        assert float(ours) >= 99.0 and float(theirs_accel) >= 99.0
    pgd, aa_part = out.split("AutoAttack standard chain", 1)
    assert len(re.findall(r"ratio +[\d.]+x", pgd)) == 4  # 2 cases x (wall, cpu)
    assert len(re.findall(r"inside accel.inference_grad .* speed-up +[\d.]+x", out)) == 2
    assert re.search(r"speed-up over torchattacks \(CPU-time\): min [\d.]+x", out)
    # the AutoAttack rows: ours vs the authors' AutoAttack, both robust accuracies and the
    # images only one side leaves robust
    aa = re.findall(r"ratio +[\d.]+x .*robust acc: ours ([\d.]+)%, original ([\d.]+)%; robust "
                    r"only against ours / only against the original: (\d+) / (\d+)", aa_part)
    assert len(aa) == 1 and "speed-up over the original (process CPU time)" in out
    acc_ours, acc_original, only_ours, only_original = aa[0]
    assert 0 <= float(acc_ours) <= 100 and 0 <= float(acc_original) <= 100


def test_bench_train_quick_reports_both_ratios_and_the_flop_bound(capsys):
    assert main(["bench", "train", "--quick", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert len(re.findall(r"ratio [\d.]+ \(goal <= [\d.]+\)", out)) == 2
    flops = dict(re.findall(r"at (\d+)px: ([\d.]+)", out))
    # The non-local blocks' FLOPs grow with (HW)^2: relatively more at 224 px than at 112 px.
    assert 1.0 < float(flops["112"]) < float(flops["224"])


@pytest.mark.slow
def test_bench_recipes_quick_prints_one_row_per_mode_and_a_plot(capsys, tmp_path, monkeypatch):
    import json
    import os

    from featdenoise.data.datasets import build_dataset

    try:
        build_dataset("fashion_mnist", None, "val", augment=False, image_size=28)
    except (FileNotFoundError, ValueError):
        pytest.skip("the Fashion-MNIST files are not installed")
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "recipes", "--quick"]) == 0
    out = capsys.readouterr().out
    rows = re.findall(r"^\| (pgd|free|fast|fast x3) \| baseline \| \d+ \| ([\d.]+) \| ([\d.]+) \| "
                      r"([\d.]+) \|$", out, re.M)
    assert [r[0] for r in rows] == ["pgd", "free", "fast", "fast x3"]
    for _, clean, pgd, aa in rows:  # robust accuracy never exceeds clean accuracy
        assert float(aa) <= float(clean) and float(pgd) <= float(clean)
    saved = json.load(open(tmp_path / "runs" / "bench_recipes" / "recipes.json"))
    assert len(saved["rows"]) == 4 and all(r["n"] == 16 for r in saved["rows"])
    assert os.path.getsize(tmp_path / "runs" / "bench_recipes" / "recipes.png") > 1000
