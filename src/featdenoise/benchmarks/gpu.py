"""``featdenoise bench gpu``: a smoke test of every CUDA path, one PASS/FAIL/SKIP line per check.

Run on one GPU (``scripts/gpu_check.sh``, about 5 minutes) it covers:

* ``env``: torch and CUDA versions, the build's arch list, the GPU's capability (is it in the
  list?), bf16 support and the TF32 switches after :func:`featdenoise.runtime.backends.configure`;
* ``ops``: every denoising op (and every backend of the Gaussian non-local), forward +
  backward at ``[2, 256, 56, 56]`` and ``[2, 512, 28, 28]`` in fp32, bf16 autocast and
  channels_last, against a float64 CPU reference with the same weights, inside
  ``sdpa_kernel([FLASH_ATTENTION, EFFICIENT_ATTENTION])`` so that a silent fallback to the math
  kernel raises (and a fallback to the chunked function fails the line);
* ``sync``: ``torch.cuda.set_sync_debug_mode("warn")`` around a PGD attack and a training step,
  counting host synchronisations (the update part of the step must have none);
* ``attacks``: seeded PGD twice (same pixels), the eps-box and [0, 1], ``visualize`` on CUDA;
* ``train-bf16``: a resnet50_denoise training step at 112 px in fp32 and bf16 (finite losses,
  gradient-sign agreement);
* ``train-resume``: a short training run, interrupted and resumed, in deterministic mode equal
  to the uninterrupted run; ``train-compile``: the same with ``run.compile=true`` (recompiles
  counted);
* ``pgd-r152``: ResNet-152-denoise, 224 px, batch 32, one PGD iteration: time and peak memory in
  strict fp32, TF32, bf16, and with the chunked instead of the fused attention;
* ``eval-resume``: an evaluation stopped after one batch and resumed equals one run in one go;
* ``accel``: PGD on ResNet-50 with and without ``featdenoise.accel.inference_grad`` (SKIP where
  that module does not exist), ``bench ops --quick`` and ``bench attacks`` on CUDA.

``--multi`` (under ``torchrun``, ``scripts/gpu_check_multi.sh``; NCCL on GPUs): parameter and
BatchNorm-buffer checksums equal on every rank after DDP training, every evaluation image counted
once, one writer, and (``--stage resume``, launched with another number of processes) resume
from the first stage's checkpoint with another world size.

``--dry-run`` runs the same wiring on the CPU with tiny shapes in well under a minute (CUDA-only
parts are SKIP lines), so a machine without a GPU can check the script itself.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import os
import shutil
import struct
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from featdenoise.models import create_model
from featdenoise.models import denoise as dn
from featdenoise.runtime import backends
from featdenoise.runtime import distributed as dist


class Skip(Exception):
    """A check that does not apply here (no GPU, missing module, dry run)."""


class Checks:
    """Runs checks and prints one ``PASS|FAIL|SKIP name: detail`` line each (rank 0 only)."""

    def __init__(self, only: list[str] | None = None, verbose: bool = False):
        self.only, self.verbose = only, verbose
        self.results: list[tuple[str, str, str]] = []

    def run(self, name: str, fn: Callable[[], str]) -> None:
        if self.only and not any(name.startswith(o) for o in self.only):
            return
        start = time.perf_counter()
        try:
            status, detail = "PASS", fn()
        except Skip as why:
            status, detail = "SKIP", str(why)
        except AssertionError as err:
            status, detail = "FAIL", str(err) or "assertion failed"
        except Exception as err:  # a crash is a failed check, reported on one line
            status, detail = "FAIL", f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
            if self.verbose:
                traceback.print_exc()
        took = time.perf_counter() - start
        self.results.append((status, name, detail))
        if dist.is_main():
            print(f"{status} {name}: {detail} [{took:.1f} s]", flush=True)

    def failed(self) -> int:
        return sum(s == "FAIL" for s, _, _ in self.results)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative L2 error of ``a`` against the reference ``b`` (float64, on the CPU)."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# --------------------------------------------------------------------------------- env


def check_env(device: torch.device) -> str:
    parts = [f"torch {torch.__version__}", f"CUDA build {torch.version.cuda}",
             f"archs {','.join(torch.cuda.get_arch_list()) or 'none'}"]
    if device.type != "cuda":
        return "; ".join(parts + ["device cpu (dry run)"])
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
    return "; ".join(parts)


# --------------------------------------------------------------------------------- ops


def _op_cases() -> list[tuple[str, str]]:
    cases = [("nonlocal_gaussian", b) for b in dn.ATTENTION_BACKENDS]
    return cases + [(op, "auto") for op in dn.OP_NAMES if op != "nonlocal_gaussian"]


# Relative-error bounds against float64: fp32 may use TF32 (10-bit mantissa), bf16 has 8 bits.
_TOL = {"fp32": 1e-2, "channels_last": 1e-2, "bf16": 5e-2}


def check_ops(device: torch.device, shapes: list[tuple[int, int, int, int]]) -> str:
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
                errs = [_rel(g, r) for g, r in zip(got, ref, strict=True)]
                key = f"{op}/{backend}/{mode}"
                worst[key] = max(worst.get(key, 0.0), max(errs))
    bad = {k: v for k, v in worst.items() if v > _TOL[k.rsplit("/", 1)[1]]}
    assert not fallbacks, f"chunked fallback instead of a fused kernel: {'; '.join(fallbacks)}"
    assert not bad, "relative error above bound: " + ", ".join(f"{k} {v:.2g}"
                                                               for k, v in bad.items())
    top = max(worst, key=worst.get)
    return (f"{len(worst)} op/backend/mode cases x {len(shapes)} shapes within bounds "
            f"(fp32 {_TOL['fp32']}, bf16 {_TOL['bf16']}); worst {top} {worst[top]:.2g}")


# --------------------------------------------------------------------------------- syncs


def _count_syncs(device: torch.device, fn: Callable[[], None]) -> tuple[int, str]:
    """Host synchronisations inside ``fn`` (CUDA sync debug mode "warn"), first location; on a
    CPU ``fn`` just runs (no count)."""
    if device.type != "cuda":
        fn()
        return 0, ""
    fn()  # warm-up: lazy initialisation may synchronise once
    torch.cuda.synchronize(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    where = f" (first: {syncs[0].filename}:{syncs[0].lineno})" if syncs else ""
    return len(syncs), where


def _train_parts(model: nn.Module, device: torch.device, steps: int = 2, bf16: bool = False):
    """A training step on ``model`` with synthetic settings: ``(step(x, y), its attack)``."""
    from featdenoise.config import load_config
    from featdenoise.training import loop, recipe

    cfg = load_config(None, [f"attack.steps={steps}", "attack.step_size=4", "run.log_every=1000",
                             "run.checkpoint_every=0", f"run.bf16={str(bf16).lower()}"])
    optimizer = recipe.build_optimizer(model, cfg.optim)
    schedule = recipe.LRSchedule(optimizer, 100, cfg.optim, 32)
    attack = recipe.TrainAttack(model, steps, 16 / 255, 4 / 255, 0.2, True)
    criterion = recipe.loss_fn(0.1)
    state = loop.State()

    def step(x, y):
        loop.train_step(model, attack, criterion, optimizer, schedule, x, y, state, cfg, device)

    return step, attack


def check_sync(device: torch.device, px: int, batch: int) -> str:
    from featdenoise.attacks import PGD

    model = create_model("small_resnet_denoise", in_channels=3, width=8).to(device).eval()
    x = torch.rand(batch, 3, px, px, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    pgd = PGD(model, eps=8 / 255, step_size=2 / 255, steps=3, seed=0)
    step, attack = _train_parts(model, device)
    n_pgd, where_pgd = _count_syncs(device, lambda: pgd(x, y))
    n_attack, _ = _count_syncs(device, lambda: attack(x, y))
    n_step, where_step = _count_syncs(device, lambda: step(x, y))
    if device.type != "cuda":
        raise Skip("sync debug mode needs CUDA (ran PGD, the attack and the step on the CPU)")
    # The update itself (loss, backward, finiteness guard, SGD, running sums) must not sync.
    assert n_step <= n_attack, (f"training step: {n_step} host syncs, its attack alone "
                                f"{n_attack}{where_step}")
    return (f"PGD-3: {n_pgd} host syncs{where_pgd}; training step {n_step} (all in its "
            f"attack: {n_attack}; the update: 0)")


# --------------------------------------------------------------------------------- attacks


def check_attacks(device: torch.device, px: int, batch: int, out_dir: str) -> str:
    from featdenoise import viz
    from featdenoise.attacks import PGD

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
    res = viz.visualize(model, x[:2], y[:2], os.path.join(out_dir, "viz"), eps=eps,
                        step_size=2 / 255, steps=2)
    assert res["pictures"], "visualize wrote no picture"
    return f"seeded PGD-5 repeatable ({same:.2%} pixels), inside eps-box and [0, 1]; visualize ok"


# --------------------------------------------------------------------------------- training


def _net(name: str, tiny: bool, **kw) -> nn.Module:
    """``name`` from the registry with 10 classes; a dry run's stand-in: a small denoising net
    (the same code paths at a size a CPU runs in a second)."""
    if tiny:
        return create_model("small_resnet_denoise", in_channels=3, width=8, **kw)
    return create_model(name, num_classes=10, **kw)


def check_train_bf16(device: torch.device, px: int, batch: int, tiny: bool) -> str:
    torch.manual_seed(0)
    base = _net("resnet50_denoise", tiny)
    x = torch.rand(batch, 3, px, px)
    y = torch.randint(0, 10, (batch,))
    grads, losses = [], []
    for bf16 in (False, True):
        model = _net("resnet50_denoise", tiny)
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
    return (f"loss fp32 {losses[0]:.4f} vs bf16 {losses[1]:.4f}; gradient signs agree "
            f"{agree:.1%}")


def _write_idx(path: str, array: np.ndarray) -> None:
    """A gzip IDX file (the Fashion-MNIST format) of uint8 ``array``."""
    array = np.asarray(array, dtype=np.uint8)
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I",
                                                                   *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.tobytes())


def fake_fashion_mnist(folder: str, n_train: int = 64, n_val: int = 16) -> str:
    """A folder of Fashion-MNIST-format files with random images (labels from brightness)."""
    rng = np.random.default_rng(0)
    os.makedirs(folder, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_val)):
        x = rng.integers(0, 256, size=(n, 28, 28))
        y = (x.reshape(n, -1).mean(1) > 127.5).astype(np.uint8) + rng.integers(0, 5, n) * 2
        _write_idx(os.path.join(folder, f"{prefix}-images-idx3-ubyte.gz"), x)
        _write_idx(os.path.join(folder, f"{prefix}-labels-idx1-ubyte.gz"), y)
    return folder


def _train_cfg(data: str, out: str, device: torch.device, *extra: str):
    from featdenoise.config import load_config

    cuda = device.type == "cuda"
    width = "width: 8" if cuda else "width: 4, blocks: [1, 1, 1]"
    return load_config(None, [
        "model.name=small_resnet_denoise", f"model.kwargs={{in_channels: 1, {width}}}",
        "data.name=fashion_mnist", f"data.root={data}", "data.batch_size=8", "data.workers=0",
        "data.augment=true", f"attack.steps={2 if cuda else 1}", "attack.step_size=4",
        "optim.epochs=2",
        "optim.milestones=[1]", "optim.base_batch=8", f"run.out_dir={out}",
        "run.eval_every=1", "run.eval_attack_steps=1", "run.final_eval_steps=1",
        "run.log_every=2", "run.checkpoint_every=3", "run.progress=false",
        "run.tensorboard=false", f"run.device={device.type}", *extra])


def _weights(run_dir: str) -> dict:
    from featdenoise.training import checkpoint as ckpt

    return ckpt.load_checkpoint(os.path.join(run_dir, ckpt.CHECKPOINT))["model"]


def check_train_resume(device: torch.device, work: str) -> str:
    from featdenoise.training import loop

    data = fake_fashion_mnist(os.path.join(work, "data"), n_train=32, n_val=8)
    det = ["run.deterministic=true"]
    try:
        whole = loop.train(_train_cfg(data, os.path.join(work, "whole"), device, *det))
        part = os.path.join(work, "part")
        loop.train(_train_cfg(data, part, device, *det, "run.stop_after=3"))
        loop.train(_train_cfg(data, part, device, *det))
    finally:
        torch.use_deterministic_algorithms(False)
        backends.configure(device)
    a, b = _weights(whole), _weights(part)
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, f"resumed run differs from the uninterrupted one in {len(diff)} tensors"
    return "2 epochs, stopped at step 3 and resumed: bit-exact in deterministic mode"


def check_train_compile(device: torch.device, work: str, dry: bool) -> str:
    from featdenoise.training import loop

    if dry:
        raise Skip("torch.compile takes minutes on a CPU; the GPU run compiles with inductor")
    data = fake_fashion_mnist(os.path.join(work, "data"), n_train=32, n_val=8)
    import torch._dynamo as dynamo

    dynamo.reset()  # also clears the guard failures
    dynamo.utils.counters.clear()
    out = os.path.join(work, "compiled")
    loop.train(_train_cfg(data, out, device, "run.compile=true", "run.stop_after=3"))
    loop.train(_train_cfg(data, out, device, "run.compile=true"))
    graphs = dynamo.utils.counters["stats"].get("unique_graphs", 0)
    # each guard failure of a compiled frame is one recompilation
    recompiles = sum(len(v) for v in dynamo.utils.guard_failures.values())
    finite = all(torch.isfinite(v).all() for v in _weights(out).values()
                 if v.is_floating_point())
    assert finite, "compiled run: non-finite weights"
    return f"run.compile=true (inductor) train + resume ok: {graphs} graphs, " \
           f"{recompiles} recompiles"


# --------------------------------------------------------------------------------- PGD R152


def check_pgd_r152(device: torch.device, px: int, batch: int, tiny: bool) -> str:
    from featdenoise.attacks import PGD

    torch.manual_seed(0)
    x = torch.rand(batch, 3, px, px, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    rows = []
    for label, tf32, bf16, backend in (("fp32", False, False, "auto"),
                                       ("tf32", True, False, "auto"),
                                       ("bf16", True, True, "auto"),
                                       ("tf32+chunked", True, False, "chunked")):
        model = _net("resnet152_denoise", tiny, backend=backend).to(device).eval()
        if device.type == "cuda":
            backends.set_tf32(tf32)
            model = model.to(memory_format=torch.channels_last)
        pgd = PGD(model, eps=16 / 255, step_size=1 / 255, steps=1, seed=0, bf16=bf16)
        pgd(x, y)  # warm-up (cuDNN autotuning, kernel choice)
        _sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        start = time.perf_counter()
        pgd(x, y)
        _sync(device)
        took = time.perf_counter() - start
        mem = (f", peak {(torch.cuda.max_memory_allocated(device) - base) / 2**30:.2f} GiB"
               if device.type == "cuda" else "")
        rows.append(f"{label} {took * 1000:.0f} ms{mem}")
        del model, pgd
    if device.type == "cuda":
        backends.set_tf32(True)
    return f"[{batch},3,{px},{px}] one PGD iteration: " + "; ".join(rows)


# --------------------------------------------------------------------------------- eval


class _Images(torch.utils.data.Dataset):
    def __init__(self, n: int, px: int):
        g = torch.Generator().manual_seed(0)
        self.x = torch.rand(n, 3, px, px, generator=g)
        self.y = torch.randint(0, 10, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


def check_eval_resume(device: torch.device, work: str, px: int) -> str:
    from featdenoise.evaluation.whitebox import evaluate_whitebox

    torch.manual_seed(0)
    model = create_model("small_resnet_denoise", in_channels=3, width=8).eval()
    data = _Images(12, px)
    common = dict(steps=[2], eps=8 / 255, step_size=2 / 255, batch_size=4, device=device,
                  progress=False, seed=1)
    one = evaluate_whitebox(model, data, os.path.join(work, "one"), **common)
    split = os.path.join(work, "split")
    assert evaluate_whitebox(model, data, split, max_batches=1, **common) is None
    two = evaluate_whitebox(model, data, split, **common)
    a, b = one["attacks"][0]["accuracy"], two["attacks"][0]["accuracy"]
    assert one["num_images"] == two["num_images"] == 12
    assert a == b and one["clean"]["top1"] == two["clean"]["top1"], f"{a} vs {b}"
    return f"stopped after 1 of 3 batches, resumed: same accuracy ({a:.3f}) as one run"


# --------------------------------------------------------------------------------- issue 12


def check_accel(device: torch.device, px: int, batch: int, tiny: bool) -> str:
    try:
        from featdenoise.accel import inference_grad
    except ImportError as err:
        raise Skip(f"featdenoise.accel.inference_grad not available ({err})") from None
    from featdenoise.attacks import PGD

    torch.manual_seed(0)
    model = (create_model("small_resnet", in_channels=3, width=8) if tiny
             else create_model("resnet50")).to(device).eval()
    x = torch.rand(batch, 3, px, px, device=device)
    y = torch.randint(0, model.num_classes, (batch,), device=device)
    times, outs = [], []
    for on in (False, True):
        pgd = PGD(model, eps=16 / 255, step_size=1 / 255, steps=10, seed=0)
        ctx = inference_grad(model) if on else contextlib.nullcontext()
        with ctx:
            pgd(x, y)
            _sync(device)
            start = time.perf_counter()
            outs.append(pgd(x, y))
            _sync(device)
        times.append(time.perf_counter() - start)
    same = float((outs[0] == outs[1]).float().mean())
    assert same >= 0.999, f"only {same:.4%} identical pixels with inference_grad"
    return (f"PGD-10 on ResNet-50 [{batch},3,{px},{px}]: {times[0]*1000:.0f} ms plain, "
            f"{times[1]*1000:.0f} ms with inference_grad ({times[0]/times[1]:.2f}x), "
            f"{same:.2%} same pixels")


def check_bench(device: torch.device, target: str, dry: bool) -> str:
    import io

    from featdenoise.cli import main

    argv = ["bench", target, "--device", device.type] + (["--quick"] if target == "ops" else [])
    if dry:
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
    if not dry:
        print(text, flush=True)
    tail = (text.strip().splitlines() or [""])[-1][:200]
    return f"{shown}: ok" + ("" if dry else f" ({tail})")


# --------------------------------------------------------------------------------- multi


def _checksums(model: nn.Module) -> tuple[list[float], list[float]]:
    params = [float(p.detach().double().sum()) for p in model.parameters()]
    buffers = [float(b.detach().double().sum()) for b in model.buffers()
               if b.is_floating_point()]
    return params, buffers


def _same_on_every_rank(values: list[float]) -> bool:
    gathered = [None] * dist.world_size()
    torch.distributed.all_gather_object(gathered, values)
    return all(g == gathered[0] for g in gathered)


def run_multi(checks: Checks, device: torch.device, work: str, stage: str) -> None:
    from featdenoise.evaluation.whitebox import evaluate_whitebox
    from featdenoise.training import checkpoint as ckpt
    from featdenoise.training import loop

    data = os.path.join(work, "data")
    run_dir = os.path.join(work, "run")
    if dist.is_main():
        fake_fashion_mnist(data, n_train=64, n_val=8)
    dist.barrier()
    world = dist.world_size()

    if stage == "train":
        def trained() -> str:
            cfg = _train_cfg(data, run_dir, device, "run.stop_after=4")
            seen = []
            real = loop.train_step

            def spy(model, *args, **kw):  # the DDP-wrapped network each rank trains
                seen[:] = [model]
                return real(model, *args, **kw)

            loop.train_step = spy
            try:
                loop.train(cfg)  # stops after 4 steps: checkpoint, rank 0's BN statistics
            finally:
                loop.train_step = real
            params, buffers = _checksums(dist.unwrap(seen[0]))
            assert _same_on_every_rank(params), "parameters differ between ranks"
            assert _same_on_every_rank(buffers), "BatchNorm buffers differ between ranks"
            return (f"{world} ranks: {len(params)} parameter and {len(buffers)} buffer "
                    f"checksums equal on every rank after 4 DDP steps")

        checks.run("multi-ddp", trained)

        def counted() -> str:
            torch.manual_seed(0)
            model = create_model("small_resnet_denoise", in_channels=3, width=8).eval()
            out = os.path.join(work, "eval")
            summary = evaluate_whitebox(model, _Images(21, 16), out, steps=[1], batch_size=4,
                                        eps=8 / 255, step_size=4 / 255, device=device,
                                        progress=False)
            dist.barrier()
            n = dist.all_reduce_sum([0 if summary is None else summary["num_images"]])[0]
            writers = dist.all_reduce_sum([float(summary is not None)])[0]
            ids = []  # the images each rank's records are about (one line per attack)
            for name in sorted(os.listdir(os.path.join(out, "parts"))):
                with open(os.path.join(out, "parts", name)) as f:
                    ids += sorted({json.loads(line)["index"] for line in f if line.strip()})
            assert writers == 1, f"{writers:g} processes wrote the summary"
            assert n == 21 and len(ids) == len(set(ids)) == 21, \
                f"{len(ids)} records, {len(set(ids))} distinct, summary {n:g}"
            return f"21 images over {world} ranks counted once; one summary writer"

        checks.run("multi-eval", counted)
    else:
        def resumed() -> str:
            path = os.path.join(run_dir, ckpt.CHECKPOINT)
            if not os.path.isfile(path):
                raise Skip(f"no {path}: run --stage train first")
            before = ckpt.load_checkpoint(path)["step"]
            cfg = _train_cfg(data, run_dir, device, "run.final_eval_steps=0", "run.eval_every=0")
            loop.train(cfg)
            after = ckpt.load_checkpoint(path)
            finite = all(torch.isfinite(v).all() for v in after["model"].values()
                         if v.is_floating_point())
            assert after["step"] > before and finite, f"step {before} -> {after['step']}"
            return f"resumed with {world} process(es) at step {before}, finished at " \
                   f"{after['step']}"

        checks.run("multi-resume", resumed)


# --------------------------------------------------------------------------------- main


def run(args: argparse.Namespace) -> int:
    """Entry point of ``featdenoise bench gpu`` and ``python -m featdenoise.benchmarks.gpu_check``
    (returns the number of failed checks, capped at 1 as an exit status)."""
    dry = bool(args.dry_run)
    # Deterministic checks need cuBLAS's fixed workspace, read when cuBLAS starts.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    if dry:
        torch.set_num_threads(min(2, torch.get_num_threads()))
    device = dist.init("cpu" if dry else args.device, what="--device")
    if not dry and device.type != "cuda":
        dist.shutdown()
        raise ValueError(f"--device {args.device}: the GPU check needs a CUDA device; use "
                         f"--dry-run on a machine without one")
    backends.configure(device)
    if args.multi and not args.out:
        dist.shutdown()
        raise ValueError("--multi needs --out DIR (the same folder for both stages)")
    work = args.out or tempfile.mkdtemp(prefix="featdenoise-gpu-check-")
    checks = Checks(args.only.split(",") if args.only else None, verbose=args.verbose)
    try:
        if args.multi:
            run_multi(checks, device, work, args.stage)
        else:
            run_single(checks, device, work, dry)
    finally:
        if dist.is_main() and not args.out:
            shutil.rmtree(work, ignore_errors=True)
        dist.shutdown()
    if dist.launched_as_main():
        counts = {s: sum(r[0] == s for r in checks.results) for s in ("PASS", "FAIL", "SKIP")}
        print(f"gpu check{' (dry run, CPU)' if dry else ''}: {counts['PASS']} passed, "
              f"{counts['FAIL']} failed, {counts['SKIP']} skipped")
    return 1 if checks.failed() else 0


def run_single(checks: Checks, device: torch.device, work: str, dry: bool) -> None:
    tiny = dry
    shapes = [(2, 8, 6, 6), (2, 16, 5, 4)] if dry else [(2, 256, 56, 56), (2, 512, 28, 28)]
    checks.run("env", lambda: check_env(device))
    checks.run("ops", lambda: check_ops(device, shapes))
    checks.run("sync", lambda: check_sync(device, 16 if dry else 32, 2 if dry else 64))
    checks.run("attacks", lambda: check_attacks(device, 16 if dry else 32, 2 if dry else 64,
                                                work))
    checks.run("train-bf16", lambda: check_train_bf16(device, 16 if dry else 112,
                                                      2 if dry else 8, tiny))
    checks.run("train-resume", lambda: check_train_resume(device, os.path.join(work, "train")))
    checks.run("train-compile", lambda: check_train_compile(device, os.path.join(work, "comp"),
                                                            dry))
    checks.run("pgd-r152", lambda: check_pgd_r152(device, 16 if dry else 224, 2 if dry else 32,
                                                  tiny))
    checks.run("eval-resume", lambda: check_eval_resume(device, os.path.join(work, "eval"),
                                                        16 if dry else 64))
    checks.run("accel", lambda: check_accel(device, 16 if dry else 112, 2 if dry else 8, tiny))
    checks.run("bench-ops", lambda: check_bench(device, "ops", dry))
    checks.run("bench-attacks", lambda: check_bench(device, "attacks", dry))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dry-run", action="store_true",
                   help="run the same wiring on the CPU with tiny shapes (no GPU needed)")
    p.add_argument("--multi", action="store_true",
                   help="the multi-GPU checks (launch with torchrun, 2+ processes)")
    p.add_argument("--stage", choices=["train", "resume"], default="train",
                   help="--multi: first run (train, evaluate) or resume with another world size")
    p.add_argument("--out", default=None,
                   help="work folder (kept; default: a temporary folder, removed)")
    p.add_argument("--only", default=None, help="comma-separated check names (prefixes)")
    p.add_argument("--verbose", action="store_true", help="tracebacks of failed checks")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m featdenoise.benchmarks.gpu_check",
                                description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="cuda or cuda:N (default: cuda)")
    add_arguments(p)
    try:
        return run(p.parse_args(argv))
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
