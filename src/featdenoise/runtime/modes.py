"""Contexts that change a network's state for a while and always give it back: eval mode (every
module's ``training`` flag), frozen parameters, and bfloat16 autocast; and one that only gives
the ``training`` flags back, whatever the code inside sets."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


@contextlib.contextmanager
def restored_modes(model: nn.Module) -> Iterator[nn.Module]:
    """Nothing changed on entry; on exit every module's own ``training`` flag is put back as it
    was, also on an error (code inside may call ``model.eval()`` or ``model.train()``)."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model.eval()`` inside the block; on exit every module's own ``training`` flag is put back
    as it was (a network whose parts were in different modes keeps them), also on an error."""
    with restored_modes(model):
        model.eval()
        yield model


@contextlib.contextmanager
def frozen(model: nn.Module) -> Iterator[nn.Module]:
    """Parameters that required gradients do not inside the block (gradients then reach only the
    input); they do again on exit, also on an error."""
    params = [p for p in model.parameters() if p.requires_grad]
    try:
        for p in params:
            p.requires_grad_(False)
        yield model
    finally:
        for p in params:
            p.requires_grad_(True)


def bf16_autocast(enabled: bool, device: torch.device | str) -> contextlib.AbstractContextManager:
    """bfloat16 autocast on ``device`` when ``enabled``, else a context that changes nothing."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
