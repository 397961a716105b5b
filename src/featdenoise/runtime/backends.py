"""Numerics and speed switches of the CUDA backends: TF32, cuDNN autotuning, deterministic mode.

:func:`configure` is called once per run with the run's device (``run.tf32``,
``run.deterministic``). On a CPU it changes nothing, so CPU results never depend on these keys.

* TF32 (on by default for CUDA): float32 matmuls and convolutions on Ampere and newer GPUs
  round their inputs to a 10-bit mantissa and accumulate in float32, several times the
  strict-FP32 throughput. The non-local ``bmm``s are a large share of a denoising network's
  FLOPs, so strict FP32 there costs more than anywhere else. Relative error per product is ~1e-3.
* ``cudnn.benchmark``: cuDNN times its convolution algorithms for each new shape once and keeps
  the fastest (a training run sees one or two shapes).
* Deterministic mode: ``torch.use_deterministic_algorithms(True)``, ``cudnn.deterministic``,
  no autotuning, TF32 off, and the median's backward gathers instead of scattering with atomics
  (:mod:`featdenoise.models.kernels`). Bit-exact resume on a GPU needs this mode; on a CPU every
  run is deterministic already. Some CUDA kernels have no deterministic version and then raise
  an error naming the op.
"""

from __future__ import annotations

import os

import torch

# cuBLAS needs a fixed workspace to be deterministic; it must be set before its first use.
_CUBLAS_WORKSPACE = ":4096:8"


def set_tf32(enabled: bool) -> None:
    """TF32 for float32 matmuls (cuBLAS) and convolutions (cuDNN), CUDA only.

    Uses ``fp32_precision`` where this torch has it (mixing it with the legacy ``allow_tf32``
    flags is an error in torch >= 2.9), else the legacy flags.
    """
    mode = "tf32" if enabled else "ieee"
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision") and hasattr(torch.backends.cudnn, "conv"):
        matmul.fp32_precision = mode
        torch.backends.cudnn.conv.fp32_precision = mode
    else:  # older torch
        matmul.allow_tf32 = enabled
        torch.backends.cudnn.allow_tf32 = enabled


def tf32_enabled() -> dict:
    """``{"matmul": bool, "conv": bool}``: whether float32 CUDA matmuls/convolutions use TF32."""
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision") and hasattr(torch.backends.cudnn, "conv"):
        return {"matmul": matmul.fp32_precision == "tf32",
                "conv": torch.backends.cudnn.conv.fp32_precision == "tf32"}
    return {"matmul": bool(matmul.allow_tf32), "conv": bool(torch.backends.cudnn.allow_tf32)}


def configure(device: torch.device | str, *, tf32: bool = True,
              deterministic: bool = False) -> dict:
    """Set the CUDA backend switches for a run on ``device``; returns what was set.

    ``tf32``: allow TF32 (ignored, i.e. off, in deterministic mode); ``deterministic``: the
    deterministic mode of the module docstring. On a CPU device only ``deterministic`` acts
    (``torch.use_deterministic_algorithms``), everything else is left as it is.
    """
    device = torch.device(device)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", _CUBLAS_WORKSPACE)
        torch.use_deterministic_algorithms(True)
    if device.type != "cuda":
        return {"device": str(device), "deterministic": deterministic}
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic
    set_tf32(tf32 and not deterministic)
    return {"device": str(device), "deterministic": deterministic,
            "tf32": tf32 and not deterministic, "cudnn_benchmark": not deterministic}


def deterministic() -> bool:
    """True inside ``torch.use_deterministic_algorithms(True)`` (not in its warn-only form)."""
    return (torch.are_deterministic_algorithms_enabled()
            and not torch.is_deterministic_algorithms_warn_only_enabled())
