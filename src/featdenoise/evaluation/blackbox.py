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
scale and ``missing_<attacker>`` when the clean image stood in for a missing file),
``summary.json`` and ``table.md``. Images, sharding, resumption and the refusal to mix two
evaluations in one folder are the engine's (:mod:`featdenoise.evaluation.engine`), so ``blackbox
--limit N`` evaluates the same images as ``eval --limit N`` with the same seed. The attackers
become a job (:func:`blackbox_job`) run by :func:`featdenoise.evaluation.evaluate.evaluate`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence, Sized
from dataclasses import dataclass, field
from typing import cast

import torch
from torch import nn
from torch.utils.data import Dataset

from featdenoise.data.files import load_image, match_files, save_image
from featdenoise.evaluation import engine, report
from featdenoise.evaluation.evaluate import Job, evaluate
from featdenoise.evaluation.metrics import all_or_nothing, kept
from featdenoise.evaluation.options import RunOptions, split_settings
from featdenoise.evaluation.whitebox import ATTACKS, attack_column, make_attack
from featdenoise.models import model_num_classes
from featdenoise.runtime import outdir
from featdenoise.runtime.atomic import atomic_write

TRANSFER_ATTACKS = ATTACKS  # every sweep attack of the registry transfers


@dataclass
class TransferAttacker:
    """An attack crafted on a source model; ``name`` labels it in records and tables."""

    name: str
    source: nn.Module
    attack: str
    kwargs: dict = field(default_factory=dict)


@dataclass
class FolderAttacker:
    """A folder of adversarial images matched to the clean images by file name.

    ``files`` maps image id -> file name for the images found; ``allow_missing``: a missing
    image is replaced by the clean one (counted in the summary), else it is an error.
    """

    name: str
    folder: str
    files: dict[str, str] = field(default_factory=dict)
    allow_missing: bool = False


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


def folder_attackers(folders: Sequence[str], allow_missing: bool = False) -> list[FolderAttacker]:
    """One :class:`FolderAttacker` per folder, named ``dir:<folder name>``.

    Files are matched to the evaluated images when the evaluation runs (so only the images it
    evaluates must be there; see :func:`featdenoise.data.files.match_files`).
    """
    out, seen = [], set()
    for folder in folders:
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"adversarial folder {folder} does not exist")
        name = os.path.basename(os.path.normpath(folder)) or folder
        while name in seen:
            name += "_"
        seen.add(name)
        out.append(FolderAttacker(f"dir:{name}", folder, allow_missing=allow_missing))
    return out


def _match(attackers: Sequence[TransferAttacker | FolderAttacker], ids: Sequence[str]) -> None:
    """Match every folder attacker to the evaluated ``ids``; refuse missing files unless allowed."""
    for a in attackers:
        if not isinstance(a, FolderAttacker):
            continue
        a.files = match_files(ids, a.folder)
        missing = [i for i in ids if i not in a.files]
        if missing and not a.allow_missing:
            raise ValueError(
                f"adversarial folder {a.folder} lacks {len(missing)} of the {len(ids)} evaluated "
                f"images (e.g. {', '.join(missing[:3])}); name files like the clean images, or "
                "pass --allow-missing to use the clean image for those (they are counted)")


def _folder_column(a: FolderAttacker, eps: float, clip_eps: bool) -> engine.Column:
    """The attacker's files for the batch, optionally clipped into the eps-box, classified."""
    def run(model: nn.Module, batch: engine.Batch) -> dict:
        x = batch.x
        advs, missing = [], []
        for m, image_id in enumerate(batch.ids):
            f = a.files.get(image_id)
            missing.append(f is None)
            if f is None:
                advs.append(x[m])  # the attacker gave up on it: the clean image stands in
                continue
            path = os.path.join(a.folder, f)
            xa = load_image(path, channels=x.shape[1]).to(x.device)
            if xa.shape != x[m].shape:
                raise ValueError(
                    f"{path} is {tuple(xa.shape)} (C, H, W) but the clean image {image_id!r} "
                    f"is {tuple(x[m].shape)}; the adversarial images must have the clean "
                    "images' size")
            advs.append(xa)
        x_adv = torch.stack(advs)  # [n, C, H, W]
        linf = (x_adv - x).abs().flatten(1).amax(1) * 255  # [n], 0..255 scale
        if clip_eps:
            x_adv = torch.minimum(torch.maximum(x_adv, x - eps), x + eps).clamp(0, 1)
        out = engine.predict_fields(model, a.name, x_adv, batch.y, batch.ids)
        out[f"linf_{a.name}"] = [round(float(v), 4) for v in linf]
        out[f"missing_{a.name}"] = missing
        return out

    return engine.Column(a.name, run)


def _transfer_column(a: TransferAttacker, eps: float, save_adv: str | None, exact: bool,
                     num_classes: int) -> engine.Column:
    """The attack run on the source model; its images shown to the defended model."""
    kw = dict(a.kwargs)
    targeted = bool(kw.pop("targeted", False))
    kw.setdefault("num_classes", num_classes)  # the source may not know the defended label set
    inner = attack_column(a.name, a.attack, source=a.source, seed_tag="transfer", eps=eps,
                          targeted=targeted, exact=exact, **kw)
    if not save_adv:
        return inner

    def run(model: nn.Module, batch: engine.Batch) -> dict:
        atk = make_attack(a.attack, a.source, eps=eps, targeted=targeted, seed=batch.seed,
                          exact=exact, **kw)
        x_adv = atk.attack(batch.x, batch.y, target=batch.target if targeted else None)
        sub = outdir.child(save_adv, adv_folder_name(a.name), "--save-adv folder")
        for m, image_id in enumerate(batch.ids):
            save_image(x_adv[m], os.path.join(sub, f"{image_id}.png"))
        return engine.predict_fields(model, a.name, x_adv, batch.y, batch.ids)

    return engine.Column(a.name, run, seed_tag="transfer")


@dataclass(frozen=True)
class BlackboxSettings:
    """The attack settings of a black-box evaluation (paper Sec. 6.2); see
    :func:`evaluate_blackbox` for each field."""

    eps: float = 32 / 255
    clip_eps: bool = False
    targeted: bool = False
    save_adv: str | None = None


def evaluate_blackbox(model: nn.Module, dataset: Dataset, out_dir: str,
                      attackers: Sequence[TransferAttacker | FolderAttacker], *,
                      options: RunOptions | None = None, **settings) -> dict | None:
    """Evaluate ``model`` against ``attackers``: per-attacker and all-or-nothing accuracy (6.2).

    Args:
        model: the defended classifier (pixels [0, 1] ``[N, C, H, W]`` -> logits ``[N, K]``).
        dataset: the clean images, ``(image [C, H, W], label)``; folder attackers are matched to
            its image ids (file stems, or indices for datasets without files).
        out_dir: output folder (reused to resume).
        attackers: from :func:`transfer_attackers` and :func:`folder_attackers`.
        options: how to run (:class:`~featdenoise.evaluation.options.RunOptions`), as in
            :func:`featdenoise.evaluation.whitebox.evaluate_whitebox`; ``seed`` also seeds the
            transfer attacks (random starts, targets).
        **settings: the fields of :class:`BlackboxSettings` and of ``RunOptions``; any other
            keyword is a ``TypeError``. The attack settings:

            - ``eps``: L-inf radius of the attacks on the [0, 1] scale (paper and default:
              32/255); transfer attacks use it, folder images are clipped to it when
              ``clip_eps``.
            - ``clip_eps``: clip the folder attackers' images into the eps-box of the clean image.
            - ``targeted``: transfer attacks aim at the engine's random target per image
              (default: untargeted, the CAAD non-targeted track).
            - ``save_adv``: if given, the transfer attackers' images are also written there as
              PNG, ``<save_adv>/<source>_<attack>/<image id>.png``, a folder per attacker that
              ``folder_attackers`` (``--adv-dirs``) reads back, e.g. to attack other defences
              with the same images. 8-bit rounding may move a pixel by up to 0.5/255 past eps.

    Returns:
        The summary (``summary.json``) once every image is done, else None.
    """
    threat, run = split_settings("evaluate_blackbox", settings, BlackboxSettings, options)
    job = blackbox_job(model, dataset, attackers, threat, run.exact)
    return evaluate(model, dataset, out_dir, job, run)


def blackbox_job(model: nn.Module, dataset: Dataset,
                 attackers: Sequence[TransferAttacker | FolderAttacker], s: BlackboxSettings,
                 exact: bool = False) -> Job:
    """One column per attacker, the attackers' settings, the source models (checked first)."""
    if not attackers:
        raise ValueError("give at least one attacker (--source or --adv-dirs)")
    if not 0 < s.eps <= 1:
        raise ValueError(f"eps={s.eps:g} is outside (0, 1] (the [0, 1] pixel scale)")
    transfers = [a for a in attackers if isinstance(a, TransferAttacker)]
    channels = _channels(dataset)
    for a in transfers:
        a.kwargs.setdefault("targeted", s.targeted)
        # A bad option (step_size=inf...) is refused now, before the folder is written.
        make_attack(a.attack, a.source, eps=s.eps, exact=exact, **a.kwargs)
        c = getattr(a.source, "in_channels", None)
        if c is not None and channels is not None and int(c) != channels:
            raise ValueError(f"source model of {a.name} takes {c}-channel images but the "
                             f"clean images have {channels}; use a source trained on "
                             "this data")
    k = model_num_classes(model)
    columns = [_folder_column(a, s.eps, s.clip_eps) if isinstance(a, FolderAttacker)
               else _transfer_column(a, s.eps, s.save_adv, exact, k) for a in attackers]
    settings = {"attackers": [_describe(a) for a in attackers], "clip_eps": bool(s.clip_eps),
                "sources": {a.name: engine.model_identity(a.source) for a in transfers}}
    return Job("blackbox", columns, s.eps, any(a.kwargs.get("targeted") for a in transfers),
               settings, finalize_blackbox, desc="blackbox ", models=[a.source for a in transfers],
               on_plan=lambda p: _match(attackers, [p.ids[i] for i in p.order]))


def _channels(dataset: Dataset) -> int | None:
    if len(cast(Sized, dataset)) == 0:  # evaluation datasets are map-style, with a length
        return None
    x = dataset[0][0]
    return int(x.shape[0]) if hasattr(x, "shape") and len(x.shape) == 3 else None


def adv_folder_name(attacker: str) -> str:
    """Folder name for an attacker's saved images: ``"src:pgd" -> "src_pgd"`` (one safe path
    component, :func:`featdenoise.runtime.outdir.safe_name`)."""
    return outdir.safe_name(attacker, "attacker")


def _describe(a: TransferAttacker | FolderAttacker) -> dict:
    if isinstance(a, FolderAttacker):
        return {"name": a.name, "kind": "folder", "folder": os.path.abspath(a.folder)}
    kw = {k: v for k, v in a.kwargs.items() if isinstance(v, (int, float, str, bool))}
    return {"name": a.name, "kind": "transfer", "attack": a.attack, **kw}


def summarize_blackbox(records: Sequence[dict], names: Sequence[str]) -> dict:
    """Clean accuracy, per-attacker and all-or-nothing accuracy from per-image records (pure).

    Also ``missing``: per folder attacker, how many images the clean image stood in for, and
    ``max_linf_255``: the largest L-inf distance found per folder attacker (0..255 scale).
    """
    records, skipped = kept(records)
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
        out["missing"] = {a: sum(1 for r in records if r.get(f"missing_{a}")) for a in linf}
    return out


def finalize_blackbox(out_dir: str, records: Sequence[dict], settings: dict) -> dict:
    """Write ``outcomes.jsonl``, ``summary.json`` and ``table.md``; return the summary."""
    names = [a["name"] for a in settings["attackers"]]
    summary = {**settings, **summarize_blackbox(records, names)}
    engine.write_outcomes(out_dir, records)
    engine.write_json(os.path.join(out_dir, engine.SUMMARY_FILE), summary)
    with atomic_write(os.path.join(out_dir, report.TABLE_FILE)) as f:
        f.write(report.blackbox_table(summary))
    return summary
