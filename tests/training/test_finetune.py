"""Adversarial fine-tuning of a library backbone with denoising blocks, in one config.

A timm ResNet-18 (1 input channel, random weights saved here as its "pretrained" file) gets
blocks after its four stages, is trained for a few steps on a tiny Fashion-MNIST folder, and its
run folder is evaluated and reloaded like any featdenoise run.
"""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_run_config

from featdenoise.cli import main
from featdenoise.hub.build import build_model, check_model
from featdenoise.hub.checkpoints import load_model
from featdenoise.training import train
from featdenoise.training.config import from_dict

pytestmark = pytest.mark.usefixtures("one_thread")

KWARGS = {"in_chans": 1, "num_classes": 10}
DENOISE = {"op": "mean", "after": "stages"}


def _finetune_config(tmp_path, init):
    tree = tiny_run_config(tmp_path / "run")
    tree["model"] = {"name": "timm:resnet18", "kwargs": KWARGS, "denoise": DENOISE,
                     "normalize": "0.28/0.35", "init": str(init)}
    tree["run"]["final_eval_steps"] = 1
    return tree


@pytest.fixture
def pretrained(tmp_path):
    pytest.importorskip("timm")
    torch.manual_seed(5)
    backbone = build_model("timm:resnet18", KWARGS, normalize="none")
    path = tmp_path / "backbone.pth"
    torch.save({"state_dict": backbone.state_dict()}, path)
    return backbone.eval(), path


def test_the_built_network_is_the_pretrained_backbone_at_step_0(pretrained):
    backbone, path = pretrained
    model = build_model("timm:resnet18", KWARGS, denoise=DENOISE, normalize="0.28/0.35",
                        init=str(path)).eval()
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x), backbone((x - 0.28) / 0.35), atol=1e-6, rtol=0)
    assert sum("denoise" in n for n, _ in model.named_modules()) >= 4


def test_finetune_run_trains_the_blocks_and_reloads_as_a_run_folder(pretrained, tmp_path, capsys):
    backbone, path = pretrained
    tree = _finetune_config(tmp_path, path)
    train(tree)
    run = tmp_path / "run"
    model = load_model(run)  # rebuilt from the checkpoint's name, kwargs and build options
    gammas = [p for n, p in model.named_parameters() if "denoise" in n and n.endswith("weight")
              and p.dim() == 1]
    assert gammas and any(g.abs().sum() > 0 for g in gammas)  # the zero-init BN has moved
    x = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        assert not torch.allclose(model(x), backbone((x - 0.28) / 0.35), atol=1e-4)
    code = main(["eval", "--checkpoint", str(run), "--data", "fashion_mnist", "--data-root",
                 tree["data"]["root"], "--limit", "4", "--steps", "1", "--out",
                 str(tmp_path / "ev"), "--device", "cpu", "--no-progress"])
    assert code == 0, capsys.readouterr().err


def test_bad_finetune_configs_name_the_key(pretrained, tmp_path):
    _, path = pretrained
    tree = _finetune_config(tmp_path, path)
    tree["model"]["denoise"] = {"op": "mean", "after": ["layer9"]}
    with pytest.raises(ValueError, match="config key 'model.denoise'"):
        check_model(from_dict(tree))
    tree["model"]["denoise"] = DENOISE
    tree["model"]["init"] = str(tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="config key 'model.init'"):
        check_model(from_dict(tree))
    tree["model"]["init"] = str(path)
    tree["model"]["kwargs"] = {"in_chans": 1, "num_classes": 7}
    with pytest.raises(ValueError, match="do not fit"):
        train(tree)
