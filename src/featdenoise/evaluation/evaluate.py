"""The one evaluation entry: :func:`evaluate` runs a :class:`Job` on a model and a dataset.

A job is *what* to run, built by :mod:`.whitebox` (an iteration sweep, AutoAttack) or
:mod:`.blackbox` (transfer and folder attackers): its engine columns, the settings that decide its
numbers, and how to write the finished records. Everything else is shared, once: the plan of
images and batches (:func:`featdenoise.evaluation.engine.plan`), the identity written to
``settings.json`` (the job's keys plus the run's seed, batch size, images, model and
:attr:`~featdenoise.evaluation.options.RunOptions.extra`), the folder's lock and resume check, and
the run itself (:func:`featdenoise.evaluation.engine.run`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from torch import nn
from torch.utils.data import Dataset

from featdenoise.evaluation import engine
from featdenoise.evaluation.options import RunOptions
from featdenoise.runtime import outdir

Finalize = Callable[[str, Sequence[dict], dict], dict]
"""``finalize(out_dir, records, settings) -> summary``: writes the finished evaluation's files."""


@dataclass
class Job:
    """What an evaluation runs (see the module docstring).

    Attributes:
        kind: ``"whitebox"`` or ``"blackbox"`` (the ``kind`` of ``settings.json``).
        columns: the engine columns, in the order they run on each batch.
        eps: the L-inf radius on the [0, 1] scale (stored as ``eps`` and ``eps_255``).
        targeted: whether the columns need the engine's random target per image.
        settings: the job's own identity keys (attack settings, attackers...).
        finalize: writes ``outcomes.jsonl``, ``summary.json`` and the report; returns the summary.
        desc: progress-bar label in front of the evaluation's name.
        models: further models the columns run (transfer sources): put in eval mode on the device.
        on_plan: called with the plan before the identity is written (e.g. to match the files of
            a folder attacker to the evaluated images; it may refuse them).
    """

    kind: str
    columns: list[engine.Column]
    eps: float
    targeted: bool
    settings: dict
    finalize: Finalize
    desc: str = ""
    models: Sequence[nn.Module] = ()
    on_plan: Callable[[engine.Plan], None] | None = field(default=None)


def identity(model: nn.Module, out_dir: str, job: Job, p: engine.Plan,
             options: RunOptions) -> dict:
    """The settings that decide the numbers (``settings.json``, checked on resume)."""
    return {
        "name": options.name or outdir.display_name(out_dir), "kind": job.kind, **job.settings,
        "eps": float(job.eps), "eps_255": round(float(job.eps) * 255, 6),
        "seed": int(options.seed), "batch_size": int(options.batch_size),
        "num_images": len(p.order), "limit": options.limit, "num_classes": p.num_classes,
        "ids_digest": p.ids_digest, "exact": bool(options.exact),
        "model": engine.model_identity(model), **(options.extra or {}),
    }


def evaluate(model: nn.Module, dataset: Dataset, out_dir: str, job: Job,
             options: RunOptions) -> dict | None:
    """Run ``job`` on ``model`` and ``dataset`` into ``out_dir``: resumable, shardable.

    Returns the summary (``summary.json``) when every image is done and this process merged the
    records; None otherwise (other ranks, other shards still to run, or ``max_batches``).
    """
    p = engine.plan(model, dataset, job.columns, batch_size=options.batch_size,
                    limit=options.limit, seed=options.seed, targeted=job.targeted,
                    ids=options.ids)
    if job.on_plan is not None:
        job.on_plan(p)
    settings = identity(model, out_dir, job, p, options)
    with engine.prepare(out_dir, settings, restart=options.restart, rank=options.rank,
                        world_size=options.world_size):
        device = options.torch_device()
        for m in job.models:
            m.eval().to(device)
        records = engine.run(model, p, out_dir, options, desc=job.desc + settings["name"])
        if records is None:
            return None
        return job.finalize(out_dir, records, settings)
