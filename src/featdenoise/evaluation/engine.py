"""The evaluation engine: every robustness number of the library is computed here.

White-box sweeps (:mod:`.whitebox`), black-box attackers (:mod:`.blackbox`), AutoAttack
(:mod:`.autoattack`), training's periodic evaluation and the ablations describe *what* to run as a
list of :class:`Column`; the engine owns the rest, once:

- which images: :func:`featdenoise.data.datasets.subset_indices` (the library's one subset rule),
  cut into fixed batches of the evaluation order, so a batch's images never depend on the number
  of processes;
- which target per image: :func:`image_targets`, seeded by ``(seed, image id)``;
- randomness of a column on a batch: seeded by ``(seed, tag, batch index, column name)``, so a
  result never depends on sharding, resumption or the order the columns ran in;
- running: clean logits once per batch, then each column; a column sees the records of earlier
  columns (an AutoAttack stage runs only on images every earlier stage failed on); every logits
  batch is checked: NaN or inf stops the run with one line naming the model and the images
  (:func:`checked_logits`), so no accuracy is ever computed from them;
- per-image records: appended to ``parts/outcomes-rank<R>.jsonl`` and fsynced after every column of
  every batch, so a kill loses at most the column that was running; a rerun resumes there;
- sharding: under torchrun each rank takes every ``world_size``-th unfinished batch; one process
  merges; every image is counted once;
- identity: ``settings.json`` holds everything that determines the numbers, the model (name,
  kwargs, SHA-256 of its weights) and the data included; a run into a folder holding another
  evaluation is refused with one line naming what differs (``restart=True`` starts over).

A record is a JSON object per image: ``index`` (position in the dataset), ``id`` (file stem or
index), ``batch``, ``label``, ``target`` (-1 untargeted), ``pred_clean``, ``top5_clean``, and for
each column ``pred_<name>`` (+ ``top5_<name>`` and whatever else the column adds, e.g.
``margin_<name>``); an unreadable file gives ``{"skipped": true}`` and counts nowhere.
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Callable, Sequence, Sized
from dataclasses import dataclass, field
from typing import TypeVar, cast

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from featdenoise.attacks import draw_targets
from featdenoise.data.datasets import subset_indices
from featdenoise.data.files import dataset_image_ids
from featdenoise.evaluation.identity import (  # noqa: F401  (part of the engine's API)
    FREE_KEYS,
    check_identity,
    model_identity,
    prepare,
    weights_digest,
)
from featdenoise.evaluation.metrics import topk_correct
from featdenoise.evaluation.options import EXECUTION, RunOptions, check_keywords, pick
from featdenoise.evaluation.records import (  # noqa: F401  (part of the engine's API)
    OUTCOMES_FILE,
    OWN_FILES,
    PARTS_DIR,
    SETTINGS_FILE,
    SUMMARY_FILE,
    append_records,
    load_records,
    write_json,
    write_outcomes,
)
from featdenoise.models.registry import model_label, model_num_classes
from featdenoise.runtime import distributed as dist
from featdenoise.runtime import outdir
from featdenoise.runtime.distributed import rank_world  # noqa: F401  (part of the API)
from featdenoise.runtime.finite import NonFiniteError, check_finite_logits, list_some
from featdenoise.runtime.modes import eval_mode
from featdenoise.runtime.seeds import derive_seed, generator

T = TypeVar("T")


# --------------------------------------------------------------------------- images and targets
def image_targets(ids: Sequence[str], labels: torch.Tensor, num_classes: int,
                  seed: int) -> torch.Tensor:
    """One target per image, uniform over the wrong classes, from a generator seeded by its id.

    The rule is :func:`featdenoise.attacks.draw_targets` (``(label + U{1..K-1}) mod K``, the
    official ``_create_random_target``); the draw of image ``ids[i]`` depends only on
    ``(seed, ids[i])``. Shapes: ``labels [N]`` -> ``[N]`` int64 on the CPU.
    """
    if num_classes < 2:
        raise ValueError(f"a targeted attack needs at least 2 classes, got {num_classes}")
    labels = labels.long().cpu()
    return torch.cat([draw_targets(labels[i:i + 1], num_classes, generator(seed, "target", i_d))
                      for i, i_d in enumerate(ids)]) if len(ids) else labels.clone()


# --------------------------------------------------------------------------- columns
@dataclass
class Batch:
    """What a column sees of one batch (only the readable images).

    ``x [n, C, H, W]`` in [0, 1] and ``y [n]`` on the evaluation device; ``target [n]`` (None when
    untargeted); ``ids`` the image ids; ``records`` the batch's records so far (clean fields and
    earlier columns), one dict per image; ``seed`` the seed of this column on this batch.
    """

    x: torch.Tensor
    y: torch.Tensor
    target: torch.Tensor | None
    ids: list[str]
    records: list[dict]
    index: int
    seed: int


@dataclass
class Column:
    """One attack (or attacker) of an evaluation: ``run(model, batch) -> {field: [n values]}``.

    The returned fields are added to the records as given (e.g. ``{"pred_pgd10": [...]}``);
    :func:`predict_fields` turns adversarial images into the usual ``pred_``/``top5_`` fields.
    ``done_key`` names the field whose presence marks the column done for an image;
    ``seed_tag`` labels its per-batch seed ``(seed, seed_tag, batch index, name)``.
    """

    name: str
    run: Callable[[nn.Module, Batch], dict[str, list]]
    done_key: str = ""
    seed_tag: str = "start"

    def __post_init__(self):
        self.done_key = self.done_key or f"pred_{self.name}"


def checked_logits(model: nn.Module, x: torch.Tensor, ids: Sequence[str] | None = None,
                   what: str = "images") -> torch.Tensor:
    """``model(x)`` without a graph, ``[n, K]``; NaN or inf logits are a
    :class:`~featdenoise.runtime.finite.NonFiniteError` naming the model and the images
    (``ids``), never a prediction."""
    with torch.no_grad():
        logits = model(x)  # [n, K]
    check_finite_logits(logits, model_label(model), ids, what)
    return logits


def predict_fields(model: nn.Module, name: str, x_adv: torch.Tensor, y: torch.Tensor,
                   ids: Sequence[str] | None = None) -> dict:
    """``pred_<name>`` and ``top5_<name>`` of ``model`` on ``x_adv [n, C, H, W]`` (``ids``: the
    images' ids, named if the logits are not finite)."""
    logits = checked_logits(model, x_adv, ids, f"{name} images")
    return {f"pred_{name}": logits.argmax(1).tolist(),
            f"top5_{name}": topk_correct(logits, y, 5).tolist()}


def seeded(batch_seed: int, device: torch.device, fn: Callable[[], T]) -> T:
    """Run ``fn`` with the global RNG seeded by ``batch_seed`` and restored afterwards."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(batch_seed)
        return fn()


def process_batch(model: nn.Module, p: Plan, b: int, x: torch.Tensor, y: torch.Tensor, *,
                  done: dict[int, dict], device: torch.device,
                  emit: Callable[[list[dict]], None]) -> None:
    """Clean fields, then every column of ``p`` not yet done, for batch ``b`` of the plan.

    ``x [n, C, H, W]`` and ``y [n]`` are the batch as loaded (label -1: an unreadable file, which
    gets ``{"skipped": true}``); ``done`` holds records already on disk (a resumed batch continues
    where it stopped); ``emit`` gets every new (partial) record.
    """
    recs, kept = _start_records(p, b, y, done, emit)
    if not kept:
        return
    sel = torch.tensor(kept, device=x.device)
    x, y = x[sel].to(device), y[sel].to(device).long()  # [n, C, H, W], [n]
    batch_ids = [r["id"] for r in recs]
    if not all("pred_clean" in r for r in recs):
        logits = checked_logits(model, x, batch_ids)  # [n, K]
        target = image_targets(batch_ids, y, p.num_classes, p.seed) if p.targeted else None
        fields = {"pred_clean": logits.argmax(1).tolist(),
                  "top5_clean": topk_correct(logits, y, 5).tolist(),
                  "target": target.tolist() if target is not None else [-1] * len(recs)}
        _add(recs, fields)
        emit([{k: r[k] for k in ("index", "id", "batch", "label", *fields)} for r in recs])
    target = torch.tensor([r["target"] for r in recs], device=device) if p.targeted else None
    for col in p.columns:
        if all(col.done_key in r for r in recs):
            continue
        batch = Batch(x, y, target, batch_ids, recs, b, derive_seed(p.seed, col.seed_tag, b,
                                                                     col.name))
        try:
            fields = seeded(batch.seed, device, functools.partial(col.run, model, batch))
        except NonFiniteError as err:  # an attack names rows of its batch: say which images
            raise NonFiniteError(f"{col.name} on batch {b} (images "
                                 f"{list_some(batch_ids)}): {err}") from None
        _add(recs, fields)
        emit([{"index": r["index"], **{k: r[k] for k in fields}} for r in recs])


def _start_records(p: Plan, b: int, y: torch.Tensor, done: dict[int, dict],
                   emit: Callable[[list[dict]], None]) -> tuple[list[dict], list[int]]:
    """The records of batch ``b`` (what is on disk, plus index, id, batch, label); unreadable
    images are marked skipped (and emitted once). Returns the readable images' records and
    their positions in the batch."""
    keep = (y >= 0).tolist()
    recs = [dict(done.get(int(i), {})) for i in p.batches[b]]
    for r, i, lab in zip(recs, p.batches[b], y.tolist(), strict=True):
        r.update({"index": int(i), "id": p.ids[int(i)], "batch": int(b), "label": int(lab)})
    skipped = [r for r, k in zip(recs, keep, strict=True) if not k and not r.get("skipped")]
    for r in skipped:
        r["skipped"] = True
    if skipped:
        emit(skipped)
    kept = [j for j, k in enumerate(keep) if k]
    return [recs[j] for j in kept], kept


def _add(records: list[dict], fields: dict[str, list]) -> None:
    for k, values in fields.items():
        if len(values) != len(records):
            raise RuntimeError(f"column field {k!r} has {len(values)} values for "
                               f"{len(records)} images")
        for r, v in zip(records, values, strict=True):
            r[k] = v


def is_done(record: dict, columns: Sequence[Column]) -> bool:
    """Whether an image's record holds the clean fields and every column (or is skipped)."""
    if record.get("skipped"):
        return True
    return "pred_clean" in record and all(c.done_key in record for c in columns)


# --------------------------------------------------------------------------- the run
@dataclass
class Plan:
    """Which images, in which batches, with which columns (see the module docstring).

    Build with :func:`plan`; ``order`` holds dataset indices, ``ids`` one id per dataset image.
    """

    dataset: Dataset
    ids: list[str]
    order: list[int]
    batch_size: int
    columns: list[Column]
    targeted: bool
    seed: int
    num_classes: int
    batches: list[list[int]] = field(init=False)

    def __post_init__(self):
        self.batches = [self.order[k:k + self.batch_size]
                        for k in range(0, len(self.order), self.batch_size)]

    @property
    def ids_digest(self) -> str:
        """SHA-256 of the evaluated image ids in order: the data part of the identity."""
        return hashlib.sha256("\n".join(self.ids[i] for i in self.order).encode()).hexdigest()


def plan(model: nn.Module, dataset: Dataset, columns: Sequence[Column], *, batch_size: int,
         limit: int | None = None, seed: int = 0, targeted: bool = True,
         ids: Sequence[str] | None = None) -> Plan:
    """Validate the arguments and fix the images (``limit``: the seeded random subset)."""
    if int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"--batch-size must be a positive integer, got {batch_size}")
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be positive, got {limit}")
    names = [c.name for c in columns]
    if len(set(names)) != len(names):
        raise ValueError(f"attack names must be unique, got {names}")
    all_ids = list(ids) if ids is not None else dataset_image_ids(dataset)
    size = len(cast(Sized, dataset))  # evaluation datasets are map-style, with a length
    if len(all_ids) != size:
        raise ValueError(f"{len(all_ids)} ids for a dataset of {size} images")
    num_classes = model_num_classes(model)
    if targeted and num_classes < 2:
        raise ValueError(f"a targeted attack needs at least 2 classes, got {num_classes}")
    return Plan(dataset, all_ids, subset_indices(size, limit, seed), int(batch_size),
                list(columns), bool(targeted), int(seed), num_classes)


def run(model: nn.Module, p: Plan, out_dir: str | None, options: RunOptions | None = None, *,
        desc: str = "eval", **overrides) -> list[dict] | None:
    """Run plan ``p``: records to ``out_dir`` (resumable), or in memory when ``out_dir`` is None.

    ``options`` (:class:`~featdenoise.evaluation.options.RunOptions`, amended by ``overrides``,
    which may name only :data:`~featdenoise.evaluation.options.EXECUTION`): ``device``,
    ``rank``/``world_size``, ``max_batches``, ``num_workers``, ``progress``; its other fields fix
    the plan and the identity, before this runs. ``desc`` labels the progress bar.

    On disk: this rank takes every ``world_size``-th unfinished batch (under torchrun the ranks
    share out what is left, so a resumed run with another world size stays balanced; shards run
    by hand with ``rank``/``world_size`` take a fixed share), and the merging process (rank 0, or
    any hand-run shard that finds everything done) gets every record in evaluation order; others
    get None, as does a run stopped by ``max_batches``. In memory (training's evaluation): the
    ranks' records are gathered and every rank gets all of them. The caller has checked the
    identity of ``out_dir`` (:func:`check_identity`). The model runs in eval mode; every module's
    mode is restored afterwards.
    """
    check_keywords("run", overrides, EXECUTION)
    opts = pick(RunOptions, overrides, options)
    device = opts.torch_device()
    rank, world_size, collective = rank_world(opts.rank, opts.world_size)
    done = load_records(out_dir) if out_dir else {}
    mine = _my_batches(p, done, rank, world_size, collective)[:opts.max_batches]
    emit, memory = _sink(out_dir, rank)
    with eval_mode(model):
        model.to(device)
        if mine:
            loader = DataLoader(p.dataset, batch_sampler=[p.batches[b] for b in mine],
                                num_workers=opts.num_workers, pin_memory=device.type == "cuda")
            with _progress(len(mine), desc, opts.progress and rank == 0) as bar:
                for b, (x, y) in zip(mine, loader, strict=True):
                    process_batch(model, p, b, x, torch.as_tensor(y), done=done, device=device,
                                  emit=emit)
                    bar.update(1)
    if not out_dir:
        return _gathered(p, memory, collective)
    return _merged(p, out_dir, rank, collective)


def _my_batches(p: Plan, done: dict[int, dict], rank: int, world_size: int,
                collective: bool) -> list[int]:
    """The unfinished batches this rank runs (see :func:`run`)."""
    todo = [b for b, idx in enumerate(p.batches)
            if not all(i in done and is_done(done[i], p.columns) for i in idx)]
    if collective:
        dist.barrier()  # every rank has read the records before any rank appends
        return todo[rank::world_size]
    left = set(todo)
    return [b for b in range(rank, len(p.batches), world_size) if b in left]


def _sink(out_dir: str | None, rank: int) -> tuple[Callable[[list[dict]], None], list[dict]]:
    """``(emit, memory)``: ``emit`` appends records to this rank's part file, or to ``memory``
    when there is no ``out_dir``."""
    memory: list[dict] = []
    if not out_dir:
        return memory.extend, memory
    part = os.path.join(out_dir, PARTS_DIR, f"outcomes-rank{rank}.jsonl")
    # appended to in place: no link may lead the records out of the folder
    outdir.check_entry(out_dir, os.path.dirname(part), "records folder")
    outdir.check_entry(out_dir, part, "records")
    return functools.partial(append_records, part), memory


def _gathered(p: Plan, memory: list[dict], collective: bool) -> list[dict]:
    """Every rank's in-memory records, merged per image, in evaluation order."""
    merged: dict[int, dict] = {}
    for r in dist.all_gather_objects(memory) if collective else memory:
        merged.setdefault(int(r["index"]), {}).update(r)
    return [merged[i] for i in p.order if i in merged]


def _merged(p: Plan, out_dir: str, rank: int, collective: bool) -> list[dict] | None:
    """Every record of ``out_dir`` in evaluation order for the merging process, once all done."""
    if collective:
        dist.barrier()
        if rank != 0:
            return None
    records = load_records(out_dir)
    if not all(i in records and is_done(records[i], p.columns) for i in p.order):
        return None  # other shards still to run, or stopped early
    return [records[i] for i in p.order]


def _progress(total: int, desc: str, enabled: bool) -> tqdm:
    return tqdm(total=total, desc=desc, unit="batch", disable=not enabled, dynamic_ncols=True)
