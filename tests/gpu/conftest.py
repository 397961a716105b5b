"""The GPU checks' fixtures: ``needs_cuda`` tests skip without a CUDA GPU; ``setting`` is the
device and sizes of a check (``cuda``: the real sizes; ``cpu``: the same code at tiny sizes);
``report`` keeps a check's one-line result, printed in a "GPU checks" section at the end."""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch

from featdenoise.runtime import backends
from featdenoise.runtime import distributed as dist

# Deterministic checks need cuBLAS's fixed workspace, read when cuBLAS starts: set before any
# test of this folder runs.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

def pytest_runtest_setup(item):
    if item.get_closest_marker("needs_cuda") and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")


@dataclass(frozen=True)
class Setting:
    """Where a check runs: ``device``; ``dry`` on the CPU (tiny shapes, stand-in nets)."""

    device: torch.device
    dry: bool

    def size(self, gpu, cpu):
        """``gpu`` on CUDA, ``cpu`` in a dry run."""
        return cpu if self.dry else gpu


@pytest.fixture()
def setting(request):
    """Parametrise indirectly with ``gpu_utils.CUDA``, ``CPU`` or ``CPU_SLOW``."""
    if request.param == "cuda":
        device = dist.resolve_device("cuda", "--device")
        torch.cuda.set_device(device)
        backends.configure(device)
        return Setting(device, dry=False)
    request.getfixturevalue("one_thread")
    return Setting(torch.device("cpu"), dry=True)


@pytest.fixture()
def report(request):
    """``report(text)``: the check's result line, shown after the run (``PASS name: text``)."""
    return lambda text: request.node.user_properties.append(("gpu_check", text))


def pytest_terminal_summary(terminalreporter):
    lines = [f"PASS {r.nodeid.rsplit('::', 1)[-1]}: {text}"
             for r in terminalreporter.stats.get("passed", [])
             for key, text in getattr(r, "user_properties", ()) if key == "gpu_check"]
    if lines:
        terminalreporter.write_sep("-", "GPU checks")
        for line in lines:
            terminalreporter.write_line(line)
