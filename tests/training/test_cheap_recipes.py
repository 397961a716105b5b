"""The cheaper recipes (attack.mode free | fast): Free-AT against a literal Alg. 1 loop, the
cyclic rate, Fast-AT's overfitting guard, exact mid-epoch resume, and the new config keys."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F
from helpers import run_weights, tiny_config

from featdenoise.hub import checkpoints as ckpt
from featdenoise.models import create_model
from featdenoise.training import loop, parts, resume, setup
from featdenoise.training.config import Config, load_config
from featdenoise.training.metrics import read_metrics
from featdenoise.training.recipes import fast
from featdenoise.training.recipes import free as free_at
from featdenoise.training.step import State, StepContext

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------
# Free-AT


def _reference_free(model, batches, *, m, eps, lr, targeted, num_classes, seed_of):
    """Shafahi et al. Alg. 1 written out: for each minibatch, m times: g_x, g_w from one loss;
    w <- SGD(w, g_w); delta <- clip(delta + eps sign(g_x), -eps, eps); delta carried over."""
    cfg = load_config(None, [f"optim.lr={lr}", "optim.base_batch=8", "optim.milestones=[100]"])
    opt = parts.build_optimizer(model, cfg.optim)
    for g in opt.param_groups:
        g["lr"] = lr
    params = [p for p in model.parameters()]
    delta = None
    for k, (x, y) in enumerate(batches):
        torch.manual_seed(seed_of(k))
        target = None
        if targeted:  # (y + U{1..K-1}) mod K, drawn once per minibatch
            target = (y + torch.randint(1, num_classes, y.shape)) % num_classes
        if delta is None:
            delta = torch.zeros_like(x)
        for _ in range(m):
            d = delta.clone().requires_grad_(True)
            model.train()
            logits = model(torch.clamp(x + d, 0.0, 1.0))
            loss = F.cross_entropy(logits, y, label_smoothing=0.1)
            if targeted:
                (gx,) = torch.autograd.grad(F.cross_entropy(logits, target), d, retain_graph=True)
                gx = -gx
                gw = torch.autograd.grad(loss, params)
            else:
                *gw, gx = torch.autograd.grad(loss, params + [d])
            for p, g in zip(params, gw, strict=True):
                p.grad = g
            opt.step()
            delta = torch.clamp(delta + eps * torch.sign(gx), -eps, eps)
    return model.state_dict()


@pytest.mark.parametrize("m, targeted", [(1, False), (2, False), (2, True)])
def test_free_step_equals_a_literal_alg1_loop(tmp_path, m, targeted):
    cfg = tiny_config(tmp_path, "attack.mode=free", f"attack.replays={m}",
                      f"attack.targeted={str(targeted).lower()}", "optim.milestones=[100]")
    torch.manual_seed(0)
    batches = [(torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))) for _ in range(3)]
    init = create_model("small_resnet", in_channels=1, width=4, blocks=[1, 1, 1]).state_dict()
    model = create_model("small_resnet", in_channels=1, width=4, blocks=[1, 1, 1])
    model.load_state_dict(init)
    opt = parts.build_optimizer(model, cfg.optim)
    sched = parts.LRSchedule(opt, 6, cfg.optim, 8)
    state, free = State(targeted=targeted), free_at.FreeState()
    for x, y in batches:
        free_at.free_step(model, free, x, y, state, StepContext(
            cfg, torch.device("cpu"), parts.loss_fn(0.1), opt, sched), 10)
        state.step += 1
    ref = create_model("small_resnet", in_channels=1, width=4, blocks=[1, 1, 1])
    ref.load_state_dict(init)
    from featdenoise.runtime.seeds import derive_seed

    want = _reference_free(ref, batches, m=m, eps=16 / 255, lr=0.1, targeted=targeted,
                           num_classes=10, seed_of=lambda k: derive_seed(0, "train-step", k, 0))
    got = model.state_dict()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-7, msg=k)
    assert state.sums["n"] == 3 * m * 8  # every replay counted
    assert free.delta.abs().max() <= 16 / 255 + 1e-7 and free.delta.abs().max() > 0


def test_free_m1_first_minibatch_is_a_clean_step(tmp_path):
    """delta starts at 0, so the first update of Free-AT is plain training on the clean batch."""
    cfg = tiny_config(tmp_path, "attack.mode=free", "attack.replays=1",
                      "attack.targeted=false")
    torch.manual_seed(1)
    x, y = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
    a = create_model("small_resnet", in_channels=1, width=4, blocks=[1, 1, 1])
    b = create_model("small_resnet", in_channels=1, width=4, blocks=[1, 1, 1])
    b.load_state_dict(a.state_dict())
    opt_a, opt_b = parts.build_optimizer(a, cfg.optim), parts.build_optimizer(b, cfg.optim)
    sched = parts.LRSchedule(opt_a, 6, cfg.optim, 8)
    free_at.free_step(a, free_at.FreeState(), x, y, State(targeted=False), StepContext(
        cfg, torch.device("cpu"), parts.loss_fn(0.1), opt_a, sched), 10)
    for g in opt_b.param_groups:
        g["lr"] = 0.1
    b.train()
    F.cross_entropy(b(x), y, label_smoothing=0.1).backward()
    opt_b.step()
    for k, v in b.state_dict().items():
        torch.testing.assert_close(a.state_dict()[k], v, rtol=1e-6, atol=1e-7, msg=k)


# ---------------------------------------------------------------------------------------------
# Schedule, Fast-AT


def test_cyclic_rate_rises_to_the_peak_then_falls_to_zero():
    cfg = load_config(None, ["optim.schedule=cyclic", "optim.lr=0.2", "optim.base_batch=128",
                             "optim.epochs=15"])
    opt = parts.build_optimizer(torch.nn.Linear(2, 2), cfg.optim)
    s = parts.LRSchedule(opt, 100, cfg.optim, 128)  # 1500 steps, peak at 750 (default 0.5)
    assert s.lr(0) == 0.0
    assert math.isclose(s.lr(375), 0.1) and math.isclose(s.lr(750), 0.2)
    assert math.isclose(s.lr(1125), 0.1) and s.lr(1500) == 0.0
    assert math.isclose(parts.LRSchedule(opt, 100, cfg.optim, 256).lr(750), 0.4)  # scaled
    early = load_config(None, ["optim.schedule=cyclic", "optim.epochs=15",
                               "optim.cycle_peak=0.4"]).optim
    assert math.isclose(parts.LRSchedule(opt, 100, early, 256).lr(600), 0.1)


def test_fast_attack_is_fgsm_from_a_random_start_in_the_box():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10))  # no zero gradients
    x, y = torch.rand(6, 1, 28, 28), torch.randint(0, 10, (6,))
    eps = 8 / 255
    torch.manual_seed(0)
    x_adv, target, clean = fast.FastAttack(model, eps, 1.25 * eps, targeted=False)(x, y)
    assert target is None and clean is False
    d = x_adv - x
    assert d.abs().max() <= eps + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    # A step of +1.25 eps from u ~ U[-eps, eps] ends on the face iff u >= -0.25 eps: 5/8 of the
    # pixels away from the [0, 1] bounds (a start at 0 would put all of them on a face).
    on_face = ((d.abs() - eps).abs() < 1e-6) | (x_adv == 0) | (x_adv == 1)
    assert 0.58 < on_face.float().mean() < 0.75
    torch.manual_seed(1)
    x2, _, _ = fast.FastAttack(model, eps, 1.25 * eps)(x, y)
    assert not torch.equal(x2, x_adv)  # the start is random


def test_overfit_guard_keeps_the_best_and_stops_on_a_drop():
    model = torch.nn.Linear(2, 2)
    g = fast.OverfitGuard(0.2)
    for epoch, acc in enumerate([0.30, 0.40, 0.35, 0.25], start=1):
        model.weight.data.fill_(epoch)
        assert not g.update(acc, epoch, model)
    assert (g.best_acc, g.best_epoch) == (0.40, 2) and g.best_model["weight"][0, 0] == 2
    assert g.update(0.19, 5, model) and g.stopped  # 0.21 below the best
    h = fast.OverfitGuard(0.2)
    h.load_state_dict(g.state_dict())
    assert h.stopped and h.best_epoch == 2


def _fake_checks(monkeypatch, accs):
    calls = []

    def fake(model, x, y, cfg, epoch):
        calls.append(epoch)
        return accs[epoch - 1]

    monkeypatch.setattr(fast, "pgd_accuracy", fake)
    return calls


FAST = ("attack.mode=fast", "optim.schedule=cyclic", "optim.epochs=3", "run.eval_every=0",
        "run.final_eval_steps=0", "attack.check_images=8", "attack.targeted=false")


def test_fast_guard_fires_on_a_collapse_and_keeps_the_best_weights(tmp_path, monkeypatch):
    calls = _fake_checks(monkeypatch, [0.50, 0.60, 0.30])  # epoch 3 collapses (-30 points)
    run = loop.train(tiny_config(tmp_path, *FAST))
    assert calls == [1, 2, 3]
    checks = [r for r in read_metrics(run) if r["kind"] == "overfit_check"]
    assert [r["stopped"] for r in checks] == [False, False, True]
    # The same run stopped after epoch 2 (12 steps) holds the weights the guard kept.
    part = loop.train(tiny_config(tmp_path, *FAST, f"run.out_dir={tmp_path / 'e2'}",
                                  "run.stop_after=12"))
    kept = run_weights(run)
    best = ckpt.load_checkpoint(os.path.join(part, ckpt.CHECKPOINT))["model"]
    for k in kept:
        assert torch.equal(kept[k], best[k]), k
    saved = ckpt.load_checkpoint(os.path.join(run, ckpt.CHECKPOINT))
    assert saved["extra"]["overfit_guard"]["stopped"] and saved["epoch"] == 3
    # Resuming a stopped run trains no further.
    calls.clear()
    loop.train(tiny_config(tmp_path, *FAST))
    assert calls == []
    again = run_weights(run)
    assert all(torch.equal(again[k], kept[k]) for k in kept)


def test_fast_guard_does_not_fire_on_a_normal_run(tmp_path, monkeypatch):
    calls = _fake_checks(monkeypatch, [0.50, 0.55, 0.40])  # -15 points: within 0.2
    run = loop.train(tiny_config(tmp_path, *FAST))
    checks = [r for r in read_metrics(run) if r["kind"] == "overfit_check"]
    assert calls == [1, 2, 3] and not any(r["stopped"] for r in checks)
    assert ckpt.load_checkpoint(os.path.join(run, ckpt.CHECKPOINT))["step"] == 18


def test_fast_guard_real_check_runs_and_agrees_with_a_direct_pgd(tmp_path):
    cfg = tiny_config(tmp_path, *FAST, "optim.epochs=1")
    run = loop.train(cfg)
    acc = [r for r in read_metrics(run) if r["kind"] == "overfit_check"][0]["pgd_acc"]
    model = ckpt.load_model(run)
    x, y = fast.check_batch(setup._build_data(cfg)[1], 8, torch.device("cpu"))
    assert x.shape == (8, 1, 28, 28)
    assert acc == fast.pgd_accuracy(model, x, y, cfg, 1)


# ---------------------------------------------------------------------------------------------
# Resume


@pytest.mark.parametrize("extra", [
    ("attack.mode=free", "attack.replays=2"),
    ("attack.mode=fast", "optim.schedule=cyclic", "attack.check_images=8"),
])
def test_cheap_modes_resume_mid_epoch_bit_for_bit(tmp_path, extra):
    common = (*extra, "run.eval_every=0", "run.final_eval_steps=0")
    full = loop.train(tiny_config(tmp_path, *common, f"run.out_dir={tmp_path / 'full'}"))
    part = tmp_path / "part"
    loop.train(tiny_config(tmp_path, *common, f"run.out_dir={part}", "run.stop_after=9"))
    saved = ckpt.load_checkpoint(str(part / ckpt.CHECKPOINT))
    assert (saved["epoch"], saved["step_in_epoch"]) == (1, 3)
    if "attack.mode=free" in extra:
        assert saved["extra"]["free_delta"][0].abs().max() > 0  # the carried perturbation
    loop.train(tiny_config(tmp_path, *common, f"run.out_dir={part}"))
    a, b = run_weights(full), run_weights(part)
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("mode", ["free", "fast"])
def test_cheap_modes_train_in_bf16(tmp_path, mode):
    run = loop.train(tiny_config(tmp_path, f"attack.mode={mode}", "attack.replays=2",
                                 "attack.check_images=8", "optim.epochs=1", "run.bf16=true",
                                 "run.eval_every=0", "run.final_eval_steps=0"))
    train = [r for r in read_metrics(run) if r["kind"] == "train"]
    assert train and all(math.isfinite(r["loss"]) for r in train)
    assert all(v.dtype == torch.float32 for v in run_weights(run).values() if v.is_floating_point())


# ---------------------------------------------------------------------------------------------
# Config


@pytest.mark.parametrize("override, words", [
    ("attack.mode=freee", "one of pgd, free, fast"),
    ("attack.replays=0", "attack.replays"),
    ("attack.fgsm_step=0", "null for 1.25 x eps"),
    ("attack.overfit_drop=1.5", "attack.overfit_drop"),
    ("optim.schedule=onecycle", "one of step, cyclic"),
    ("optim.cycle_peak=1", "optim.cycle_peak"),
])
def test_new_keys_are_validated(override, words):
    with pytest.raises(ValueError, match=words.replace(".", r"\.").replace("(", r"\(")):
        load_config(None, [override])


def test_new_keys_defaults_and_fgsm_step():
    a = Config().attack
    assert (a.mode, a.fgsm_step, Config().optim.schedule) == ("pgd", None, "step")
    assert load_config(None, ["attack.eps=8"]).attack.fast_step() == 10.0  # 1.25 x 8
    assert load_config(None, ["attack.fgsm_step=7"]).attack.fast_step() == 7.0


def test_checkpoint_written_before_the_new_keys_still_resumes(tmp_path):
    cfg = Config()
    old = cfg.to_dict()
    for k in ("mode", "replays", "fgsm_step", "check_images", "check_steps", "overfit_drop"):
        del old["attack"][k]
    del old["optim"]["schedule"], old["optim"]["cycle_peak"]
    resume.check_compatible(old, cfg, "c.pt")  # no error
    with pytest.raises(ValueError, match="'attack' config"):
        resume.check_compatible(old, load_config(None, ["attack.mode=free"]), "c.pt")


# ---------------------------------------------------------------------------------------------
# Two processes


@pytest.mark.parametrize("extra", [
    ("attack.mode=free", "attack.replays=2"),  # targeted: the input-only backward under DDP
    ("attack.mode=fast", "optim.schedule=cyclic", "attack.check_images=8"),
])
def test_two_process_cheap_modes_keep_ranks_identical(tmp_path, extra):
    from helpers import train_two_ranks

    cfg = tiny_config(tmp_path, "optim.epochs=1", "run.eval_every=0", *extra)
    a, b = train_two_ranks(cfg, tmp_path)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    saved = ckpt.load_checkpoint(os.path.join(cfg.run.out_dir, ckpt.CHECKPOINT))
    if "attack.mode=free" in extra:  # one carried perturbation per process, both saved
        d = saved["extra"]["free_delta"]
        assert len(d) == 2 and not torch.equal(d[0], d[1])
    else:
        assert saved["extra"]["overfit_guard"]["best_epoch"] == 1


# ---------------------------------------------------------------------------------------------
# The paper recipe is unchanged


# sha256 over (name, bytes) of the final weights of ``tiny_config`` runs, computed from the tree
# before attack.mode existed, per kernel set: (PyTorch's CPU capability, oneDNN's ISA limit), each
# emulated with ATEN_CPU_CAPABILITY and ONEDNN_MAX_CPU_ISA (AVX512 without a limit: oneDNN then
# runs its AVX-512 kernels). Both kernel libraries round differently, so each set has its own.
BEFORE_TORCH = "2.14.1+cu130"
BEFORE = {
    ("AVX512", "AVX512"): ("ca781a2249952fb5293254b4cb0212544cde483373bb1a1380261ca7b726fbc3",
                           "3a718136cd7ea055a94d9383b97ad6a5d626c24aaab3e80049034765cb4bf2bc"),
    ("AVX2", "AVX2"): ("6d2580b48a63b4eeabde349fcd003c1f37309541cfd740f341cadeae70088414",
                       "ddb18577c55ce4e0c12a8bffbe39a2dddc662723a5dfa430f7ede19d648f4cf7"),
    ("AVX2", "AVX512"): ("c236319aadc157f2edc1559a43139a7f8af9fd326f49b6ef04b74d341e5ea6a3",
                         "42d41f887cf287a4d12ce7082f816b882317436db3798993e4ee6066a84b31cd"),
    ("DEFAULT", "SSE41"): ("d14a0667b3eee2fb5c342c9073e49c7ff849e4677ab15444bc5e4947dc30598d",
                           "f91b01d2bcf34b4c32bbb3aabb8573da445a9759d54e0a50f9c35736967b6884"),
    ("DEFAULT", "AVX512"): ("d78d9f88de0c6f0d1093f01ed61408af273f0e400a2e753846ca7a0f3bb39002",
                            "7d84c0585e7afcd44198657874ded12575edea15347ad6541183aeb5805cad0d"),
}


def _onednn_isa() -> str:
    """oneDNN's ISA: its limit where one is set, else the best this CPU offers (x86-64 Linux)."""
    limit = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    if limit:
        return "AVX512" if limit.startswith("AVX512") else limit
    try:
        flags = open("/proc/cpuinfo").read().split()
    except OSError:
        return "unknown"
    return "AVX512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "SSE41"


@pytest.mark.parametrize("kind", ["targeted", "untargeted"])
def test_default_pgd_run_gives_the_weights_of_the_code_before_the_cheap_modes(tmp_path, kind):
    import hashlib

    kernels = (torch.backends.cpu.get_cpu_capability(), _onednn_isa())
    if torch.__version__ != BEFORE_TORCH or kernels not in BEFORE:
        pytest.skip(f"no stored weights for torch {torch.__version__} with kernels {kernels}")
    extra = [] if kind == "targeted" else ["attack.targeted=false"]
    w = run_weights(loop.train(tiny_config(tmp_path, *extra)))
    h = hashlib.sha256()
    for k in sorted(w):
        h.update(k.encode())
        h.update(w[k].numpy().tobytes())
    assert h.hexdigest() == BEFORE[kernels][0 if kind == "targeted" else 1]
