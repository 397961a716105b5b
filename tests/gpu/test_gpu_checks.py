"""Every CUDA path on one GPU (``scripts/gpu_check.sh``, about 5 minutes): the ``cuda`` cases
need a CUDA GPU (``needs_cuda``); the ``cpu`` cases run the same code with tiny shapes and
stand-in nets (dry runs: the wiring of the checks on a machine without a GPU)."""

from __future__ import annotations

import contextlib
import io
import os
import time
import warnings

import numpy as np
import pytest
import torch
from gpu_utils import (
    CPU,
    CPU_SLOW,
    CUDA,
    Images,
    count_syncs,
    fake_fashion_mnist,
    rel,
    train_cfg,
    train_parts,
    weights,
)
from torch import nn

from featdenoise.benchmarks import gpu as bench_gpu
from featdenoise.benchmarks.common import sync
from featdenoise.models import create_model
from featdenoise.models import denoise as dn
from featdenoise.runtime import backends


@pytest.mark.parametrize("setting", [CUDA], indirect=True)
def test_env(setting, report):
    """torch and CUDA versions, the build's arch list, the GPU's capability (is it in the
    list?), bf16 support and the TF32 switches after :func:`backends.configure`."""
    device = setting.device
    parts = [f"torch {torch.__version__}", f"CUDA build {torch.version.cuda}",
             f"archs {','.join(torch.cuda.get_arch_list()) or 'none'}"]
    major, minor = torch.cuda.get_device_capability(device)
    name = torch.cuda.get_device_name(device)
    archs = torch.cuda.get_arch_list()
    sm = f"sm_{major}{minor}"
    ok = sm in archs or any(a.startswith("compute_") and int(a[8:]) <= major * 10 + minor
                            for a in archs)
    set_ = backends.configure(device)
    parts += [f"{name} capability {major}.{minor}", f"bf16 {torch.cuda.is_bf16_supported()}",
              f"tf32 {backends.tf32_enabled()}", f"cudnn.benchmark {set_['cudnn_benchmark']}"]
    assert ok, (f"{sm} is not in this torch build's arch list ({', '.join(archs)}): install a "
                f"torch build for this GPU (README: GPUs and clusters)")
    report("; ".join(parts))


def _op_cases() -> list[tuple[str, str]]:
    cases = [("nonlocal_gaussian", b) for b in dn.ATTENTION_BACKENDS]
    return cases + [(op, "auto") for op in dn.OP_NAMES if op != "nonlocal_gaussian"]


# Relative-error bounds against float64: fp32 may use TF32 (10-bit mantissa), bf16 has 8 bits.
_TOL = {"fp32": 1e-2, "channels_last": 1e-2, "bf16": 5e-2}


@pytest.mark.parametrize("setting", [CUDA, CPU], indirect=True)
def test_ops(setting, report):
    """Every denoising op (and every backend of the Gaussian non-local), forward + backward at
    ``[2, 256, 56, 56]`` and ``[2, 512, 28, 28]`` in fp32, bf16 autocast and channels_last,
    against a float64 CPU reference with the same weights, inside ``dn.fused_kernels()`` (a
    silent fallback to the math kernel raises, a fallback to the chunked function fails)."""
    device = setting.device
    shapes = setting.size([(2, 256, 56, 56), (2, 512, 28, 28)], [(2, 8, 6, 6), (2, 16, 5, 4)])
    worst = {}
    fallbacks = []
    for op, backend in _op_cases():
        for shape in shapes:
            torch.manual_seed(0)
            kw = {"backend": "materialise"} if op.startswith("nonlocal") else {}
            ref_block = dn.build_op(op, shape[1], **kw).double()
            for p in ref_block.parameters():  # theta, phi: scores of order 1, not ~0
                nn.init.normal_(p, std=shape[1] ** -0.5)
            x = torch.randn(shape, dtype=torch.float64)
            go = torch.randn(shape, dtype=torch.float64)
            xr = x.clone().requires_grad_()
            out_ref = ref_block(xr)
            ref = [out_ref, *torch.autograd.grad(out_ref, [xr, *ref_block.parameters()], go)]
            for mode in ("fp32", "bf16", "channels_last"):
                kw = {"backend": backend} if op.startswith("nonlocal") else {}
                block = dn.build_op(op, shape[1], **kw)
                block.load_state_dict(ref_block.state_dict())
                block = block.to(device)
                xd = x.float().to(device)
                if mode == "channels_last":
                    block = block.to(memory_format=torch.channels_last)
                    xd = xd.contiguous(memory_format=torch.channels_last)
                xd.requires_grad_()
                auto = (torch.autocast(device.type, dtype=torch.bfloat16) if mode == "bf16"
                        else contextlib.nullcontext())
                fused = dn.fused_kernels() if device.type == "cuda" else contextlib.nullcontext()
                with warnings.catch_warnings(record=True) as caught, fused, auto:
                    warnings.simplefilter("always")
                    out = block(xd)
                    got = [out, *torch.autograd.grad(out, [xd, *block.parameters()],
                                                     go.to(device, out.dtype))]
                if any("no fused attention kernel" in str(w.message) for w in caught):
                    fallbacks.append(f"{op}/{backend} {mode} {list(shape)}")
                errs = [rel(g, r) for g, r in zip(got, ref, strict=True)]
                key = f"{op}/{backend}/{mode}"
                worst[key] = max(worst.get(key, 0.0), max(errs))
    bad = {k: v for k, v in worst.items() if v > _TOL[k.rsplit("/", 1)[1]]}
    assert not fallbacks, f"chunked fallback instead of a fused kernel: {'; '.join(fallbacks)}"
    assert not bad, "relative error above bound: " + ", ".join(f"{k} {v:.2g}"
                                                               for k, v in bad.items())
    top = max(worst, key=worst.get)
    report(f"{len(worst)} op/backend/mode cases x {len(shapes)} shapes within bounds "
           f"(fp32 {_TOL['fp32']}, bf16 {_TOL['bf16']}); worst {top} {worst[top]:.2g}")


@pytest.mark.parametrize("setting", [CUDA], indirect=True)
def test_sync(setting, report):
    """``torch.cuda.set_sync_debug_mode("warn")`` around a PGD attack and a training step: the
    step may synchronise only inside its attack, the update itself not at all."""
    from featdenoise.attacks import PGD

    device, px, batch = setting.device, 32, 64
    model = create_model("small_resnet_denoise", in_channels=3, width=8).to(device).eval()
    x = torch.rand(batch, 3, px, px, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    pgd = PGD(model, eps=8 / 255, step_size=2 / 255, steps=3, seed=0)
    step, attack = train_parts(model, device)
    n_pgd, where_pgd = count_syncs(device, lambda: pgd(x, y))
    n_attack, _ = count_syncs(device, lambda: attack(x, y))
    n_step, where_step = count_syncs(device, lambda: step(x, y))
    # The update itself (loss, backward, finiteness guard, SGD, running sums) must not sync.
    assert n_step <= n_attack, (f"training step: {n_step} host syncs, its attack alone "
                                f"{n_attack}{where_step}")
    report(f"PGD-3: {n_pgd} host syncs{where_pgd}; training step {n_step} (all in its "
           f"attack: {n_attack}; the update: 0)")


@pytest.mark.parametrize("setting", [CUDA, CPU], indirect=True)
def test_attacks(setting, report, tmp_path):
    """Seeded PGD twice (same pixels), the eps-box and [0, 1], ``visualize`` on the device."""
    from featdenoise.analysis import viz
    from featdenoise.attacks import PGD

    device, px, batch = setting.device, setting.size(32, 16), setting.size(64, 2)
    torch.manual_seed(0)
    model = create_model("small_resnet_denoise", in_channels=3, width=8).to(device).eval()
    x = torch.rand(batch, 3, px, px, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    eps = 8 / 255
    a = PGD(model, eps=eps, step_size=2 / 255, steps=5, seed=3)(x, y)
    b = PGD(model, eps=eps, step_size=2 / 255, steps=5, seed=3)(x, y)
    same = float((a == b).float().mean())
    assert a.device == x.device, f"adversarial images on {a.device}"
    assert same >= 0.999, f"seeded PGD twice: only {same:.4%} identical pixels"
    assert float((a - x).abs().max()) <= eps + 1e-6 and 0 <= float(a.min()) <= float(a.max()) <= 1
    res = viz.visualize(model, x[:2], y[:2], os.path.join(tmp_path, "viz"),
                        attack=viz.NoiseAttack(eps=eps, step_size=2 / 255, steps=2))
    assert res["pictures"], "visualize wrote no picture"
    report(f"seeded PGD-5 repeatable ({same:.2%} pixels), inside eps-box and [0, 1]; "
           f"visualize ok")


@pytest.mark.parametrize("setting", [CUDA, CPU], indirect=True)
def test_train_bf16(setting, report):
    """A resnet50_denoise training step at 112 px in fp32 and bf16 (channels_last): finite
    losses within 5%, gradient signs agreeing on more than 80% of the parameters."""
    device, px, batch = setting.device, setting.size(112, 16), setting.size(8, 2)
    torch.manual_seed(0)
    base = bench_gpu._net("resnet50_denoise", setting.dry)
    x = torch.rand(batch, 3, px, px)
    y = torch.randint(0, 10, (batch,))
    grads, losses = [], []
    for bf16 in (False, True):
        model = bench_gpu._net("resnet50_denoise", setting.dry)
        model.load_state_dict(base.state_dict())
        model = model.to(device).train().to(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = nn.functional.cross_entropy(model(x.to(device)).float(), y.to(device))
        loss.backward()
        losses.append(float(loss.detach()))
        grads.append(torch.cat([p.grad.flatten().float().cpu() for p in model.parameters()
                                if p.grad is not None]))
    agree = float(((grads[0].sign() == grads[1].sign()) | (grads[0].abs() < 1e-8)).float().mean())
    assert all(np.isfinite(losses)), f"non-finite loss {losses}"
    assert abs(losses[0] - losses[1]) < 0.05 * abs(losses[0]) + 1e-3, f"losses {losses}"
    assert agree > 0.8, f"gradient signs agree on only {agree:.1%}"
    report(f"loss fp32 {losses[0]:.4f} vs bf16 {losses[1]:.4f}; gradient signs agree "
           f"{agree:.1%}")


@pytest.mark.parametrize("setting", [CUDA, CPU_SLOW], indirect=True)
def test_train_resume(setting, report, tmp_path):
    """A short training run, interrupted and resumed, in deterministic mode equal bit for bit
    to the uninterrupted run."""
    from featdenoise.training import loop

    device, work = setting.device, str(tmp_path)
    data = fake_fashion_mnist(os.path.join(work, "data"), n_train=32, n_val=8)
    det = ["run.deterministic=true"]
    try:
        whole = loop.train(train_cfg(data, os.path.join(work, "whole"), device, *det))
        part = os.path.join(work, "part")
        loop.train(train_cfg(data, part, device, *det, "run.stop_after=3"))
        loop.train(train_cfg(data, part, device, *det))
    finally:
        torch.use_deterministic_algorithms(False)
        backends.configure(device)
    a, b = weights(whole), weights(part)
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, f"resumed run differs from the uninterrupted one in {len(diff)} tensors"
    report("2 epochs, stopped at step 3 and resumed: bit-exact in deterministic mode")


@pytest.mark.parametrize("setting", [CUDA], indirect=True)
def test_train_compile(setting, report, tmp_path):
    """The same short run with ``run.compile=true`` (inductor), trained and resumed: finite
    weights; graphs and recompiles counted (torch.compile takes minutes on a CPU)."""
    from featdenoise.training import loop

    device, work = setting.device, str(tmp_path)
    data = fake_fashion_mnist(os.path.join(work, "data"), n_train=32, n_val=8)
    import torch._dynamo as dynamo

    dynamo.reset()  # also clears the guard failures
    dynamo.utils.counters.clear()
    out = os.path.join(work, "compiled")
    loop.train(train_cfg(data, out, device, "run.compile=true", "run.stop_after=3"))
    loop.train(train_cfg(data, out, device, "run.compile=true"))
    graphs = dynamo.utils.counters["stats"].get("unique_graphs", 0)
    # each guard failure of a compiled frame is one recompilation
    recompiles = sum(len(v) for v in dynamo.utils.guard_failures.values())
    finite = all(torch.isfinite(v).all() for v in weights(out).values()
                 if v.is_floating_point())
    assert finite, "compiled run: non-finite weights"
    report(f"run.compile=true (inductor) train + resume ok: {graphs} graphs, "
           f"{recompiles} recompiles")


@pytest.mark.parametrize("setting", [CUDA, CPU], indirect=True)
def test_pgd_r152(setting, report):
    """ResNet-152-denoise, 224 px, batch 32, one PGD iteration: time (and peak memory on CUDA)
    in strict fp32, TF32, bf16 and with the chunked attention (``featdenoise bench gpu``)."""
    line = bench_gpu.pgd_r152(setting.device, setting.size(224, 16), setting.size(32, 2),
                              setting.dry)
    for label, *_ in bench_gpu.SETTINGS:
        assert f" {label} " in line, line
    assert line.count(" ms") == 4 and line.count("GiB") == (0 if setting.dry else 4), line
    report(line)


@pytest.mark.parametrize("setting", [CUDA, CPU], indirect=True)
def test_eval_resume(setting, report, tmp_path):
    """An evaluation stopped after one batch and resumed equals one run in one go."""
    from featdenoise.evaluation.whitebox import evaluate_whitebox

    device, work, px = setting.device, str(tmp_path), setting.size(64, 16)
    torch.manual_seed(0)
    model = create_model("small_resnet_denoise", in_channels=3, width=8).eval()
    data = Images(12, px)
    common = dict(steps=[2], eps=8 / 255, step_size=2 / 255, batch_size=4, device=device,
                  progress=False, seed=1)
    one = evaluate_whitebox(model, data, os.path.join(work, "one"), **common)
    split = os.path.join(work, "split")
    assert evaluate_whitebox(model, data, split, max_batches=1, **common) is None
    two = evaluate_whitebox(model, data, split, **common)
    a, b = one["attacks"][0]["accuracy"], two["attacks"][0]["accuracy"]
    assert one["num_images"] == two["num_images"] == 12
    assert a == b and one["clean"]["top1"] == two["clean"]["top1"], f"{a} vs {b}"
    report(f"stopped after 1 of 3 batches, resumed: same accuracy ({a:.3f}) as one run")


@pytest.mark.parametrize("setting", [CUDA, CPU], indirect=True)
def test_accel(setting, report):
    """PGD-10 on ResNet-50 with and without :func:`featdenoise.accel.inference_grad`: the same
    pixels (>= 99.9%); both times reported."""
    from featdenoise.accel import inference_grad
    from featdenoise.attacks import PGD

    device, px, batch = setting.device, setting.size(112, 16), setting.size(8, 2)
    torch.manual_seed(0)
    model = (create_model("small_resnet", in_channels=3, width=8) if setting.dry
             else create_model("resnet50")).to(device).eval()
    x = torch.rand(batch, 3, px, px, device=device)
    y = torch.randint(0, model.num_classes, (batch,), device=device)
    times, outs = [], []
    for on in (False, True):
        pgd = PGD(model, eps=16 / 255, step_size=1 / 255, steps=10, seed=0)
        ctx = inference_grad(model) if on else contextlib.nullcontext()
        with ctx:
            pgd(x, y)
            sync(device)
            start = time.perf_counter()
            outs.append(pgd(x, y))
            sync(device)
        times.append(time.perf_counter() - start)
    same = float((outs[0] == outs[1]).float().mean())
    assert same >= 0.999, f"only {same:.4%} identical pixels with inference_grad"
    report(f"PGD-10 on ResNet-50 [{batch},3,{px},{px}]: {times[0]*1000:.0f} ms plain, "
           f"{times[1]*1000:.0f} ms with inference_grad ({times[0]/times[1]:.2f}x), "
           f"{same:.2%} same pixels")


@pytest.mark.parametrize("target", ["ops", "attacks"])
@pytest.mark.parametrize("setting", [CUDA, CPU], indirect=True)
def test_bench(setting, report, target):
    """``featdenoise bench ops --quick`` and ``featdenoise bench attacks`` on CUDA exit 0 (the
    dry run: the command and its options exist, ``--help``)."""
    from featdenoise.cli import main

    argv = ["bench", target, "--device", setting.device.type] + (
        ["--quick"] if target == "ops" else [])
    if setting.dry:
        argv.append("--help")  # wiring only: the command and its options exist
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            rc = main(argv)
    except SystemExit as done:  # --help
        rc = done.code or 0
    text = buf.getvalue()
    shown = "featdenoise " + " ".join(argv)
    assert rc == 0, f"{shown} exited {rc}"
    report(f"{shown}: ok" + ("" if setting.dry else f"\n{text.rstrip()}"))
