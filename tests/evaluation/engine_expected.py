"""How ``engine_expected.json`` was made: the evaluation code of commit a8607d3, before the engine.

``python tests/data/engine_expected.py OUT.json`` in a checkout of that commit (where this file
was ``tests/data/``). The model, data and settings below are also what
``tests/evaluation/test_engine.py`` evaluates now, with ``exact=True`` (that commit's attacks ran
without the speed layer).
"""

import json
import sys
import tempfile

import torch

from featdenoise.data.datasets import ArrayDataset

WHITEBOX = dict(steps=[1, 3], eps=8 / 255, step_size=2 / 255, seed=3, batch_size=8, limit=30,
                progress=False, device="cpu")
TRANSFER = dict(steps=2, step_size=4 / 255)
BLACKBOX = dict(eps=16 / 255, seed=3, batch_size=8, limit=30, progress=False, device="cpu")


def tiny() -> torch.nn.Module:
    """A conv + BN + linear net with ``num_classes``; random weights, eval mode."""
    m = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, stride=2), torch.nn.BatchNorm2d(4),
                            torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(4 * 13 * 13, 10))
    m.num_classes = 10
    return m.eval()


def setup() -> tuple[torch.nn.Module, torch.nn.Module, ArrayDataset]:
    """``(model, source model, 40 images)``; half the labels are the model's own predictions."""
    torch.manual_seed(0)
    model, src = tiny(), tiny()
    for m in (model, src):
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                torch.nn.init.uniform_(mod.weight, 0.5, 1.5)
                torch.nn.init.normal_(mod.running_mean, 0, 0.1)
    g = torch.Generator().manual_seed(1)
    x = (torch.rand(40, 1, 28, 28, generator=g) * 255).round().to(torch.uint8)
    with torch.no_grad():
        y = model(x.float() / 255).argmax(1)
    y[::2] = torch.randint(0, 10, (20,), generator=g)
    return model, src, ArrayDataset(x, y)


def main(path: str) -> None:
    from featdenoise.evaluation import blackbox as bb
    from featdenoise.evaluation.whitebox import evaluate_whitebox

    torch.set_num_threads(1)
    model, src, ds = setup()
    out = {}
    with tempfile.TemporaryDirectory() as d:
        for targeted in (True, False):
            evaluate_whitebox(model, ds, f"{d}/wb{targeted}", targeted=targeted, **WHITEBOX)
            with open(f"{d}/wb{targeted}/outcomes.jsonl") as f:
                out[f"whitebox_targeted={targeted}"] = [json.loads(line) for line in f]
        atk = bb.transfer_attackers([("src", src)], ["pgd", "fgsm"], **TRANSFER)
        bb.evaluate_blackbox(model, ds, f"{d}/bb", atk, **BLACKBOX)
        with open(f"{d}/bb/outcomes.jsonl") as f:
            out["blackbox"] = [json.loads(line) for line in f]
    with open(path, "w") as f:
        json.dump(out, f, indent=1, sort_keys=True)


if __name__ == "__main__":
    main(sys.argv[1])
