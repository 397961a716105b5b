"""Evaluation sanity checks (Athalye et al. 2018; Carlini et al. 2019): they must FAIL on a
gradient-masked model and PASS on a normally trained one."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from featdenoise.evaluation.sanity import CheckResult, format_report, run_sanity

NUM_CLASSES = 4
EPS = 0.12


def _synthetic(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Separable 1x8x8 images whose pixels sit on the levels {0, 1/3, 2/3, 1} +- 0.02.

    The classes share a random pattern of levels and differ in one row of 4 pixels each.
    Every pixel stays >= 0.14 away from the rounding boundaries of a 4-level quantiser, so
    noise of size EPS (0.12) never changes the quantised image: for the masked model, random
    noise and PGD give exactly the same result.
    """
    gen = torch.Generator().manual_seed(1234)
    base = torch.randint(1, 3, (1, 8, 8), generator=gen).float()  # levels 1 or 2 (of 0..3)
    patterns = base.repeat(NUM_CLASSES, 1, 1, 1)  # [K, 1, 8, 8]
    for c in range(NUM_CLASSES):
        # Class c differs from the others in one row of 4 pixels, by one level.
        row = patterns[c, 0, 2 * c, 2:6]
        patterns[c, 0, 2 * c, 2:6] = torch.where(row > 1, row - 1, row + 1)
    patterns = patterns / 3
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % NUM_CLASSES
    jitter = (torch.rand((n, 1, 8, 8), generator=gen) * 2 - 1) * 0.02
    x = (patterns[y] + jitter).clamp(0, 1)
    return x, y


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.num_classes = NUM_CLASSES
        self.body = nn.Sequential(
            nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, NUM_CLASSES)
        )

    def forward(self, x):
        return self.body(x)


class _Rounded(nn.Module):
    """The gradient-masking defence of the tests: quantise the input to 4 levels, then classify.

    ``torch.round`` has a zero gradient everywhere, so gradient attacks see nothing.
    """

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.num_classes = net.num_classes

    def forward(self, x):
        return self.net(torch.round(x * 3) / 3)


class _NaNGrad(nn.Module):
    """A model whose input gradient is NaN/inf: sqrt of exactly zero on the backward path."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.num_classes = net.num_classes

    def forward(self, x):
        return self.net(x) + torch.sqrt(x - x.detach()).sum(dim=(1, 2, 3))[:, None]


@pytest.fixture(scope="module")
def trained() -> nn.Module:
    torch.manual_seed(0)
    net = _Net()
    x, y = _synthetic(256, seed=1)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(150):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    net.eval()
    with torch.no_grad():
        assert (net(x).argmax(1) == y).float().mean() == 1.0
    return net


def _loader(n: int = 64, batch: int = 32):
    x, y = _synthetic(n, seed=2)
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, n, batch)]


def _by_name(results: list[CheckResult]) -> dict[str, CheckResult]:
    return {r.name: r for r in results}


def test_checks_pass_on_a_normal_model(trained):
    trained.train()  # the caller's (mixed) mode must come back
    trained.body[1].eval()
    results = run_sanity(trained, _loader(), eps=EPS, steps=8, restarts=2)
    assert trained.training and not trained.body[1].training and trained.body[3].training
    trained.eval()
    by = _by_name(results)
    assert set(by) == {
        "gradient",
        "more_iterations",
        "larger_eps",
        "unbounded",
        "pgd_vs_noise",
        "restarts",
    }
    assert all(r.passed for r in results), format_report(results)
    assert by["gradient"].numbers["usable"] == 64
    # The checks are meaningful: PGD really hurts this model while noise of the same size does not.
    assert by["pgd_vs_noise"].numbers["pgd"] < 0.5 <= by["pgd_vs_noise"].numbers["uniform_noise"]
    assert by["larger_eps"].numbers["acc_eps_0.03"] > by["larger_eps"].numbers["acc_eps_0.24"]
    assert by["unbounded"].numbers["accuracy"] <= 0.05
    assert by["unbounded"].numbers["success"] >= 0.95
    assert (
        by["pgd_vs_noise"].numbers["loss_gain_pgd"] > by["pgd_vs_noise"].numbers["loss_gain_noise"]
    )


def test_checks_fail_on_a_gradient_masked_model(trained):
    masked = _Rounded(trained)
    # The masked model is still a perfect classifier of clean images ...
    x, y = _synthetic(64, seed=2)
    with torch.no_grad():
        assert (masked(x).argmax(1) == y).all()
    results = run_sanity(masked, _loader(), eps=EPS, steps=8, restarts=2)
    by = _by_name(results)
    report = format_report(results)
    # ... but the checks expose why PGD cannot hurt it.
    assert not by["gradient"].passed, report
    assert by["gradient"].numbers["zero"] == 64
    assert not by["unbounded"].passed, report
    assert by["unbounded"].numbers["accuracy"] > 0.05
    assert not by["pgd_vs_noise"].passed, report
    assert by["pgd_vs_noise"].numbers["pgd"] == 1.0
    assert "FAIL" in report and "should not be trusted" in report.splitlines()[-1]


def test_gradient_check_counts_nan_gradients(trained):
    results = run_sanity(_NaNGrad(trained), _loader(32), eps=EPS, steps=2, restarts=2)
    grad = _by_name(results)["gradient"]
    assert not grad.passed
    assert grad.numbers["nonfinite"] == 32
    assert "NaN/inf" in grad.message


def test_report_is_printable_with_numbers():
    results = [
        CheckResult("gradient", True, {"fraction": 1.0}, "64/64 images (100.0%) usable"),
        CheckResult("unbounded", False, {"accuracy": 0.3}, "eps=1: accuracy 30.0%"),
    ]
    text = format_report(results)
    lines = text.splitlines()
    assert lines[0].startswith("PASS") and "gradient" in lines[0] and "100.0%" in lines[0]
    assert lines[1].startswith("FAIL") and "30.0%" in lines[1]
    assert "1 of 2 checks FAILED (unbounded)" in lines[2]


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"eps": 0.0, "steps": 5}, "eps=0.0"),
        ({"eps": 1.5, "steps": 5}, "eps=1.5"),
        ({"eps": float("nan"), "steps": 5}, "eps=nan"),
        ({"eps": 0.1, "steps": 0}, "steps=0"),
        ({"eps": 0.1, "steps": 5, "restarts": 1}, "restarts=1"),
    ],
)
def test_bad_settings_are_one_line_errors(trained, kwargs, words):
    with pytest.raises(ValueError, match=words) as err:
        run_sanity(trained, _loader(8), **kwargs)
    assert "\n" not in str(err.value)


def test_empty_loader_is_a_clear_error(trained):
    with pytest.raises(ValueError, match="no images"):
        run_sanity(trained, [], eps=EPS, steps=2)


def test_monotone_check_flags_a_rise_beyond_the_slack():
    from featdenoise.evaluation.sanity.checks import _monotone_check

    ok = _monotone_check("more_iterations", "steps", [2, 4, 8], [0.5, 0.51, 0.3], 0.02, "d")
    bad = _monotone_check("more_iterations", "steps", [2, 4, 8], [0.5, 0.3, 0.4], 0.02, "d")
    assert ok.passed and not bad.passed
    assert bad.numbers["max_rise"] == pytest.approx(0.1)
    assert "rises by 10.0%" in bad.message


def test_eval_cli_runs_the_real_checks_end_to_end(tmp_path, capsys):
    """``featdenoise eval --sanity`` with the real :func:`run_sanity` on a tiny saved model."""
    from helpers import write_idx_folder

    from featdenoise.cli import main
    from featdenoise.hub.checkpoints import save_weights
    from featdenoise.models import create_model

    kwargs = dict(in_channels=1, num_classes=10, width=4, blocks=[1, 1, 1])
    torch.manual_seed(0)
    save_weights(str(tmp_path / "model.safetensors"), create_model("small_resnet", **kwargs),
                 "small_resnet", kwargs)
    data = write_idx_folder(tmp_path / "fmnist", n=8)
    code = main(["eval", "--checkpoint", str(tmp_path / "model.safetensors"), "--data",
                 "fashion_mnist", "--data-root", str(data), "--steps", "2", "--eps", "25",
                 "--sanity", "--sanity-images", "8", "--batch-size", "8", "--out",
                 str(tmp_path / "ev"), "--device", "cpu", "--no-progress"])
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if ln.startswith(("PASS", "FAIL"))]
    assert [ln.split()[1] for ln in lines] == [
        "gradient", "more_iterations", "larger_eps", "unbounded", "pgd_vs_noise", "restarts"
    ], out
    failed = any(ln.startswith("FAIL") for ln in lines)
    assert code == (1 if failed else 0)
    assert (tmp_path / "ev" / "summary.json").exists() != failed  # evaluated only if all passed


def test_skipped_files_in_the_loader_are_left_out(trained):
    x, y = _synthetic(16, seed=2)
    y = y.clone()
    y[[1, 5]] = -1  # how the datasets mark an unreadable file
    results = run_sanity(trained, [(x[:8], y[:8]), (x[8:], y[8:])], eps=EPS, steps=2,
                         restarts=2)
    assert all(r.numbers["images"] == 14 for r in results)


class _StartDependent(nn.Module):
    """Robust or not depending on where PGD starts: it reads one pixel ``p`` (0.5 on clean
    images) and the wrong class wins when ``g(u) > 1``, ``u = (p - 0.5) / eps``, with
    ``g = 2u`` for ``u > 0`` (ascent walks to the box edge: fooled) and a bump topping at 0.5 at
    ``u = -0.5`` for ``u < 0`` (ascent stops there: robust). A random start picks the side."""

    num_classes = 2

    def __init__(self, eps: float):
        super().__init__()
        self.eps = eps

    def forward(self, x):
        u = (x[:, 0, 0, 0] - 0.5) / self.eps  # [N]
        g = torch.where(u > 0, 2 * u, 0.5 * (1 - (2 * u + 1) ** 2))
        return torch.stack([torch.ones_like(g), g], dim=1)  # [N, 2]


def test_restarts_check_flags_start_dependent_robustness(trained):
    eps = 0.1
    x = torch.full((64, 1, 4, 4), 0.5)
    loader = [(x, torch.zeros(64, dtype=torch.long))]
    results = _by_name(run_sanity(_StartDependent(eps), loader, eps=eps, steps=20, restarts=5,
                                  targeted=False))
    r = results["restarts"]
    assert not r.passed, r.message
    # about half the images survive one start, about 1/32 survive five independent starts
    assert 0.3 < r.numbers["acc_1"] < 0.7 and r.numbers["acc_5"] < 0.15
    assert r.numbers["drop"] > r.numbers["allowed"] and "--restarts 5" in r.message
    # a normal model's robustness does not hinge on the start
    normal = _by_name(run_sanity(trained, _loader(), eps=EPS, steps=8, restarts=3))["restarts"]
    assert normal.passed, normal.message
    assert normal.numbers["drop"] <= normal.numbers["allowed"]
