"""The validated training config: file -> overrides -> checks -> frozen -> run dir."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml
from helpers import ROOT

from featdenoise.configs import list_configs, resolve_config, shipped_config
from featdenoise.training.config import Config, load_config, parse_overrides, save_config

CONFIGS = [Path(shipped_config(n)) for n in list_configs()]


def test_defaults_are_the_paper_recipe():
    cfg = Config()
    assert (cfg.attack.steps, cfg.attack.eps, cfg.attack.step_size) == (30, 16.0, 1.0)
    assert cfg.attack.clean_start_prob == 0.2 and cfg.attack.targeted
    o = cfg.optim
    assert (o.lr, o.base_batch, o.momentum, o.nesterov) == (0.1, 256, 0.9, True)
    assert (o.weight_decay, o.label_smoothing, o.warmup_epochs) == (1e-4, 0.1, 5.0)
    assert (o.milestones, o.epochs) == ([35, 70, 95], 110)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_validate_and_name_buildable_models(path):
    from featdenoise.hub.build import check_model
    from featdenoise.hub.specs import is_code_spec
    from featdenoise.models import list_models

    cfg = load_config(path)
    assert cfg.model.name in list_models() or is_code_spec(cfg.model.name)
    # Builds on the meta device; init (a file the user downloads) is checked by train.
    check_model(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, init=None)))


def test_shipped_configs_cover_the_paper_runs():
    names = {p.name for p in CONFIGS}
    for required in ("imagenet_r152.yaml", "imagenet_r152_denoise.yaml",
                     "imagenet_x101_denoise_all.yaml", "imagenet_r101_denoise.yaml"):
        assert required in names
    assert any(n.startswith("cifar10_") for n in names)
    assert any(n.startswith("fashion_mnist_") for n in names)


def test_overrides_parse_yaml_scalars_and_nested_keys(tmp_path):
    cfg = load_config(CONFIGS[0], ["optim.lr=0.2", "run.bf16=true", "optim.milestones=[30, 60]",
                                   "model.kwargs.denoise=mean", "data.root=null",
                                   "attack.eps=8"])
    assert cfg.optim.lr == 0.2 and cfg.run.bf16 is True
    assert cfg.optim.milestones == [30, 60]
    assert cfg.model.kwargs["denoise"] == "mean"
    assert cfg.data.root is None
    assert isinstance(cfg.attack.eps, float) and cfg.attack.eps == 8.0


def test_override_wins_over_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 0.3\n  epochs: 3\n")
    cfg = load_config(path, ["optim.lr=0.05"])
    assert cfg.optim.lr == 0.05 and cfg.optim.epochs == 3


@pytest.mark.parametrize("override, fragment", [
    (["optim.lrr=0.1"], "did you mean optim.lr"),
    (["atack.steps=3"], "did you mean attack.steps"),
    (["run.resum=auto"], "run.resume"),
    (["data.batchsize=3"], "data.batch_size"),
])
def test_unknown_key_is_one_line_with_suggestion(override, fragment):
    with pytest.raises(ValueError) as err:
        load_config(None, override)
    msg = str(err.value)
    assert "unknown config key" in msg and fragment in msg and "\n" not in msg


def test_unknown_key_in_file_is_reported(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  momentun: 0.9\n")
    with pytest.raises(ValueError, match="optim.momentun.*optim.momentum"):
        load_config(path)


@pytest.mark.parametrize("override, fragment", [
    ("attack.clean_start_prob=1.5", "attack.clean_start_prob' = 1.5 is out of range: expected "
                                    "a number in [0, 1]"),
    ("data.batch_size=0", "data.batch_size' = 0 is out of range"),
    ("optim.milestones=[70, 35]", "increasing list"),
    ("data.name=mnist", "one of fashion_mnist, cifar10, imagenet"),
    ("optim.lr=fast", "wrong type: expected float"),
    ("run.bf16=3", "wrong type: expected bool"),
    ("attack.steps=2.5", "wrong type: expected int"),
    ("attack.eps=300", "[0, 255]"),
    ("run.device=tpu", "auto, cpu, cuda"),
])
def test_bad_value_names_key_value_and_range(override, fragment):
    with pytest.raises(ValueError) as err:
        load_config(None, [override])
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_malformed_override_and_missing_file():
    with pytest.raises(ValueError, match="not key=value"):
        parse_overrides(["optim.lr"])
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config("nope.yaml")


def test_config_is_frozen():
    cfg = load_config(None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.optim.lr = 1.0


def test_saved_config_holds_resolved_values_and_reloads_identically(tmp_path):
    cfg = load_config(CONFIGS[0], ["optim.lr=0.2", "model.kwargs.width=4"])
    path = save_config(cfg, tmp_path / "run")
    saved = yaml.safe_load(Path(path).read_text())
    assert saved["optim"]["lr"] == 0.2 and saved["model"]["kwargs"]["width"] == 4
    # Every key is written, including defaults the file did not mention.
    assert set(saved["run"]) == {f.name for f in dataclasses.fields(type(cfg.run))}
    assert load_config(path) == cfg


# ---------------------------------------------------------------- finding a config

def test_top_level_configs_folder_is_the_shipped_one():
    top = ROOT / "configs"
    assert sorted(p.stem for p in top.glob("*.yaml")) == list_configs()
    assert top.resolve() == Path(shipped_config("fashion_mnist_quick")).parent.resolve()
    assert len(list_configs()) >= 14


def test_config_by_name_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    by_name = load_config("fashion_mnist_quick")
    assert by_name.data.name == "fashion_mnist" and by_name.attack.steps == 3
    assert load_config("fashion_mnist_quick.yaml") == by_name
    # the README's relative paths mean the shipped file when they do not exist here
    assert load_config("configs/fashion_mnist_quick.yaml") == by_name
    assert resolve_config("configs/imagenet_r152.yaml") == shipped_config("imagenet_r152")


def test_a_path_that_exists_is_read_as_a_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").mkdir()
    mine = tmp_path / "configs" / "fashion_mnist_quick.yaml"
    mine.write_text("optim:\n  epochs: 7\n")
    assert load_config("configs/fashion_mnist_quick.yaml").optim.epochs == 7
    (tmp_path / "fashion_mnist_quick").write_text("optim:\n  epochs: 5\n")
    assert load_config("fashion_mnist_quick").optim.epochs == 5


def test_unknown_config_names_the_choices(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="no shipped config named 'fashion_mnist_quik'.*"
                                                "fashion_mnist_quick"):
        load_config("fashion_mnist_quik")
    with pytest.raises(FileNotFoundError, match="mine/absent.yaml not found.*imagenet_r152"):
        load_config("mine/absent.yaml")


def test_train_lists_configs_with_a_line_each(capsys):
    from featdenoise.cli import main

    assert main(["train", "--list-configs"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == list_configs()
    described = dict(line.split(None, 1) for line in lines)
    assert "R-152 +all denoise" in described["imagenet_r152_denoise_all"]
    assert all(len(d) > 10 for d in described.values())


def test_train_print_config_of_the_all_denoise_config(capsys, tmp_path, monkeypatch):
    from featdenoise.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["train", "--config", "configs/imagenet_r152_denoise_all.yaml",
                 "--print-config"]) == 0
    tree = yaml.safe_load(capsys.readouterr().out)
    assert tree["model"]["name"] == "resnet152_denoise_all_gaussian"
    assert tree["model"]["kwargs"] == {"denoise": "nonlocal_gaussian", "subsample": True}


# --------------------------------------------------------------------------- YAML 1.2 numbers
@pytest.mark.parametrize("override, key, value", [
    ("optim.weight_decay=1e-4", ("optim", "weight_decay"), 1e-4),
    ("optim.lr=1.0e12", ("optim", "lr"), 1.0e12),
    ("optim.lr=2E-3", ("optim", "lr"), 2e-3),
    ("optim.lr=.5", ("optim", "lr"), 0.5),
    ("run.seed=1e3", ("run", "seed"), 1000),
    ("optim.milestones=[1e1, 2e1]", ("optim", "milestones"), [10.0, 20.0]),
])
def test_ordinary_floats_in_overrides_are_numbers(override, key, value):
    """YAML 1.1 (PyYAML's default) reads ``1e-4`` as a string; overrides read YAML 1.2 floats,
    and a whole-valued float for an int key is taken as that int."""
    cfg = load_config(None, [override])
    got = getattr(getattr(cfg, key[0]), key[1])
    assert got == value and type(got) is type(value)


def test_ordinary_floats_in_config_files_are_numbers(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  weight_decay: 5e-5\n  lr: 1e-1\nrun:\n  seed: 2e1\n")
    cfg = load_config(path)
    assert (cfg.optim.weight_decay, cfg.optim.lr, cfg.run.seed) == (5e-5, 0.1, 20)


@pytest.mark.parametrize("override, fragment", [
    ("run.seed=2.5", "'run.seed' = 2.5 has the wrong type: expected int"),
    ("optim.lr=.inf", "'optim.lr' = inf is not a finite number"),
    ("optim.weight_decay=.nan", "'optim.weight_decay' = nan is not a finite number"),
    ("data.batch_size=-1e2", "'data.batch_size' = -100 is out of range"),
])
def test_non_whole_or_non_finite_numbers_are_refused(override, fragment):
    with pytest.raises(ValueError) as err:
        load_config(None, [override])
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_strings_that_only_look_like_numbers_stay_strings():
    cfg = load_config(None, ["run.out_dir=1e3x", "run.resume=1.5"])
    assert (cfg.run.out_dir, cfg.run.resume) == ("1e3x", "1.5")


@pytest.mark.parametrize("overrides, fragment", [
    (["model.name=resnet15"], "config key 'model.name': unknown model 'resnet15'"),
    (["model.name=small_resnet", "model.kwargs.widht=4"],
     "config key 'model.kwargs': model 'small_resnet' does not take widht"),
    (["model.name=small_resnet", "model.kwargs.blocks=[1, 1]"],
     "config key 'model.kwargs': blocks must be 3"),
    (["model.name=small_resnet", "model.kwargs.denoise=median3"],
     "config key 'model.kwargs': unknown denoising op 'median3'"),
])
def test_check_model_refuses_what_train_refuses_without_allocating(overrides, fragment):
    from featdenoise.hub.build import check_model

    with pytest.raises(ValueError) as err:
        check_model(load_config(None, overrides))
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_check_model_accepts_every_registry_model():
    """No false refusal: every registered model (ResNet-152, ResNeXt-101 among them) passes the
    meta-device build, so its data-dependent initialiser does not trip the check."""
    from featdenoise.hub.build import check_model
    from featdenoise.models import list_models

    for name in list_models():
        check_model(load_config(None, [f"model.name={name}"]))
