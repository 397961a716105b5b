"""Model specs: one string names any model, from any library or the user's own code.

- ``runs/x``, ``checkpoint.pt``, ``model.safetensors``: a featdenoise run folder or file;
- ``R152.npz:ResNet[:152]``: an official tensorpack checkpoint (:mod:`featdenoise.hub.tensorpack`);
- ``torchvision:NAME``: ``torchvision.models.get_model(NAME, weights=None)``;
- ``timm:NAME``: ``timm.create_model(NAME, pretrained=False)`` (the ``timm`` extra);
- ``robustbench:NAME``: the architecture of RobustBench's model zoo (installed by the user, not
  part of the tested set), its checkpoint read from ``--model-dir``;
- ``PATH.py:FUNCTION`` or ``package.module:FUNCTION``: ``FUNCTION(**kwargs)`` from the user's
  code, which is imported and so runs;
- ``NAME``: a featdenoise registry model (:func:`featdenoise.models.list_models`).

Library and user models take ``kwargs`` (``--model-kwargs JSON``), read their weights from
``weights`` (``--weights FILE``, :mod:`featdenoise.hub.weights`) and get a normalisation layer in
front (``--normalize``, :mod:`featdenoise.models.normalize`), so every model takes [0, 1] pixels:
by default ImageNet mean/std for torchvision, the model's ``pretrained_cfg`` for timm, none for
the rest. Nothing is downloaded: a spec or kwargs that would download (``weights="DEFAULT"``,
``pretrained=True``) is refused in one line.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import json
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import torchvision
from torch import nn

from featdenoise.models.normalize import STATS
from featdenoise.runtime import optional

_T = TypeVar("_T")  # what a builder returns

LIBRARIES = ("torchvision", "timm", "robustbench")
_MODULE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


@dataclass
class Built:
    """A model built from a library or user spec, before weights and normalisation."""

    model: nn.Module
    normalize: tuple[tuple[float, ...], tuple[float, ...]] | None = None  # the kind's default
    weights: str | None = None  # a weights file the kind names itself (robustbench)
    facts: dict = field(default_factory=dict)


def is_code_spec(spec: str) -> bool:
    """True for the specs this module builds (a library prefix, or code ``X.py:F`` / ``a.b:F``)."""
    kind, sep, rest = spec.partition(":")
    if not sep or not rest or ".npz:" in spec or os.path.exists(spec):
        return False  # no kind; an official FILE.npz:ARCH; a file
    if kind in LIBRARIES:
        return True
    return kind.endswith(".py") or (_MODULE.match(kind) is not None
                                    and _MODULE.match(rest) is not None)


def _close(name: str, names: list[str]) -> str:
    near = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
    return f" (did you mean {', '.join(near)}?)" if near else ""


def _refuse_download(spec: str, kwargs: dict, keys: tuple[str, ...]) -> None:
    for key in keys:
        if kwargs.get(key) not in (None, False):
            raise ValueError(f"{spec}: {key}={kwargs[key]!r} would download weights, which "
                             "featdenoise never does; download them yourself and pass "
                             "--weights FILE")


def _torchvision(name: str, kwargs: dict) -> Built:
    spec = f"torchvision:{name}"
    _refuse_download(spec, kwargs, ("weights", "pretrained"))
    names = torchvision.models.list_models()
    if name not in names:
        raise ValueError(f"{spec}: torchvision has no model {name!r}{_close(name, names)}")
    model = _call_builder(spec, kwargs, lambda: torchvision.models.get_model(name, weights=None,
                                                                            **kwargs))
    model.num_classes = int(kwargs.get("num_classes", 1000))
    return Built(model, STATS["imagenet"])


def _timm(name: str, kwargs: dict) -> Built:
    spec = f"timm:{name}"
    timm = optional.timm(spec)
    _refuse_download(spec, kwargs, ("pretrained", "pretrained_cfg_overlay", "checkpoint_path"))
    names = timm.list_models()
    if name not in names:
        raise ValueError(f"{spec}: timm has no model {name!r}{_close(name, names)}")
    model = _call_builder(spec, kwargs, lambda: timm.create_model(name, pretrained=False,
                                                                 **kwargs))
    cfg = getattr(model, "pretrained_cfg", None) or {}
    norm = (tuple(cfg["mean"]), tuple(cfg["std"])) if "mean" in cfg and "std" in cfg else None
    facts = {"input_size": list(cfg["input_size"])} if "input_size" in cfg else {}
    return Built(model, norm, facts=facts)


def _robustbench(name: str, kwargs: dict, model_dir: str | None) -> Built:
    spec = f"robustbench:{name}"
    zoo_module, enums = optional.robustbench_zoo(spec)
    if not model_dir:
        raise ValueError(f"{spec} needs --model-dir DIR holding the checkpoint you downloaded "
                         "(DIR/DATASET/THREAT/NAME.pt); featdenoise never downloads it")
    dataset = kwargs.get("dataset", "cifar10")
    threat = kwargs.get("threat_model", "Linf")
    try:
        zoo = zoo_module.model_dicts[enums.BenchmarkDataset(dataset)][enums.ThreatModel(threat)]
    except (ValueError, KeyError):
        raise ValueError(f"{spec}: unknown dataset {dataset!r} or threat_model {threat!r} "
                         "(--model-kwargs '{\"dataset\": \"cifar10\", \"threat_model\": "
                         "\"Linf\"}')") from None
    if name not in zoo:
        raise ValueError(f"{spec}: not in RobustBench's {dataset}/{threat} zoo"
                         f"{_close(name, list(zoo))}")
    weights = os.path.join(model_dir, dataset, threat, f"{name}.pt")
    return Built(zoo[name]["model"](), None, weights, {"dataset": dataset, "threat_model": threat})


def _import_function(spec: str) -> Callable:
    where, _, function = spec.rpartition(":")
    if where.endswith(".py"):
        if not os.path.isfile(where):
            raise ValueError(f"{spec}: no such file {where}")
        module_name = "featdenoise_user_" + re.sub(r"\W", "_", os.path.abspath(where))
        found = importlib.util.spec_from_file_location(module_name, where)
        if found is None or found.loader is None:
            raise ValueError(f"{spec}: {where} cannot be imported as a Python module")
        module = importlib.util.module_from_spec(found)
        sys.path.insert(0, os.path.dirname(os.path.abspath(where)))  # its sibling modules
        try:
            found.loader.exec_module(module)
        except Exception as err:  # the user's code: any error is theirs, named in one line
            raise ValueError(f"{spec}: importing {where} failed: {type(err).__name__}: "
                             f"{str(err).splitlines()[0] if str(err) else ''}") from None
        finally:
            sys.path.remove(os.path.dirname(os.path.abspath(where)))
    else:
        try:
            module = importlib.import_module(where)
        except Exception as err:
            raise ValueError(f"{spec}: cannot import module {where!r} ({type(err).__name__}: "
                             f"{str(err).splitlines()[0] if str(err) else ''})") from None
    fn = getattr(module, function, None)
    if not callable(fn):
        public = [n for n in dir(module) if not n.startswith("_")]
        raise ValueError(f"{spec}: {where} has no function {function!r}{_close(function, public)}")
    return fn


def _call_builder(spec: str, kwargs: dict, build: Callable[[], _T]) -> _T:
    """``build()``; a builder that refuses its kwargs (wrong name, type or value) is one line
    naming the spec and the kwargs."""
    try:
        return build()
    except (TypeError, ValueError) as err:
        text = str(err).strip().splitlines()
        raise ValueError(f"{spec}: building it with --model-kwargs {json.dumps(kwargs)} failed: "
                         f"{text[0] if text else type(err).__name__}") from None


def _user_code(spec: str, kwargs: dict) -> Built:
    fn = _import_function(spec)
    model = _call_builder(spec, kwargs, lambda: fn(**kwargs))
    if not isinstance(model, nn.Module):
        raise ValueError(f"{spec} returned a {type(model).__name__}, not a torch.nn.Module")
    return Built(model)


def construct(spec: str, kwargs: dict | None = None, model_dir: str | None = None) -> Built:
    """The architecture a library or user-code spec names (random weights), with the kind's
    default normalisation; :func:`featdenoise.hub.build.build_spec` adds weights and
    normalisation."""
    kwargs = dict(kwargs or {})
    kind, _, name = spec.partition(":")
    if kind == "torchvision":
        return _torchvision(name, kwargs)
    if kind == "timm":
        return _timm(name, kwargs)
    if kind == "robustbench":
        return _robustbench(name, kwargs, model_dir)
    return _user_code(spec, kwargs)
