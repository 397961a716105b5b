"""Atomic, resumable checkpoints and the exported weights.

``checkpoint.pt`` is a plain dict loadable with
``torch.load(path, weights_only=True, map_location="cpu")`` (a run on a GPU saves the optimizer
state as CUDA tensors: without ``map_location`` a CPU-only machine cannot load it):
``model`` (state dict of the unwrapped model), ``model_name``, ``model_kwargs``, ``model_build``
(:func:`build_options`), ``optimizer``, ``schedule`` (``{"step": int}``), ``epoch`` /
``step_in_epoch`` / ``step`` (the position to resume from, :class:`Position`), ``rng`` (torch,
CUDA, numpy and python generator states as tensors and plain types), ``config`` (the resolved
config as a nested dict) and ``extra`` (the recipe's own state). Files are written to a temporary
file, flushed, fsynced and renamed over the old one, so a kill at any moment leaves the last good
checkpoint.

``model.safetensors`` holds the final weights with metadata ``model`` (name) and ``model_kwargs``
(JSON); :func:`load_model` rebuilds a network from either file or from a run directory.
"""

from __future__ import annotations

import json
import os
import random
import zipfile
from dataclasses import dataclass

import numpy as np
import torch
from safetensors.torch import save
from torch import nn

from featdenoise.hub.build import build_model, set_facts
from featdenoise.runtime.atomic import atomic_write
from featdenoise.runtime.finite import check_finite_tensors
from featdenoise.runtime.meta import build_on_meta, check_fits, stored_shapes
from featdenoise.runtime.safeio import (
    metadata_json,
    read_safetensors,
    read_safetensors_header,
    read_safetensors_metadata,
    safe_torch_load,
)

CHECKPOINT = "checkpoint.pt"
WEIGHTS = "model.safetensors"


def atomic_save(obj, path: str) -> None:
    """``torch.save`` to ``path`` all at once or not at all (:mod:`featdenoise.runtime.atomic`)."""
    with atomic_write(path, "wb") as f:
        torch.save(obj, f)


def rng_state() -> dict:
    """All generator states as tensors and plain Python types (safe for ``weights_only``)."""
    np_state = np.random.get_state()
    assert isinstance(np_state, tuple)  # the legacy form, numpy's default
    py_state = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]),
                  "cached_gaussian": float(np_state[4])},
        "python": {"version": py_state[0], "state": list(py_state[1]), "gauss": py_state[2]},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def build_options(model: nn.Module) -> dict:
    """What rebuilds ``model`` beyond its name and kwargs
    (:func:`featdenoise.hub.build.build_model`): ``{"denoise": {...}, "normalize": "..."}`` where
    set, else ``{}``."""
    out: dict = {}
    denoise = getattr(model, "model_denoise", None)
    if denoise:
        out["denoise"] = dict(denoise)
    normalize = getattr(model, "model_normalize", None)
    if normalize is not None:
        out["normalize"] = normalize
    return out


@dataclass(frozen=True)
class Position:
    """Where a saved run stands: the next global step to run is ``step``, batch
    ``step_in_epoch`` of epoch ``epoch`` (0-based); ``schedule_step`` is the learning-rate
    schedule's step (the file's ``schedule: {"step": ...}``)."""

    epoch: int
    step_in_epoch: int
    step: int
    schedule_step: int


def save_checkpoint(path: str, *, model: nn.Module, model_name: str, model_kwargs: dict,
                    optimizer: torch.optim.Optimizer, position: Position, config: dict,
                    extra: dict | None = None) -> None:
    """Write a resumable checkpoint atomically (see the module docstring for the keys), with the
    current generator states (:func:`rng_state`) and the recipe's ``extra`` state."""
    state = {
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "model_name": model_name,
        "model_kwargs": dict(model_kwargs),
        "model_build": build_options(model),
        "optimizer": optimizer.state_dict(),
        "schedule": {"step": int(position.schedule_step)},
        "epoch": int(position.epoch),
        "step_in_epoch": int(position.step_in_epoch),
        "step": int(position.step),
        "rng": rng_state(),
        "config": config,
        "extra": extra or {},
    }
    atomic_save(state, path)


def load_checkpoint(path: str, map_location="cpu") -> dict:
    """``torch.load(path, weights_only=True, map_location=map_location)`` (never runs code from
    the file); tensors land on the CPU by default, so a checkpoint written on a GPU loads on a
    CPU-only machine. One-line errors for a missing, truncated or refused file, and for model
    weights holding NaN or inf (:func:`featdenoise.runtime.finite.check_finite_tensors`)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} not found")
    ckpt = safe_torch_load(path, map_location=map_location)
    if isinstance(ckpt, dict) and isinstance(ckpt.get("model"), dict):
        check_finite_tensors(ckpt["model"], path)  # resuming or loading NaN weights is refused
    return ckpt


def save_weights(path: str, model: nn.Module, model_name: str, model_kwargs: dict,
                 extra_metadata: dict | None = None) -> None:
    """Export the weights as safetensors with ``model`` and ``model_kwargs`` (JSON) metadata."""
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    meta = {"model": model_name, "model_kwargs": json.dumps(model_kwargs, sort_keys=True),
            "format": "pt"}
    if build_options(model):
        meta["model_build"] = json.dumps(build_options(model), sort_keys=True)
    meta.update({k: str(v) for k, v in (extra_metadata or {}).items()})
    with atomic_write(path, "wb") as f:
        f.write(save(tensors, metadata=meta))


def _build(path: str, name, kwargs, build: dict | None = None,
           meta_device: bool = False) -> nn.Module:
    """The model a file names (:func:`featdenoise.hub.build.build_model` of its name, kwargs and
    build options; ``meta_device``: shapes only, no memory, :mod:`featdenoise.runtime.meta`); one
    line naming the file when they cannot build a model."""
    if meta_device:
        return build_on_meta(lambda: _build(path, name, kwargs, build))

    build = {} if build is None else build
    if not isinstance(name, str) or not isinstance(kwargs, dict) or not isinstance(build, dict) \
            or set(build) - {"denoise", "normalize"}:
        raise ValueError(f"{path}: its model name {name!r} / kwargs {kwargs!r} / build options "
                         f"{build!r} are not a name and mappings; the file is damaged or was not "
                         "written by featdenoise")
    try:
        return build_model(name, kwargs, denoise=build.get("denoise"),
                           normalize=build.get("normalize"))
    except (ValueError, TypeError, KeyError) as err:
        text = str(err).strip().splitlines()
        raise ValueError(f"{path}: the model it names cannot be built "
                         f"({text[0] if text else type(err).__name__})") from None


def is_own_weights(path: str) -> bool:
    """True if ``path`` is a safetensors file featdenoise wrote (it has ``model`` metadata)."""
    try:
        return "model" in read_safetensors_metadata(path)
    except (OSError, ValueError):
        return False


def is_own_checkpoint(path: str) -> bool:
    """True if ``path`` looks like a featdenoise training checkpoint (a ``torch.save`` zip whose
    pickle names ``model_name`` and ``step_in_epoch``), judged without unpickling it."""
    try:
        with zipfile.ZipFile(path) as z:
            pickles = [n for n in z.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
            if len(pickles) != 1 or z.getinfo(pickles[0]).file_size > 50_000_000:
                return False
            raw = z.read(pickles[0])
    except (OSError, zipfile.BadZipFile, KeyError, EOFError):
        return False
    return b"model_name" in raw and b"step_in_epoch" in raw


def load_model(path: str | os.PathLike, map_location="cpu") -> nn.Module:
    """Rebuild a trained network (eval mode) from ``model.safetensors``, ``checkpoint.pt`` or a run
    directory holding either (the safetensors file is preferred).

    Raises:
        FileNotFoundError: no such file, or a run directory holding neither file.
        ValueError: one line naming the file when it is truncated, refused (a code pickle), lacks
            featdenoise metadata, its ``model_kwargs`` is not a JSON object (invalid JSON, a
            list), it names a model that cannot be built, its weights do not fit that model
            (keys, shapes, dtypes: compared on the meta device, before the model takes memory,
            so metadata naming a huge network is refused at no cost), or a weight or buffer
            holds NaN or inf (naming the tensor).
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        for name in (WEIGHTS, CHECKPOINT):
            if os.path.isfile(os.path.join(path, name)):
                path = os.path.join(path, name)
                break
        else:
            raise FileNotFoundError(f"run directory {path} holds neither {WEIGHTS} nor "
                                    f"{CHECKPOINT}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"model file {path} not found")
    state: dict
    if path.endswith(".safetensors"):
        # Shapes from the header first: the network the metadata names is checked against
        # them on the meta device, before its weights or the file's tensors take memory.
        stored, meta = read_safetensors_header(path)
        if "model" not in meta:
            raise ValueError(f"{path} has no 'model' metadata; it was not written by featdenoise")
        name = meta["model"]
        kwargs = metadata_json(path, meta, "model_kwargs", {}, dict)
        build = metadata_json(path, meta, "model_build", {}, dict)
        check_fits(_build(path, name, kwargs, build, meta_device=True), stored, path, name)
        state, _ = read_safetensors(path, device=str(map_location))
        check_finite_tensors(state, path)
    else:
        ckpt = load_checkpoint(path, map_location)
        if "model_name" not in ckpt:
            raise ValueError(f"{path} is not a featdenoise training checkpoint (no model_name)")
        name = ckpt["model_name"]
        kwargs = ckpt.get("model_kwargs", {})
        build = ckpt.get("model_build", {})
        entry = ckpt.get("model")
        if not isinstance(entry, dict):
            raise ValueError(f"{path}: its 'model' entry is not a state dict; the file is "
                             "damaged or was not written by featdenoise")
        state = entry
        check_fits(_build(path, name, kwargs, build, meta_device=True),
                   stored_shapes(state, path), path, name)
    model = _build(path, name, kwargs, build)  # for real: its tensors are the file's, already read
    model.load_state_dict(state)
    set_facts(model, source_file=path)  # named by messages about this model (models.model_label)
    return model.eval()
