"""Model specs: every kind evaluates to the records of the same model through the Python API;
normalisation gives the logits of a hand-normalised call; bad specs are one line, exit 2.

No downloads: library models are built with random weights and saved here.
"""

from __future__ import annotations

import json
import sys
import textwrap

import pytest
import torch
import torchvision
from helpers import folder_dataset

from featdenoise.cli import main
from featdenoise.evaluation.whitebox import evaluate_whitebox
from featdenoise.hub import build_spec, read_state_dict
from featdenoise.hub.loading import SpecOptions, load_model_spec

pytestmark = pytest.mark.usefixtures("one_thread")

K = 4
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def _tv_resnet18(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = torchvision.models.resnet18(num_classes=K).eval()
    with torch.no_grad():  # trained-looking BatchNorm statistics
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 2.0)
    return model


def _hand_normalised(model, mean, std):
    mean, std = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    return lambda x: model((x - mean) / std)


USER_CODE = textwrap.dedent("""
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self, width=8, classes=4):
            super().__init__()
            self.conv = nn.Conv2d(3, width, 3, padding=1)
            self.head = nn.Linear(width, classes)

        def forward(self, x):
            return self.head(torch.relu(self.conv(x)).mean((2, 3)))

    def build(width=8, classes=4):
        return Net(width, classes)

    def not_a_model():
        return 3
""")


@pytest.fixture
def user_file(tmp_path):
    path = tmp_path / "mynets.py"
    path.write_text(USER_CODE)
    return path


# ------------------------------------------------------------------------------ the kinds
def test_torchvision_spec_with_weights_is_the_saved_model_behind_imagenet_normalisation(tmp_path):
    ref = _tv_resnet18()
    torch.save({"state_dict": {f"module.{k}": v for k, v in ref.state_dict().items()},
                "epoch": 7}, tmp_path / "w.pth")
    model, facts = build_spec("torchvision:resnet18", {"num_classes": K}, str(tmp_path / "w.pth"))
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), _hand_normalised(ref, *IMAGENET)(x))
    assert model.num_classes == K and facts["normalize"]["mean"] == list(IMAGENET[0])
    assert facts["spec"] == "torchvision:resnet18" and len(facts["weights_file_sha256"]) == 64


def test_custom_and_no_normalisation(tmp_path):
    ref = _tv_resnet18()
    torch.save(ref.state_dict(), tmp_path / "w.pt")
    x = torch.rand(1, 3, 32, 32)
    plain, _ = build_spec("torchvision:resnet18", {"num_classes": K}, str(tmp_path / "w.pt"),
                          normalize="none")
    mine, facts = build_spec("torchvision:resnet18", {"num_classes": K}, str(tmp_path / "w.pt"),
                             normalize="0.5,0.5,0.5/0.25,0.25,0.25")
    with torch.no_grad():
        assert torch.equal(plain(x), ref(x))
        assert torch.equal(mine(x), _hand_normalised(ref, (0.5,) * 3, (0.25,) * 3)(x))
    assert facts["normalize"] == {"mean": [0.5] * 3, "std": [0.25] * 3}


def test_timm_spec_uses_the_models_own_pretrained_cfg(tmp_path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(1)
    ref = timm.create_model("resnet18", pretrained=False, num_classes=K).eval()
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in ref.state_dict().items()},
              tmp_path / "w.safetensors")
    model, facts = build_spec("timm:resnet18", {"num_classes": K},
                              str(tmp_path / "w.safetensors"))
    cfg = ref.pretrained_cfg
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), _hand_normalised(ref, cfg["mean"], cfg["std"])(x))
    assert facts["input_size"] == [3, 224, 224] and model.num_classes == K


def test_user_code_file_and_module_specs(user_file, monkeypatch):
    model, facts = build_spec(f"{user_file}:build", {"width": 5})
    assert model.conv.out_channels == 5 and facts["normalize"] is None
    monkeypatch.syspath_prepend(str(user_file.parent))
    model2, _ = build_spec("mynets:build", {"width": 5})
    assert type(model2).__name__ == "Net"
    sys.modules.pop("mynets", None)


def test_registry_name_with_weights(tmp_path):
    from featdenoise.models import create_model

    torch.manual_seed(0)
    ref = create_model("small_resnet", num_classes=K, width=4, blocks=[1, 1, 1]).eval()
    torch.save(ref.state_dict(), tmp_path / "w.pt")
    _, model, facts = load_model_spec("small_resnet", SpecOptions(
        kwargs={"num_classes": K, "width": 4, "blocks": [1, 1, 1]},
        weights=str(tmp_path / "w.pt")))
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))
    assert facts["registry"] == "small_resnet"


def _eval_argv(folder, labels, out, *model):
    return ["eval", *model, "--data", "folder", "--data-root", str(folder), "--labels",
            str(labels), "--steps", "1,2", "--eps", "8", "--batch-size", "2", "--out", str(out),
            "--device", "cpu", "--no-progress"]


def _outcomes(out):
    rows = [json.loads(line) for line in (out / "outcomes.jsonl").read_text().splitlines()]
    return sorted(json.dumps(r, sort_keys=True) for r in rows)


@pytest.mark.parametrize("kind", ["torchvision", "code"])
def test_each_spec_kind_evaluates_to_the_records_of_the_python_api(tmp_path, capsys, user_file,
                                                                    kind):
    folder, labels = folder_dataset(tmp_path, n=4)
    if kind == "torchvision":
        ref = _tv_resnet18()
        torch.save(ref.state_dict(), tmp_path / "w.pt")
        args = ["--model", "torchvision:resnet18", "--model-kwargs", json.dumps({"num_classes": K}),
                "--weights", str(tmp_path / "w.pt")]
        api = _hand_normalised(ref, *IMAGENET)

        class Api(torch.nn.Module):  # the same function, passed through the Python API
            num_classes = K

            def __init__(self):
                super().__init__()
                self.ref = ref

            def forward(self, x):
                return api(x)

        api_model = Api().eval()
    else:
        args = ["--model", f"{user_file}:build"]
        api_model, _ = build_spec(f"{user_file}:build")
        api_model.num_classes = K
    assert main(_eval_argv(folder, labels, tmp_path / "cli", *args)) == 0
    from featdenoise.data.files import labelled_folder

    evaluate_whitebox(api_model, labelled_folder(str(folder), str(labels)), steps=[1, 2],
                      eps=8 / 255, batch_size=2, out_dir=str(tmp_path / "api"),
                      device="cpu", progress=False)
    capsys.readouterr()
    a, b = _outcomes(tmp_path / "cli"), _outcomes(tmp_path / "api")
    assert a == b and len(a) == 4


def test_cli_records_spec_kwargs_weights_digest_and_normalisation(tmp_path, capsys):
    folder, labels = folder_dataset(tmp_path, n=4)
    torch.save(_tv_resnet18().state_dict(), tmp_path / "w.pt")
    argv = _eval_argv(folder, labels, tmp_path / "ev", "--model", "torchvision:resnet18",
                      "--model-kwargs", '{"num_classes": 4}', "--weights", str(tmp_path / "w.pt"))
    assert main(argv) == 0
    settings = json.loads((tmp_path / "ev" / "settings.json").read_text())
    assert settings["model"]["model_name"] == "torchvision:resnet18"
    assert settings["model"]["model_kwargs"] == {"num_classes": 4}
    assert settings["source"]["normalize"]["std"] == list(IMAGENET[1])
    # Other normalisation = another model: resuming into the folder is refused.
    capsys.readouterr()
    assert main(argv + ["--normalize", "cifar10"]) == 2
    assert "weights_sha256" in capsys.readouterr().err  # the normalisation buffers differ


def test_read_state_dict_unnests_and_strips_prefixes(tmp_path):
    state = {"a.weight": torch.ones(2), "b": torch.zeros(1)}
    for i, saved in enumerate([state, {"model": state}, {"state_dict": {"model": state}},
                               {f"module.{k}": v for k, v in state.items()},
                               {"net": {f"_orig_mod.{k}": v for k, v in state.items()}}]):
        torch.save(saved, tmp_path / f"{i}.pt")
        assert set(read_state_dict(tmp_path / f"{i}.pt")) == set(state)


# ------------------------------------------------------------------------------ bad specs
def _refused(capsys, tmp_path, *model_args) -> str:
    folder, labels = folder_dataset(tmp_path, n=2)
    code = main(_eval_argv(folder, labels, tmp_path / "ev", *model_args))
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1, (code, lines)
    assert not (tmp_path / "ev").exists() or not any((tmp_path / "ev").iterdir())
    return lines[0]


def test_bad_specs_are_one_line_and_write_nothing(tmp_path, capsys, user_file):
    torch.save(torchvision.models.resnet18(num_classes=K).state_dict(), tmp_path / "r18.pt")

    class Evil:
        def __reduce__(self):
            return (print, ("ran",))

    torch.save({"state_dict": Evil()}, tmp_path / "evil.pt")
    cases = [
        (["--model", "torchvision:resnet1800"], "torchvision has no model 'resnet1800'"),
        (["--model", "torchvision:resnet18", "--model-kwargs", '{"weights": "DEFAULT"}'],
         "would download"),
        (["--model", "timm:resnet18", "--model-kwargs", '{"pretrained": true}'],
         "would download"),
        (["--model", f"{user_file}:buidl"], "has no function 'buidl' (did you mean build"),
        (["--model", f"{user_file}:not_a_model"], "returned a int, not a torch.nn.Module"),
        (["--model", f"{tmp_path / 'nope.py'}:build"], "no such file"),
        (["--model", "no_such_pkg.mod:build"], "cannot import module 'no_such_pkg.mod'"),
        (["--model", "torchvision:resnet34", "--model-kwargs", '{"num_classes": 4}',
          "--weights", str(tmp_path / "r18.pt")], "do not fit the model"),
        (["--model", "torchvision:resnet18", "--weights", str(tmp_path / "evil.pt")],
         "evil.pt"),
        (["--model", "torchvision:resnet18", "--normalize", "0.5/0"], "--normalize"),
        (["--model", "robustbench:Standard"], "robustbench"),
        (["--model", "torchvision:resnet18", "--model-kwargs", '{"bogus": 1}'],
         "building it with --model-kwargs {\"bogus\": 1} failed"),
        (["--model", "timm:resnet18", "--model-kwargs", '{"num_classes": "ten"}'],
         "timm:resnet18: building it with --model-kwargs"),
        (["--model", f"{user_file}:build", "--model-kwargs", '{"depth": 3}'],
         "unexpected keyword argument 'depth'"),
        (["--model", "torchvision:resnet18", "--weights", str(tmp_path)], "is a folder"),
    ]
    for i, (args, expected) in enumerate(cases):
        line = _refused(capsys, tmp_path / str(i), *args)
        assert expected in line, (args, line)


def test_flag_errors_are_argparse_lines(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["eval", "--model", "x", "--model-kwargs", "[1]", "--data", "x", "--out", "o"])
    assert stop.value.code == 2 and "expected a JSON object" in capsys.readouterr().err


def test_blackbox_source_spec_with_weights(tmp_path, capsys):
    folder, labels = folder_dataset(tmp_path, n=4)
    torch.save(_tv_resnet18().state_dict(), tmp_path / "src.pt")
    torch.save(_tv_resnet18(seed=1).state_dict(), tmp_path / "target.pt")
    argv = ["blackbox", "--model", "torchvision:resnet18", "--model-kwargs", '{"num_classes": 4}',
            "--weights", str(tmp_path / "target.pt"), "--clean-dir", str(folder), "--labels",
            str(labels), "--source", f"torchvision:resnet18@{tmp_path / 'src.pt'}",
            "--source-attacks", "fgsm", "--out", str(tmp_path / "bb"), "--device", "cpu",
            "--no-progress"]
    assert main(argv) == 0, capsys.readouterr().err
    settings = json.loads((tmp_path / "bb" / "settings.json").read_text())
    assert "resnet18" in json.dumps(settings)
    capsys.readouterr()
    argv[argv.index("--source") + 1] = f"torchvision:resnet34@{tmp_path / 'src.pt'}"
    assert main(argv) == 2 and "do not fit" in capsys.readouterr().err


def test_blackbox_source_split_keeps_an_at_sign_inside_a_path(tmp_path):
    from featdenoise.cli.inputs import split_source

    odd = tmp_path / "v@2"
    odd.mkdir()
    (odd / "w@best.pt").write_bytes(b"")
    weights = str(odd / "w@best.pt")
    assert split_source(f"torchvision:resnet18@{weights}") == ("torchvision:resnet18", weights)
    assert split_source(str(odd)) == (str(odd), None)  # a run folder named with an @
    assert split_source(f"{odd}@{weights}") == (str(odd), weights)
    assert split_source("timm:resnet18") == ("timm:resnet18", None)
    # a weights file that is not there is still split off, so its absence is what is reported
    assert split_source("timm:resnet18@missing.pt") == ("timm:resnet18", "missing.pt")
