"""One validated training configuration: YAML file -> ``key=value`` overrides -> checks -> frozen.

The schema is a tree of frozen dataclasses (:class:`Config` with sections ``model``, ``data``,
``attack``, ``optim``, ``run``). :func:`load_config` reads a YAML file, applies command-line
overrides written as dotted keys (``optim.lr=0.2``, ``model.kwargs.denoise=mean``; values are
parsed as YAML scalars, so ``run.bf16=true`` and ``optim.milestones=[30,60]`` work), validates every
value, and returns a frozen :class:`Config`. :func:`save_config` writes the resolved values into a
run directory. An unknown key or a bad value raises ``ValueError`` with one line naming the key, the
value and what is allowed (with close matches for misspelt keys).

Defaults are the paper's ImageNet recipe (Sec. 5 and the official ``main.py``): targeted PGD with
eps 16, step 1, 30 steps, 20% of batches starting from the clean image; SGD with Nesterov momentum
0.9, weight decay 1e-4, label smoothing 0.1, lr 0.1 per 256 images, /10 at epochs 35, 70, 95 of 110.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any

import yaml

from featdenoise.configs import resolve_config
from featdenoise.runtime.atomic import atomic_write, ensure_dir

DATASETS = ("fashion_mnist", "cifar10", "imagenet")
ATTACK_MODES = ("pgd", "free", "fast")
SCHEDULES = ("step", "cyclic")


class DuplicateKeyError(ValueError):
    """A YAML mapping names the same key twice (PyYAML would keep the last silently)."""


class _Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` reading floats as YAML 1.2 does: ``1e-4``, ``1E3`` and ``1.0e12`` are
    numbers (YAML 1.1, PyYAML's default, needs a dot and a signed exponent and reads ``1e-4``
    as the *string* "1e-4"), and refusing a key given twice in one mapping, at any depth
    (:class:`DuplicateKeyError` naming the key and both lines; ``<<`` merges may override)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}  # key -> line of its first occurrence
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    hash(key)
                except TypeError:
                    continue  # an unhashable key: the constructor below says so
                line = key_node.start_mark.line + 1
                if key in seen:
                    raise DuplicateKeyError(_duplicate(key_node.start_mark.name, key, seen[key],
                                                       line))
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _duplicate(stream: str, key, first: int, line: int) -> str:
    where = f"at lines {first} and {line}" if first != line else f"at line {line} (twice)"
    prefix = f"{stream}: " if stream and not stream.startswith("<") else ""
    return f"{prefix}duplicate key {key!r} {where}; keep one (YAML would silently use the last)"


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:float"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                   |[-+]?(?:[0-9][0-9_]*)[eE][-+]?[0-9]+
                   |[-+]?\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?
                   |[-+]?\.(?:inf|Inf|INF)
                   |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def yaml_load(stream) -> Any:
    """``yaml.safe_load`` with YAML 1.2 floats and no duplicate keys (:class:`_Loader`): the one
    YAML reader of featdenoise, for config files and ``key=value`` overrides alike, so
    ``optim.weight_decay: 1e-4`` means the number everywhere and a second ``optim:`` block is
    refused (:class:`DuplicateKeyError`, one line naming the file, key and lines)."""
    loader = _Loader(stream)  # a SafeLoader: plain data only, never Python objects
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


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
    0-255 pixel units as in the paper (16 and 1); ``steps=0`` is clean training (Table 3).

    ``mode`` picks the recipe (:mod:`featdenoise.training.cheap`): ``pgd`` (the paper's: PGD-
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


_SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}
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


def _positive(v):
    return v > 0


def _non_negative(v):
    return v >= 0


def _probability(v):
    return 0.0 <= v <= 1.0


# key -> (predicate, description of the allowed values)
_CHECKS: dict[str, tuple[Any, str]] = {
    "data.name": (lambda v: v in DATASETS, f"one of {', '.join(DATASETS)}"),
    "data.batch_size": (_positive, "an integer >= 1"),
    "data.eval_batch_size": (_non_negative, "an integer >= 0 (0: same as batch_size)"),
    "data.workers": (_non_negative, "an integer >= 0"),
    "data.train_subset": (_non_negative, "an integer >= 0 (0: whole split)"),
    "data.val_subset": (_non_negative, "an integer >= 0 (0: whole split)"),
    "data.image_size": (_positive, "an integer >= 1"),
    "attack.steps": (_non_negative, "an integer >= 0 (0: clean training)"),
    "attack.eps": (lambda v: 0 <= v <= 255, "a number in [0, 255] (pixel units, paper: 16)"),
    "attack.step_size": (lambda v: 0 < v <= 255, "a number in (0, 255] (pixel units, paper: 1)"),
    "attack.clean_start_prob": (_probability, "a number in [0, 1] (paper: 0.2)"),
    "attack.mode": (lambda v: v in ATTACK_MODES, f"one of {', '.join(ATTACK_MODES)}"),
    "attack.replays": (_positive, "an integer >= 1 (free: Shafahi et al. use 4 to 10)"),
    "attack.fgsm_step": (lambda v: 0 < v <= 255,
                         "a number in (0, 255] (pixel units) or null for 1.25 x eps"),
    "attack.check_images": (_positive, "an integer >= 1"),
    "attack.check_steps": (_positive, "an integer >= 1"),
    "attack.overfit_drop": (_probability, "a fraction in [0, 1] (0: no check; e.g. 0.2)"),
    "optim.lr": (_positive, "a number > 0"),
    "optim.base_batch": (_positive, "an integer >= 1 (paper: 256)"),
    "optim.momentum": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "optim.weight_decay": (_non_negative, "a number >= 0"),
    "optim.label_smoothing": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "optim.warmup_epochs": (_non_negative, "a number >= 0"),
    "optim.milestones": (
        lambda v: all(isinstance(m, (int, float)) and not isinstance(m, bool) and m > 0
                      for m in v) and list(v) == sorted(v),
        "an increasing list of epochs > 0"),
    "optim.lr_decay": (lambda v: 0 < v <= 1, "a number in (0, 1]"),
    "optim.epochs": (_positive, "an integer >= 1"),
    "optim.schedule": (lambda v: v in SCHEDULES, f"one of {', '.join(SCHEDULES)}"),
    "optim.cycle_peak": (lambda v: 0 < v < 1, "a fraction in (0, 1) (Wong et al.: 0.5)"),
    "run.out_dir": (lambda v: len(v) > 0, "a non-empty path"),
    "run.checkpoint_every": (_non_negative, "an integer >= 0 (steps; 0: epoch ends only)"),
    "run.eval_every": (_non_negative, "an integer >= 0 (epochs; 0: final evaluation only)"),
    "run.eval_attack_steps": (_non_negative, "an integer >= 0"),
    "run.eval_sweeps": (
        lambda v: all(isinstance(e, (list, tuple)) and len(e) == 2
                      and all(isinstance(i, int) and not isinstance(i, bool) and i > 0 for i in e)
                      for e in v),
        "a list of [steps, every epochs] pairs of integers >= 1, e.g. [[50, 20], [100, 10]]"),
    "run.final_eval_steps": (_non_negative, "an integer >= 0"),
    "run.device": (lambda v: v in ("auto", "cpu", "cuda") or v.startswith("cuda:"),
                   "auto, cpu, cuda or cuda:N"),
    "run.stop_after": (_non_negative, "an integer >= 0 (0: off)"),
    "run.log_every": (_positive, "an integer >= 1"),
    "run.resume": (lambda v: len(v) > 0, "auto, never, or a checkpoint path"),
}


def _coerce(key: str, value: Any, default: Any, annotation: str) -> Any:
    """Check the type of ``value`` against the field's annotation.

    Ints are accepted as floats; a float with a whole value (``run.seed=1e3``) is accepted as an
    int, any other float (``2.5``, ``.nan``) is refused for an int key; ``nan`` and ``inf`` are
    refused everywhere (no setting means "infinitely" or "undefined")."""
    optional = "None" in annotation
    if value is None:
        if optional:
            return None
        raise ValueError(f"config key '{key}' may not be null; give a value like {default!r}")
    kind = annotation.replace(" | None", "").strip()
    if isinstance(value, float) and not math.isfinite(value) and kind in ("int", "float"):
        raise ValueError(f"config key '{key}' = {value!r} is not a finite number; give a value "
                         f"like {default!r}")
    if kind == "int" and isinstance(value, float):
        if not value.is_integer():
            raise ValueError(f"config key '{key}' = {value!r} has the wrong type: expected int "
                             f"(a whole number), e.g. {default!r}")
        value = int(value)
    ok = {
        "bool": isinstance(value, bool),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool),
        "str": isinstance(value, (str, int, float)) and not isinstance(value, bool),
        "list": isinstance(value, (list, tuple)),
        "dict": isinstance(value, dict),
    }.get(kind, True)
    if not ok:
        raise ValueError(f"config key '{key}' = {value!r} has the wrong type: expected {kind}, "
                         f"e.g. {default!r}")
    if kind == "float":
        return float(value)
    if kind == "str":
        return str(value)
    if kind == "list":
        return list(value)
    return value


def _refuse_nonfinite(key: str, value: Any) -> None:
    """Refuse NaN / inf anywhere inside a list or a free-form mapping (``model.kwargs.width``,
    ``optim.milestones[1]``), naming the nested key: a builder would fail later with an unrelated
    message, or not at all."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"config key '{key}' = {value!r} is not a finite number; give a finite "
                         "value")
    if isinstance(value, dict):
        for k, v in value.items():
            _refuse_nonfinite(f"{key}.{k}", v)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _refuse_nonfinite(f"{key}[{i}]", v)


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
    """``["optim.lr=0.2", "run.bf16=true"]`` -> nested dict; values are parsed as YAML scalars."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override '{item}' is not key=value (e.g. optim.lr=0.2)")
        key, raw = item.split("=", 1)
        try:
            value = yaml_load(raw) if raw.strip() else ""
        except yaml.YAMLError as err:
            raise ValueError(f"override '{item}': value is not valid YAML ({err})") from None
        except DuplicateKeyError as err:
            raise ValueError(f"override '{item}': {err}") from None
        _set_dotted(tree, key.strip(), value)
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


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
            value = _coerce(key, value, getattr(default, name), str(fields[name].type))
            _refuse_nonfinite(key, value)
            check = _CHECKS.get(key)
            if check is not None and value is not None and not check[0](value):
                raise ValueError(f"config key '{key}' = {value!r} is out of range: expected "
                                 f"{check[1]}")
            kwargs[name] = value
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
        with open(path) as f:
            try:
                tree = yaml_load(f) or {}
            except yaml.YAMLError as err:
                where = getattr(err, "problem_mark", None)
                at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
                what = getattr(err, "problem", None) or str(err).splitlines()[0]
                raise ValueError(f"config file {path} is not valid YAML{at}: {what}") from None
        if not isinstance(tree, dict):
            raise ValueError(f"config file {path} must be a mapping of sections")
    if base:
        tree = _merge(tree, base)
    if overrides:
        tree = _merge(tree, parse_overrides(list(overrides)))
    return from_dict(tree)


def check_model(cfg: Config) -> None:
    """Refuse a model that ``train`` would refuse, without allocating weights.

    Builds the network of ``cfg.model`` (without ``init``) on the ``meta`` device (shapes only,
    no memory, well under a second even for ResNet-152), so a misspelt name, an unknown kwarg, a
    denoising placement that does not fit or a value the builder rejects is one ``ValueError``
    naming the config key, exactly as the real build in ``train`` would give it.
    """
    from featdenoise.hub.build import build_model
    from featdenoise.hub.specs import is_code_spec
    from featdenoise.models import list_models
    from featdenoise.runtime.meta import build_on_meta

    m = cfg.model

    def build(key: str, denoise: dict | None) -> None:
        try:
            build_on_meta(lambda: build_model(m.name, dict(m.kwargs), denoise=denoise,
                                              normalize=m.normalize))
        except (ValueError, TypeError) as err:
            text = str(err).strip().splitlines()
            raise ValueError(f"config key '{key}': {text[0] if text else type(err).__name__}") \
                from None

    known = m.name in list_models() or is_code_spec(m.name)
    try:
        # The backbone first, so an error is told against the key that causes it.
        build("model.kwargs" if known else "model.name", None)
        if m.denoise:
            build("model.denoise", dict(m.denoise))
    except (NotImplementedError, RuntimeError):
        pass  # a builder that needs real values: the build in train checks it
    if m.init and not os.path.isfile(m.init):
        raise ValueError(f"config key 'model.init': {m.init} not found; give the backbone's "
                         "weights file")


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
