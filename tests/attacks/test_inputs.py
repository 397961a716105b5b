"""Attacks refuse inputs that cannot be right, each with one ValueError line saying what they
expect: images that are not [N, C, H, W] float in [0, 1], labels and targets that are not class
indices of this model, a dtype other than the model's, a model that does not return logits."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from featdenoise.attacks import ATTACKS, PGD, build_attack

K = 5


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Flatten(), nn.Linear(4 * 8 * 8, K)).eval()
    model.num_classes = K
    return model


def batch(n: int = 4):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 3, 8, 8, generator=g)
    y = torch.randint(0, K, (n,), generator=g)
    return x, y


def refused(match: str, x, y, target=None, model=None, **kw) -> str:
    attack = PGD(model if model is not None else tiny_model(), steps=1, seed=0, **kw)
    with pytest.raises(ValueError, match=match) as err:
        attack(x, y, target)
    text = str(err.value)
    assert text and "\n" not in text, f"not one line: {text!r}"
    return text


def test_images_not_4d():
    x, y = batch()
    text = refused(r"\[N, C, H, W\]", x[0], y[:3])
    assert "(3, 8, 8)" in text
    refused(r"\[N, C, H, W\]", x.flatten(1), y)


def test_images_not_float():
    x, y = batch()
    assert "x.float() / 255" in refused("float tensor", (x * 255).to(torch.uint8), y)


def test_images_outside_0_1_beyond_tolerance():
    x, y = batch()
    refused(r"outside \[0, 1\]", x * 255, y)
    below = x.clone()
    below[1, 1, 1, 1] = -1e-3
    refused(r"outside \[0, 1\]", below, y)
    x_edge = x.clone()
    x_edge[0, 0, 0, 0], x_edge[0, 0, 0, 1] = 1 + 5e-7, -5e-7  # rounding of x / 255: accepted
    out = PGD(tiny_model(), steps=1, seed=0)(x_edge, y)
    assert out.min() >= 0 and out.max() <= 1


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_images_not_finite(bad):
    x, y = batch()
    x[1, 2, 3, 4] = bad
    refused("NaN or inf", x, y)


def test_labels_not_integer():
    x, y = batch()
    assert "int64" in refused("labels are torch.float32", x, y.float())
    refused("labels are torch.bool", x, y > 2)


def test_labels_wrong_length():
    x, y = batch()
    refused("disagree", x, y[:2])
    refused("disagree", x, y.view(2, 2))


@pytest.mark.parametrize("bad", [-1, K])
def test_labels_outside_the_classes(bad):
    x, y = batch()
    y[2] = bad
    assert f"K={K}" in refused(r"labels span", x, y)
    model = tiny_model()
    del model.num_classes  # K read from the logits instead
    refused(r"labels span", x, y, model=model, targeted=False)


def test_target_equal_to_label_or_out_of_range():
    x, y = batch()
    target = (y + 1) % K
    target[3] = y[3]
    assert "target[3]" in refused("wrong class", x, y, target)
    refused("target span", x, y, (y + 1) % K + K)
    refused("target are torch.float32", x, y, ((y + 1) % K).float())
    refused("disagree", x, y, ((y + 1) % K)[:3])
    # Untargeted attacks ignore the target, as documented.
    PGD(tiny_model(), steps=1, targeted=False)(x, y, y)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_image_dtype_must_be_the_models(dtype):
    x, y = batch()
    text = refused(f"images are {dtype}", x.to(dtype), y)
    assert "x.to(torch.float32)" in text
    model = tiny_model().double()  # the model's own dtype is fine
    assert PGD(model, steps=1)(x.double(), y).dtype == torch.float64


class _Returns(nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.net = tiny_model()

    def forward(self, x):
        logits = self.net(x)
        return {"tuple": (logits, x), "dict": {"logits": logits}, "vector": logits[:, 0],
                "tensor": logits}[self.kind]


@pytest.mark.parametrize("kind", ["tuple", "dict", "vector"])
@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_model_must_return_logits(kind, name):
    x, y = batch()
    attack = build_attack(name, _Returns(kind), num_classes=K, seed=0)
    with pytest.raises(ValueError, match=r"logits tensor \[N, K\]") as err:
        attack(x, y)
    assert "_Returns returned" in str(err.value) and "\n" not in str(err.value)
    assert build_attack(name, _Returns("tensor"), num_classes=K, seed=0)(x, y).shape == x.shape


@pytest.mark.parametrize("cls,kwargs,match", [
    ("PGD", dict(steps=-1), "steps=-1 must be a non-negative integer"),
    ("PGD", dict(restarts=1.5), "restarts=1.5 must be an integer >= 1"),
    ("APGD", dict(steps=None), "steps=None must be an integer >= 1 .AutoAttack uses 100."),
    ("APGD", dict(eot_iter=0), "eot_iter=0 must be an integer >= 1"),
    ("APGDT", dict(n_target_classes="9"), "n_target_classes='9' must be an integer >= 1"),
    ("FAB", dict(steps=2.5), "steps=2.5 must be an integer >= 1"),
    ("Square", dict(n_queries="many"), "n_queries='many' must be a non-negative integer"),
])
def test_counts_that_are_not_whole_numbers_are_refused_in_one_line(cls, kwargs, match):
    import featdenoise.attacks as attacks

    with pytest.raises(ValueError, match=match) as err:
        getattr(attacks, cls)(tiny_model(), **kwargs)
    assert "\n" not in str(err.value)
