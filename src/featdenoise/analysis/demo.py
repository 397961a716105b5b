"""The demo (``make demo``): the whole system on Fashion-MNIST in a few minutes on a 2-core CPU.

It trains three networks of the same size with :func:`featdenoise.training.train`:

* ``clean``: a small ResNet trained on clean images (the control, Table 3's "clean training"),
* ``adv-baseline``: the same ResNet, PGD adversarial training (paper Sec. 5),
* ``adv-denoise``: the same ResNet with a non-local denoising block after each stage (Sec. 4),
  the same adversarial training;

then evaluates each of them with :func:`featdenoise.evaluation.whitebox.evaluate_whitebox` on the
same fixed test images: clean accuracy, and PGD-10 / PGD-100 at eps 0.1 (on the [0, 1] pixel scale,
25.5 on the 0..255 scale) both targeted (the paper's setting: a random wrong target per image) and
untargeted; draws the feature-noise picture of Sec. 3 (:mod:`featdenoise.analysis.viz`) for the
denoising network; and writes ``report.md`` (table, accuracy-vs-iterations plot, pictures) into the
output folder (:mod:`featdenoise.analysis.demo_report`), whose path it prints. Progress goes to
the ``featdenoise.analysis.demo`` logger (INFO; the ``featdenoise`` command shows it on standard
error).

Every number is measured: the clean-trained network is shown beside the adversarially trained
ones so that the reader sees what "no robustness" looks like (PGD accuracy near 0).

Budget. Training runs a reduced version of the paper's recipe (few PGD steps with a large step
during training, a subset of the training images, a few epochs); see
:mod:`featdenoise.analysis.demo_budget` (``FULL``, and ``QUICK`` for tests). The denoising op is
the non-local means of Eq. (1) in its dot-product form (``f(x_i, x_j) = x_i^T x_j``, normalised
by the number of pixels, as in the official ResNeXt "DenoiseAll" model): at 28x28 the Gaussian
(softmax) form costs several times a baseline forward-backward pass on a CPU (``featdenoise bench
ops`` measures it), which would not fit the time limit.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import Dataset

from featdenoise.analysis import viz
from featdenoise.analysis.demo_budget import EPS, FULL, QUICK, Budget
from featdenoise.analysis.demo_report import write_report
from featdenoise.data.datasets import build_dataset
from featdenoise.evaluation import report, whitebox
from featdenoise.evaluation.records import is_own_evaluation
from featdenoise.runtime import outdir
from featdenoise.runtime.atomic import own_json, own_png, own_text
from featdenoise.training import load_model, train
from featdenoise.training.rundir import is_own_run_dir

log = logging.getLogger(__name__)

FMNIST_ROOT = "/usr/share/datasets/fashion-mnist"

MODELS: tuple[tuple[str, str, dict, bool], ...] = (
    # (run name, registry name, extra model kwargs (None: the budget's op), adversarial training?)
    ("clean", "small_resnet", {}, False),
    ("adv-baseline", "small_resnet", {}, True),
    ("adv-denoise", "small_resnet_denoise", {"denoise": None}, True),
)


@dataclass(frozen=True)
class _Run:
    """What every step of one demo call shares: the report folder, the Fashion-MNIST folder, the
    budget, the seed and whether progress bars are drawn."""

    out_dir: str
    data_root: str
    budget: Budget
    seed: int
    progress: bool


def _train_config(name: str, arch: str, kwargs: dict, adversarial: bool, run: _Run) -> dict:
    """The :mod:`featdenoise.training.config` overrides of one demo network (a :data:`MODELS`
    entry)."""
    budget = run.budget
    kwargs = {k: (budget.denoise if v is None else v) for k, v in kwargs.items()}
    return {
        "model": {"name": arch, "kwargs": {"in_channels": 1, "num_classes": 10,
                                           "width": budget.width, "blocks": [1, 1, 1], **kwargs}},
        "data": {"name": "fashion_mnist", "root": run.data_root, "batch_size": budget.batch_size,
                 "workers": 0, "augment": False, "train_subset": budget.train_images,
                 "val_subset": min(200, budget.eval_images)},
        "attack": {"steps": budget.train_steps if adversarial else 0, "eps": EPS * 255,
                   "step_size": budget.train_step_size * 255, "clean_start_prob": 0.2,
                   "targeted": budget.train_targeted},
        "optim": {"lr": budget.lr, "base_batch": 64, "momentum": 0.9, "nesterov": True,
                  "weight_decay": 1e-4, "label_smoothing": 0.1, "warmup_epochs": 0,
                  "milestones": list(budget.milestones), "lr_decay": 0.1,
                  "epochs": budget.epochs},
        "run": {"out_dir": os.path.join(run.out_dir, "runs", name), "seed": run.seed,
                "checkpoint_every": 0, "eval_every": 0, "final_eval_steps": 0,
                "resume": "never", "device": "cpu", "tensorboard": False,
                "progress": run.progress},
    }


def default_threads() -> int:
    """2 CPU threads (the demo's target machine has 2 cores), or 1 when the machine is already
    busy (1-minute load average >= cores - 0.5): two threads competing with other jobs spin-wait
    and run several times slower than one."""
    cores = os.cpu_count() or 1
    try:
        busy = os.getloadavg()[0] >= cores - 0.5
    except OSError:  # not available on this platform
        busy = False
    return 1 if busy or cores < 2 else 2


def _summary(summary: dict | None) -> dict:
    """A white-box summary; the demo runs in one process, which always merges its evaluation
    (``evaluate_whitebox`` returns None only to the other ranks of a process group)."""
    if summary is None:
        raise RuntimeError("the demo's evaluation returned no summary (it runs in one process)")
    return summary


def _evaluate(name: str, model: nn.Module, test_set: Dataset, run: _Run) -> dict[str, dict]:
    """Targeted and untargeted PGD (and AutoAttack when the budget has images for it)."""
    budget, out_dir = run.budget, run.out_dir
    out = {}
    for mode in ("targeted", "untargeted"):
        folder = os.path.join(out_dir, "eval", f"{name}-{mode}")
        out[mode] = _summary(whitebox.evaluate_whitebox(
            model, test_set, folder, steps=budget.eval_steps, attack="pgd", eps=EPS,
            step_size=budget.eval_step_size, targeted=mode == "targeted", seed=run.seed,
            batch_size=budget.eval_batch_size, limit=budget.eval_images, name=name,
            device="cpu", progress=run.progress, extra={"dataset": "fashion_mnist"}))
    if budget.aa_images:
        steps, targets, queries = budget.aa_budget or (None, None, None)
        out["autoattack"] = _summary(whitebox.evaluate_whitebox(
            model, test_set, os.path.join(out_dir, "eval", f"{name}-autoattack"), attack=None,
            autoattack={"version": "standard", "steps": steps, "n_target_classes": targets,
                        "n_queries": queries}, eps=EPS, seed=run.seed,
            batch_size=budget.eval_batch_size, limit=budget.aa_images, name=name,
            device="cpu", progress=run.progress, extra={"dataset": "fashion_mnist"}))
    return out


def run_demo(out_dir: str = "reports/demo", quick: bool = False, data_root: str | None = None,
             threads: int | None = None, seed: int = 0, progress: bool = True,
             budget: Budget | None = None) -> str:
    """Train, evaluate, draw and report (see the module docstring); returns ``report.md``'s path.

    Args:
        out_dir: report folder, held by this call alone (a lock file); the demo's own run,
            evaluation and picture folders in its ``runs/``, ``eval/`` and ``feature_noise/``
            are rewritten on every call, each checked first to hold only what the demo wrote
            (otherwise nothing is deleted and the call is refused); nothing else in it is
            touched.
        quick: the tiny ``QUICK`` budget (seconds; numbers meaningless) instead of ``FULL``
            (:mod:`~featdenoise.analysis.demo_budget`).
        data_root: Fashion-MNIST IDX folder (default: the Debian package's folder).
        threads: torch CPU threads (default: :func:`default_threads`).
        seed: seeds training, the image subsets, attack targets and random starts.
        budget: overrides the budget entirely (tests).

    Progress is logged (``[demo] ...`` lines, INFO). Returns the report's path
    (``featdenoise demo`` prints it last, as ``report: PATH``).
    """
    run = _Run(out_dir, data_root or FMNIST_ROOT, budget or (QUICK if quick else FULL), seed,
               progress)
    with outdir.FolderLock(out_dir, "demo folder"):
        path = _run_demo(run, threads, quick)
    return path


def _stale(out_dir: str) -> dict:
    """The demo's own sub-folders of ``out_dir``, each with how it is recognised as the demo's."""
    owned: dict[str, Callable[[str], bool]] = {}
    for name, *_ in MODELS:
        owned[os.path.join("runs", name)] = is_own_run_dir
        for mode in ("targeted", "untargeted", "autoattack"):
            owned[os.path.join("eval", f"{name}-{mode}")] = is_own_evaluation
        owned[os.path.join("feature_noise", name)] = outdir.own_folder(_own_picture)
    return owned


def _own_picture(path: str) -> bool:
    """A file :func:`featdenoise.analysis.viz.visualize` writes: a PNG it drew or its distances."""
    name = os.path.basename(path)
    if name == "distances.json":
        return own_json("distances", "channels")(path)
    if name == "distances.md":  # the table, or its bold title line above it
        return own_text("|")(path) or own_text("**")(path)
    return name.endswith(".png") and own_png(path)


def _clock() -> Callable[[], tuple[float, float]]:
    """Start a clock; calling what it returns gives the (wall, CPU) seconds since."""
    wall, cpu = time.perf_counter(), time.process_time()
    return lambda: (time.perf_counter() - wall, time.process_time() - cpu)


def _run_demo(run: _Run, threads: int | None, quick: bool) -> str:
    total = _clock()
    root = run.data_root
    if not os.path.isfile(os.path.join(root, "train-images-idx3-ubyte.gz")) and not \
            os.path.isfile(os.path.join(root, "train-images-idx3-ubyte")):
        raise FileNotFoundError(f"Fashion-MNIST not found in {root}; install the Debian package "
                                "dataset-fashion-mnist (`make data`) or pass --data-root DIR")
    torch.set_num_threads(threads or default_threads())
    # Stale results of an earlier demo: every folder checked first, then deleted.
    outdir.remove_planned(outdir.plan_removal(run.out_dir, _stale(run.out_dir), "demo"))

    test_set = build_dataset("fashion_mnist", root, "val", augment=False)
    timings: dict[str, tuple[float, float]] = {}
    models = _train_all(run, timings)
    summaries = _evaluate_all(run, models, test_set, timings)
    # Accuracy against attack iterations (Fig. 6), every network and both attack modes.
    flat = [s for pair in summaries.values() for s in (pair["targeted"], pair["untargeted"])]
    plot = report.plot_accuracy_vs_iterations(
        flat, os.path.join(run.out_dir, "accuracy_vs_iterations.png"),
        title=f"Fashion-MNIST, PGD white-box, eps = {EPS} ({EPS * 255:g}/255)")
    noise = _feature_noise(run, models, test_set, timings)
    timings["total"] = total()

    path = write_report(run.out_dir, run.budget, summaries, plot, noise, timings, quick, run.seed)
    log.info("[demo] done in %.0f s", timings["total"][0])
    return path


def _train_all(run: _Run, timings: dict) -> dict[str, nn.Module]:
    """Train every network of :data:`MODELS`; adds each one's (wall, CPU) seconds to
    ``timings``. Returns the trained networks in eval mode, by run name."""
    models = {}
    for name, arch, kwargs, adversarial in MODELS:
        log.info("[demo] training %s (%s, %s training)", name, arch,
                 "PGD" if adversarial else "clean")
        clock = _clock()
        run_dir = train(_train_config(name, arch, kwargs, adversarial, run))
        timings[f"train {name}"] = clock()
        models[name] = load_model(run_dir).eval()
    return models


def _evaluate_all(run: _Run, models: dict[str, nn.Module], test_set: Dataset,
                  timings: dict) -> dict[str, dict[str, dict]]:
    """:func:`_evaluate` every network; adds each one's (wall, CPU) seconds to ``timings``."""
    b = run.budget
    summaries = {}
    for name, model in models.items():
        log.info("[demo] evaluating %s: clean, PGD-%s targeted and untargeted on %s test images, "
                 "AutoAttack on %s", name, "/".join(map(str, b.eval_steps)), b.eval_images,
                 b.aa_images)
        clock = _clock()
        summaries[name] = _evaluate(name, model, test_set, run)
        timings[f"evaluate {name}"] = clock()
    return summaries


def _feature_noise(run: _Run, models: dict[str, nn.Module], test_set: Dataset,
                   timings: dict) -> dict[str, dict]:
    """Feature noise (Sec. 3, Figs. 1-3) of the adversarially trained networks on the first test
    images (:func:`featdenoise.analysis.viz.visualize`); adds its seconds to ``timings``."""
    log.info("[demo] drawing the feature-noise pictures")
    clock = _clock()
    b = run.budget
    attack = viz.NoiseAttack(eps=EPS, steps=max(b.eval_steps[0], 1), step_size=b.eval_step_size,
                             seed=run.seed)
    x, y = _first_images(test_set, b.viz_images)
    noise = {name: viz.visualize(models[name], x, y,
                                 os.path.join(run.out_dir, "feature_noise", name),
                                 attack=attack, title=name)
             for name in ("adv-denoise", "adv-baseline")}
    timings["feature-noise pictures"] = clock()
    return noise


def _first_images(dataset, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` test images and labels: ``[n, C, H, W]``, ``[n]``."""
    items = [dataset[i] for i in range(n)]
    return torch.stack([a for a, _ in items]), torch.tensor([int(b) for _, b in items])
