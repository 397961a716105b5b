"""Whether tensors are still the ones a cache was built from, unmodified.

The accelerator's caches (folded BatchNorm in :mod:`featdenoise.accel.fold`, packed convolutions
in :mod:`featdenoise.accel.pack`) derive tensors from a model's weights and must refresh them
whenever those weights change, however they change.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch


def _versions(tensors: tuple) -> tuple:
    return tuple(None if t is None else t._version for t in tensors)


class Unchanged:
    """A record of ``tensors`` (entries may be None) taken now; :meth:`holds` tells later whether
    the given tensors are the very same objects, at the same in-place version (optimizer steps
    and ``load_state_dict`` bump it; the batch_norm kernel's update of running statistics does
    not, so a cache of them also holds ``num_batches_tracked``) and, for those ``snapshot``
    selects, still equal to a copy taken now (``p.data`` writes bypass version counters).

    The record holds its tensors, so a freed tensor's id or address can never be mistaken for a
    new one. Memory: one copy of each snapshotted tensor.
    """

    def __init__(self, tensors: Iterable[torch.Tensor | None],
                 snapshot: Callable[[torch.Tensor], bool] = lambda t: True, epoch: int = 0):
        self.tensors = tuple(tensors)
        self.versions = _versions(self.tensors)
        self.copies = tuple(t.detach().clone() if t is not None and snapshot(t) else None
                            for t in self.tensors)
        self.compared_at = epoch

    def holds(self, tensors: Iterable[torch.Tensor | None], epoch: int | None = None) -> bool:
        """Same objects, same versions and (once per ``epoch``; always when None) equal to the
        snapshot. An epoch is one entry of the accelerator: comparing values at every forward
        would cost a read of all weights per step, while ``p.data`` writes during one block of
        input-gradient passes are not expected."""
        tensors = tuple(tensors)
        same = (len(tensors) == len(self.tensors)
                and all(a is b for a, b in zip(self.tensors, tensors, strict=True))
                and _versions(tensors) == self.versions)
        if not same or (epoch is not None and epoch == self.compared_at):
            return same
        if not all(c is None or (t is not None and torch.equal(c, t))
                   for c, t in zip(self.copies, tensors, strict=True)):
            return False
        if epoch is not None:
            self.compared_at = epoch
        return True
