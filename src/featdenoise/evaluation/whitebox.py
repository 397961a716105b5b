"""White-box robustness evaluation (paper Sec. 6.1, Fig. 6; official INSTRUCTIONS.md).

For each image: the clean prediction (top-1 and whether the label is in the top 5), then, for every
attack strength (e.g. PGD with 10, 100 and 1000 iterations), the prediction on the adversarial
image. From these per-image outcomes the summary reports, per attack, the *accuracy* (the
defender's number) and the *targeted attack success rate* (prediction == target; the attacker's
number), as the official model zoo does, with the number of images.

Threat model (paper Sec. 6, official ``PGDAttacker``): targeted PGD under L-inf with eps = 16 on the
0..255 scale (16/255 here, pixels are [0, 1]), step size 1 (``max(step, eps / steps)`` for the
"paper" step rule, so 1.6 for 10 iterations), a random start, and one target per image drawn
uniformly from the wrong classes. Here the target of an image is drawn from a generator seeded by
``(seed, image id)``, so it does not depend on batching, sharding or resumption; the random start of
a batch is seeded by ``(seed, batch index, attack)`` and batches are fixed by the image order, so an
evaluation split over ranks or interrupted and resumed gives exactly the same numbers.

Files written to ``out_dir``:

- ``settings.json``: everything that determines the numbers (checked on resume);
- ``parts/outcomes-rank<R>.jsonl``: per-image records appended and flushed after every batch;
- ``outcomes.jsonl``: all records merged, ordered by image, once every image is done;
  keys: ``index``, ``id``, ``batch``, ``label``, ``target`` (-1 when untargeted),
  ``pred_clean``, ``top5_clean``, and ``pred_<attack>`` per attack (e.g. ``pred_pgd100``);
- ``summary.json``, ``table.md`` and ``accuracy_vs_iterations.png`` (see :mod:`.report`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from featdenoise.runtime.atomic import atomic_write

SETTINGS_FILE = "settings.json"
OUTCOMES_FILE = "outcomes.jsonl"
SUMMARY_FILE = "summary.json"
PARTS_DIR = "parts"

# Settings that change the numbers: a resumed evaluation must use the same ones.
_RESULT_KEYS = ("attack", "steps", "eps", "step_size", "restarts", "targeted", "step_rule", "seed",
                "batch_size", "num_images", "ids_digest", "num_classes")


def derive_seed(seed: int, *parts: object) -> int:
    """A 63-bit seed from ``seed`` and any labels (image id, batch index, ...), stable across runs.

    Python's ``hash`` is salted per process, so a digest is used instead.
    """
    text = "|".join([str(int(seed))] + [str(p) for p in parts])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def image_targets(ids: Sequence[str], labels: torch.Tensor, num_classes: int,
                  seed: int) -> torch.Tensor:
    """One target per image, uniform over the wrong classes, from a generator seeded by its id.

    ``target = (label + U{1..K-1}) mod K``, as the official ``_create_random_target``; the offset of
    image ``ids[i]`` depends only on ``(seed, ids[i])``. Shapes: ``labels [N]`` -> ``[N]`` int64.
    """
    if num_classes < 2:
        raise ValueError(f"a targeted attack needs at least 2 classes, got {num_classes}")
    offsets = []
    for image_id in ids:
        g = torch.Generator().manual_seed(derive_seed(seed, "target", image_id))
        offsets.append(int(torch.randint(1, num_classes, (1,), generator=g)))
    offsets_t = torch.tensor(offsets, dtype=torch.long)
    return (labels.long().cpu() + offsets_t) % num_classes


def attack_names(attack: str, steps: Sequence[int]) -> list[str]:
    """Record keys of the attacks of a sweep: ``("pgd", [10, 100]) -> ["pgd10", "pgd100"]``."""
    return [f"{attack}{int(s)}" for s in steps]


def make_attack(name: str, model: nn.Module, *, eps: float, step_size: float = 1 / 255,
                steps: int = 10, targeted: bool = True, restarts: int = 1,
                step_rule: str = "paper", seed: int | None = None, **kwargs):
    """Build an attack of :mod:`featdenoise.attacks` by name with the evaluation's settings.

    ``eps`` and ``step_size`` are on the [0, 1] pixel scale. One-step attacks (fgsm) ignore
    ``steps``, ``restarts`` and ``step_rule``.
    """
    from featdenoise.attacks import build_attack

    kw = dict(eps=eps, targeted=targeted, seed=seed, **kwargs)
    if name != "fgsm":
        kw.update(step_size=step_size, steps=int(steps))
    if name == "pgd":
        kw.update(restarts=int(restarts), step_rule=step_rule, random_start=True)
    return build_attack(name, model, **kw)


def _topk_correct(logits: torch.Tensor, y: torch.Tensor, k: int) -> torch.Tensor:
    k = min(k, logits.shape[1])
    return (logits.topk(k, dim=1).indices == y[:, None]).any(dim=1)  # [N, k] -> [N]


def summarize(records: Sequence[dict], names: Sequence[str], targeted: bool = True) -> dict:
    """Clean top-1/top-5 and, per attack, accuracy and attack success rate, from per-image records.

    Records marked ``skipped`` (unreadable files) are left out and counted apart. A pure
    function of the records (see the module docstring for their keys). Success is
    ``pred == target`` for a targeted sweep (official ``compute_attack_success``) and
    ``pred != label`` for an untargeted one. Rates are fractions in [0, 1]; ``n`` counts images.
    """
    skipped = sum(1 for r in records if r.get("skipped"))
    records = [r for r in records if not r.get("skipped")]
    n = len(records)
    if n == 0:
        raise ValueError("no per-image records to summarize (all skipped, or none given)")

    def rate(flags) -> float:
        return sum(1 for f in flags if f) / n

    out = {
        "num_images": n,
        "skipped_images": skipped,
        "clean": {
            "top1": rate(r["pred_clean"] == r["label"] for r in records),
            "top5": rate(bool(r["top5_clean"]) for r in records),
            "n": n,
        },
        "attacks": [],
    }
    for name in names:
        key = f"pred_{name}"
        acc = rate(r[key] == r["label"] for r in records)
        if targeted:
            succ = rate(r[key] == r["target"] for r in records)
        else:
            succ = rate(r[key] != r["label"] for r in records)
        out["attacks"].append({"name": name, "accuracy": acc, "success_rate": succ, "n": n})
    return out


# --------------------------------------------------------------------------- per-image record files
def _read_jsonl(path: str) -> list[dict]:
    """Records of a JSONL file; a line cut short by an interruption is dropped."""
    out = []
    if not os.path.isfile(path):
        return out
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # partially written last line of an interrupted run
    return out


def load_records(out_dir: str) -> dict[int, dict]:
    """Every per-image record in ``out_dir`` (merged file and per-rank parts), by image index."""
    records: dict[int, dict] = {}
    paths = [os.path.join(out_dir, OUTCOMES_FILE)]
    parts = os.path.join(out_dir, PARTS_DIR)
    if os.path.isdir(parts):
        paths += [os.path.join(parts, p) for p in sorted(os.listdir(parts)) if p.endswith(".jsonl")]
    for path in paths:
        for r in _read_jsonl(path):
            records[int(r["index"])] = r
    return records


def append_records(path: str, records: Sequence[dict]) -> None:
    """Append records as JSON lines and push them to disk (flush + fsync): a kill loses no batch."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as f:
        f.write("".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
        f.flush()
        os.fsync(f.fileno())


def _write_json(path: str, obj: dict) -> None:
    with atomic_write(path) as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def _check_settings(out_dir: str, settings: dict, write: bool = True,
                    keys: Sequence[str] = _RESULT_KEYS) -> None:
    """Check that a resumed run has the same result-defining settings, or write them."""
    path = os.path.join(out_dir, SETTINGS_FILE)
    if os.path.isfile(path):
        with open(path) as f:
            old = json.load(f)
        diff = [k for k in keys if old.get(k) != settings.get(k)]
        if diff:
            pairs = ", ".join(f"{k}: {old.get(k)!r} -> {settings.get(k)!r}" for k in diff)
            raise ValueError(
                f"{out_dir!r} holds an evaluation with other settings ({pairs}); "
                "resume with the same settings or choose a new --out folder")
    elif write:
        _write_json(path, settings)


# --------------------------------------------------------------------------- distributed helpers
def _rank_world(rank: int | None, world_size: int | None) -> tuple[int, int, bool]:
    """``(rank, world_size, collective)``; collective: the ranks come from torch.distributed."""
    if rank is not None or world_size is not None:
        if rank is None or world_size is None or not 0 <= rank < world_size:
            raise ValueError(f"give both rank and world_size with 0 <= rank < world_size, "
                             f"got rank={rank}, world_size={world_size}")
        return int(rank), int(world_size), False
    from featdenoise.runtime import distributed as dist

    return int(dist.rank()), int(dist.world_size()), dist.is_dist()


def _barrier() -> None:
    from featdenoise.runtime import distributed as dist

    dist.barrier()


def _shard(n: int, rank: int, world_size: int) -> list[int]:
    """Round-robin share of ``n`` batches for ``rank`` (whole batches, so batches never change)."""
    from featdenoise.runtime.distributed import ShardSampler

    return list(ShardSampler(n, world_size, rank))


def default_device() -> torch.device:
    """``cuda:<LOCAL_RANK>`` when a GPU is present (torchrun sets LOCAL_RANK), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def model_num_classes(model: nn.Module) -> int:
    """``model.num_classes`` (every model of the library has it)."""
    k = getattr(model, "num_classes", None)
    if k is None:
        raise ValueError("the model has no num_classes attribute; build it with "
                         "featdenoise.models.create_model or set model.num_classes")
    return int(k)


def subset_indices(n: int, limit: int | None, seed: int = 0) -> list[int]:
    """Image indices to evaluate: all ``n``, or a fixed random subset of ``limit`` in sorted order.

    A random subset (not the first ``limit``) because ImageNet's validation folder is sorted by
    class; the subset depends only on ``(n, limit, seed)``.
    """
    if limit is None or limit >= n:
        return list(range(n))
    if limit <= 0:
        raise ValueError(f"--limit must be positive, got {limit}")
    g = torch.Generator().manual_seed(derive_seed(seed, "subset", n, limit))
    return sorted(torch.randperm(n, generator=g)[:limit].tolist())


# --------------------------------------------------------------------------- the evaluation
def evaluate_whitebox(
    model: nn.Module,
    dataset: Dataset,
    out_dir: str,
    *,
    steps: Sequence[int] = (10, 100, 1000),
    attack: str = "pgd",
    eps: float = 16 / 255,
    step_size: float = 1 / 255,
    restarts: int = 1,
    targeted: bool = True,
    step_rule: str = "paper",
    seed: int = 0,
    batch_size: int = 32,
    limit: int | None = None,
    ids: Sequence[str] | None = None,
    name: str | None = None,
    device: torch.device | str | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    max_batches: int | None = None,
    num_workers: int = 0,
    progress: bool = True,
    fast: bool = False,
    extra: dict | None = None,
) -> dict | None:
    """Evaluate ``model`` on ``dataset`` clean and under an attack at several iteration counts.

    Paper Sec. 6.1 / Fig. 6. Resumable: records already in ``out_dir`` are kept and only the
    remaining batches run. Distributed: under torchrun each rank takes every ``world_size``-th batch
    (``featdenoise.runtime.distributed`` gives rank and size) and rank 0 merges; in one process,
    ``rank``/``world_size`` may be given to run one shard by hand (the last shard to finish merges).

    Args:
        model: classifier taking ``[N, C, H, W]`` pixels in [0, 1], returning logits ``[N, K]``;
            needs ``model.num_classes``. Put in eval mode here (BatchNorm in inference mode).
        dataset: yields ``(image [C, H, W] in [0, 1], label int)``.
        out_dir: output folder (created; reused to resume).
        steps: attack iteration counts, e.g. ``(10, 100, 1000)``; one record column each
            (sorted, duplicates dropped; ``fgsm`` has exactly one step).
        attack: attack name of :func:`featdenoise.attacks.build_attack` (``pgd`` in the paper).
        eps, step_size: L-inf radius and step on the [0, 1] scale (paper: 16/255 and 1/255).
        restarts: random restarts per attack (PGD).
        targeted: paper's targeted attacks with a random wrong target per image (default) or
            untargeted attacks (success = misclassification).
        step_rule: "paper" uses ``max(step_size, eps / steps)`` (Sec. 6.1) as the official code.
        seed: seeds targets, random starts and the ``limit`` subset.
        batch_size: images per batch; part of the settings (it fixes the random starts).
        limit: evaluate a fixed random subset of this many images (see :func:`subset_indices`).
        ids: one id per dataset image (default: file stems where known, else indices).
        name: model label in tables and plots (default: the folder name of ``out_dir``).
        device: default :func:`default_device`.
        rank, world_size: run one shard by hand (no collectives); default from torch.distributed.
        max_batches: stop after this many batches of this call (an interruption, for tests).
        fast: let the attack fold BatchNorm into the convolutions and run them on packed weights
            (``exact=not fast`` of :class:`~featdenoise.attacks.base.Attack`): the same
            function up to float rounding, ~1.3x faster on a CPU; off by default for bit-level
            agreement with the official attacker. Recorded in the settings; a resumed run may
            change it (it moves no result beyond rounding).
        extra: more JSON-able facts stored in settings and summary (model source, dataset name).

    Returns:
        The summary dict (also written to ``summary.json``) when every image is done and this
        process merged the results; None otherwise (other ranks, or stopped by ``max_batches``).
    """
    from featdenoise.data.files import dataset_image_ids

    steps = sorted({int(s) for s in steps})
    if attack == "fgsm":
        steps = [1]  # one step by definition; a sweep over iterations means nothing
    if not steps or any(s < 1 for s in steps):
        raise ValueError(f"--steps must be positive iteration counts, got {steps}")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be positive, got {batch_size}")
    rank, world_size, collective = _rank_world(rank, world_size)
    device = torch.device(device) if device is not None else default_device()
    names = attack_names(attack, steps)
    num_classes = model_num_classes(model)
    all_ids = list(ids) if ids is not None else dataset_image_ids(dataset)
    if len(all_ids) != len(dataset):
        raise ValueError(f"{len(all_ids)} ids for a dataset of {len(dataset)} images")
    order = subset_indices(len(dataset), limit, seed)
    settings = {
        "name": name or os.path.basename(os.path.normpath(out_dir)),
        "attack": attack, "steps": steps, "eps": float(eps), "step_size": float(step_size),
        "eps_255": round(float(eps) * 255, 6), "step_size_255": round(float(step_size) * 255, 6),
        "restarts": int(restarts), "targeted": bool(targeted), "step_rule": step_rule,
        "seed": int(seed), "batch_size": int(batch_size), "num_images": len(order),
        "limit": limit, "num_classes": num_classes, "fast": bool(fast),
        "ids_digest": hashlib.sha256("\n".join(all_ids[i] for i in order).encode()).hexdigest(),
        **(extra or {}),
    }
    os.makedirs(out_dir, exist_ok=True)
    _check_settings(out_dir, settings, write=rank == 0)

    records = run_batches(
        out_dir, dataset, order, batch_size, settings["name"],
        lambda x, y, b, indices: _evaluate_batch(
            model, x, y, b, indices, all_ids, names, steps, attack=attack, eps=eps,
            step_size=step_size, restarts=restarts, targeted=targeted, step_rule=step_rule,
            seed=seed, num_classes=num_classes, device=device, fast=fast),
        model=model, device=device, rank=rank, world_size=world_size, collective=collective,
        max_batches=max_batches, num_workers=num_workers, progress=progress)
    if records is None:
        return None
    return finalize(out_dir, records, settings)


def run_batches(out_dir: str, dataset: Dataset, order: Sequence[int], batch_size: int,
                desc: str, process, *, model: nn.Module, device: torch.device, rank: int,
                world_size: int, collective: bool, max_batches: int | None = None,
                num_workers: int = 0, progress: bool = True) -> list[dict] | None:
    """Resumable, sharded loop over fixed batches of ``order``; per-image records go to disk.

    Batches are ``order`` cut into ``batch_size`` pieces, so a batch's images never depend on
    the number of ranks; this rank takes every ``world_size``-th batch, skips batches whose images
    all have records already, and calls ``process(x, y, batch_index, indices) -> records`` on the
    rest, appending its records to ``parts/outcomes-rank<rank>.jsonl`` after each batch.

    Returns the records of every image of ``order`` (in that order) when all are done and this
    process is the one to merge (rank 0, or any rank when run by hand), else None.
    """
    batches = [list(order[k:k + batch_size]) for k in range(0, len(order), batch_size)]
    done = load_records(out_dir)
    todo = [b for b in range(len(batches)) if not all(i in done for i in batches[b])]
    if collective:
        # Every rank has read the same records before any rank writes: share out what is left,
        # so a resumed run (even with another world size) keeps the ranks equally busy.
        _barrier()
        mine = [todo[j] for j in _shard(len(todo), rank, world_size)]
    else:
        # Shards run by hand, one after another: a fixed share of all batches per rank.
        left = set(todo)
        mine = [b for b in _shard(len(batches), rank, world_size) if b in left]
    if max_batches is not None:
        mine = mine[:max_batches]
    if mine:
        part = os.path.join(out_dir, PARTS_DIR, f"outcomes-rank{rank}.jsonl")
        was_training = model.training
        model.eval().to(device)
        loader = DataLoader(dataset, batch_sampler=[batches[b] for b in mine],
                            num_workers=num_workers)
        bar = _progress(len(mine), desc, progress and rank == 0)
        try:
            for b, (x, y) in zip(mine, loader, strict=True):
                append_records(part, process(x, torch.as_tensor(y), b, batches[b]))
                bar.update(1)
        finally:
            bar.close()
            model.train(was_training)
    if collective:
        _barrier()
        if rank != 0:
            return None
    records = load_records(out_dir)
    if not all(i in records for i in order):
        return None  # other shards still to run, or stopped early
    return [records[i] for i in order]


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="batch", disable=not enabled, dynamic_ncols=True)


def _evaluate_batch(model, x, y, batch_index, indices, all_ids, names, steps, *, attack, eps,
                    step_size, restarts, targeted, step_rule, seed, num_classes,
                    device, fast=False) -> list[dict]:
    """Clean and attacked predictions of one batch as per-image records.

    Images with label -1 (files the dataset could not read) get a record ``{"skipped": true}``
    and are left out of every statistic.
    """
    keep = (y >= 0).tolist()
    base = [{"index": int(i), "id": all_ids[i], "batch": int(batch_index), "label": int(lab)}
            for i, lab in zip(indices, y.tolist(), strict=True)]
    kept = [j for j, k in enumerate(keep) if k]
    for j, k in enumerate(keep):
        if not k:
            base[j]["skipped"] = True
    if not kept:
        return base
    sel = torch.tensor(kept)
    x, y = x[sel].to(device), y[sel].to(device).long()  # [n, C, H, W], [n]
    batch_ids = [base[j]["id"] for j in kept]
    with torch.no_grad():
        logits = model(x)  # [n, K]
    rec = {
        "pred_clean": logits.argmax(1).tolist(),
        "top5_clean": _topk_correct(logits, y, 5).tolist(),
    }
    target = image_targets(batch_ids, y, num_classes, seed).to(device) if targeted else None
    for name, n in zip(names, steps, strict=True):
        s = derive_seed(seed, "start", batch_index, name)
        atk = make_attack(attack, model, eps=eps, step_size=step_size, steps=n, targeted=targeted,
                          restarts=restarts, step_rule=step_rule, seed=s, exact=not fast)
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(s)
            x_adv = atk.attack(x, y, target=target)
        with torch.no_grad():
            rec[f"pred_{name}"] = model(x_adv).argmax(1).tolist()  # [n]
    targets = target.tolist() if target is not None else [-1] * len(kept)
    for m, j in enumerate(kept):
        base[j]["target"] = targets[m]
        base[j].update({k: v[m] for k, v in rec.items()})
    return base


def finalize(out_dir: str, records: Sequence[dict], settings: dict) -> dict:
    """Write ``outcomes.jsonl``, ``summary.json``, ``table.md``, the Fig. 6 plot; return summary."""
    from featdenoise.evaluation import report

    names = attack_names(settings["attack"], settings["steps"])
    summary = {**settings, **summarize(records, names, settings["targeted"])}
    for entry, n in zip(summary["attacks"], settings["steps"], strict=True):
        entry["steps"] = n
    with atomic_write(os.path.join(out_dir, OUTCOMES_FILE)) as f:
        f.write("".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
    _write_json(os.path.join(out_dir, SUMMARY_FILE), summary)
    report.write_report([summary], out_dir)
    return summary
