"""``inference_grad(model)``: fast forward and input-gradient passes of an eval-mode model.

Inside the block every call ``model(x)`` of the eval-mode model runs

- each BatchNorm folded into the convolution before it (:mod:`featdenoise.accel.fold`), where the
  wiring and the logits were verified once for inputs like ``x``;
- each convolution on weights packed once for oneDNN (:mod:`featdenoise.accel.pack`, CPU float32),
  each conv and input shape verified once against PyTorch's own forward and input gradient.

Nothing in the model is replaced: the block installs instance-level routing functions (the
model's ``forward``, each conv's ``_conv_forward``, each paired BatchNorm's ``forward``) that
choose per call between the fast and the normal path, and removes them on exit. Modules,
parameters, buffers and ``state_dict`` stay the caller's own objects throughout, so code inside
the block (an attack library calling ``model.eval()`` and ``model(x)``) sees the model it knows.
The normal path runs, with bit-identical results, whenever a fast one is not verified: a module
in training mode, a call with more than one argument or on an empty batch, autocast (bf16: a
speed path of its own, whose rounding would hide a wrong fold), ``torch.compile`` tracing, a
check that failed, an operator missing or refusing its arguments. A hook must see PyTorch's own
tensors: a conv or BatchNorm with a hook of its own (forward, forward pre-, backward or backward
pre-hook, also added inside the block) runs the normal path (neither folded nor packed), a global
module hook (``torch.nn.modules.module.register_module_*``) makes every call normal, and the fold
check of a new input kind, which runs the model twice more, waits while a module inside has one.
So does a parametrized conv or BatchNorm (``torch.nn.utils.parametrize``, ``weight_norm``: its
weight is recomputed at every access); a subclass that overrides ``forward`` is never folded,
and a conv's own ``_conv_forward`` is never routed.

The caches (folded weights, packs, verifications) belong to the model and outlive the block, so
an evaluation that builds a new attack per batch folds and packs once; they are refreshed when
any weight or BatchNorm statistic changes (identity, version and ``requires_grad`` at every call,
values once per block; a train-mode forward through ``num_batches_tracked``, since the kernel
leaves the statistics' versions alone) or a BatchNorm's ``eps``. While none changes, each conv
call reuses what it resolved to at its first call in the block, and passes that need no graph
call oneDNN directly. The per-model caches and the routing state of a block live in
:mod:`featdenoise.accel.state`.
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from collections.abc import Iterator

import torch
from torch import nn

from featdenoise.accel.fold import sources
from featdenoise.accel.state import BlockState, global_hooks
from featdenoise.runtime.backends import tf32_enabled
from featdenoise.runtime.modes import frozen, restored_modes

_VERIFY_IMAGES = 8  # images of the first batch of a shape on which folding is verified
_MISSING = object()

# The block now active on each model (weak keys: it goes with the model).
_ACTIVE: weakref.WeakKeyDictionary[nn.Module, BlockState] = weakref.WeakKeyDictionary()


def _compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and compiler.is_compiling())


def _frozen(tensors) -> bool:
    return not any(t is not None and t.requires_grad for t in tensors)


def _conv_forward(block: BlockState, i: int | None, conv: nn.Conv2d, x: torch.Tensor,
                  weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``conv._conv_forward`` inside a block: pair ``i`` folded and/or packed, or normal."""
    mode = block.mode
    if mode is None or _compiling():
        return nn.Conv2d._conv_forward(conv, x, weight, bias)
    if mode == "record":
        out = nn.Conv2d._conv_forward(conv, x, weight, bias)
        if i is not None:
            block.counts["conv"][i] += 1
            block.last_out[i] = out
        return out
    # Everything the plan's choices depend on besides the weights (those are in the plans'
    # validity, checked per forward): input kind, dtype, device, layout, autocast.
    key = (id(conv), i in block.fold, block.pack, tuple(x.shape[1:]), x.dtype, x.device,
           x.is_contiguous(), x.is_contiguous(memory_format=torch.channels_last),
           torch.is_autocast_enabled(x.device.type))
    plan = block.plans.get(key)
    if plan is None or plan[0] is not weight or plan[1] is not bias:
        plan = block.plans[key] = _plan(block, i, conv, x, weight, bias)
    _, _, weight, bias, folded, entry = plan
    if entry is not None:
        out = block.caches.packer.run(entry, conv, x, weight, bias)
    else:
        out = nn.Conv2d._conv_forward(conv, x, weight, bias)
    if folded and i is not None:
        block.last_out[i] = out  # the BatchNorm that receives exactly this tensor passes it on
    return out


def _plan(block: BlockState, i: int | None, conv: nn.Conv2d, x: torch.Tensor,
          weight: torch.Tensor, bias: torch.Tensor | None) -> tuple:
    """What a fast-mode call of ``conv`` on inputs like ``x`` runs: ``(weight, bias as called,
    weight, bias to use, folded, verified pack entry or None)``."""
    given = (weight, bias)
    folded = False
    if id(conv) in block.excluded:  # hooked: PyTorch's own convolution, unpacked
        return (*given, weight, bias, False, None)
    if i in block.fold and weight is conv.weight and bias is conv.bias:
        bn = block.pairs[i][1]
        if (not bn.training and bn.running_mean is not None and bn.running_var is not None
                and _frozen(sources(conv, bn))):
            weight, bias = block.caches.folds.get(conv, bn, block.caches.epoch)
            folded = True
    entry = block.caches.packer.resolve(conv, x, weight, bias) if block.pack else None
    return (*given, weight, bias, folded, entry)


def _bn_forward(block: BlockState, i: int, bn: nn.BatchNorm2d, forward, x: torch.Tensor):
    """A paired BatchNorm's ``forward`` inside a block: identity on its folded conv's output."""
    if block.mode == "record":
        block.counts["bn"][i] += 1
        block.counts["fed"][i] += block.last_out.get(i) is x
    elif block.mode == "fast" and block.last_out.get(i) is x:
        del block.last_out[i]
        return x
    return forward(x)


def _model_forward(block: BlockState, forward, *args, **kwargs):
    """The model's ``forward`` inside a block: fast when verified for inputs like ``args[0]``."""
    if (not block.enabled[-1] or block.mode is not None or len(args) != 1 or kwargs
            or not isinstance(args[0], torch.Tensor) or args[0].numel() == 0 or _compiling()
            or torch.is_autocast_enabled(args[0].device.type)
            or any(m.training for m in block.modules) or global_hooks()):
        return forward(*args, **kwargs)
    x = args[0]
    c = block.caches
    if block.hooks_changed():
        block.refresh()
    tensors, marks = block.marks()
    if marks != block.planned_marks or any(
            a is not b for a, b in zip(tensors, block.planned_from, strict=True)):
        # A tensor was replaced (also by a parametrization), written in place or unfrozen.
        block.refresh()
        tensors, marks = block.marks()
        block.plans.clear()
        block.planned_from, block.planned_marks = tensors, marks
        # The fold checks outlive the block: they hold while the same tensors are unchanged
        # and the same modules take the fast path.
        token = (tuple(None if t is None else id(t) for t in tensors) + marks
                 + (block.excluded,))
        if token != c.token:
            c.verified.clear()
            c.token = token
    key = (tuple(x.shape[1:]), x.dtype, x.device)
    fold = c.verified.get(key)
    if fold is None:
        if block.hooked - {id(block.model)}:
            # The checks run the model twice more: a hook inside it would see those calls.
            fold = frozenset()
        else:
            fold = c.verified[key] = _verify_fold(block, forward, x)
    return _run(block, forward, x, "fast", fold - block.excluded_pairs, block.pack_available)


def _run(block: BlockState, forward, x: torch.Tensor, mode: str, fold: frozenset[int],
         pack: bool):
    block.mode, block.fold, block.pack = mode, fold, pack
    try:
        return forward(x)
    finally:
        block.mode, block.fold, block.pack = None, frozenset(), False
        block.last_out.clear()


def fold_tolerance(device_type: str, tf32: bool, rtol: float = 1e-4) -> float:
    """Relative tolerance of the folding check: ``rtol`` in strict float32; on CUDA with TF32
    matmuls or convolutions, 8 unit roundoffs of TF32 (2^-11), since both the folded and the
    unfolded network then carry that rounding and a strict check would switch folding off."""
    return max(rtol, 8 * 2.0 ** -11) if device_type == "cuda" and tf32 else rtol


@torch.no_grad()
def _verify_fold(block: BlockState, forward, x: torch.Tensor, rtol: float = 1e-4) -> frozenset[int]:
    """The pairs that may be folded for inputs like ``x``: wiring (each paired BatchNorm receives
    exactly its conv's output, as often as the conv runs, so a BN registered after its conv but
    applied elsewhere is caught whatever its statistics) and numbers (folded logits equal
    PyTorch's own within ``rtol`` of their largest magnitude), on up to 8 images."""
    n = len(block.pairs)
    if n == 0:
        return frozenset()
    x = x[:_VERIFY_IMAGES]
    block.counts = {"conv": [0] * n, "bn": [0] * n, "fed": [0] * n}
    # A randomised model draws from the global generators: both passes see the same draws, and
    # the checks leave the generators as they found them.
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        states = (torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in devices])
        ref = _run(block, forward, x, "record", frozenset(), False)
        torch.set_rng_state(states[0])
        for d, state in zip(devices, states[1], strict=True):
            torch.cuda.set_rng_state(state, d)
        out = None
        counts = block.counts
        wired = frozenset(i for i in range(n)
                          if counts["conv"][i] > 0 and counts["conv"][i] == counts["bn"][i]
                          == counts["fed"][i]) - block.excluded_pairs
        if wired and isinstance(ref, torch.Tensor):
            out = _run(block, forward, x, "fast", wired, False)
    if not isinstance(out, torch.Tensor) or out.shape != ref.shape:
        return frozenset()
    ref, out = ref.float(), out.float()
    tf32 = x.device.type == "cuda" and any(tf32_enabled().values())
    tol = fold_tolerance(x.device.type, tf32, rtol) * float(ref.abs().max()) + 1e-6
    return wired if bool(((out - ref).abs().max() <= tol).item()) else frozenset()


def _install(block: BlockState, installed: list) -> None:
    """Route the model's forward, every conv (but one with its own ``_conv_forward``) and every
    paired BatchNorm through ``block``."""

    def put(module: nn.Module, name: str, fn) -> None:
        installed.append((module, name, module.__dict__.get(name, _MISSING)))
        module.__dict__[name] = fn

    pair_of_conv = {id(conv): i for i, (conv, _) in enumerate(block.pairs)}
    for module in block.convs:
        put(module, "_conv_forward",
            functools.partial(_conv_forward, block, pair_of_conv.get(id(module)), module))
    for i, (_, bn) in enumerate(block.pairs):
        put(bn, "forward", functools.partial(_bn_forward, block, i, bn, bn.forward))
    model = block.model
    put(model, "forward", functools.partial(_model_forward, block, model.forward))


def _uninstall(installed: list) -> None:
    """Undo :func:`_install`: each routed attribute back as it was (or absent), last first."""
    for module, name, prior in reversed(installed):
        if prior is _MISSING:
            module.__dict__.pop(name, None)
        else:
            module.__dict__[name] = prior


@contextlib.contextmanager
def inference_grad(model: nn.Module, *, enabled: bool = True) -> Iterator[nn.Module]:
    """Fast forward and input-gradient passes of ``model`` inside the block, for any attack.

    For an eval-mode model (BatchNorm on running statistics, as during the paper's attacks,
    Sec. 5 and 6): every BatchNorm that follows a convolution is folded into it, and on a CPU in
    float32 every convolution runs on weights packed once for oneDNN, forward and input
    gradient. Each is verified once per model and input kind against PyTorch's own result and
    refreshed when any weight changes; whatever is not verified, and any conv or BatchNorm with a
    hook, runs PyTorch's normal path. The result is the same function up to float rounding, so a
    gradient sign near zero can flip: use ``enabled=False`` (attacks: ``exact=True``) for
    bit-for-bit work.

    Inside the block the parameters do not require gradients (input gradients only, as an
    attack needs: ``torch.autograd.grad(loss, x)``); a training step belongs outside. On exit,
    also after an exception, the model's modules, parameters, ``requires_grad`` flags,
    ``training`` flags and ``state_dict`` are exactly as before. A ``torch.compile``d model
    (``OptimizedModule``) is left alone. Nested blocks on one model are allowed; an inner
    ``enabled=False`` switches the fast path off until it exits.

    Args:
        model: any ``nn.Module`` called as ``model(x)`` with one tensor ``x`` (e.g. images
            ``[N, C, H, W]`` in [0, 1]); other call signatures run the normal path.
        enabled: False makes the block a no-op (or, nested, switches the fast path off).
    Yields:
        ``model`` itself.

    Example::

        with featdenoise.accel.inference_grad(model):
            x_adv = torchattacks.PGD(model, eps=16 / 255)(x, y)
    """
    active = _ACTIVE.get(model)
    if active is not None:
        active.enabled.append(bool(enabled))
        try:
            yield model
        finally:
            active.enabled.pop()
        return
    if not enabled or hasattr(model, "_orig_mod"):
        yield model
        return
    installed: list = []
    # Code inside may switch modes (an attack library calling model.eval()): all put back.
    with restored_modes(model), frozen(model):
        try:
            block = BlockState(model)
            block.caches.epoch += 1
            block.caches.packer.epoch = block.caches.epoch
            _install(block, installed)
            _ACTIVE[model] = block
            yield model
        finally:
            _ACTIVE.pop(model, None)
            _uninstall(installed)
