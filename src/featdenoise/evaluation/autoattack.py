"""AutoAttack on the evaluation engine (Croce & Hein, ICML 2020; the RobustBench standard).

The chain's attacks (:class:`featdenoise.attacks.autoattack.AutoAttack`: APGD-CE, APGD-T, FAB-T,
Square for ``version="standard"``; APGD-CE, APGD-DLR with EOT for ``"rand"``) become one engine
column each, in chain order. As in the original, an attack runs only on the images that the clean
model classifies correctly and that every earlier attack failed on; an image's result is the first
attack that broke it. Because every column is stored per batch as soon as it is done, a killed run
resumes at the attack it was running on the batch it was running (an attack half-done over the data
set resumes from its last finished batch), shards over torchrun ranks like any evaluation, and
counts every image once.

Record fields per attack ``a`` (on top of the engine's): ``pred_<a>`` (the prediction after the
chain up to ``a``: for an image an earlier stage broke, that stage's prediction, so the column's
accuracy *is* the robust accuracy after ``a``), ``ran_<a>`` (whether ``a`` attacked the image),
``iter_<a>`` (the APGD/FAB iteration or Square query at which it broke the image, else None),
``target_<a>`` (APGD-T/FAB-T target class that broke it) and ``margin_<a>`` (logit of the label
minus the best other logit on the attack's returned image; < 0 when broken).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from featdenoise.attacks.autoattack import AutoAttack
from featdenoise.attacks.registry import AUTOATTACK_ATTACKS as ATTACK_NAMES
from featdenoise.attacks.registry import AUTOATTACK_VERSIONS as CHAINS
from featdenoise.evaluation import engine
from featdenoise.evaluation.metrics import kept, robust_after_each

VERSIONS = tuple(CHAINS)


def chain_names(version: str = "standard", attacks: Sequence[str] | None = None) -> list[str]:
    """The attacks of the chain in order: the version's, or the given subset in chain order."""
    if version not in CHAINS:
        raise ValueError(f"--version {version!r} is unknown; use one of {', '.join(CHAINS)}")
    if attacks is None:
        return list(CHAINS[version])
    unknown = [a for a in attacks if a not in ATTACK_NAMES]
    if unknown or not attacks:
        raise ValueError(f"unknown AutoAttack attack {unknown[0] if unknown else ''!r}; choose "
                         f"among {', '.join(ATTACK_NAMES)}")
    return [a for a in ATTACK_NAMES if a in attacks]  # the original order, whatever was typed


def autoattack_columns(model: nn.Module, *, eps: float, version: str = "standard",
                       attacks: Sequence[str] | None = None, exact: bool = False,
                       **chain_kwargs) -> list[engine.Column]:
    """One engine column per attack of the chain (see the module docstring).

    ``eps`` on the [0, 1] scale; ``chain_kwargs``: ``steps``, ``n_target_classes``,
    ``n_queries``, ``eot_iter`` of :class:`~featdenoise.attacks.autoattack.AutoAttack` (smaller
    values are a cheaper, weaker check than AutoAttack: say so when reporting).
    """
    names = chain_names(version, attacks)
    chain = AutoAttack(model, eps=eps, version=version, attacks=names, exact=exact,
                       **chain_kwargs)
    return [_column(chain, k) for k in range(len(names))]


def _column(chain, k: int) -> engine.Column:
    names = chain.attacks
    name = names[k]

    def run(model: nn.Module, batch: engine.Batch) -> dict:
        recs = batch.records
        prev = f"pred_{names[k - 1]}" if k else "pred_clean"
        pred = [r[prev] for r in recs]
        alive = [p == r["label"] for p, r in zip(pred, recs, strict=True)]
        n = len(recs)
        ran, iters, targets, margins = [False] * n, [None] * n, [None] * n, [None] * n
        idx = [i for i, a in enumerate(alive) if a]
        if idx:
            sel = torch.tensor(idx, device=batch.x.device)
            x_adv, out = chain.run_attack(name, batch.x[sel], batch.y[sel], seed=batch.seed)
            ids = [batch.ids[i] for i in idx]
            logits = engine.checked_logits(model, x_adv, ids, f"{name} images")  # [m, K]
            p = logits.argmax(1).tolist()  # [m]: the defender's view of the images
            for j, i in enumerate(idx):
                pred[i], ran[i] = p[j], True
                iters[i], targets[i] = out[j]["iteration"], out[j]["target"]
                margins[i] = round(out[j]["margin"], 6)
        return {f"pred_{name}": pred, f"ran_{name}": ran, f"iter_{name}": iters,
                f"target_{name}": targets, f"margin_{name}": margins}

    return engine.Column(name, run, seed_tag="autoattack")


def summarize_autoattack(records: Sequence[dict], names: Sequence[str]) -> dict:
    """Robust accuracy after each attack of the chain and who broke how many images (pure).

    Returns ``{"names", "robust_accuracy": [after each attack], "final", "broken_by": {attack:
    count, "clean": count}, "n"}`` (fractions of the ``n`` images that count).
    """
    good, _ = kept(records)
    after = robust_after_each(good, names)
    broken = {"clean": sum(1 for r in good if r["pred_clean"] != r["label"])}
    for name in names:
        broken[name] = sum(1 for r in good if r.get(f"ran_{name}")
                           and r[f"pred_{name}"] != r["label"])
    return {"names": list(names), "robust_accuracy": after, "final": after[-1] if after else None,
            "broken_by": broken, "n": len(good)}


def broken_by(record: dict, names: Sequence[str]) -> str | None:
    """The first attack that broke the image (``"clean"`` if misclassified clean), else None."""
    if record["pred_clean"] != record["label"]:
        return "clean"
    for name in names:
        if record.get(f"ran_{name}") and record[f"pred_{name}"] != record["label"]:
            return name
    return None
