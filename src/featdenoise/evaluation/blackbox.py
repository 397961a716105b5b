"""Black-box evaluation with the "all-or-nothing" criterion (paper Sec. 6.2, Table 2).

The defended model faces a set of attackers; each produces one adversarial version of every clean
image. Reported are the accuracy against each attacker and the *all-or-nothing* accuracy of the
CAAD 2018 defence track: an image counts as correct only if the model classifies every attacker's
version of it correctly (:func:`all_or_nothing`).

Attackers are of two kinds:

- *transfer* attackers: an attack (``pgd``, ``fgsm``, ``ifgsm``, ``mifgsm``) run on a *source*
  model (any registered model or checkpoint), whose adversarial images are then shown to the
  defended model. The paper follows the CAAD black-box setting, eps = 32 (0..255 scale) per pixel,
  while its models are trained with eps = 16. The paper does not say whether its five CAAD 2017
  attackers were targeted; the two it cites (footnotes 5, 6) are entries of the *non-targeted*
  track and the criterion scored is accuracy, so transfer attacks here are untargeted by default
  (``targeted=True`` gives the white-box threat model's random-target variant instead).
- *folder* attackers: a folder of adversarial images produced elsewhere (how CAAD attackers
  deliver), matched to the clean images by file name (:func:`featdenoise.data.files.match_files`).
  The image shown is the file's pixels, optionally clipped back into the eps-box of the clean
  image (``clip_eps``, what the competition's harness did); the largest L-inf distance found per
  attacker is reported either way.

Output folder: ``settings.json``, per-image records (``outcomes.jsonl``: ``index``, ``id``,
``label``, ``pred_clean``, ``pred_<attacker>``, and for folders ``linf_<attacker>`` on the 0..255
scale), ``summary.json`` and ``table.md``. Resumable and shardable like the white-box evaluation.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.data import Dataset

from featdenoise.evaluation import whitebox as wb
from featdenoise.runtime.atomic import atomic_write

TRANSFER_ATTACKS = ("pgd", "fgsm", "ifgsm", "mifgsm")


def all_or_nothing(correct: Mapping[str, Sequence[bool]]) -> dict:
    """Accuracy per attacker and the all-or-nothing accuracy (paper Sec. 6.2, CAAD 2018 criterion).

    Args:
        correct: ``{attacker: per-image correctness}``, every sequence over the same images in the
            same order (bools or 0/1).
    Returns:
        ``{"per_attacker": {attacker: fraction correct}, "all_or_nothing": fraction of images
        correct under every attacker, "n": number of images}``. With no attacker the
        all-or-nothing accuracy is undefined and raises ValueError.
    """
    if not correct:
        raise ValueError("all-or-nothing needs at least one attacker")
    lengths = {name: len(v) for name, v in correct.items()}
    n = next(iter(lengths.values()))
    if any(m != n for m in lengths.values()):
        raise ValueError(f"attackers cover different numbers of images: {lengths}")
    if n == 0:
        raise ValueError("all-or-nothing needs at least one image")
    per = {name: sum(1 for c in v if c) / n for name, v in correct.items()}
    every = sum(1 for flags in zip(*correct.values(), strict=True) if all(flags)) / n
    return {"per_attacker": per, "all_or_nothing": every, "n": n}


@dataclass
class TransferAttacker:
    """An attack crafted on a source model; ``name`` labels it in records and tables."""

    name: str
    source: nn.Module
    attack: str
    kwargs: dict = field(default_factory=dict)


@dataclass
class FolderAttacker:
    """A folder of adversarial images matched to the clean images by file name."""

    name: str
    folder: str
    files: dict[str, str] = field(default_factory=dict)  # image id -> file name


def transfer_attackers(sources: Sequence[tuple[str, nn.Module]],
                       attacks: Sequence[str] = TRANSFER_ATTACKS,
                       **kwargs) -> list[TransferAttacker]:
    """Every (source model, attack) pair as a :class:`TransferAttacker` named ``source:attack``."""
    out = []
    for src_name, src in sources:
        for a in attacks:
            if a not in TRANSFER_ATTACKS:
                raise ValueError(f"unknown source attack {a!r}; choose from "
                                 f"{', '.join(TRANSFER_ATTACKS)}")
            out.append(TransferAttacker(f"{src_name}:{a}", src, a, dict(kwargs)))
    return out


def folder_attackers(folders: Sequence[str], ids: Sequence[str],
                     allow_missing: bool = False) -> list[FolderAttacker]:
    """One :class:`FolderAttacker` per folder, named by the folder, its files matched to ``ids``.

    A folder lacking some images raises ValueError naming a few, unless ``allow_missing``: then the
    clean image stands in for each missing one (the attacker "gave up" on it).
    """
    from featdenoise.data.files import match_files

    out, seen = [], set()
    for folder in folders:
        name = os.path.basename(os.path.normpath(folder)) or folder
        while name in seen:
            name += "_"
        seen.add(name)
        files = match_files(ids, folder)
        missing = [i for i in ids if i not in files]
        if missing and not allow_missing:
            raise ValueError(
                f"adversarial folder {folder!r} lacks {len(missing)} of {len(ids)} images "
                f"(e.g. {', '.join(missing[:3])}); name files like the clean images, or pass "
                "--allow-missing to use the clean image for those")
        out.append(FolderAttacker(f"dir:{name}", folder, files))
    return out


def evaluate_blackbox(
    model: nn.Module,
    dataset: Dataset,
    out_dir: str,
    attackers: Sequence[TransferAttacker | FolderAttacker],
    *,
    eps: float = 32 / 255,
    clip_eps: bool = False,
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
    save_adv: str | None = None,
    extra: dict | None = None,
) -> dict | None:
    """Evaluate ``model`` against ``attackers``: per-attacker and all-or-nothing accuracy (6.2).

    Args:
        model: the defended classifier (pixels [0, 1] ``[N, C, H, W]`` -> logits ``[N, K]``).
        dataset: the clean images, ``(image [C, H, W], label)``; folder attackers are matched to
            its image ids (file stems, or indices for datasets without files).
        out_dir: output folder (reused to resume).
        attackers: from :func:`transfer_attackers` and :func:`folder_attackers`.
        eps: L-inf radius of the attacks on the [0, 1] scale (paper: 32/255); transfer attacks use
            it, folder images are clipped to it when ``clip_eps``.
        seed: seeds the transfer attacks (random starts, targets if targeted).
        batch_size, limit, ids, name, device, rank, world_size, max_batches, num_workers,
        progress, extra: as in :func:`featdenoise.evaluation.whitebox.evaluate_whitebox`.
        save_adv: if given, the transfer attackers' images are also written there as PNG,
            ``<save_adv>/<source>_<attack>/<image id>.png``, a folder per attacker that
            ``folder_attackers`` (``--adv-dirs``) reads back, e.g. to attack other defences with
            the same images. 8-bit rounding may move a pixel by up to 0.5/255 past eps.

    Returns:
        The summary (``summary.json``) once every image is done, else None.
    """
    from featdenoise.data.files import dataset_image_ids

    if not attackers:
        raise ValueError("give at least one attacker (--source or --adv-dirs)")
    names = [a.name for a in attackers]
    if len(set(names)) != len(names):
        raise ValueError(f"attacker names must be unique, got {names}")
    rank, world_size, collective = wb._rank_world(rank, world_size)
    device = torch.device(device) if device is not None else wb.default_device()
    all_ids = list(ids) if ids is not None else dataset_image_ids(dataset)
    if len(all_ids) != len(dataset):
        raise ValueError(f"{len(all_ids)} ids for a dataset of {len(dataset)} images")
    order = wb.subset_indices(len(dataset), limit, seed)
    num_classes = wb.model_num_classes(model)
    settings = {
        "name": name or os.path.basename(os.path.normpath(out_dir)),
        "kind": "blackbox",
        "attackers": [_describe(a) for a in attackers],
        "eps": float(eps), "eps_255": round(float(eps) * 255, 6), "clip_eps": bool(clip_eps),
        "seed": int(seed), "batch_size": int(batch_size), "num_images": len(order),
        "limit": limit, "num_classes": num_classes,
        "ids_digest": hashlib.sha256("\n".join(all_ids[i] for i in order).encode()).hexdigest(),
        **(extra or {}),
    }
    os.makedirs(out_dir, exist_ok=True)
    _check_settings(out_dir, settings, write=rank == 0)
    for a in attackers:
        if isinstance(a, TransferAttacker):
            a.source.eval().to(device)

    def process(x, y, b, indices):
        return _blackbox_batch(model, x, y, b, indices, all_ids, attackers, eps=eps,
                               clip_eps=clip_eps, seed=seed, device=device, save_adv=save_adv)

    records = wb.run_batches(out_dir, dataset, order, batch_size, f"blackbox {settings['name']}",
                             process, model=model, device=device, rank=rank,
                             world_size=world_size, collective=collective,
                             max_batches=max_batches, num_workers=num_workers, progress=progress)
    if records is None:
        return None
    return finalize_blackbox(out_dir, records, settings)


def adv_folder_name(attacker: str) -> str:
    """Folder name for an attacker's saved images: ``"src:pgd" -> "src_pgd"``."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in attacker)


def _describe(a: TransferAttacker | FolderAttacker) -> dict:
    if isinstance(a, FolderAttacker):
        return {"name": a.name, "kind": "folder", "folder": os.path.abspath(a.folder)}
    kw = {k: v for k, v in a.kwargs.items() if isinstance(v, (int, float, str, bool))}
    return {"name": a.name, "kind": "transfer", "attack": a.attack, **kw}


_BLACKBOX_KEYS = ("attackers", "eps", "clip_eps", "seed", "batch_size", "num_images", "ids_digest",
                  "num_classes")


def _check_settings(out_dir: str, settings: dict, write: bool) -> None:
    wb._check_settings(out_dir, settings, write=write, keys=_BLACKBOX_KEYS)


def _blackbox_batch(model, x, y, batch_index, indices, all_ids, attackers, *, eps, clip_eps,
                    seed, device, save_adv=None) -> list[dict]:
    """Clean and per-attacker predictions of one batch as per-image records."""
    from featdenoise.data.files import load_image

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
    rec: dict[str, list] = {}
    with torch.no_grad():
        rec["pred_clean"] = model(x).argmax(1).tolist()
    for a in attackers:
        if isinstance(a, TransferAttacker):
            s = wb.derive_seed(seed, "transfer", batch_index, a.name)
            kw = dict(a.kwargs)
            targeted = bool(kw.pop("targeted", False))
            atk = wb.make_attack(a.attack, a.source, eps=eps, targeted=targeted, seed=s,
                                 num_classes=wb.model_num_classes(model), **kw)
            target = None
            if targeted:
                target = wb.image_targets(batch_ids, y, wb.model_num_classes(model), seed)
                target = target.to(device)
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(s)
                x_adv = atk.attack(x, y, target=target)
            if save_adv:
                from featdenoise.data.files import save_image

                sub = os.path.join(save_adv, adv_folder_name(a.name))
                for m, image_id in enumerate(batch_ids):
                    save_image(x_adv[m], os.path.join(sub, f"{image_id}.png"))
        else:
            advs = []
            for m, image_id in enumerate(batch_ids):
                f = a.files.get(image_id)
                if f is None:
                    advs.append(x[m])  # missing: the clean image stands in (allow_missing)
                    continue
                xa = load_image(os.path.join(a.folder, f), channels=x.shape[1]).to(device)
                if xa.shape != x[m].shape:
                    raise ValueError(
                        f"{os.path.join(a.folder, f)} is {tuple(xa.shape)} (C, H, W) but the "
                        f"clean image {image_id!r} is {tuple(x[m].shape)}; the adversarial "
                        "images must have the clean images' size")
                advs.append(xa)
            x_adv = torch.stack(advs)  # [n, C, H, W]
            linf = (x_adv - x).abs().flatten(1).amax(1) * 255  # [n], 0..255 scale
            rec[f"linf_{a.name}"] = [round(float(v), 4) for v in linf]
            if clip_eps:
                x_adv = torch.minimum(torch.maximum(x_adv, x - eps), x + eps).clamp(0, 1)
        with torch.no_grad():
            rec[f"pred_{a.name}"] = model(x_adv).argmax(1).tolist()  # [n]
    for m, j in enumerate(kept):
        base[j].update({k: v[m] for k, v in rec.items()})
    return base


def summarize_blackbox(records: Sequence[dict], names: Sequence[str]) -> dict:
    """Clean accuracy, per-attacker and all-or-nothing accuracy from per-image records (pure)."""
    skipped = sum(1 for r in records if r.get("skipped"))
    records = [r for r in records if not r.get("skipped")]
    if not records:
        raise ValueError("no per-image records to summarize (all skipped, or none given)")
    correct = {a: [r[f"pred_{a}"] == r["label"] for r in records] for a in names}
    out = all_or_nothing(correct)
    n = len(records)
    out["num_images"] = n
    out["skipped_images"] = skipped
    out["clean"] = sum(1 for r in records if r["pred_clean"] == r["label"]) / n
    linf = {a: max(r[f"linf_{a}"] for r in records) for a in names
            if f"linf_{a}" in records[0]}
    if linf:
        out["max_linf_255"] = linf
    return out


def finalize_blackbox(out_dir: str, records: Sequence[dict], settings: dict) -> dict:
    """Write ``outcomes.jsonl``, ``summary.json`` and ``table.md``; return the summary."""
    import json

    from featdenoise.evaluation import report

    names = [a["name"] for a in settings["attackers"]]
    summary = {**settings, **summarize_blackbox(records, names)}
    with atomic_write(os.path.join(out_dir, wb.OUTCOMES_FILE)) as f:
        f.write("".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
    wb._write_json(os.path.join(out_dir, wb.SUMMARY_FILE), summary)
    table = os.path.join(out_dir, report.TABLE_FILE)
    with atomic_write(table) as f:
        f.write(report.blackbox_table(summary))
    return summary
