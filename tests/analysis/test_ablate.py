"""Ablations (paper Fig. 7, Table 1): featdenoise.analysis.ablate and `featdenoise ablate`."""

from __future__ import annotations

import json
import math

import pytest
import yaml
from helpers import write_random_fashion_mnist

from featdenoise.analysis import ablate


@pytest.fixture()
def tiny_config(tmp_path):
    """A Fashion-MNIST-format folder of random images and a seconds-long training config."""
    data = tmp_path / "fmnist"
    data.mkdir()
    write_random_fashion_mnist(data, 64, 16)
    cfg = {
        "model": {"name": "small_resnet_denoise",
                  "kwargs": {"in_channels": 1, "width": 4, "denoise": "nonlocal_gaussian"}},
        "data": {"name": "fashion_mnist", "root": str(data), "batch_size": 32, "workers": 0,
                 "augment": False, "val_subset": 16},
        "attack": {"steps": 1, "eps": 25.5, "step_size": 10},
        "optim": {"epochs": 1, "milestones": [], "warmup_epochs": 0, "base_batch": 32},
        "run": {"eval_every": 0, "final_eval_steps": 0, "tensorboard": False,
                "progress": False, "device": "cpu"},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_variant_model_keeps_backbone_options_and_sets_block_options():
    name, kw = ablate.variant_model("resnet152_denoise", {"denoise": "mean", "blocks": [1, 1, 1, 1],
                                                          "residual": False}, "baseline")
    assert name == "resnet152" and kw == {"blocks": [1, 1, 1, 1], "placement": "none"}
    name, kw = ablate.variant_model("small_resnet", {"width": 4}, "no_1x1")
    assert name == "small_resnet"
    assert kw == {"width": 4, "placement": "stages", "denoise": "nonlocal_gaussian",
                  "use_conv": False}
    assert ablate.variant_model("small_resnet", {}, "bottleneck")[1]["placement"] == "bottleneck"
    with pytest.raises(ValueError, match="unknown ablation variant"):
        ablate.variant_model("small_resnet", {}, "gaussian_blur")


def test_aggregate_mean_and_std_over_seeds_by_hand():
    results = [
        {"variant": "a", "seed": 0, "clean": 0.8, "accuracy": {10: 0.5, 100: 0.4}},
        {"variant": "a", "seed": 1, "clean": 0.9, "accuracy": {10: 0.7, 100: 0.4}},
        {"variant": "b", "seed": 0, "clean": float("nan"), "status": "diverged",
         "accuracy": {10: float("nan"), 100: float("nan")}},
    ]
    agg = ablate.aggregate(results, [10, 100])
    m, s = agg["a"]["accuracy"][10]
    assert m == pytest.approx(0.6) and s == pytest.approx(math.sqrt(0.02))  # (0.1^2 * 2) / 1
    assert agg["a"]["accuracy"][100] == pytest.approx((0.4, 0.0))
    assert agg["a"]["clean"][0] == pytest.approx(0.85)
    assert agg["b"]["diverged"] == 1 and math.isnan(agg["b"]["accuracy"][10][0])
    table = ablate.ablation_table(agg, [10, 100])
    assert "| a | 2 | 85.0 ± 7.1 | 60.0 ± 14.1 | 40.0 ± 0.0 |" in table
    assert "| b | 1 | NaN | NaN | NaN |" in table


def test_ablate_command_trains_and_evaluates_two_variants(tiny_config, tmp_path, capsys):
    from featdenoise.cli import main

    out = tmp_path / "abl"
    rc = main(["ablate", "--config", tiny_config, "--variants", "baseline,mean",
               "--steps", "1,2", "--limit", "8", "--batch-size", "8", "--no-progress",
               "--out", str(out), "optim.lr=0.05"])
    assert rc == 0
    table = (out / "ablation.md").read_text()
    assert "| baseline | 1 |" in table and "| +denoise: 3x3 mean | 1 |" in table
    assert "PGD-1" in table and "PGD-2" in table
    assert (out / "ablation.png").read_bytes()[:4] == b"\x89PNG"
    saved = json.loads((out / "ablation.json").read_text())
    runs = {r["variant"]: r for r in saved["results"]}
    assert runs["baseline"]["kwargs"]["placement"] == "none"
    assert runs["mean"]["kwargs"] == {"in_channels": 1, "width": 4, "placement": "stages",
                                      "denoise": "mean"}
    for r in runs.values():
        assert r["status"] == "ok" and r["num_images"] == 8
        assert all(0.0 <= v <= 1.0 for v in [r["clean"], *r["accuracy"].values()])
    # Both variants ran with the same budget: the same config apart from the model.
    cfgs = [yaml.safe_load((out / "runs" / f"{v}-seed0" / "config.yaml").read_text())
            for v in ("baseline", "mean")]
    for c in cfgs:
        c.pop("model"), c["run"].pop("out_dir")
    assert cfgs[0] == cfgs[1] and cfgs[0]["optim"]["lr"] == 0.05
    assert "table:" in capsys.readouterr().out
    assert main(["ablate", "--config", tiny_config, "--variants", "blur",
                 "--out", str(out)]) == 2
