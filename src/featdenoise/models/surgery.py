"""Denoising blocks in any backbone (paper Sec. 4; placement after res2..res5, Secs. 5, 6).

:func:`add_denoising` puts a :class:`~featdenoise.models.denoise.DenoisingBlock` (the op, a 1x1
conv, BatchNorm, residual: ``y = x + BN(conv1x1(op(x)))``) after named modules of any
``nn.Module``: a torchvision or timm ResNet / ResNeXt / Wide ResNet, or a user's network. Each
block's BatchNorm starts at gamma 0 and beta 0 (the official initialisation), so right after
insertion the network computes exactly the function it computed before (``x + 0``, bit for bit
in eval mode) and pretrained weights keep their meaning.

The module ``m`` named ``name`` is replaced in its parent by :class:`Denoised` ``(m, block)``, an
ordinary module (``torch.compile``, DDP and ``state_dict`` see plain submodules), so its keys gain
``inner.``: ``layer1.0.conv1.weight`` becomes ``layer1.inner.0.conv1.weight`` and the block's
are ``layer1.denoise.*`` (``denoise.op.theta.weight``, ``denoise.conv.weight``,
``denoise.bn.*``). A state dict of the backbone loads before insertion with
``model.load_state_dict``, or after it with :func:`load_backbone_state`, which maps the keys.
"""

from __future__ import annotations

import difflib
import inspect
from collections import OrderedDict
from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torch.func import functional_call

from featdenoise.models.denoise import DenoiseOptions, DenoisingBlock
from featdenoise.models.registry import model_in_channels
from featdenoise.models.resnet import denoise_block
from featdenoise.runtime.modes import eval_mode

STAGES = ("layer1", "layer2", "layer3", "layer4")
"""The residual stages res2..res5 of torchvision and timm ResNets (``after="stages"``)."""


class Denoised(nn.Sequential):
    """``denoise(inner(x))``: a module followed by its denoising block (:func:`add_denoising`).

    Children ``inner`` (the original module) and ``denoise`` (the block); a ``Sequential``, so
    code that iterates stages (timm's gradient checkpointing) runs both. Extra arguments of a
    call go to ``inner``. Shapes: whatever ``inner`` takes -> ``[N, C, H, W]``.
    """

    inner: nn.Module
    denoise: DenoisingBlock

    def __init__(self, inner: nn.Module, denoise: DenoisingBlock):
        super().__init__(OrderedDict(inner=inner, denoise=denoise))

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return self.denoise(self.inner(*args, **kwargs))


def add_denoising(model: nn.Module, after: Sequence[str] | str = "stages",
                  op: str = "nonlocal_gaussian", *, example_input: tuple[int, ...] | None = None,
                  **block_kwargs) -> nn.Module:
    """Insert a denoising block after each module named in ``after``; returns ``model``, changed
    in place (nothing is changed when a ValueError is raised).

    Args:
        model: any network; each module named in ``after`` must output a 4-D ``[N, C_i, H_i,
            W_i]`` feature map (any float dtype, any device, also ``meta``).
        after: dotted module names (as in ``model.named_modules()``), or ``"stages"``: the
            residual stages ``layer1..layer4`` of torchvision and timm ResNets (the first module
            having all four as children), the paper's placement after res2..res5 ("+4 denoise").
        op: the denoising operation, a name of :data:`featdenoise.models.denoise.OP_NAMES`
            (default ``nonlocal_gaussian``, the paper's best, Sec. 6).
        example_input: the input shape of the dry run that finds each ``C_i`` (meta device: no
            memory, no compute); default ``(1, C, H, W)`` with ``C`` from the model
            (:func:`~featdenoise.models.registry.model_in_channels`: its first conv) and ``H, W``
            from timm's ``pretrained_cfg["input_size"]``, else 224 x 224.
        **block_kwargs: options of :class:`~featdenoise.models.denoise.DenoisingBlock`
            (``use_conv``, ``residual``, ``subsample``, ``embed``, ``backend``).

    Returns:
        ``model``, the same function as before (``residual=False`` blocks excepted: their gamma
        starts at 1), each block on the device and in the dtype of the module it follows, in its
        training mode; the 1x1 conv drawn as the official code's (TF variance scaling, fan-out).
        :func:`feature_modules` lists the stages and blocks.

    Raises:
        ValueError: one line: an unknown module name (with close names), a module whose output
            is not 4-D, ``"stages"`` on a network without them, an unknown op or option.

    Example::

        >>> import torch, torchvision
        >>> from featdenoise.models import add_denoising
        >>> net = add_denoising(torchvision.models.resnet50(), "stages", "nonlocal_gaussian")
        >>> [tuple(net.get_submodule(f"layer{i}.denoise").bn.weight.shape) for i in (1, 4)]
        [(256,), (2048,)]
        >>> net.eval()(torch.rand(1, 3, 64, 64)).shape
        torch.Size([1, 1000])
    """
    names = _resolve_after(model, after)
    options = _check_options(op, block_kwargs)
    shape = _example_input(model, example_input)
    shapes = _output_shapes(model, names, shape)
    channels: dict[str, int] = {}
    for name in names:
        out = shapes.get(name, "nothing (it is not called)")
        if not isinstance(out, tuple) or len(out) != 4:
            kind = type(model.get_submodule(name)).__name__
            raise ValueError(f"add_denoising: {name!r} outputs {out} on an example input of shape "
                             f"{shape}, not a 4-D [N, C, H, W] feature map ({kind}); name another "
                             "module")
        channels[name] = out[1]
    for name in sorted(names, key=lambda n: -n.count(".")):  # inner first: outer names stay
        _insert(model, name, denoise_block(channels[name], options))
    return model


def _resolve_after(model: nn.Module, after: Sequence[str] | str) -> list[str]:
    """The module names ``after`` means, each checked to exist; one line otherwise."""
    cls = type(model).__name__
    names = dict(model.named_modules())
    if after == "stages":
        for prefix, module in names.items():
            if all(s in module._modules for s in STAGES):
                return [f"{prefix}.{s}" if prefix else s for s in STAGES]
        children = ", ".join(n for n, _ in model.named_children()) or "none"
        raise ValueError(f"add_denoising(after='stages'): cannot guess the stages: {cls} has no "
                         f"layer1..layer4 (its children: {children}); name the modules, e.g. "
                         "after=['block1', 'block2']")
    after = [after] if isinstance(after, str) else list(after)
    for name in after:
        if not name or name not in names:
            near = difflib.get_close_matches(name, [n for n in names if n], n=3, cutoff=0.5)
            hint = f"did you mean {', '.join(near)}?" if near else \
                f"its children: {', '.join(n for n, _ in model.named_children())}"
            raise ValueError(f"add_denoising: {cls} has no module {name!r} (names as in "
                             f"model.named_modules(); {hint})")
    if len(set(after)) != len(after) or not after:
        raise ValueError(f"add_denoising: after={after} names a module twice or none")
    return after


def _check_options(op: str, block_kwargs: dict) -> DenoiseOptions:
    """The blocks' options; a bad op or option fails before the model is touched (build_op's
    one line)."""
    accepted = [p for p in inspect.signature(DenoisingBlock).parameters if p not in
                ("channels", "op")]
    unknown = sorted(set(block_kwargs) - set(accepted))
    if unknown:
        raise ValueError(f"add_denoising: DenoisingBlock does not take {', '.join(unknown)}; "
                         f"it takes op, {', '.join(accepted)}")
    options = DenoiseOptions(op, **block_kwargs)
    options.block(4)  # a bad op or option value raises here
    return options


def _example_input(model: nn.Module, example_input: tuple[int, ...] | None) -> tuple[int, ...]:
    if example_input is not None:
        return tuple(int(s) for s in example_input)
    size = (getattr(model, "pretrained_cfg", None) or {}).get("input_size", (3, 224, 224))
    return 1, model_in_channels(model), *(int(s) for s in size[-2:])


def _output_shapes(model: nn.Module, names: list[str],
                   shape: tuple[int, ...]) -> dict[str, tuple[int, ...] | str]:
    """Output shape (or type name) of each of ``names`` in one eval-mode forward on the meta
    device: parameters and buffers are swapped for meta tensors, so the model is untouched."""
    out: dict[str, tuple[int, ...] | str] = {}

    def hook(name):
        def record(_module, _inputs, output):
            out[name] = tuple(output.shape) if isinstance(output, torch.Tensor) else \
                f"a {type(output).__name__}"
        return record

    modules = dict(model.named_modules())
    handles = [modules[n].register_forward_hook(hook(n)) for n in names]
    meta = {k: torch.empty_like(v, device="meta")
            for k, v in (*model.named_parameters(), *model.named_buffers())}
    ref = _reference(model)
    try:
        with eval_mode(model), torch.no_grad():
            x = torch.empty(shape, device="meta", dtype=ref.dtype if ref is not None else None)
            functional_call(model, meta, (x,))
    except Exception as err:  # the network's own error, told in one line
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"add_denoising: a dry run of {type(model).__name__} on an input of "
                         f"shape {shape} failed ({first}); pass example_input=(N, C, H, W)"
                         ) from err
    finally:
        for h in handles:
            h.remove()
    return out


def _reference(*modules: nn.Module) -> torch.Tensor | None:
    """The first floating-point parameter or buffer of the first module that has one."""
    found = (t for m in modules for t in (*m.parameters(), *m.buffers()) if t.is_floating_point())
    return next(found, None)


def _insert(model: nn.Module, name: str, block: DenoisingBlock) -> None:
    """Replace the module ``name`` by ``Denoised(it, block)``, the block moved to its device and
    dtype and put in its training mode."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    target = parent.get_submodule(child)
    ref = _reference(target, model)
    if ref is not None:
        block = block.to(device=ref.device, dtype=ref.dtype)
    block.train(target.training)
    setattr(parent, child, Denoised(target, block))


def feature_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Feature maps of ``model`` for :mod:`featdenoise.analysis.viz`: its own
    ``feature_modules()`` if it has one (featdenoise networks), then for each :class:`Denoised`
    at path ``P`` the module before the block as ``P`` and the block as ``P_denoise`` (a block's
    ``.op`` input and output are the maps right before and after denoising, paper Figs. 2, 3).
    Each module outputs ``[N, C, H, W]``; empty for a network with neither."""
    own = getattr(model, "feature_modules", None)
    out = dict(own()) if callable(own) else {}
    for name, module in model.named_modules():
        if isinstance(module, Denoised):
            out[name] = module.inner
            out[f"{name}_denoise"] = module.denoise
    return out


def load_backbone_state(model: nn.Module, state: Mapping[str, torch.Tensor],
                        strict: bool = True) -> list[str]:
    """Load a state dict of the network as it was before :func:`add_denoising` into ``model``
    (keys below each :class:`Denoised` gain ``inner.``: ``layer1.0.conv1.weight`` ->
    ``layer1.inner.0.conv1.weight``); the blocks keep their initial values.

    Returns:
        The keys not loaded: exactly the blocks' (``layer1.denoise.*``) when ``strict``.

    Raises:
        ValueError: one line, when ``strict`` and a backbone key is missing or a key of
            ``state`` is unexpected (with counts and the first three), and whenever a tensor's
            shape differs from the model's (the count and the first three, with both shapes);
            nothing is loaded then.
    """
    wrapped = {n for n, m in model.named_modules() if isinstance(m, Denoised)}
    mapped = {_backbone_key(k, wrapped): v for k, v in state.items()}
    own = model.state_dict()
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in mapped.items()
             if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if wrong:
        raise ValueError(f"load_backbone_state: {len(wrong)} tensors of the state do not fit "
                         f"{type(model).__name__} (state vs model shape), e.g. "
                         f"{'; '.join(wrong[:3])}; was the state saved from another "
                         "architecture or number of classes?")
    result = model.load_state_dict(mapped, strict=False)
    blocks = tuple(f"{n}.denoise." for n in wrapped)
    missing = [k for k in result.missing_keys if not k.startswith(blocks)]
    if strict and (missing or result.unexpected_keys):
        named = "; ".join((missing + result.unexpected_keys)[:3])
        raise ValueError(f"load_backbone_state: the state does not fit {type(model).__name__}: "
                         f"{len(missing)} backbone keys missing, {len(result.unexpected_keys)} "
                         f"unexpected (as mapped), e.g. {named}")
    return list(result.missing_keys)


def _backbone_key(key: str, wrapped: set[str]) -> str:
    """``key`` of the network before insertion -> its key now (``inner.`` below each wrapper)."""
    path: list[str] = []
    for part in key.split("."):
        if path and ".".join(path) in wrapped:
            path.append("inner")
        path.append(part)
    return ".".join(path)
