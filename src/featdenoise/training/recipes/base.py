"""What the training loop asks of a recipe (one per ``attack.mode``): train on a batch, say whether
training stopped early, do its bookkeeping after an epoch, and round-trip its own state through
the checkpoint's ``extra`` entry."""

from __future__ import annotations

import abc

import torch
from torch import nn
from torch.utils.data import Dataset

from featdenoise.training.config import Config
from featdenoise.training.metrics import MetricsLogger
from featdenoise.training.step import State, StepContext


class Recipe(abc.ABC):
    """One ``attack.mode``: how a minibatch becomes SGD updates, and what the mode keeps."""

    @classmethod
    @abc.abstractmethod
    def build(cls, cfg: Config, model: nn.Module, attack_net: nn.Module, val_set: Dataset,
              device: torch.device) -> Recipe:
        """The recipe of ``cfg`` for the plain ``model`` (its facts, its weights);
        ``attack_net`` is what attacks run (``model`` or its compiled form); ``val_set`` the
        held-out images."""

    @abc.abstractmethod
    def step(self, net: nn.Module, x: torch.Tensor, y: torch.Tensor, state: State,
             ctx: StepContext) -> None:
        """Train ``net`` (what the update runs: DDP and/or compiled wrapper of the model) on one
        minibatch ``x`` ``[N, C, H, W]`` in [0, 1], ``y`` ``[N]``; the running sums of ``state``
        count what it trained on. Raises :class:`featdenoise.training.step.NonFiniteLossError`
        at a check step after a non-finite loss."""

    @property
    def stopped(self) -> bool:
        """True once the recipe has ended training before ``optim.epochs`` (kept on resume)."""
        return False

    def end_epoch(self, model: nn.Module, epoch: int, logger: MetricsLogger, step: int) -> None:
        """Bookkeeping after epoch ``epoch`` (1-based) at global step ``step``, on every process;
        ``model`` is the plain module. Nothing by default."""
        return None

    def state_dict(self) -> dict:
        """The recipe's entries of the checkpoint's ``extra`` (called on every process)."""
        return {}

    def load_state_dict(self, extra: dict, device: torch.device) -> None:
        """Take back what :meth:`state_dict` saved (``extra``: the checkpoint's entry)."""
        return None
