"""One validated training configuration: YAML file -> ``key=value`` overrides -> checks -> frozen.

The schema is a tree of frozen dataclasses (:class:`Config` with sections ``model``, ``data``,
``attack``, ``optim``, ``run``). :func:`load_config` reads a YAML file, applies command-line
overrides written as dotted keys (``optim.lr=0.2``, ``model.kwargs.denoise=mean``; values are
parsed as YAML scalars, so ``run.bf16=true`` and ``optim.milestones=[30,60]`` work), validates every
value, and returns a frozen :class:`Config`. :func:`save_config` writes the resolved values into a
run directory. An unknown key or a bad value raises ``ValueError`` with one line naming the key, the
value and what is allowed (with close matches for misspelt keys; the value rules are in
:mod:`featdenoise.training.checks`, the YAML reader in :mod:`featdenoise.training.yamlio`).

Pixel sizes (``attack.eps``, ``attack.step_size``, ``attack.fgsm_step``) are held on the paper's
0..255 scale; :meth:`AttackConfig.unit_sizes` is the one place that converts them to the [0, 1]
scale of the images.

Defaults are the paper's ImageNet recipe (Sec. 5 and the official ``main.py``): targeted PGD with
eps 16, step 1, 30 steps, 20% of batches starting from the clean image; SGD with Nesterov momentum
0.9, weight decay 1e-4, label smoothing 0.1, lr 0.1 per 256 images, /10 at epochs 35, 70, 95 of 110.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from dataclasses import dataclass, field
from typing import Any

import yaml

from featdenoise.configs import resolve_config
from featdenoise.runtime.atomic import atomic_write, ensure_dir
from featdenoise.training.checks import check_value
from featdenoise.training.yamlio import (
    DuplicateKeyError,
    load_yaml_file,
    merge,
    parse_override,
    yaml_load,
)


@dataclass(frozen=True)
class ModelConfig:
    """Which network (:func:`featdenoise.hub.build.build_model`).

    ``name``: a registry name (``resnet152_denoise``) or a library / user-code spec
    (``torchvision:resnet50``, ``timm:resnet50``, ``nets.py:build``); ``kwargs``: its builder's
    keyword arguments; ``denoise``: denoising blocks put into the backbone (``{op:
    nonlocal_gaussian, after: stages}``, paper Sec. 4; empty: none); ``normalize``: the
    normalisation in front (``imagenet``, ``none``, ``M1,M2,M3/S1,S2,S3``; null: the kind's
    default); ``init``: the backbone's pretrained weights (safetensors or a ``.pt``/``.pth``
    state dict), loaded strictly before the blocks go in.
    """

    name: str = "resnet152"
    kwargs: dict = field(default_factory=dict)
    denoise: dict = field(default_factory=dict)
    normalize: str | None = None
    init: str | None = None


@dataclass(frozen=True)
class DataConfig:
    """Dataset and loader. ``batch_size`` is per process (the official ``--batch``, 32 per GPU);
    the global batch is ``batch_size x world size``. Subset sizes of 0 mean the whole split."""

    name: str = "imagenet"
    root: str | None = None
    batch_size: int = 32
    eval_batch_size: int = 0
    workers: int = 4
    train_subset: int = 0
    val_subset: int = 0
    augment: bool = True
    image_size: int = 224
    strict: bool = False


@dataclass(frozen=True)
class AttackConfig:
    """The training attack (Sec. 5): targeted PGD under L-inf. ``eps`` and ``step_size`` are in
    0-255 pixel units as in the paper (16 and 1; :meth:`unit_sizes` gives the [0, 1] values the
    attacks take); ``steps=0`` is clean training (Table 3).

    ``mode`` picks the recipe (:mod:`featdenoise.training.recipes`): ``pgd`` (the paper's: PGD-
    ``steps`` on every minibatch), ``free`` (Shafahi et al. 2019: each minibatch replayed
    ``replays`` times, one backward gives both the weight gradient and the perturbation's step of
    ``eps``; ``optim.epochs`` counts passes over the data *after* the division by ``replays``) or
    ``fast`` (Wong et al. 2020: FGSM of step ``fgsm_step`` from a uniform random start; null means
    1.25 x ``eps``). ``step_size`` stays the PGD step of the ``pgd`` recipe, of every evaluation
    and of the ``fast`` overfitting check: PGD-``check_steps`` on the first ``check_images``
    validation images after every epoch; when its accuracy falls more than ``overfit_drop`` (a
    fraction, 0: no check) below the best so far, training stops and the best weights are kept.
    ``steps`` and ``clean_start_prob`` apply to ``pgd`` only."""

    steps: int = 30
    eps: float = 16.0
    step_size: float = 1.0
    clean_start_prob: float = 0.2
    targeted: bool = True
    mode: str = "pgd"
    replays: int = 4
    fgsm_step: float | None = None
    check_images: int = 256
    check_steps: int = 10
    overfit_drop: float = 0.2

    def fast_step(self) -> float:
        """The ``fast`` recipe's FGSM step in pixel units: ``fgsm_step``, or 1.25 x ``eps``."""
        return self.fgsm_step if self.fgsm_step is not None else 1.25 * self.eps

    def unit_sizes(self) -> UnitSizes:
        """``eps``, ``step_size`` and :meth:`fast_step` on the [0, 1] scale of the images: each
        0..255 value divided by 255 (16 -> 16/255), here and nowhere else."""
        return UnitSizes(eps=self.eps / 255, step_size=self.step_size / 255,
                         fgsm_step=self.fast_step() / 255)


@dataclass(frozen=True)
class UnitSizes:
    """The training attack's sizes on the [0, 1] pixel scale (:meth:`AttackConfig.unit_sizes`):
    the L-inf radius ``eps`` (paper: 16/255), the PGD step ``step_size`` (paper: 1/255) and the
    ``fast`` recipe's FGSM step ``fgsm_step``."""

    eps: float
    step_size: float
    fgsm_step: float


@dataclass(frozen=True)
class OptimConfig:
    """SGD recipe (Sec. 5; Goyal et al. warm-up). ``lr`` is per ``base_batch`` images; when the
    scaled rate exceeds ``lr`` it ramps linearly from ``lr`` over ``warmup_epochs``. The rate is
    multiplied by ``lr_decay`` at each of ``milestones`` (in epochs); training lasts ``epochs``.
    ``schedule``: ``step`` (that recipe) or ``cyclic`` (Wong et al. 2020's one cycle: linear from
    0 up to the scaled ``lr`` at fraction ``cycle_peak`` of all steps, 0.5 as in their CIFAR-10
    code, then linear down to 0; warm-up and milestones unused)."""

    lr: float = 0.1
    base_batch: int = 256
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 1e-4
    label_smoothing: float = 0.1
    warmup_epochs: float = 5.0
    milestones: list = field(default_factory=lambda: [35, 70, 95])
    lr_decay: float = 0.1
    epochs: int = 110
    schedule: str = "step"
    cycle_peak: float = 0.5


@dataclass(frozen=True)
class RunConfig:
    """Where and how to run. ``out_dir`` is the run directory. ``checkpoint_every`` is in steps
    (0: only at epoch ends); ``eval_every`` in epochs (0: only the final evaluation): clean and
    PGD-``eval_attack_steps``; ``eval_sweeps``: more ``[steps, every epochs]`` evaluations (the
    official trainer's PGD-50 every 20 and PGD-100 every 10 epochs); ``final_eval_steps`` at the
    end. Every evaluation reports adversarial top-1 and top-5 (and targeted success when the
    attack is targeted) on the same images.
    ``resume``: ``auto`` (continue if out_dir holds a checkpoint), ``never``, or a checkpoint path.
    ``stop_after`` stops cleanly after that many global steps (0: off), for time-boxed jobs.
    ``tf32``: TF32 float32 matmuls/convolutions on CUDA (ignored on a CPU);
    ``deterministic``: deterministic CUDA kernels, TF32 and cuDNN autotuning off (bit-exact
    resume on a GPU; slower) - see :mod:`featdenoise.runtime.backends`."""

    out_dir: str = "runs/default"
    seed: int = 0
    checkpoint_every: int = 1000
    eval_every: int = 1
    eval_attack_steps: int = 10
    eval_sweeps: list = field(default_factory=lambda: [[50, 20], [100, 10]])
    final_eval_steps: int = 100
    resume: str = "auto"
    bf16: bool = False
    channels_last: bool = False
    compile: bool = False
    device: str = "auto"
    tf32: bool = True
    deterministic: bool = False
    stop_after: int = 0
    log_every: int = 20
    tensorboard: bool = True
    progress: bool = True


@dataclass(frozen=True)
class Config:
    """The whole training configuration (see the module docstring)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict:
        """Plain nested dict of the resolved values (YAML/JSON/``torch.save`` safe)."""
        return dataclasses.asdict(self)


_SECTION_CLASSES = {
    "model": ModelConfig, "data": DataConfig, "attack": AttackConfig, "optim": OptimConfig,
    "run": RunConfig,
}
# Sections whose values are free-form dicts (validated later by their consumer, e.g. create_model).
_FREE_FORM = {("model", "kwargs"), ("model", "denoise")}


def _all_keys() -> list[str]:
    return [f"{s}.{f.name}" for s, cls in _SECTION_CLASSES.items()
            for f in dataclasses.fields(cls)]


def _unknown(key: str) -> ValueError:
    close = difflib.get_close_matches(key, _all_keys(), n=3, cutoff=0.5)
    hint = f"; did you mean {' or '.join(close)}?" if close else "; see configs/*.yaml for keys"
    return ValueError(f"unknown config key '{key}'{hint}")


def _set_dotted(tree: dict, key: str, value: Any) -> None:
    """Set ``tree[a][b][c] = value`` for ``key = 'a.b.c'``, checking the key against the schema."""
    parts = key.split(".")
    section = parts[0]
    if section not in _SECTION_CLASSES or len(parts) < 2:
        raise _unknown(key)
    names = {f.name for f in dataclasses.fields(_SECTION_CLASSES[section])}
    if parts[1] not in names:
        raise _unknown(key)
    if len(parts) > 2 and (section, parts[1]) not in _FREE_FORM:
        raise _unknown(key)
    node = tree.setdefault(section, {})
    for p in parts[1:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ValueError(f"config key '{key}': '{p}' is not a mapping")
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict:
    """``["optim.lr=0.2", "run.bf16=true"]`` -> nested dict; values are parsed as YAML scalars
    (:func:`featdenoise.training.yamlio.parse_override`), keys checked against the schema."""
    tree: dict = {}
    for item in overrides:
        key, value = parse_override(item)
        _set_dotted(tree, key, value)
    return tree


def from_dict(tree: dict) -> Config:
    """Validate a nested dict (unknown keys, types, ranges) and build the frozen :class:`Config`."""
    if not isinstance(tree, dict):
        raise ValueError("a config must be a YAML mapping of sections (model, data, attack, ...)")
    sections = {}
    for section, values in tree.items():
        if section not in _SECTION_CLASSES:
            raise _unknown(section)
        if values is None:
            values = {}
        if not isinstance(values, dict):
            raise ValueError(f"config section '{section}' must be a mapping, got {values!r}")
        cls = _SECTION_CLASSES[section]
        fields = {f.name: f for f in dataclasses.fields(cls)}
        default = cls()
        kwargs = {}
        for name, value in values.items():
            key = f"{section}.{name}"
            if name not in fields:
                raise _unknown(key)
            kwargs[name] = check_value(key, value, getattr(default, name),
                                       str(fields[name].type))
        sections[section] = cls(**kwargs)
    return Config(**sections)


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None,
                base: dict | None = None) -> Config:
    """Read YAML ``path`` (optional), merge ``base`` (a nested dict, optional) and ``overrides``
    (``key=value`` strings), validate, and return the frozen :class:`Config`.

    ``path`` is a file, or the name of a shipped config (``fashion_mnist_quick``; see
    :func:`featdenoise.configs.resolve_config` and :func:`featdenoise.configs.list_configs`).
    """
    tree: dict = {}
    if path is not None:
        path = resolve_config(path)
        tree = load_yaml_file(path) or {}
        if not isinstance(tree, dict):
            raise ValueError(f"config file {path} must be a mapping of sections")
    if base:
        tree = merge(tree, base)
    if overrides:
        tree = merge(tree, parse_overrides(list(overrides)))
    return from_dict(tree)


def is_own_config(path: str | os.PathLike) -> bool:
    """True if ``path`` is a YAML mapping of config sections (what :func:`save_config` writes)."""
    try:
        with open(path) as f:
            tree = yaml_load(f)
    except (OSError, yaml.YAMLError, UnicodeDecodeError, DuplicateKeyError):
        return False
    return isinstance(tree, dict) and bool(tree) and set(tree) <= set(_SECTION_CLASSES)


def save_config(cfg: Config, run_dir: str | os.PathLike) -> str:
    """Write the resolved values to ``run_dir/config.yaml`` (atomically); return the path.

    An existing ``config.yaml`` that is not a featdenoise config, or that is the config file the
    running command read (unless the bytes are the same), is refused (``ValueError``; see
    :mod:`featdenoise.runtime.atomic`).
    """
    ensure_dir(run_dir, "run folder")
    path = os.path.join(run_dir, "config.yaml")
    with atomic_write(path, ours=is_own_config) as f:
        f.write(config_text(cfg))
    return path


def config_text(cfg: Config) -> str:
    """The YAML text :func:`save_config` writes for ``cfg``."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
