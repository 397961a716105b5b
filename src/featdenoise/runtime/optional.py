"""The one place that imports packages lazily: the optional extras (matplotlib, timm, RobustBench,
TensorBoard, and the benchmarks' references torchattacks and the authors' AutoAttack).

Every other module imports at its top, so the package's coupling can be read from its imports.
Each function here imports on first call and, where the package is an optional extra, turns the
``ImportError`` into one line saying what to install.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType


def require(module: str, what: str, install: str) -> ModuleType:
    """Import ``module`` for ``what`` (a spec, a benchmark); if it is missing, one line:
    ``what: PACKAGE is not installed; INSTALL``."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ValueError(f"{what}: {module.split('.')[0]} is not installed; {install}") from None


def installed(module: str) -> bool:
    """Whether ``module`` can be imported (without importing it)."""
    return importlib.util.find_spec(module) is not None


def pyplot(what: str = "this plot") -> ModuleType:
    """``matplotlib.pyplot`` on the Agg backend (PNG output, no display needed); matplotlib is
    the ``plots`` extra."""
    matplotlib = require("matplotlib", what, "pip install 'featdenoise[plots]'")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def timm(spec: str) -> ModuleType:
    """The ``timm`` package (the ``featdenoise[timm]`` extra), for the model spec ``spec``."""
    return require("timm", spec, "pip install 'featdenoise[timm]'")


def robustbench_zoo(spec: str) -> tuple[ModuleType, ModuleType]:
    """RobustBench's ``model_zoo`` and its ``enums`` module, for the model spec ``spec`` (one
    line when RobustBench is missing or cannot be imported: it pins its own timm)."""
    try:
        return (importlib.import_module("robustbench.model_zoo"),
                importlib.import_module("robustbench.model_zoo.enums"))
    except ImportError:
        raise ValueError(f"{spec}: robustbench is not installed (pip install robustbench; it "
                         "pins its own timm, see the README)") from None


def summary_writer() -> type | None:
    """TensorBoard's ``SummaryWriter`` class, or ``None`` when TensorBoard cannot be imported
    (logging must never stop training)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter


def torchattacks(what: str = "featdenoise bench attacks") -> ModuleType:
    """torchattacks, the attack benchmarks' reference (installed by ``make``)."""
    return require("torchattacks", what, "pip install --no-deps torchattacks==3.5.1")


def pyautoattack(what: str = "featdenoise bench attacks") -> ModuleType:
    """The authors' AutoAttack (pyautoattack, the ``dev`` extra), the AutoAttack benchmark's
    reference."""
    return require("pyautoattack", what, "pip install 'pyautoattack>=0.2,<0.3'")
