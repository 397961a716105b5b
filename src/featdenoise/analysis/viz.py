"""Feature-noise pictures and numbers (paper Sec. 3, Figs. 1-3).

An adversarial perturbation that is invisible in the image becomes large "noise" in the feature
maps of an undefended network (Fig. 1); a denoising block removes much of it (Fig. 3). This module
shows that and measures it:

* :func:`capture_features` records, with forward hooks, the output of every entry of
  :func:`~featdenoise.models.surgery.feature_modules` (stages and denoising blocks: the model's
  ``feature_modules()``, and those :func:`~featdenoise.models.add_denoising` put in) and, for each
  :class:`~featdenoise.models.denoise.DenoisingBlock`, the maps right before and right after its
  denoising operation (``<block>.before`` / ``<block>.after``: input and output of ``block.op``);
* :func:`relative_l2` gives ``||f(x_adv) - f(x)||_2 / ||f(x)||_2`` per image;
* :func:`feature_noise` computes it for every recorded map;
* :func:`visualize` attacks a few images with PGD (:class:`NoiseAttack`) and writes PNG grids
  (clean image, adversarial image, one channel of a chosen stage for both; and per denoising
  block, the channel before and after the op for both), plus ``distances.json`` and
  ``distances.md``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from featdenoise.attacks import PGD, draw_targets
from featdenoise.evaluation.report import save_figure
from featdenoise.models import DenoisingBlock, feature_modules, model_num_classes
from featdenoise.runtime import optional
from featdenoise.runtime.atomic import atomic_write, own_json, own_text
from featdenoise.runtime.modes import eval_mode

BEFORE, AFTER = ".before", ".after"


def relative_l2(clean: torch.Tensor, adv: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Per-image relative L2 distance ``||adv_i - clean_i||_2 / ||clean_i||_2``.

    Args:
        clean, adv: ``[N, ...]`` feature maps (or images) of the same shape.
        eps: guards a zero clean norm.
    Returns:
        ``[N]`` float tensor (0 means identical features).
    """
    if clean.shape != adv.shape:
        raise ValueError(f"feature shapes differ: clean {tuple(clean.shape)} vs adversarial "
                         f"{tuple(adv.shape)}")
    c = clean.detach().double().flatten(1)  # [N, D]
    a = adv.detach().double().flatten(1)  # [N, D]
    return ((a - c).norm(dim=1) / c.norm(dim=1).clamp_min(eps)).float()


def _denoise_ops(model: nn.Module) -> dict[str, nn.Module]:
    """``{feature name: block.op}`` for every denoising block among the feature modules."""
    return {name: m.op for name, m in feature_modules(model).items()
            if isinstance(m, DenoisingBlock)}


@torch.no_grad()
def capture_features(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Run ``model(x)`` and return its recorded feature maps, in forward order.

    Keys: every name of ``feature_modules(model)`` (the module's output), and for each
    denoising block ``name`` also ``name + ".before"`` / ``name + ".after"`` (input and output of
    its ``.op``, the maps "right before/after the denoising operation" of Fig. 3).
    Values: ``[N, C, H, W]`` float tensors on the CPU. ``x``: ``[N, C, H, W]`` pixels in [0, 1].
    """
    features = feature_modules(model)
    if not features:
        raise ValueError(f"{type(model).__name__} has no feature_modules() and no denoising blocks;"
                         " use a model built by featdenoise.models.create_model or add_denoising")
    records: list[tuple[str, torch.Tensor]] = []
    handles = []

    def out_hook(name):
        def hook(_module, _inputs, output):
            records.append((name, output.detach().float().cpu()))
        return hook

    def op_hook(name):
        def hook(_module, inputs, output):
            records.append((name + BEFORE, inputs[0].detach().float().cpu()))
            records.append((name + AFTER, output.detach().float().cpu()))
        return hook

    try:
        for name, module in features.items():
            handles.append(module.register_forward_hook(out_hook(name)))
        for name, op in _denoise_ops(model).items():
            handles.append(op.register_forward_hook(op_hook(name)))
        with eval_mode(model):
            model(x)
    finally:
        for h in handles:
            h.remove()
    # Forward order; a denoising block's ".before"/".after" come just before its own output.
    return dict(records)


def feature_noise(clean: dict[str, torch.Tensor], adv: dict[str, torch.Tensor]) -> dict:
    """Relative L2 distance between clean and adversarial features, for every recorded map.

    Args:
        clean, adv: outputs of :func:`capture_features` for ``x`` and ``x_adv``.
    Returns:
        ``{name: {"mean": float, "per_image": [float, ...], "shape": [C, H, W]}}`` in forward
        order.
    """
    out = {}
    for name, c in clean.items():
        d = relative_l2(c, adv[name])
        out[name] = {"mean": float(d.mean()), "per_image": [float(v) for v in d],
                     "shape": list(c.shape[1:])}
    return out


def pick_channel(clean: torch.Tensor, adv: torch.Tensor) -> int:
    """The channel whose maps change most under the attack (mean |adv - clean| over images and
    pixels, relative to the channel's mean |clean|), for ``[N, C, H, W]`` maps."""
    diff = (adv - clean).abs().mean(dim=(0, 2, 3))  # [C]
    scale = clean.abs().mean(dim=(0, 2, 3)).clamp_min(1e-6)  # [C]
    score = diff / scale * (diff > 0)
    return int(score.argmax())


def default_stage(model: nn.Module) -> str:
    """``res3`` (the paper's pictures) for ImageNet nets, else the second stage (``stage2``)."""
    names = [n for n in feature_modules(model) if "denoise" not in n and "bottleneck" not in n]
    if "res3" in names:
        return "res3"
    if not names:
        raise ValueError("the model lists no feature stages")
    return names[min(1, len(names) - 1)]


def distances_markdown(noise: dict, title: str | None = None) -> str:
    """Markdown table of :func:`feature_noise`'s output: map, shape, mean relative L2 distance."""
    lines = [f"**{title}**", ""] if title else []
    lines += ["| feature map | shape (C, H, W) | rel. L2 distance |", "|---|---|---:|"]
    for name, d in noise.items():
        label = name.replace(BEFORE, " (before op)").replace(AFTER, " (after op)")
        lines.append(f"| {label} | {'x'.join(map(str, d['shape']))} | {d['mean']:.3f} |")
    return "\n".join(lines) + "\n"


_PANEL = 84  # pixels per panel side in the mosaic (nearest-neighbour upscaling)
_GAP = 6


def _image_panel(img: torch.Tensor) -> torch.Tensor:
    """``[C, H, W]`` pixels in [0, 1] -> ``[H, W, 3]`` RGB."""
    img = img.detach().float().cpu().clamp(0, 1)
    return img.permute(1, 2, 0).expand(-1, -1, 3) if img.shape[0] == 1 else img.permute(1, 2, 0)


def _map_pair(clean: torch.Tensor, adv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two ``[H, W]`` maps -> two ``[H, W, 3]`` viridis images with one shared colour scale, so
    that only their difference shows."""
    lo = float(torch.minimum(clean.min(), adv.min()))
    hi = float(torch.maximum(clean.max(), adv.max()))
    span = hi - lo if hi > lo else 1.0
    cmap = optional.pyplot("the feature-noise pictures").colormaps["viridis"]

    def paint(m: torch.Tensor) -> torch.Tensor:  # [H, W] -> [H, W, 3]
        rgba = cmap(((m.float() - lo) / span).clamp(0, 1).numpy())  # [H, W, 4]
        return torch.from_numpy(rgba[..., :3]).float()

    return paint(clean), paint(adv)


def _mosaic(rows: list[list[tuple[torch.Tensor, str]]], path: str, title: str | None) -> str:
    """Tile ``[H, W, 3]`` panels (any sizes, upscaled to one size) into one PNG with a caption
    above each panel: one axes and one image, so that drawing stays fast."""
    plt = optional.pyplot("the feature-noise pictures")
    n_rows, n_cols = len(rows), max(len(r) for r in rows)
    cell_h, cell_w = _PANEL + _GAP + 14, _PANEL + _GAP  # 14 px of caption room above a panel
    canvas = torch.ones(n_rows * cell_h + _GAP, n_cols * cell_w + _GAP, 3)
    captions = []
    for i, row in enumerate(rows):
        for j, (panel, caption) in enumerate(row):
            up = F.interpolate(panel.permute(2, 0, 1)[None], size=(_PANEL, _PANEL),
                               mode="nearest")[0].permute(1, 2, 0)  # [P, P, 3]
            top, left = i * cell_h + 14 + _GAP, j * cell_w + _GAP
            canvas[top:top + _PANEL, left:left + _PANEL] = up
            captions.append((left + _PANEL / 2, top - 2, caption))
    dpi = 100
    extra = 24 if title else 0
    fig = plt.figure(figsize=(canvas.shape[1] / dpi, (canvas.shape[0] + extra) / dpi), dpi=dpi)
    ax = fig.add_axes((0, 0, 1, canvas.shape[0] / (canvas.shape[0] + extra)))
    ax.imshow(canvas.numpy(), interpolation="nearest")
    ax.set_axis_off()
    for x, y, caption in captions:
        ax.text(x, y, caption, ha="center", va="bottom", fontsize=6)
    if title:
        fig.suptitle(title, fontsize=8, y=1 - 4 / (canvas.shape[0] + extra), va="top")
    return save_figure(fig, path, dpi=dpi)


def plot_stage(images: tuple[torch.Tensor, torch.Tensor], maps: tuple[torch.Tensor, torch.Tensor],
               channel: int, stage: str, path: str, distances: Sequence[float] | None = None,
               title: str | None = None) -> str:
    """PNG grid, one row per image: clean image, adversarial image, channel ``channel`` of
    ``stage`` for both (shared colour scale). ``images``: (clean, adversarial) ``[N, C, H, W]`` in
    [0, 1]; ``maps``: their ``stage`` maps (clean, adversarial) ``[N, C', H', W']``;
    ``distances``: per image, written beside the adversarial map. Returns ``path``."""
    x, x_adv = images
    clean, adv = maps
    rows = []
    for i in range(x.shape[0]):
        d = f" d={distances[i]:.2f}" if distances is not None else ""
        mc, ma = _map_pair(clean[i, channel], adv[i, channel])
        rows.append([(_image_panel(x[i]), "clean"), (_image_panel(x_adv[i]), "adversarial"),
                     (mc, f"{stage} ch{channel} clean"), (ma, f"adv{d}")])
    return _mosaic(rows, path, title)


def plot_denoise(maps: dict[str, dict[str, torch.Tensor]], name: str, channel: int, path: str,
                 noise: dict | None = None, title: str | None = None) -> str:
    """PNG grid for denoising block ``name``, one row per image: channel ``channel`` right before
    the op (clean, adversarial) and right after it (clean, adversarial). ``maps`` holds
    ``clean``/``adv`` dicts of :func:`capture_features`. Returns ``path``."""
    clean, adv = maps["clean"], maps["adv"]
    b_c, b_a = clean[name + BEFORE], adv[name + BEFORE]
    a_c, a_a = clean[name + AFTER], adv[name + AFTER]
    rows = []
    for i in range(b_c.shape[0]):
        db = da = ""
        if noise is not None:
            db = f" d={noise[name + BEFORE]['per_image'][i]:.2f}"
            da = f" d={noise[name + AFTER]['per_image'][i]:.2f}"
        bc, ba = _map_pair(b_c[i, channel], b_a[i, channel])
        ac, aa = _map_pair(a_c[i, channel], a_a[i, channel])
        rows.append([(bc, "before op, clean"), (ba, f"before, adv{db}"),
                     (ac, "after op, clean"), (aa, f"after, adv{da}")])
    return _mosaic(rows, path, (f"{title}: " if title else "") + f"{name} ch{channel}")


@dataclass(frozen=True)
class NoiseAttack:
    """The PGD attack whose feature noise :func:`visualize` shows (Sec. 3; the attack of Sec. 6.1).

    ``eps`` and ``step_size`` are on the [0, 1] pixel scale (paper: 16/255 and 1/255, its 16 and
    1); the step rule is the paper's ``max(step_size, eps / steps)``. ``steps``: PGD iterations;
    ``targeted``: the paper's random-target attack (else untargeted); ``seed`` seeds the targets
    and the random start.
    """

    eps: float = 16 / 255
    steps: int = 10
    step_size: float = 1 / 255
    targeted: bool = True
    seed: int = 0


def visualize(model: nn.Module, x: torch.Tensor, y: torch.Tensor, out_dir: str, *,
              stage: str | None = None, channel: int | None = None,
              attack: NoiseAttack | None = None, title: str | None = None) -> dict:
    """Attack ``x`` with PGD and write the feature-noise pictures and numbers (Sec. 3, Figs. 1-3).

    Args:
        model: a featdenoise model or one with :func:`~featdenoise.models.add_denoising` blocks
            (:func:`~featdenoise.models.surgery.feature_modules`), taking ``[N, C, H, W]`` in
            [0, 1]; it runs in eval mode, and its modes are restored afterwards.
        x, y: images ``[N, C, H, W]`` in [0, 1] and labels ``[N]``.
        out_dir: output folder (created).
        stage: feature map to picture (default :func:`default_stage`: ``res3`` / ``stage2``).
        channel: channel to picture; default: :func:`pick_channel` (largest relative change),
            chosen separately for the stage and for each denoising block.
        attack: the PGD attack (default :class:`NoiseAttack`: the paper's targeted PGD-10 at
            eps 16/255, step 1/255).
        title: caption above every picture.
    Returns:
        ``{"pictures": [png paths], "distances": feature_noise dict, "table": markdown,
        "stage": str, "channels": {map: channel}, "clean_pred", "adv_pred", "labels"}``;
        ``distances.json`` and ``distances.md`` are written beside the pictures.
    """
    attack = attack or NoiseAttack()
    features = feature_modules(model)
    stage = stage or default_stage(model)
    if stage not in features:
        raise ValueError(f"unknown stage {stage!r} for this model; choose one of "
                         f"{', '.join(features)}")
    os.makedirs(out_dir, exist_ok=True)
    x, y = x.float(), y.long()
    with eval_mode(model):
        x_adv = _attack(model, x, y, attack)
        clean, adv = capture_features(model, x), capture_features(model, x_adv)
        with torch.no_grad():
            clean_pred, adv_pred = model(x).argmax(1), model(x_adv).argmax(1)
    noise = feature_noise(clean, adv)

    c = clean[stage].shape[1]
    if channel is not None and not 0 <= channel < c:
        raise ValueError(f"--channel {channel} is out of range: {stage} has {c} channels")
    blocks = _block_channels(clean, adv, list(_denoise_ops(model)), channel)
    channels = {stage: pick_channel(clean[stage], adv[stage]) if channel is None else channel,
                **blocks}
    pictures = [plot_stage((x, x_adv), (clean[stage], adv[stage]), channels[stage], stage,
                           os.path.join(out_dir, f"{stage}.png"), noise[stage]["per_image"],
                           title)]
    pictures += [plot_denoise({"clean": clean, "adv": adv}, name, k,
                              os.path.join(out_dir, f"{name}.png"), noise, title)
                 for name, k in blocks.items()]

    table = distances_markdown(noise)
    facts = {"stage": stage, "channels": channels, "eps": attack.eps, "steps": attack.steps,
             "targeted": attack.targeted, "labels": y.tolist(), "clean_pred": clean_pred.tolist(),
             "adv_pred": adv_pred.tolist(), "distances": noise}
    _write_distances(out_dir, facts, table)
    return {"pictures": pictures, "distances": noise, "table": table, "stage": stage,
            "channels": channels, "clean_pred": clean_pred.tolist(),
            "adv_pred": adv_pred.tolist(), "labels": y.tolist()}


def _attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
            attack: NoiseAttack) -> torch.Tensor:
    """Adversarial images ``[N, C, H, W]`` of ``x`` under ``attack`` (random start)."""
    # Targets drawn on the CPU (a CPU generator cannot draw on a GPU, and the CPU stream gives
    # the same targets on every device), then moved to the labels' device.
    g = torch.Generator().manual_seed(attack.seed)
    target = (draw_targets(y.cpu(), model_num_classes(model), g).to(y.device)
              if attack.targeted else None)
    pgd = PGD(model, eps=attack.eps, step_size=attack.step_size, steps=attack.steps,
              targeted=attack.targeted, random_start=True, seed=attack.seed)
    return pgd.attack(x, y, target=target).detach()


def _block_channels(clean: dict[str, torch.Tensor], adv: dict[str, torch.Tensor],
                    blocks: list[str], channel: int | None) -> dict[str, int]:
    """The channel pictured for each denoising block: ``channel`` where the block has it, else
    the one the attack changes most right before the op."""
    out = {}
    for name in blocks:
        b_c, b_a = clean[name + BEFORE], adv[name + BEFORE]
        out[name] = (channel if channel is not None and channel < b_c.shape[1]
                     else pick_channel(b_c, b_a))
    return out


def _write_distances(out_dir: str, facts: dict, table: str) -> None:
    """``distances.json`` (``facts``) and ``distances.md`` (``table``), each replacing only a
    file this module wrote."""
    with atomic_write(os.path.join(out_dir, "distances.json"),
                      ours=own_json("distances", "channels")) as f:
        json.dump(facts, f, indent=2)
    with atomic_write(os.path.join(out_dir, "distances.md"),
                      ours=own_text(table.splitlines()[0])) as f:
        f.write(table)
