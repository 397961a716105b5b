"""The authors' released TensorFlow/tensorpack checkpoints, loaded exactly into PyTorch.

The model zoo of facebookresearch/ImageNet-Adversarial-Training ships ``.npz`` files written by
tensorpack's ``dump_session_params``: one array per TF variable, keyed by its name (with or
without ``:0``). Our :class:`~featdenoise.models.resnet.ResNet` mirrors the official variable
scopes, so loading is a name translation plus a layout change:

==============================  ==============================  ======================
TF variable                     PyTorch parameter / buffer      layout
==============================  ==============================  ======================
``<scope>/W``                   ``<scope>.conv.weight``         HWIO -> OIHW
``<scope>/bn/gamma``, ``beta``  ``<scope>.bn.weight``, ``bias``
``<scope>/bn/mean/EMA``         ``<scope>.bn.running_mean``
``<scope>/bn/variance/EMA``     ``<scope>.bn.running_var``
``<d>/conv/W``, ``conv/bn/*``   ``<d>.conv.weight``, ``<d>.bn``  (denoising block ``d``)
``<d>/embedding_theta/W``       ``<d>.op.theta.weight``         HWIO -> OIHW
``linear/W``, ``linear/b``      ``linear.weight``, ``bias``      [in, out] -> [out, in]
==============================  ==============================  ======================

Official files: R152.npz (``arch="ResNet"``, depth 152), R152-Denoise.npz (``"ResNetDenoise"``,
152), X101-DenoiseAll.npz (``"ResNeXtDenoiseAll"``, 101).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save
from torch import nn

from featdenoise.models.denoise import DenoisingBlock
from featdenoise.models.registry import create_model, model_metadata
from featdenoise.models.resnet import NUM_BLOCKS, ConvBN
from featdenoise.runtime.atomic import atomic_write, check_output
from featdenoise.runtime.finite import check_finite_tensors
from featdenoise.runtime.meta import build_on_meta, check_fits
from featdenoise.runtime.safeio import (
    metadata_json,
    read_safetensors,
    read_safetensors_header,
    read_safetensors_metadata,
)
from featdenoise.runtime.safeio import read_npz as safe_read_npz

ARCHS = {
    # official --arch -> (registry name, its ImageNet depth tag)
    "ResNet": "resnet{depth}",
    "ResNetDenoise": "resnet{depth}_denoise",
    "ResNeXtDenoiseAll": "resnext101_32x8d_denoise_all",
}
"""Official architecture names (``nets.py``: ``<arch>Model``) and the registry model each is."""

_BN_NAMES = {"weight": "gamma", "bias": "beta", "running_mean": "mean/EMA",
             "running_var": "variance/EMA"}


def _check_arch(arch: str) -> None:
    if arch not in ARCHS:
        raise ValueError(f"unknown official arch {arch!r}; choose one of {', '.join(ARCHS)}")


def _model_name(arch: str, blocks: list[int]) -> str:
    # The registry name carries a depth; the actual counts always travel as ``blocks``.
    depth = next((d for d, b in NUM_BLOCKS.items() if b == blocks), 152)
    return ARCHS[arch].format(depth=depth)


def _tensorpack_names(model: nn.Module) -> dict[str, tuple[str, str]]:
    """Map every TF variable name to (state-dict key, kind), kind in conv/linear_w/plain."""
    names: dict[str, tuple[str, str]] = {}

    def add(tf_name: str, key: str, kind: str = "plain") -> None:
        names[tf_name] = (key, kind)

    def add_bn(tf_scope: str, key: str) -> None:
        for ours, theirs in _BN_NAMES.items():
            add(f"{tf_scope}/bn/{theirs}", f"{key}.bn.{ours}")

    for path, module in model.named_modules():
        scope = path.replace(".", "/")
        if isinstance(module, ConvBN):
            add(f"{scope}/W", f"{path}.conv.weight", "conv")
            add_bn(scope, path)
        elif isinstance(module, DenoisingBlock):
            if isinstance(module.conv, nn.Conv2d):
                add(f"{scope}/conv/W", f"{path}.conv.weight", "conv")
            add_bn(f"{scope}/conv", path)
            for pname, _ in module.op.named_parameters():
                emb = {"theta.weight": "embedding_theta/W", "phi.weight": "embedding_phi/W"}
                if pname not in emb:
                    raise ValueError(f"{path}.op.{pname} has no tensorpack counterpart")
                add(f"{scope}/{emb[pname]}", f"{path}.op.{pname}", "conv")
        elif isinstance(module, nn.Linear):
            add(f"{scope}/W", f"{path}.weight", "linear_w")
            add(f"{scope}/b", f"{path}.bias")
    covered = {key for key, _ in names.values()}
    left = [k for k in model.state_dict() if k not in covered
            and not k.endswith("num_batches_tracked")]
    if left:  # a module kind without a translation rule: a bug here, not in the file
        raise ValueError(f"no tensorpack name for {', '.join(left)}")
    return names


def _to_tf_shape(shape: Sequence[int], kind: str) -> tuple[int, ...]:
    if kind == "conv":  # OIHW -> HWIO ([kh, kw, in / groups, out])
        o, i, h, w = shape
        return (h, w, i, o)
    if kind == "linear_w":  # [out, in] -> [in, out]
        return tuple(reversed(shape))
    return tuple(shape)


def _from_tf(array: np.ndarray, kind: str) -> torch.Tensor:
    if kind == "conv":
        array = array.transpose(3, 2, 0, 1)
    elif kind == "linear_w":
        array = array.T
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


def read_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Variables of a tensorpack ``.npz`` dump, keyed by TF name without the ``:0`` suffix.

    Raises:
        FileNotFoundError: no such file.
        ValueError: one line naming the file when it is empty, truncated, not an npz, or holds
            pickled objects (:func:`featdenoise.runtime.safeio.read_npz`).
    """
    raw = safe_read_npz(path)
    out: dict[str, np.ndarray] = {}
    for key, value in raw.items():
        name = key[:-2] if key.endswith(":0") else key
        if name in out:
            raise ValueError(f"{path}: variable {name!r} appears both with and without ':0'")
        out[name] = value
    if not out:
        raise ValueError(f"{path}: the npz holds no arrays; it is not a tensorpack checkpoint")
    return out


def _named_blocks(names: Sequence[str]) -> list[set[int]]:
    """The block indices each group ``group{g}/block{b}/`` of a dump has variables for."""
    named: list[set[int]] = [set(), set(), set(), set()]
    for name in names:
        m = re.match(r"group([0-3])/block(\d+)/", name)
        if m:
            named[int(m.group(1))].add(int(m.group(2)))
    return named


def guess_arch(names: Sequence[str]) -> tuple[str, list[int] | None]:
    """Guess the official arch and the blocks per group from the variable names of a dump."""
    counts = [max(named, default=-1) + 1 for named in _named_blocks(names)]
    blocks = counts if min(counts) > 0 else None
    if any("/non_local/" in n for n in names):
        return "ResNeXtDenoiseAll", blocks
    if any(re.match(r"group\d_denoise/", n) for n in names):
        return "ResNetDenoise", blocks
    return "ResNet", blocks


def _resolve_blocks(path: Path, arch: str, variables: dict, depth: int | None,
                    blocks: Sequence[int] | None) -> list[int]:
    if blocks is not None:
        blocks = [int(b) for b in blocks]
        if len(blocks) != 4:
            raise ValueError(f"blocks must be 4 counts (res2..res5), got {blocks}")
        if depth is not None and depth in NUM_BLOCKS and NUM_BLOCKS[depth] != blocks:
            raise ValueError(f"depth {depth} means blocks {NUM_BLOCKS[depth]}, but blocks "
                             f"{blocks} was given; pass only one of them")
        return blocks
    if depth is not None:
        if depth not in NUM_BLOCKS:
            raise ValueError(f"depth must be one of {sorted(NUM_BLOCKS)} "
                             f"(or give blocks=[a,b,c,d]), got {depth}")
        return list(NUM_BLOCKS[depth])
    _, found = guess_arch(list(variables))
    if found is None:
        raise ValueError(f"{path}: cannot infer the blocks per group from the variable names; "
                         "pass depth or blocks")
    # Every block up to the highest index must have variables: a few names such as
    # group0/block999999/ would otherwise ask for a network of millions of blocks.
    for g, (count, named) in enumerate(zip(found, _named_blocks(list(variables)), strict=True)):
        if len(named) != count:
            raise ValueError(
                f"{path} does not match the official {arch} network with blocks {found}: group{g} "
                f"names block{count - 1} but has variables for {len(named)} of its {count} "
                "blocks; pass depth or blocks, or re-create the file")
    return found


def _offender_report(path: Path, arch: str, blocks: list[int], variables: dict,
                     missing: list, unexpected: list, misshaped: list) -> str:
    head = (f"{path} does not match the official {arch} network with blocks {blocks}: "
            f"{len(missing)} missing, {len(unexpected)} unexpected and {len(misshaped)} "
            f"mis-shaped variables.")
    lines = [head]
    g_arch, g_blocks = guess_arch(list(variables))
    if (g_arch, g_blocks) != (arch, blocks):
        lines.append(f"The file's variable names look like arch={g_arch}, blocks={g_blocks}.")
    lines += [f"  missing: {n}" for n in missing]
    lines += [f"  unexpected: {n}" for n in unexpected]
    lines += [f"  mis-shaped: {n}: file has {fs}, network expects {ms}"
              for n, fs, ms in misshaped]
    return "\n".join(lines)


def load_tensorpack(path: str | os.PathLike, arch: str, depth: int | None = None,
                    blocks: Sequence[int] | None = None) -> nn.Module:
    """Load an official tensorpack ``.npz`` checkpoint into our network, in eval mode.

    Args:
        path: the ``.npz`` file (e.g. R152-Denoise.npz of the official model zoo).
        arch: official ``--arch``: ``ResNet``, ``ResNetDenoise`` or ``ResNeXtDenoiseAll``.
        depth: official ``-d`` (50, 101, 152); fixes the blocks per group (:data:`NUM_BLOCKS`).
        blocks: blocks per group ``[a, b, c, d]`` instead of ``depth`` (any counts). With
            neither, the counts are read off the variable names.

    Returns:
        The model (``create_model`` name + ``blocks``), eval mode, taking float RGB in [0, 1]
        ``[N, 3, H, W]`` (224 px for ImageNet) and returning the official logits ``[N, 1000]``.

    Raises:
        ValueError: one error naming every missing, unexpected and mis-shaped variable; one line
            naming a variable that holds NaN or inf.
    """
    path = Path(path)
    _check_arch(arch)
    variables = read_npz(path)
    blocks = _resolve_blocks(path, arch, variables, depth, blocks)
    name = _model_name(arch, blocks)
    num_classes = 1000
    if "linear/b" in variables and variables["linear/b"].ndim == 1:
        num_classes = int(variables["linear/b"].shape[0])
    # On the meta device first: the network the names ask for (any block counts) costs nothing
    # until every variable is found with its shape; then it is built for real.
    model = build_on_meta(lambda: create_model(name, blocks=blocks, num_classes=num_classes))
    names = _tensorpack_names(model)
    state = model.state_dict()

    missing = sorted(n for n in names if n not in variables)
    unexpected = sorted(n for n in variables if n not in names)
    misshaped = []
    for tf_name, (key, kind) in sorted(names.items()):
        if tf_name in variables:
            want = _to_tf_shape(state[key].shape, kind)
            if tuple(variables[tf_name].shape) != want:
                misshaped.append((tf_name, tuple(variables[tf_name].shape), want))
    if missing or unexpected or misshaped:
        raise ValueError(_offender_report(path, arch, blocks, variables, missing, unexpected,
                                          misshaped))
    bad_dtype = sorted(n for n, v in variables.items() if not np.issubdtype(v.dtype, np.floating))
    if bad_dtype:
        raise ValueError(f"{path}: variables are not floating point: {', '.join(bad_dtype)}")
    check_finite_tensors(variables, str(path))

    converted = {key: _from_tf(variables[tf_name], kind)
                 for tf_name, (key, kind) in names.items()}
    model = create_model(name, blocks=blocks, num_classes=num_classes)
    model.load_state_dict(converted, strict=False)  # num_batches_tracked keeps its default
    model.source_file = str(path)  # type: ignore[assignment]  # a plain str attribute
    return model.eval()


def convert_tensorpack(in_npz: str | os.PathLike, out_safetensors: str | os.PathLike,
                       arch: str, depth: int | None = None,
                       blocks: Sequence[int] | None = None) -> nn.Module:
    """Convert an official ``.npz`` into a ``.safetensors`` file that :func:`load_converted`
    (and ``featdenoise.hub.checkpoints.load_model``) rebuild without TensorFlow names.

    The metadata holds ``model`` (registry name), ``model_kwargs`` (JSON) and ``source``.
    The file is written atomically (temporary file, then rename). Returns the loaded model.

    The output is checked before the (long) conversion: it may not be the input itself (under any
    spelling, symlink or hard link), a folder, a read-only file, or an existing file that is not a
    featdenoise safetensors file (``ValueError``, one line; nothing is written).
    """
    check_output(out_safetensors, inputs=[in_npz], ours=is_converted)
    model = load_tensorpack(in_npz, arch, depth=depth, blocks=blocks)
    meta = model_metadata(model)
    meta["source"] = json.dumps({"format": "tensorpack", "arch": arch,
                                 "file": Path(in_npz).name})
    out = Path(out_safetensors)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    with atomic_write(out, "wb", inputs=[in_npz], ours=is_converted) as f:
        f.write(save(state, metadata=meta))
    return model


def is_converted(path: str | os.PathLike) -> bool:
    """True if ``path`` is a safetensors file that featdenoise wrote (``model`` metadata)."""
    try:
        return "model" in read_safetensors_metadata(path)
    except (OSError, ValueError):
        return False


def load_converted(path: str | os.PathLike) -> nn.Module:
    """Rebuild a model from a ``.safetensors`` file with ``model``/``model_kwargs`` metadata
    (as written by :func:`convert_tensorpack`); returned in eval mode.

    Raises:
        FileNotFoundError: no such file.
        ValueError: one line naming the file when it is truncated, lacks the metadata, its
            ``model_kwargs`` is not a JSON object the model accepts, or the tensors it stores do
            not fit (keys, shapes, dtypes) the model it names: checked on the meta device, before
            the model or the tensors take memory.
    """
    path = Path(path)
    stored, meta = read_safetensors_header(path)  # shapes only: checked before any allocation
    if "model" not in meta:
        raise ValueError(f"{path} has no 'model' metadata; it was not written by featdenoise")
    kwargs = metadata_json(path, meta, "model_kwargs", {}, dict)

    def build() -> nn.Module:
        try:
            return create_model(meta["model"], **kwargs)
        except (ValueError, TypeError) as err:
            raise ValueError(f"{path}: the model it names cannot be built "
                             f"({str(err).splitlines()[0] if str(err) else type(err).__name__})"
                             ) from None

    check_fits(build_on_meta(build), stored, str(path), meta["model"])
    state, _ = read_safetensors(path)
    check_finite_tensors(state, str(path))
    model = build()
    model.load_state_dict(state, strict=True)
    model.source_file = str(path)  # type: ignore[assignment]  # a plain str attribute
    return model.eval()
