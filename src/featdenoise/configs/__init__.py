"""Shipped training configs: YAML files installed with the package, found by name.

Every ``<name>.yaml`` in this folder is a training config (:mod:`featdenoise.training.config`):
the paper's ImageNet runs, the ablations, and small Fashion-MNIST / CIFAR-10 runs. A source
checkout also shows them as ``configs/`` at the top of the repository (a link to this folder, one
copy).

``--config`` takes either a path or a name (:func:`resolve_config`): an existing file is read as
it is; ``fashion_mnist_quick`` (no folder, no ``.yaml``) is the shipped config of that name from
any folder; a path that does not exist but ends in a shipped config's file name
(``configs/fashion_mnist_quick.yaml``, as the README writes it) also means that shipped config,
so the README's commands work outside the source tree too.
"""

from __future__ import annotations

import os
from importlib import resources

SUFFIX = ".yaml"


def _folder():
    return resources.files(__name__)


def list_configs() -> list[str]:
    """Names of the shipped configs (file names without ``.yaml``), sorted."""
    return sorted(p.name[: -len(SUFFIX)] for p in _folder().iterdir()
                  if p.name.endswith(SUFFIX))


def shipped_config(name: str) -> str:
    """Path of the shipped config ``name`` (``.yaml`` optional); FileNotFoundError if unknown."""
    stem = name[: -len(SUFFIX)] if name.endswith(SUFFIX) else name
    if stem not in list_configs():
        raise FileNotFoundError(f"no shipped config named {name!r}; choose one of "
                                f"{', '.join(list_configs())} or give a path to a YAML file")
    return os.fspath(_folder() / (stem + SUFFIX))


def describe_config(name: str) -> str:
    """One line about the shipped config ``name``: the first comment line of its file."""
    with open(shipped_config(name)) as f:
        for line in f:
            if line.startswith("#"):
                return line.lstrip("#").strip().rstrip(":")
            if line.strip():
                break
    return ""


def resolve_config(spec: str | os.PathLike) -> str:
    """The file that ``--config spec`` means (see the module docstring for the rules).

    Raises FileNotFoundError naming the path and the shipped names when it means nothing.
    """
    path = os.fspath(spec)
    if os.path.isfile(path):
        return path
    base = os.path.basename(path)
    bare = base == path and not path.endswith((SUFFIX, ".yml"))
    if bare or (base.endswith(SUFFIX) and base[: -len(SUFFIX)] in list_configs()):
        return shipped_config(base)
    raise FileNotFoundError(f"config file {path} not found; give a YAML file or the name of a "
                            f"shipped config ({', '.join(list_configs())})")
