"""How an evaluation runs, apart from what it attacks: :class:`RunOptions`, shared by the white-box
sweep, the black-box evaluation and the engine, and the keyword checks of the entry points.

An entry point such as :func:`featdenoise.evaluation.whitebox.evaluate_whitebox` takes its own
attack settings and the fields of :class:`RunOptions` as keywords (``batch_size=8, device="cpu"``)
or a ready ``options=RunOptions(...)``; :func:`check_keywords` refuses any other keyword with one
line, and :func:`pick` builds each frozen settings object from the keywords that are its fields.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from featdenoise.runtime.distributed import resolve_device

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

T = TypeVar("T", bound="DataclassInstance")


@dataclass(frozen=True)
class RunOptions:
    """Which images, on which device and processes, and how an evaluation is labelled.

    Attributes:
        batch_size: images per batch; part of the settings (it fixes the random starts).
        limit: evaluate the library's fixed random subset of this many images (None: all).
        seed: seeds targets, random starts and the ``limit`` subset.
        ids: one id per dataset image (default: file stems where known, else indices).
        name: model label in tables and plots (default: the folder name of ``out_dir``).
        device: default: this process's GPU if there is one, else the CPU
            (:func:`featdenoise.runtime.distributed.resolve_device`).
        rank, world_size: run one shard by hand (no collectives); default from torch.distributed.
        max_batches: stop after this many batches of this call (an interruption, for tests).
        num_workers: DataLoader workers.
        progress: show a progress bar (rank 0 only).
        exact: turn the speed layer off (:mod:`featdenoise.accel`): bit-level agreement with
            the attack as written. Not part of the identity.
        restart: discard an evaluation of other settings found in ``out_dir`` and start over.
        extra: more JSON-able facts stored in settings and summary (model source, dataset name).
    """

    batch_size: int = 32
    limit: int | None = None
    seed: int = 0
    ids: Sequence[str] | None = None
    name: str | None = None
    device: torch.device | str | None = None
    rank: int | None = None
    world_size: int | None = None
    max_batches: int | None = None
    num_workers: int = 0
    progress: bool = True
    exact: bool = False
    restart: bool = False
    extra: dict | None = None

    def torch_device(self) -> torch.device:
        """``device`` as a :class:`torch.device`; None: this process's GPU, else the CPU."""
        return torch.device(self.device) if self.device is not None else resolve_device()


EXECUTION = ("device", "rank", "world_size", "max_batches", "num_workers", "progress")
"""The :class:`RunOptions` fields that :func:`featdenoise.evaluation.engine.run` reads (the
others fix the plan or the identity before it runs)."""


def field_names(*classes: type[DataclassInstance]) -> list[str]:
    """The field names of the given dataclasses, in order."""
    return [f.name for cls in classes for f in fields(cls)]


def check_keywords(what: str, keywords: Iterable[str], allowed: Sequence[str]) -> None:
    """Refuse a keyword of ``what`` that is not in ``allowed``: one ``TypeError`` line naming it
    and listing the accepted ones."""
    unknown = [k for k in keywords if k not in allowed]
    if unknown:
        raise TypeError(f"{what}() got an unexpected keyword argument {unknown[0]!r}; it takes "
                        f"{', '.join(allowed)}")


def pick(cls: type[T], keywords: Mapping[str, Any], base: T | None = None) -> T:
    """``base`` (default: ``cls()``) with the fields of ``cls`` that ``keywords`` name replaced;
    keywords that are not fields of ``cls`` are left for another settings object."""
    own = set(field_names(cls))
    return replace(base if base is not None else cls(),
                   **{k: v for k, v in keywords.items() if k in own})


def split_settings(what: str, keywords: Mapping[str, Any], cls: type[T],
                   options: RunOptions | None) -> tuple[T, RunOptions]:
    """``(cls settings, RunOptions)`` from the keywords of entry point ``what`` (``options``: the
    run options the keywords amend); any other keyword is one ``TypeError`` line."""
    check_keywords(what, keywords, field_names(cls, RunOptions))
    return pick(cls, keywords), pick(RunOptions, keywords, options)
