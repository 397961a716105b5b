"""Paired comparisons (:mod:`featdenoise.evaluation.paired`) against SciPy, and the agreement
bench end to end on a tiny budget (two kernel sets, one worker process each)."""

from __future__ import annotations

import math
import re

import pytest
import torch
from scipy import stats

from featdenoise.benchmarks import agreement
from featdenoise.cli import main
from featdenoise.evaluation.paired import discordant, mean_interval, sign_test, t_quantile_975


def test_discordant_counts_each_direction():
    a = torch.tensor([True, True, False, False, True])
    b = torch.tensor([True, False, True, False, False])
    assert discordant(a, b) == (2, 1)
    assert discordant([True, False], [True, False]) == (0, 0)
    with pytest.raises(ValueError, match="one length"):
        discordant([True], [True, False])


@pytest.mark.parametrize("b,c", [(0, 0), (3, 0), (7, 0), (5, 5), (12, 3), (1, 9), (40, 25)])
def test_sign_test_is_scipys_one_sided_binomial_test(b, c):
    expected = 1.0 if b + c == 0 else stats.binomtest(b, b + c, 0.5, alternative="greater").pvalue
    assert sign_test(b, c) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("df", [1, 2, 5, 17, 26, 30, 35, 50, 80, 200, 10_000])
def test_t_quantile_matches_scipy_within_table_interpolation(df):
    assert t_quantile_975(df) == pytest.approx(stats.t.ppf(0.975, df), abs=2e-3)


def test_mean_interval_is_the_student_t_interval():
    values = [0, 1, 0, 2, -1, 0, 1, 3, 0, 0, 1, 0]
    mean, lo, hi = mean_interval(values)
    ref = stats.t.interval(0.95, len(values) - 1, loc=sum(values) / len(values),
                           scale=stats.sem(values))
    assert mean == pytest.approx(sum(values) / len(values))
    assert (lo, hi) == pytest.approx(ref, abs=1e-3)  # the table has 3 decimals
    assert mean_interval([2, 2, 2]) == (2, 2, 2)
    assert mean_interval([1])[1] == -math.inf


def test_summary_flags_a_weaker_default_and_counts_rounding_flips():
    """Three kernel sets, one model: the default leaves image 0 robust that exact breaks in
    every set (a systematic +1: the interval is [1, 1], above 0); exact differs between the
    first two sets on image 1 (one rounding flip in one of the three pairs of sets)."""
    def runs(fast, exact):
        return {"runs": {"m/0/fab-t/default": fast, "m/0/fab-t/exact": exact}}
    results = {"native": runs([True, False, True], [False, False, True]),
               "avx2": runs([True, True, True], [False, True, True]),
               "default": runs([True, False, True], [False, False, True])}
    (row,) = agreement.summarise(results, ["fab-t"])
    assert row["combinations"] == 3 and row["mean"] == 1 and row["weaker"]
    assert row["b"] == 1 and row["c"] == 0
    assert row["flips"] == pytest.approx(2 / 3)  # native-avx2 and avx2-default differ on image 1


def test_bench_agreement_end_to_end(capsys):
    code = main(["bench", "agreement", "--kernels", "native,default", "--seeds", "1",
                 "--images", "16", "--models", "maxpool_cnn", "--attacks", "pgd,fab-t"])
    out = capsys.readouterr().out
    assert "kernel set native" in out
    rows = [line for line in out.splitlines() if line.startswith("| pgd") or
            line.startswith("| fab-t")]
    assert len(rows) == 2, out
    assert code == (1 if "WEAKER" in out else 0)
    # The agreement table: one row per model and kernel set; logits agree to the folding
    # check's bound (1e-4 of the largest logit), whatever the gradients do at near-ties.
    numbers = re.findall(r"^\| (maxpool_cnn) \| (native|default) \| ([\d.e+-]+) \|", out,
                         flags=re.M)
    assert len(numbers) == 2 and "resnet50" not in out, out
    assert all(float(v) < 1e-4 for *_, v in numbers)


def test_bench_agreement_refuses_unknown_names():
    with pytest.raises(SystemExit, match="--attacks: unknown"):
        main(["bench", "agreement", "--attacks", "pgd,nope"])
