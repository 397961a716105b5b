"""The training recipe's pieces, exact resume, checkpoints, and the 2-process gloo run."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import run_weights, tiny_config, train_two_ranks
from torch import nn

from featdenoise.hub import checkpoints as ckpt
from featdenoise.models import create_model
from featdenoise.runtime import distributed as dist
from featdenoise.training import NonFiniteLossError, loop, parts
from featdenoise.training.config import load_config
from featdenoise.training.metrics import read_metrics
from featdenoise.training.recipes import pgd
from featdenoise.training.step import State, StepContext

pytestmark = pytest.mark.usefixtures("one_thread")




# ---------------------------------------------------------------------------------------------
# Recipe pieces


def test_weight_decay_only_on_conv_and_linear_weights():
    model = create_model("small_resnet_denoise", in_channels=1, width=4)
    decay, no_decay = parts.param_groups(model, 1e-4)
    assert decay["weight_decay"] == 1e-4 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    expected = {f"{m}.weight" if m else "weight" for m, mod in model.named_modules()
                if type(mod) in (nn.Conv2d, nn.Linear)}
    assert decayed == expected
    assert any("denoise" in n for n in decayed)  # the denoising block's 1x1 conv decays
    others = {names[id(p)] for p in no_decay["params"]}
    assert others and all(n.endswith(".bias") or "bn" in n or "norm" in n or n.endswith("weight")
                          for n in others)
    bn_params = {f"{m}.{k}" for m, mod in model.named_modules()
                 if isinstance(mod, nn.BatchNorm2d) for k in ("weight", "bias")}
    assert bn_params <= others and not bn_params & decayed
    assert len(decayed) + len(others) == len(list(model.parameters()))


LR = dict(lr=0.1, base_batch=256, warmup_epochs=5, milestones=[35, 70, 95], lr_decay=0.1)


@pytest.mark.parametrize("step, expected", [
    (0, 0.1),                       # warm-up starts at 0.1 (Goyal et al.)
    (250, 0.1 + (1.6 - 0.1) / 2),   # half-way through 5 epochs of 100 steps
    (499, 0.1 + 1.5 * 499 / 500),
    (500, 1.6),                     # 0.1 x 4096 / 256
    (3499, 1.6),
    (3500, 0.16),                   # / 10 at epoch 35
    (6999, 0.16),
    (7000, 0.016),                  # epoch 70
    (9500, 0.0016),                 # epoch 95
    (10999, 0.0016),
])
def test_lr_schedule_corners_global_batch_4096(step, expected):
    got = parts.lr_at(step, 100, global_batch=4096, **LR)
    assert math.isclose(got, expected, rel_tol=1e-12)


@pytest.mark.parametrize("batch, expected", [(256, 0.1), (128, 0.05), (512, 0.1), (64, 0.025)])
def test_lr_batch_scaling_and_no_warmup_at_or_below_0_1(batch, expected):
    assert math.isclose(parts.lr_at(0, 100, global_batch=batch, **LR), expected)
    peak = 0.1 * batch / 256
    assert math.isclose(parts.lr_at(600, 100, global_batch=batch, **LR), peak)


def test_lr_schedule_sets_optimizer_groups():
    model = nn.Linear(2, 2)
    opt = parts.build_optimizer(model, load_config(None).optim)
    assert opt.defaults["nesterov"] and opt.defaults["momentum"] == 0.9
    sched = parts.LRSchedule(opt, 10, load_config(None, ["optim.milestones=[1]"]).optim, 256)
    sched.apply(10)
    assert all(math.isclose(g["lr"], 0.01) for g in opt.param_groups)
    assert sched.state_dict() == {"step": 10}


def test_label_smoothing_matches_hand_computation():
    logits = torch.tensor([[2.0, -1.0, 0.5, 0.0], [0.1, 0.2, 0.3, 3.0]])
    y = torch.tensor([0, 2])
    k, s = 4, 0.1
    expected = 0.0
    for i in range(2):
        logp = [logits[i, j].item() - math.log(sum(math.exp(v) for v in logits[i].tolist()))
                for j in range(k)]
        q = [(1 - s) * (j == y[i].item()) + s / k for j in range(k)]
        expected += -sum(qj * lj for qj, lj in zip(q, logp, strict=True)) / 2
    assert math.isclose(parts.loss_fn(0.1)(logits, y).item(), expected, rel_tol=1e-6)


class _Flat(nn.Module):
    """Logits that do not depend on the input: PGD stays exactly at its start point."""

    num_classes = 10

    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(10))

    def forward(self, x):
        return self.bias.expand(len(x), 10) + (x * 0.0).flatten(1).sum(1, keepdim=True)


def test_clean_start_is_one_coin_per_batch_with_probability_0_2():
    attack = parts.TrainAttack(_Flat(), steps=1, eps=16 / 255, step_size=1 / 255,
                                clean_start_prob=0.2)
    torch.manual_seed(0)
    x, y = torch.rand(4, 1, 6, 6) * 0.5 + 0.25, torch.zeros(4, dtype=torch.long)
    clean = 0
    for _ in range(300):
        x_adv, target, flag = attack(x, y)
        same = (x_adv == x).flatten(1).all(1)
        assert same.all() == flag and same.any() == flag  # the whole batch, not per image
        assert target is not None and (target != y).all()
        clean += flag
    # Binomial(300, 0.2): mean 60, sd 6.9.
    assert 35 <= clean <= 85
    assert parts.TrainAttack(_Flat(), 0, 0.1, 0.1)(x, y)[0] is x  # steps 0: clean training


def test_bn_inference_mode_during_attack_and_training_mode_for_update(tmp_path):
    cfg = tiny_config(tmp_path)
    model = create_model("small_resnet", in_channels=1, width=4).train()
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    stats = lambda: [(b.running_mean.clone(), b.running_var.clone(),  # noqa: E731
                      int(b.num_batches_tracked)) for b in bns]
    x, y = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
    attack = parts.TrainAttack(model, 3, 16 / 255, 4 / 255, 0.2)
    # The attack alone: a training-mode BN pass would move the running statistics.
    before = stats()
    attack(x, y)
    assert model.training and all(b.training for b in bns)  # caller's mode restored
    for (m0, v0, n0), (m1, v1, n1) in zip(before, stats(), strict=True):
        assert torch.equal(m0, m1) and torch.equal(v0, v1) and n0 == n1
    # A whole step: exactly one training-mode pass (the update on the adversarial batch).
    opt = parts.build_optimizer(model, cfg.optim)
    sched = parts.LRSchedule(opt, 10, cfg.optim, 8)
    pgd.train_step(model, attack, x, y, State(), StepContext(cfg, torch.device("cpu"),
                                                             parts.loss_fn(0.1), opt, sched))
    after = stats()
    assert all(n1 == n0 + 1 for (_, _, n0), (_, _, n1) in zip(before, after, strict=True))
    assert not torch.equal(after[0][0], before[0][0])
    assert model.training


# ---------------------------------------------------------------------------------------------
# Runs, checkpoints, resume


def test_resume_after_interruption_gives_identical_weights(tmp_path):
    full = loop.train(tiny_config(tmp_path, f"run.out_dir={tmp_path / 'full'}"))
    # Interrupted mid-epoch 2 (after step 9 of 12; 6 steps per epoch) ...
    part = tmp_path / "part"
    loop.train(tiny_config(tmp_path, f"run.out_dir={part}", "run.stop_after=9"))
    saved = ckpt.load_checkpoint(str(part / ckpt.CHECKPOINT))
    assert (saved["epoch"], saved["step_in_epoch"], saved["step"]) == (1, 3, 9)
    assert not (part / ckpt.WEIGHTS).exists()
    # ... then resumed (resume=auto) to the end.
    loop.train(tiny_config(tmp_path, f"run.out_dir={part}"))
    a, b = run_weights(full), run_weights(part)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ca = ckpt.load_checkpoint(os.path.join(full, ckpt.CHECKPOINT))
    cb = ckpt.load_checkpoint(str(part / ckpt.CHECKPOINT))
    for sa, sb in zip(ca["optimizer"]["state"].values(), cb["optimizer"]["state"].values(),
                      strict=True):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    assert ca["schedule"] == cb["schedule"] == {"step": 11}  # the last step taken
    kinds = [r["kind"] for r in read_metrics(str(part))]
    assert "resume" in kinds and kinds[-1] == "final"


def test_run_dir_contents_checkpoint_and_load_model(tmp_path):
    run = loop.train(tiny_config(tmp_path, "optim.epochs=1", "attack.steps=0"))
    files = set(os.listdir(run))
    assert {"config.yaml", "metrics.jsonl", ckpt.CHECKPOINT, ckpt.WEIGHTS} <= files
    assert not [f for f in files if ".tmp" in f]
    state = torch.load(os.path.join(run, ckpt.CHECKPOINT), weights_only=True)
    assert state["model_name"] == "small_resnet" and state["step"] == 6
    assert set(state["rng"]) >= {"torch", "numpy", "python"}
    from safetensors import safe_open

    with safe_open(os.path.join(run, ckpt.WEIGHTS), "pt") as f:
        meta = f.metadata()
    assert meta["model"] == "small_resnet"
    assert json.loads(meta["model_kwargs"]) == {"in_channels": 1, "width": 4, "blocks": [1, 1, 1]}
    x = torch.rand(3, 1, 28, 28)
    outs = [ckpt.load_model(p)(x) for p in
            (run, os.path.join(run, ckpt.WEIGHTS), os.path.join(run, ckpt.CHECKPOINT))]
    assert not ckpt.load_model(run).training
    torch.testing.assert_close(outs[0], outs[1])
    torch.testing.assert_close(outs[0], outs[2])
    final = [r for r in read_metrics(run) if r["kind"] == "final"][0]
    assert final["n"] == 10 and 0 <= final["clean_acc"] <= 1 and "pgd2_acc" in final
    assert 0 <= final["pgd2_top5"] <= 1 and "pgd2_success" in final  # targeted by default
    # Starting over (resume=never) starts a fresh metrics file.
    loop.train(tiny_config(tmp_path, "optim.epochs=1", "attack.steps=0", "run.resume=never"))
    assert [r["kind"] for r in read_metrics(run)].count("final") == 1


def test_rng_state_round_trip():
    state = ckpt.rng_state()
    a = (torch.rand(3), np.random.rand(3), __import__("random").random())
    ckpt.set_rng_state(state)
    b = (torch.rand(3), np.random.rand(3), __import__("random").random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


def test_atomic_save_keeps_old_file_when_writing_fails(tmp_path, monkeypatch):
    path = str(tmp_path / "c.pt")
    ckpt.atomic_save({"step": 1}, path)

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        ckpt.atomic_save({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"step": 1}


def exploding_at_step_5(monkeypatch) -> None:
    """Training builds a small_resnet whose 6th training-mode forward (step 5) returns NaN."""
    import featdenoise.hub.build as build

    real = build.create_model

    class Exploding(nn.Module):
        def __init__(self, **kw):
            super().__init__()
            self.net = real("small_resnet", **kw)
            self.num_classes = 10
            self.calls = 0

        def forward(self, x):
            out = self.net(x)
            if self.training:
                self.calls += 1
                if self.calls == 6:
                    return out * float("nan")
            return out

    monkeypatch.setattr(build, "create_model", lambda name, **kw: Exploding(**kw))


def test_non_finite_loss_stops_with_step_and_keeps_last_checkpoint(tmp_path, monkeypatch):
    exploding_at_step_5(monkeypatch)
    cfg = tiny_config(tmp_path, "attack.steps=0")
    with pytest.raises(NonFiniteLossError) as err:
        loop.train(cfg)
    msg = str(err.value)
    assert "step 5" in msg and "\n" not in msg and "checkpoint" in msg
    saved = ckpt.load_checkpoint(os.path.join(cfg.run.out_dir, ckpt.CHECKPOINT))
    assert saved["step"] == 4
    assert all(torch.isfinite(v).all() for v in saved["model"].values() if v.is_floating_point())


def test_non_finite_step_between_checks_never_reaches_the_weights(tmp_path, monkeypatch):
    """The guard reads the device flag only at check steps (no per-step host sync): a NaN at
    step 5, the last of epoch 1, is followed by the end-of-epoch checkpoint before the next
    check (step 7); that checkpoint holds finite weights and the error names both steps."""
    exploding_at_step_5(monkeypatch)
    cfg = tiny_config(tmp_path, "attack.steps=0", "run.log_every=4", "run.checkpoint_every=0",
                      "run.eval_every=0")
    with pytest.raises(NonFiniteLossError) as err:
        loop.train(cfg)
    msg = str(err.value)
    assert "at step 5" in msg and "stopped at step 7" in msg and "holds step 6" in msg
    saved = ckpt.load_checkpoint(os.path.join(cfg.run.out_dir, ckpt.CHECKPOINT))
    assert saved["step"] == 6
    assert all(torch.isfinite(v).all() for v in saved["model"].values() if v.is_floating_point())
    assert all(torch.isfinite(t).all() for s in saved["optimizer"]["state"].values()
               for t in s.values() if torch.is_tensor(t))


# ---------------------------------------------------------------------------------------------
# Distributed


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("n", [1, 7, 10])
def test_eval_shards_count_every_image_once(world, n):
    seen = []
    for r in range(world):
        sampler = dist.ShardSampler(n, num_replicas=world, rank_=r)
        seen += list(sampler)
        assert len(sampler) == len(list(sampler))
    assert sorted(seen) == list(range(n))


def test_single_process_helpers_are_no_ops():
    assert dist.world_size() == 1 and dist.rank() == 0 and dist.is_main()
    assert dist.all_reduce_sum([1.0, 2.5]) == [1.0, 2.5]
    model = nn.Linear(2, 2)
    assert dist.wrap_model(model, torch.device("cpu")) is model
    assert dist.unwrap(model) is model


def test_two_process_gloo_training_keeps_ranks_identical(tmp_path):
    cfg = tiny_config(tmp_path, "optim.epochs=1", "run.eval_every=0")
    a, b = train_two_ranks(cfg, tmp_path)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    init = create_model("small_resnet", in_channels=1, width=4).state_dict()
    assert any(not torch.equal(a[k], init[k]) for k in a)  # it did train
    records = read_metrics(cfg.run.out_dir)
    final = [r for r in records if r["kind"] == "final"][0]
    assert final["n"] == 10  # 10 validation images counted once over 2 ranks (5 + 5)
    # 48 images / 2 ranks / batch 8 = 3 steps per epoch; lr scaled by the global batch 16.
    train = [r for r in records if r["kind"] == "train"]
    # Global batch 16 > 8 = base batch: warm-up from 0.1 towards 0.2 over 5 epochs (15 steps).
    assert train[-1]["step"] == 3 and math.isclose(train[-1]["lr"], 0.1 + 0.1 * 2 / 15)


def test_cli_train_runs_and_reports_bad_keys(tmp_path, capsys):
    from featdenoise.cli import main

    cfg = tiny_config(tmp_path)
    path = tmp_path / "c.yaml"
    from featdenoise.training.config import save_config

    save_config(cfg, tmp_path)
    os.replace(tmp_path / "config.yaml", path)
    assert main(["train", "--config", str(path), "optim.lrr=1"]) == 2
    assert "did you mean optim.lr" in capsys.readouterr().err
    assert main(["train", "--config", str(path), "optim.epochs=1", "attack.steps=0",
                 f"run.out_dir={tmp_path / 'cli'}"]) == 0
    assert (tmp_path / "cli" / ckpt.WEIGHTS).exists()
    assert F is not None


def test_bf16_and_channels_last_options_train(tmp_path):
    run = loop.train(tiny_config(tmp_path, "optim.epochs=1", "run.bf16=true",
                                 "run.channels_last=true", "run.eval_every=0"))
    train = [r for r in read_metrics(run) if r["kind"] == "train"]
    assert train and all(math.isfinite(r["loss"]) for r in train)
    assert all(v.dtype == torch.float32 for v in run_weights(run).values() if v.is_floating_point())


@pytest.mark.slow
def test_compile_option_trains(tmp_path, monkeypatch):
    # Inductor's CPU backward of a strided 1x1 conv crashed on some machines with torch 2.14.1
    # (double free: torch.compile(nn.Conv2d(4, 8, 1, stride=2)) then .backward()), not on
    # others; aot_eager still checks that the update and the attack run through compiled
    # modules sharing one set of weights, on any machine.
    import functools

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    run = loop.train(tiny_config(tmp_path, "optim.epochs=1", "run.compile=true",
                                 "run.eval_every=0", "run.final_eval_steps=0"))
    assert os.path.isfile(os.path.join(run, ckpt.WEIGHTS))


@pytest.mark.slow
def test_sigkill_then_resume_gives_identical_weights(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    from featdenoise.training.config import save_config

    cfg = tiny_config(tmp_path, "optim.epochs=3", "run.checkpoint_every=2")
    full = loop.train(tiny_config(tmp_path, "optim.epochs=3", "run.checkpoint_every=2",
                                  f"run.out_dir={tmp_path / 'full'}"))
    save_config(cfg, tmp_path / "cfg")
    cmd = [sys.executable, "-m", "featdenoise.cli", "train", "--config",
           str(tmp_path / "cfg" / "config.yaml")]
    # Same intra-op thread count as the uninterrupted run in this process (the autouse fixture
    # sets 1): float reductions, hence bit-exact weights, depend on it.
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    path = os.path.join(cfg.run.out_dir, ckpt.CHECKPOINT)
    deadline = time.time() + 300
    while not os.path.exists(path) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not os.path.exists(os.path.join(cfg.run.out_dir, ckpt.WEIGHTS)), "killed too late"
    assert ckpt.load_checkpoint(path)["step"] < 18
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=env)
    a, b = run_weights(full), run_weights(cfg.run.out_dir)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_imagenet_folder_training_skips_and_reports_unreadable_files(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 9), ("val", 3)):
        for c, wnid in enumerate(("n01440764", "n01443537")):
            folder = tmp_path / "imnet" / split / wnid
            folder.mkdir(parents=True)
            for i in range(n):
                arr = rng.integers(0, 256, size=(40, 48, 3), dtype=np.uint8) // (c + 1)
                Image.fromarray(arr).save(folder / f"{i}.JPEG")
    (tmp_path / "imnet/train/n01440764/0.JPEG").write_bytes(b"\xff\xd8 truncated")
    cfg = tiny_config(tmp_path, "data.name=imagenet", f"data.root={tmp_path / 'imnet'}",
                      "data.image_size=32", "data.batch_size=9",
                      "model.kwargs={in_channels: 3, width: 4, num_classes: 2}", "optim.epochs=1",
                      "run.eval_every=0")
    with pytest.warns(UserWarning, match="0.JPEG"):
        run = loop.train(cfg)
    epoch = [r for r in read_metrics(run) if r["kind"] == "epoch"]
    assert epoch[0]["skipped_files"] == 1  # 18 images, batch 9: 2 steps see all, one is bad
    final = [r for r in read_metrics(run) if r["kind"] == "final"][0]
    assert final["n"] == 6


@pytest.mark.parametrize("eval_every", [0, 1])
def test_untargeted_training_runs_to_its_final_evaluation_from_the_cli(tmp_path, capsys,
                                                                       eval_every):
    """``attack.targeted=false`` trains, evaluates every epoch (or only at the end) and logs
    no targeted success rate anywhere."""
    from featdenoise.cli import main

    cfg = tiny_config(tmp_path, "optim.epochs=2", "data.train_subset=32", "data.val_subset=6",
                      "attack.targeted=false", f"run.eval_every={eval_every}")
    from featdenoise.training.config import save_config

    path = save_config(cfg, str(tmp_path / "cfg"))
    assert main(["train", "--config", path]) == 0
    recs = read_metrics(str(tmp_path / "run"))
    final = [r for r in recs if r["kind"] == "final"]
    assert len(final) == 1 and final[0]["n"] == 6 and "pgd2_acc" in final[0]
    assert not any("success" in k for r in recs for k in r)
    evals = [r for r in recs if r["kind"] == "eval"]
    assert len(evals) == (1 if eval_every else 0)  # epoch 1 of 2; the last one is the final
