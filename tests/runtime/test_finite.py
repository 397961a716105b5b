"""Numbers that cannot look right when they are wrong: NaN / inf weights, logits and options are
refused with one line naming what holds them; a config naming a key twice is refused."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import OFFICIAL
from torch import nn

from featdenoise.attacks import APGD, APGDT, FAB, FGSM, IFGSM, MIFGSM, PGD, AutoAttack, Square
from featdenoise.hub import checkpoints as ckpt
from featdenoise.models import create_model
from featdenoise.runtime.finite import NonFiniteError, check_finite_tensors, finite_float

pytestmark = pytest.mark.usefixtures("one_thread")

FIXTURES = OFFICIAL
NAN, INF = float("nan"), float("inf")


def _one_line(err: BaseException) -> str:
    text = str(err)
    assert "\n" not in text, f"not one line: {text!r}"
    return text


def _tiny(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return create_model("small_resnet", in_channels=3, num_classes=10, width=4).eval()


# ============================================================ 1. finiteness of loaded weights
def _poison(model: nn.Module, key: str, value: float, count: int) -> None:
    with torch.no_grad():
        model.state_dict()[key].view(-1)[:count] = value


def test_check_finite_tensors_counts_and_names_the_first_bad_tensor():
    state = {"a": torch.ones(3), "step": torch.tensor(3), "b": torch.ones(20), "c": torch.ones(2)}
    check_finite_tensors(state, "f.pt")  # finite (and integer entries skipped): no error
    state["b"][:12] = NAN
    state["b"][12:15] = INF
    state["c"][0] = -INF
    with pytest.raises(NonFiniteError) as err:
        check_finite_tensors(state, "f.pt")
    assert _one_line(err.value) == ("f.pt: b holds 12 NaN and 3 inf values (and 1 more tensors); "
                                    "the file is damaged or the training diverged")
    arrays = {"linear/W:0": np.array([1.0, np.nan], np.float32), "n": np.array([1, 2])}
    with pytest.raises(ValueError, match=r"x.npz: linear/W:0 holds 1 NaN values"):
        check_finite_tensors(arrays, "x.npz")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_all_finite_sees_one_nan_or_inf_anywhere(dtype):
    from featdenoise.runtime.finite import all_finite

    t = torch.rand(3, 2, 5, 5).to(dtype)
    assert bool(all_finite(t)) and all_finite(t).dim() == 0
    for i in (0, 17, t.numel() - 1):
        for bad in (NAN, INF, -INF):
            u = t.clone()
            u.view(-1)[i] = bad
            assert not bool(all_finite(u)), (i, bad)


@pytest.mark.parametrize("key, value, count, words", [
    ("linear.weight", NAN, 12, "linear.weight holds 12 NaN values"),
    ("stem.bn.running_var", INF, 3, "stem.bn.running_var holds 3 inf values"),  # a buffer
])
def test_model_safetensors_with_nan_or_inf_is_refused_naming_the_tensor(tmp_path, key, value,
                                                                        count, words):
    model = _tiny()
    _poison(model, key, value, count)
    path = tmp_path / "run" / "model.safetensors"
    path.parent.mkdir()
    ckpt.save_weights(str(path), model, "small_resnet", model.model_kwargs)
    for spec in (path, path.parent):  # the file, and the run folder holding it
        with pytest.raises(NonFiniteError) as err:
            ckpt.load_model(spec)
        text = _one_line(err.value)
        assert text.startswith(f"{path}: {words}") and "damaged or the training diverged" in text


def _save_checkpoint(path: Path, model: nn.Module) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ckpt.save_checkpoint(str(path), model=model, model_name="small_resnet",
                         model_kwargs=model.model_kwargs, optimizer=opt, config={},
                         position=ckpt.Position(epoch=0, step_in_epoch=0, step=0, schedule_step=0))


def test_checkpoint_pt_with_nan_is_refused_on_load_and_on_resume(tmp_path):
    model = _tiny()
    _poison(model, "stage2.block0.conv1.conv.weight", NAN, 3)
    path = tmp_path / "checkpoint.pt"
    _save_checkpoint(path, model)
    for load in (ckpt.load_model, ckpt.load_checkpoint, lambda p: ckpt.load_model(tmp_path)):
        with pytest.raises(NonFiniteError, match=r"stage2\.block0\.conv1\.conv\.weight holds "
                                                 r"3 NaN values") as err:
            load(str(path))
        assert str(path) in _one_line(err.value)


def test_a_finite_checkpoint_still_loads_and_names_its_file(tmp_path):
    model = _tiny()
    path = tmp_path / "checkpoint.pt"
    _save_checkpoint(path, model)
    loaded = ckpt.load_model(str(path))
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert loaded.source_file == str(path)


def test_converted_safetensors_and_official_npz_with_nan_are_refused(tmp_path):
    from featdenoise.hub.tensorpack import load_converted, load_tensorpack

    model = _tiny()
    _poison(model, "linear.bias", NAN, 1)
    path = tmp_path / "conv.safetensors"
    ckpt.save_weights(str(path), model, "small_resnet", model.model_kwargs)
    with pytest.raises(NonFiniteError, match=r"conv.safetensors: linear.bias holds 1 NaN"):
        load_converted(path)

    with np.load(FIXTURES / "resnet_1111" / "checkpoint.npz", allow_pickle=False) as data:
        variables = {k: data[k] for k in data.files}
    variables["linear/W:0"] = variables["linear/W:0"].copy()
    variables["linear/W:0"][0, :5] = np.inf
    npz = tmp_path / "R.npz"
    np.savez(npz, **variables)
    with pytest.raises(NonFiniteError) as err:
        load_tensorpack(npz, "ResNet", blocks=[1, 1, 1, 1])
    assert _one_line(err.value).startswith(f"{npz}: linear/W holds 5 inf values")


def test_predict_and_eval_cli_refuse_a_nan_checkpoint_in_one_line(tmp_path, capsys):
    from featdenoise.cli import main

    model = _tiny()
    _poison(model, "linear.weight", NAN, 12)
    weights = tmp_path / "model.safetensors"
    ckpt.save_weights(str(weights), model, "small_resnet", model.model_kwargs)
    imgs = _image_folder(tmp_path / "imgs", 3)
    rc = main(["predict", str(imgs), "--checkpoint", str(weights), "--out",
               str(tmp_path / "p.csv"), "--device", "cpu", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "linear.weight holds 12 NaN values" in err and "\n" not in err
    assert not (tmp_path / "p.csv").exists()
    rc = main(["eval", "--checkpoint", str(weights), "--data", "folder", "--data-root",
               str(imgs), "--labels", str(imgs / "labels.csv"), "--steps", "1", "--out",
               str(tmp_path / "ev"), "--device", "cpu", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "linear.weight holds 12 NaN values" in err and "\n" not in err


def _image_folder(folder: Path, n: int) -> Path:
    from PIL import Image

    folder.mkdir()
    rng = np.random.default_rng(0)
    lines = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(
            folder / f"im{i}.png")
        lines.append(f"im{i}.png,{i % 10}")
    (folder / "labels.csv").write_text("\n".join(lines) + "\n")
    return folder


# ============================================================ 1b. finiteness of every logits batch
class _NaNRows(nn.Module):
    """Finite weights; logits NaN for the images whose first pixel is above ``level``
    (``level=-1``: every image)."""

    def __init__(self, level: float = -1.0):
        super().__init__()
        self.net = _tiny()
        self.num_classes = 10
        self.level = level

    def forward(self, x):
        out = self.net(x)
        bad = (x[:, 0, 0, 0] > self.level)[:, None]  # [N, 1]
        return torch.where(bad, torch.full_like(out, NAN), out)


class _NaNGrad(nn.Module):
    """Finite logits at the clean image; the input gradient is NaN (0 x the infinite slope of
    sqrt at zero)."""

    def __init__(self):
        super().__init__()
        self.net = _tiny()
        self.num_classes = 10

    def forward(self, x):
        return self.net(x) + 0 * torch.sqrt(x - x.detach()).sum(dim=(1, 2, 3))[:, None]


def _batch(n: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 16, 16, generator=g) * 0.5, torch.arange(n) % 10


ATTACKS = [
    (PGD, dict(steps=2)), (PGD, dict(steps=2, restarts=2)), (FGSM, {}), (IFGSM, dict(steps=2)),
    (MIFGSM, dict(steps=2)), (APGD, dict(steps=2)), (APGD, dict(steps=2, loss="dlr")),
    (APGDT, dict(steps=2, n_target_classes=2)), (FAB, dict(steps=2, n_target_classes=2)),
    (Square, dict(n_queries=3)),
]


@pytest.mark.parametrize("cls, kw", ATTACKS, ids=lambda a: getattr(a, "__name__", str(a)))
def test_every_attack_refuses_nan_logits_naming_the_model_and_images(cls, kw):
    x, y = _batch()
    model = _NaNRows()
    with pytest.raises(NonFiniteError) as err:
        cls(model, eps=8 / 255, seed=0, **kw)(x, y)
    text = _one_line(err.value)
    assert f"{cls.__name__}: model _NaNRows" in text
    assert "NaN or inf logits for 4 of 4 images (0, 1, 2, 3)" in text


@pytest.mark.parametrize("cls, kw", ATTACKS[:6], ids=lambda a: getattr(a, "__name__", str(a)))
def test_the_images_whose_logits_are_nan_are_named(cls, kw):
    x, y = _batch()
    x[1, 0, 0, 0] = x[3, 0, 0, 0] = 0.9
    with pytest.raises(NonFiniteError, match=r"for 2 of 4 images \(1, 3\)"):
        cls(_NaNRows(level=0.8), eps=0.01, seed=0, **kw)(x, y)


@pytest.mark.parametrize("cls, kw", [(PGD, dict(steps=1)), (PGD, dict(steps=3)), (FGSM, {}),
                                     (MIFGSM, dict(steps=2))],
                         ids=lambda a: getattr(a, "__name__", str(a)))
def test_nan_input_gradients_never_come_back_as_images(cls, kw):
    x, y = _batch()
    with pytest.raises(NonFiniteError) as err:
        cls(_NaNGrad(), eps=8 / 255, seed=0, **kw)(x, y)
    assert "the clean logits are finite but during the attack" in _one_line(err.value)


def test_a_finite_model_is_untouched_and_a_guarded_caller_may_opt_out():
    x, y = _batch()
    model = _tiny()
    a = PGD(model, eps=8 / 255, steps=2, seed=0)(x, y)
    b = PGD(model, eps=8 / 255, steps=2, seed=0, exact=True)(x, y)
    assert torch.isfinite(a).all() and (a - x).abs().max() <= 8 / 255 + 1e-6
    assert torch.allclose(a, b, atol=2 / 255)
    quiet = PGD(_NaNRows(), eps=8 / 255, steps=1, seed=0)
    quiet.check_finite = False  # adversarial training: its own guard stops every process
    assert quiet(x, y).shape == x.shape  # no error: the caller's guard sees the NaN loss


def test_training_attack_leaves_non_finite_numbers_to_the_training_guard():
    from featdenoise.training.parts import TrainAttack

    attack = TrainAttack(_tiny(), steps=1, eps=8 / 255, step_size=1 / 255)
    assert attack.random_start.check_finite is False and attack.clean_start.check_finite is False


def test_autoattack_refuses_nan_clean_logits():
    x, y = _batch()
    aa = AutoAttack(_NaNRows(), eps=8 / 255, steps=2, n_target_classes=2, n_queries=2)
    with pytest.raises(NonFiniteError, match=r"AutoAttack: model _NaNRows returned NaN"):
        aa.run(x, y)


def _list_dataset(n: int):
    x, y = _batch(n, seed=1)
    return [(x[i], int(y[i])) for i in range(n)]


def test_the_engine_refuses_nan_clean_logits_naming_the_image_ids(tmp_path):
    from featdenoise.evaluation import engine
    from featdenoise.evaluation.whitebox import attack_column

    data = _list_dataset(6)
    data[4] = (data[4][0].clone().fill_(0.95), data[4][1])
    cols = [attack_column("pgd2", "pgd", eps=8 / 255, steps=2)]
    p = engine.plan(_NaNRows(level=0.9), data, cols, batch_size=3)
    with pytest.raises(NonFiniteError) as err:
        engine.run(_NaNRows(level=0.9), p, None, progress=False)
    assert "model _NaNRows returned NaN or inf logits for 1 of 3 images (4)" in _one_line(err.value)
    # An attack that goes non-finite on perturbed images: its batch's image ids are named.
    data = _list_dataset(3)
    p = engine.plan(_NaNGrad(), data, cols, batch_size=3)
    with pytest.raises(NonFiniteError) as err:
        engine.run(_NaNGrad(), p, None, progress=False)
    assert _one_line(err.value).startswith("pgd2 on batch 0 (images 0, 1, 2): PGD: model _NaNGrad")
    # Adversarial images the evaluated model cannot classify (a transfer attack's) are named too.
    with pytest.raises(NonFiniteError, match=r"for 3 of 3 pgd2 images \(a, b, c\)"):
        engine.predict_fields(_NaNRows(), "pgd2", data[0][0][None].repeat(3, 1, 1, 1),
                              torch.zeros(3, dtype=torch.long), ["a", "b", "c"])


def test_eval_cli_on_a_model_with_nan_logits_prints_no_table(tmp_path, capsys, monkeypatch):
    from featdenoise.cli import evaluate, main

    imgs = _image_folder(tmp_path / "imgs", 4)
    weights = tmp_path / "model.safetensors"
    ckpt.save_weights(str(weights), _tiny(), "small_resnet", _tiny().model_kwargs)
    real = evaluate.models_from_args
    monkeypatch.setattr(evaluate, "models_from_args",
                        lambda args: [(n, _NaNRows(), s) for n, _, s in real(args)])
    rc = main(["eval", "--checkpoint", str(weights), "--data", "folder", "--data-root",
               str(imgs), "--labels", str(imgs / "labels.csv"), "--steps", "1", "--out",
               str(tmp_path / "ev"), "--device", "cpu", "--no-progress"])
    out, err = capsys.readouterr()
    assert rc == 2 and "NaN or inf logits" in err and "im0" in err
    assert "%" not in out and not (tmp_path / "ev" / "table.md").exists()


def test_predict_refuses_nan_logits_naming_the_files(tmp_path):
    from featdenoise.evaluation.predict import predict_folder

    imgs = _image_folder(tmp_path / "imgs", 5)
    with pytest.raises(NonFiniteError) as err:
        predict_folder(_NaNRows(), str(imgs), size=None, batch_size=2, device="cpu",
                       progress=False)
    assert "for 2 of 2 images (im0.png, im1.png)" in _one_line(err.value)
    names, preds = predict_folder(_tiny(), str(imgs), size=None, batch_size=2, device="cpu",
                                  progress=False)
    assert len(preds) == 5


def test_sanity_reports_the_checks_an_attack_cannot_run_as_failed():
    from featdenoise.evaluation.sanity import ATTACK_CHECKS, run_sanity

    x, y = _batch(8)
    results = run_sanity(_NaNGrad(), [(x, y)], eps=8 / 255, steps=2, restarts=2)
    by = {r.name: r for r in results}
    assert not by["gradient"].passed and by["gradient"].numbers["nonfinite"] == 8
    for name in ATTACK_CHECKS:
        assert not by[name].passed and by[name].message.startswith("not run: PGD: model")
        assert "%" not in by[name].message and by[name].numbers == {"images": 8}
    with pytest.raises(NonFiniteError, match="model _NaNRows returned NaN"):
        run_sanity(_NaNRows(), [(x, y)], eps=8 / 255, steps=2, restarts=2)


# ============================================================ 2. float options are finite
@pytest.mark.parametrize("value, words", [(NAN, "is not a finite number"),
                                          (INF, "is not a finite number"),
                                          (-INF, "is not a finite number"),
                                          ("0.1", "is not a number"), (None, "is not a number"),
                                          (True, "is not a number")])
def test_finite_float_names_the_option(value, words):
    with pytest.raises(ValueError, match=f"^step_size={value!r} {words}"):
        finite_float("step_size", value)
    assert finite_float("x", np.float32(0.5)) == 0.5 and finite_float("x", 2) == 2.0


LIBRARY_OPTIONS = [
    (PGD, "eps"), (PGD, "step_size"), (PGD, "clean_start_prob"), (FGSM, "eps"),
    (IFGSM, "step_size"), (MIFGSM, "decay"), (MIFGSM, "step_size"), (APGD, "eps"),
    (APGD, "rho"), (APGDT, "rho"), (FAB, "eta"), (FAB, "beta"), (FAB, "alpha_max"),
    (Square, "p_init"), (Square, "eps"), (AutoAttack, "eps"),
]


@pytest.mark.parametrize("value", [NAN, INF, -INF])
@pytest.mark.parametrize("cls, name", LIBRARY_OPTIONS,
                         ids=[f"{c.__name__}-{n}" for c, n in LIBRARY_OPTIONS])
def test_every_float_option_of_the_attacks_refuses_nan_and_inf(cls, name, value):
    with pytest.raises(ValueError) as err:
        cls(_tiny(), **{name: value})
    assert _one_line(err.value).startswith(f"{name}={value!r} is not a finite number")


def test_pgd_with_an_infinite_fixed_step_is_refused_before_it_returns_nan_images():
    with pytest.raises(ValueError, match=r"step_size=inf is not a finite number"):
        PGD(_tiny(), step_size=INF, step_rule="fixed")


def test_evaluate_whitebox_refuses_a_bad_step_before_writing_anything(tmp_path):
    from featdenoise.evaluation.whitebox import evaluate_whitebox

    out = tmp_path / "ev"
    with pytest.raises(ValueError, match=r"^step_size=inf is not a finite number"):
        evaluate_whitebox(_tiny(), _list_dataset(2), str(out), steps=[2], eps=8 / 255,
                          step_size=INF, step_rule="fixed")
    assert not out.exists()


def test_evaluate_blackbox_refuses_a_bad_source_step_before_writing_anything(tmp_path):
    from featdenoise.evaluation.blackbox import evaluate_blackbox, transfer_attackers

    out = tmp_path / "bb"
    attackers = transfer_attackers([("src", _tiny(1))], ["pgd", "ifgsm"], steps=2,
                                   step_size=NAN)
    with pytest.raises(ValueError, match=r"^step_size=nan is not a finite number"):
        evaluate_blackbox(_tiny(), _list_dataset(2), str(out), attackers, eps=8 / 255)
    assert not out.exists()


def test_sanity_float_options_are_finite():
    from featdenoise.evaluation.sanity import run_sanity

    x, y = _batch(4)
    for kw in (dict(step_size=INF), dict(tolerance=NAN), dict(min_grad_fraction=INF)):
        name = next(iter(kw))
        with pytest.raises(ValueError, match=f"sanity: {name}=(nan|inf) is not a finite"):
            run_sanity(_tiny(), [(x, y)], eps=8 / 255, steps=2, **kw)


def test_create_model_refuses_non_finite_sizes():
    with pytest.raises(ValueError, match=r"^width=inf is not a finite number"):
        create_model("small_resnet", width=INF)


@pytest.mark.parametrize("override, key", [
    ("model.kwargs.width=.inf", "model.kwargs.width"),
    ("model.kwargs.width=.nan", "model.kwargs.width"),
    ("model.kwargs={blocks: [1, .inf, 1]}", "model.kwargs.blocks[1]"),
    ("optim.milestones=[10, .inf]", "optim.milestones[1]"),
    ("optim.lr=.inf", "optim.lr"),
    ("attack.eps=-.inf", "attack.eps"),
])
def test_config_refuses_non_finite_values_anywhere_naming_the_nested_key(override, key):
    from featdenoise.training.config import load_config

    with pytest.raises(ValueError) as err:
        load_config(None, [override])
    assert _one_line(err.value).startswith(f"config key '{key}' = ")
    assert "is not a finite number" in str(err.value)


def test_print_config_refuses_an_infinite_model_width(capsys):
    from featdenoise.cli import main

    rc = main(["train", "--config", "fashion_mnist_quick", "--print-config",
               "model.kwargs.width=.inf"])
    err = capsys.readouterr().err
    assert rc == 2 and "'model.kwargs.width' = inf is not a finite number" in err
    assert "divisible" not in err


CLI_FLAGS = [("eval", "--eps"), ("eval", "--step-size"), ("blackbox", "--eps"),
             ("blackbox", "--source-step-size"), ("visualize", "--eps"),
             ("visualize", "--step-size"), ("ablate", "--eps"), ("ablate", "--step-size")]


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "NaN", "1e999"])
@pytest.mark.parametrize("command, flag", CLI_FLAGS, ids=[" ".join(f) for f in CLI_FLAGS])
def test_every_float_flag_refuses_non_finite_values_naming_the_flag(command, flag, value,
                                                                    capsys):
    from featdenoise.cli import main

    with pytest.raises(SystemExit) as exit_:
        main([command, f"{flag}={value}" if value.startswith("-") else flag, *(
            [] if value.startswith("-") else [value])])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and "\n" not in err
    assert f"error: {flag} {value}: not a finite number" in err
    assert "[0, 1]" not in err


def test_a_float_flag_typed_with_equals_or_as_words(capsys):
    from featdenoise.cli import main

    with pytest.raises(SystemExit):
        main(["eval", "--step-size=inf"])
    assert "--step-size inf: not a finite number" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", "--eps", "sixteen"])
    assert "--eps sixteen: not a number" in capsys.readouterr().err


def test_no_float_flag_of_the_cli_escapes_the_finite_check():
    from featdenoise.cli import build_parser
    from featdenoise.cli.common import FiniteFloat

    def actions(parser):
        for a in parser._actions:
            if isinstance(a, argparse._SubParsersAction):
                for sub in a.choices.values():
                    yield from actions(sub)
            else:
                yield a

    found = list(actions(build_parser()))
    assert not [a.option_strings for a in found if a.type is float]
    assert sum(isinstance(a, FiniteFloat) for a in found) >= len(CLI_FLAGS)
    defaults = [a.default for a in found if isinstance(a, FiniteFloat)]
    assert all(d is None or math.isfinite(d) for d in defaults)


def test_float_flags_still_parse_numbers():
    from featdenoise.cli import build_parser

    args = build_parser().parse_args(["eval", "--out", "o", "--eps", "8", "--step-size", "0.5"])
    assert (args.eps, args.step_size) == (8 / 255, 0.5 / 255)  # stored on the [0, 1] scale
    assert build_parser().parse_args(["eval", "--out", "o"]).eps == 16 / 255


# ============================================================ 3. strict config loading
CONFIG = """\
model:
  name: small_resnet
optim:
  lr: 0.1
data:
  name: fashion_mnist
  batch_size: 8
optim:
  lr: 0.5
"""


def test_a_config_with_two_optim_blocks_is_refused_with_both_lines(tmp_path):
    from featdenoise.training.config import load_config

    path = tmp_path / "x.yaml"
    path.write_text(CONFIG)
    with pytest.raises(ValueError) as err:
        load_config(str(path))
    assert _one_line(err.value).startswith(f"{path}: duplicate key 'optim' at lines 3 and 8")


@pytest.mark.parametrize("text, key, lines", [
    ("model:\n  kwargs:\n    width: 8\n    blocks: [1, 1, 1]\n    width: 16\n", "width", (3, 5)),
    ("run:\n  eval_sweeps:\n    - {a: 1, a: 2}\n", "a", (3, 3)),
    ("optim:\n  lr: 0.1\n  momentum: 0.9\n  lr: 0.2\n", "lr", (2, 4)),
    ("1: a\n1.0: b\n", 1.0, (1, 2)),
])
def test_duplicate_keys_are_refused_at_any_depth(tmp_path, text, key, lines):
    from featdenoise.training.config import load_config
    from featdenoise.training.yamlio import DuplicateKeyError, yaml_load

    path = tmp_path / "c.yaml"
    path.write_text(text)
    with open(path) as f, pytest.raises(DuplicateKeyError) as err:
        yaml_load(f)
    where = f"at lines {lines[0]} and {lines[1]}" if lines[0] != lines[1] else \
        f"at line {lines[0]} (twice)"
    assert _one_line(err.value).startswith(f"{path}: duplicate key {key!r} {where}")
    with pytest.raises(ValueError, match="duplicate key"):
        load_config(str(path))


def test_yaml_merge_keys_and_distinct_keys_still_load():
    from featdenoise.training.yamlio import yaml_load

    tree = yaml_load("base: &b {lr: 0.1, momentum: 0.9}\noptim:\n  <<: *b\n  lr: 0.2\n")
    assert tree["optim"] == {"lr": 0.2, "momentum": 0.9}
    assert yaml_load("a: {x: 1}\nb: {x: 2}\n") == {"a": {"x": 1}, "b": {"x": 2}}


def test_duplicate_keys_in_an_override_and_in_a_saved_config(tmp_path):
    from featdenoise.training.config import is_own_config, load_config

    with pytest.raises(ValueError) as err:
        load_config(None, ["model.kwargs={width: 8, width: 16}"])
    assert _one_line(err.value).startswith("override 'model.kwargs={width: 8, width: 16}': "
                                           "duplicate key 'width'")
    path = tmp_path / "config.yaml"
    path.write_text(CONFIG)
    assert not is_own_config(path)


def test_print_config_refuses_a_config_with_two_optim_blocks(tmp_path, capsys):
    from featdenoise.cli import main

    path = tmp_path / "x.yaml"
    path.write_text(CONFIG)
    rc = main(["train", "--config", str(path), "--print-config"])
    out, err = capsys.readouterr()
    assert rc == 2 and "duplicate key 'optim' at lines 3 and 8" in err and "lr" not in out


def test_safetensors_metadata_with_a_key_twice_is_refused():
    from featdenoise.runtime.safeio import metadata_json

    with pytest.raises(ValueError, match=r"m.safetensors: metadata 'model_kwargs' is not valid "
                                         r"JSON \(duplicate key 'width'\)"):
        metadata_json("m.safetensors", {"model_kwargs": '{"width": 8, "width": 16}'},
                      "model_kwargs", {}, dict)
    assert metadata_json("m", {"k": '{"a": {"b": 1}, "c": 2}'}, "k", {}, dict)["c"] == 2
