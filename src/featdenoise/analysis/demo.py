"""The demo (``make demo``): the whole system on Fashion-MNIST in a few minutes on a 2-core CPU.

It trains three networks of the same size with :func:`featdenoise.training.train`:

* ``clean``: a small ResNet trained on clean images (the control, Table 3's "clean training"),
* ``adv-baseline``: the same ResNet, PGD adversarial training (paper Sec. 5),
* ``adv-denoise``: the same ResNet with a non-local denoising block after each stage (Sec. 4),
  the same adversarial training;

then evaluates each of them with :func:`featdenoise.evaluation.whitebox.evaluate_whitebox` on the
same fixed test images: clean accuracy, and PGD-10 / PGD-100 at eps 0.1 (on the [0, 1] pixel scale,
25.5 on the 0..255 scale) both targeted (the paper's setting: a random wrong target per image) and
untargeted; draws the feature-noise picture of Sec. 3 (:mod:`featdenoise.analysis.viz`) for the denoising
network; and writes ``report.md`` (table, accuracy-vs-iterations plot, pictures) into the output
folder, whose path it prints.

Every number is measured: the clean-trained network is shown beside the adversarially trained
ones so that the reader sees what "no robustness" looks like (PGD accuracy near 0).

Budget. Training runs a reduced version of the paper's recipe (few PGD steps with a large step
during training, a subset of the training images, a few epochs); see :data:`FULL` and
:data:`QUICK` (the latter is for tests). The denoising op is the non-local means of Eq. (1) in
its dot-product form (``f(x_i, x_j) = x_i^T x_j``, normalised by the number of pixels, as in the
official ResNeXt "DenoiseAll" model): at 28x28 the Gaussian (softmax) form costs about 9x a
baseline forward-backward pass on a CPU (batch 128: 405 ms against 46 ms; dot product 61 ms),
which would not fit the time limit.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass

import torch

from featdenoise.runtime import outdir
from featdenoise.runtime.atomic import atomic_write, own_json, own_png, own_text

FMNIST_ROOT = "/usr/share/datasets/fashion-mnist"
EPS = 0.1  # L-inf budget on the [0, 1] pixel scale (25.5 on 0..255)


@dataclass(frozen=True)
class Budget:
    """How much the demo trains and evaluates (all sizes in images, steps in PGD iterations).

    ``train_step_size`` and ``eval_step_size`` are on the [0, 1] scale; the attacks use the paper's
    step rule ``max(step_size, eps / steps)`` (Sec. 6.1).
    """

    width: int = 8                  # small_resnet width (stages of 8, 16, 32 channels)
    denoise: str = "nonlocal_dot"   # denoising op of the adv-denoise net
    train_images: int = 9000        # fixed random subset of the 60k training images
    epochs: int = 3
    milestones: tuple = (2,)        # lr / 10 after these epochs
    batch_size: int = 128
    lr: float = 0.1                 # per 64 images (scaled linearly with the batch)
    train_steps: int = 3            # PGD iterations when crafting training examples
    train_step_size: float = 0.04
    train_targeted: bool = True     # the paper trains against targeted PGD (Sec. 5)
    eval_images: int = 500          # fixed random subset of the 10k test images
    eval_steps: tuple = (10, 100)
    eval_step_size: float = 0.01
    eval_batch_size: int = 100
    viz_images: int = 3
    aa_images: int = 100            # AutoAttack (standard) on this many fixed test images
    aa_budget: tuple = ()           # (steps, targets, queries); () = AutoAttack's own


FULL = Budget()
QUICK = Budget(train_images=256, epochs=1, milestones=(), batch_size=64, train_steps=1,
               eval_images=32, eval_steps=(2, 5), eval_batch_size=32, viz_images=2,
               aa_images=16, aa_budget=(3, 3, 30))

MODELS = (
    # (run name, registry name, extra model kwargs, adversarial training?)
    ("clean", "small_resnet", {}, False),
    ("adv-baseline", "small_resnet", {}, True),
    ("adv-denoise", "small_resnet_denoise", {"denoise": None}, True),
)


def _train_config(name: str, arch: str, kwargs: dict, adversarial: bool, budget: Budget,
                  out_dir: str, data_root: str | None, seed: int, progress: bool) -> dict:
    """The :mod:`featdenoise.training.config` overrides of one demo network."""
    kwargs = {k: (budget.denoise if v is None else v) for k, v in kwargs.items()}
    return {
        "model": {"name": arch, "kwargs": {"in_channels": 1, "num_classes": 10,
                                           "width": budget.width, "blocks": [1, 1, 1], **kwargs}},
        "data": {"name": "fashion_mnist", "root": data_root, "batch_size": budget.batch_size,
                 "workers": 0, "augment": False, "train_subset": budget.train_images,
                 "val_subset": min(200, budget.eval_images)},
        "attack": {"steps": budget.train_steps if adversarial else 0, "eps": EPS * 255,
                   "step_size": budget.train_step_size * 255, "clean_start_prob": 0.2,
                   "targeted": budget.train_targeted},
        "optim": {"lr": budget.lr, "base_batch": 64, "momentum": 0.9, "nesterov": True,
                  "weight_decay": 1e-4, "label_smoothing": 0.1, "warmup_epochs": 0,
                  "milestones": list(budget.milestones), "lr_decay": 0.1,
                  "epochs": budget.epochs},
        "run": {"out_dir": os.path.join(out_dir, "runs", name), "seed": seed,
                "checkpoint_every": 0, "eval_every": 0, "final_eval_steps": 0,
                "resume": "never", "device": "cpu", "tensorboard": False,
                "progress": progress},
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


def _fmt_pct(x: float) -> str:
    return f"{100.0 * x:.1f}"


def results_table(summaries: dict[str, dict[str, dict]], steps: tuple) -> str:
    """Markdown table: one row per network; clean accuracy, then accuracy under each attack.

    ``summaries[name]["targeted" | "untargeted"]`` are white-box summaries
    (:func:`featdenoise.evaluation.whitebox.evaluate_whitebox`); rates are shown in %.
    Targeted columns also give the targeted attack success rate after a slash.
    """
    head = ["network", "images", "clean"]
    head += [f"PGD-{s} targeted acc / succ" for s in steps]
    head += [f"PGD-{s} untargeted acc" for s in steps]
    with_aa = any("autoattack" in pair for pair in summaries.values())
    if with_aa:
        n_aa = next(p["autoattack"]["autoattack"]["n"] for p in summaries.values()
                    if "autoattack" in p)
        head.append(f"AutoAttack acc ({n_aa} images)")
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1))
             + "|"]
    for name, pair in summaries.items():
        t, u = pair["targeted"], pair["untargeted"]
        at = {a["steps"]: a for a in t["attacks"]}
        au = {a["steps"]: a for a in u["attacks"]}
        row = [name, str(t["num_images"]), _fmt_pct(t["clean"]["top1"])]
        row += [f"{_fmt_pct(at[s]['accuracy'])} / {_fmt_pct(at[s]['success_rate'])}"
                for s in steps]
        row += [_fmt_pct(au[s]["accuracy"]) for s in steps]
        if with_aa:
            aa = pair.get("autoattack")
            row.append(_fmt_pct(aa["autoattack"]["final"]) if aa else "-")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def _evaluate(name: str, model, test_set, out_dir: str, budget: Budget, seed: int,
              progress: bool) -> dict[str, dict]:
    from featdenoise.evaluation.whitebox import evaluate_whitebox

    out = {}
    for mode in ("targeted", "untargeted"):
        folder = os.path.join(out_dir, "eval", f"{name}-{mode}")
        out[mode] = evaluate_whitebox(
            model, test_set, folder, steps=budget.eval_steps, attack="pgd", eps=EPS,
            step_size=budget.eval_step_size, targeted=mode == "targeted", seed=seed,
            batch_size=budget.eval_batch_size, limit=budget.eval_images, name=name,
            device="cpu", progress=progress, extra={"dataset": "fashion_mnist"})
    if budget.aa_images:
        steps, targets, queries = budget.aa_budget or (None, None, None)
        out["autoattack"] = evaluate_whitebox(
            model, test_set, os.path.join(out_dir, "eval", f"{name}-autoattack"), attack=None,
            autoattack={"version": "standard", "steps": steps, "n_target_classes": targets,
                        "n_queries": queries}, eps=EPS, seed=seed,
            batch_size=budget.eval_batch_size, limit=budget.aa_images, name=name,
            device="cpu", progress=progress, extra={"dataset": "fashion_mnist"})
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
        quick: the tiny :data:`QUICK` budget (seconds; numbers meaningless) instead of :data:`FULL`.
        data_root: Fashion-MNIST IDX folder (default: the Debian package's folder).
        threads: torch CPU threads (default: :func:`default_threads`).
        seed: seeds training, the image subsets, attack targets and random starts.
        budget: overrides the budget entirely (tests).
    """
    with outdir.FolderLock(out_dir, "demo folder"):
        return _run_demo(out_dir, quick, data_root, threads, seed, progress, budget)


def _stale(out_dir: str) -> dict:
    """The demo's own sub-folders of ``out_dir``, each with how it is recognised as the demo's."""
    from featdenoise.evaluation.records import is_own_evaluation
    from featdenoise.training.rundir import is_own_run_dir

    owned = {}
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


def _run_demo(out_dir: str, quick: bool, data_root: str | None, threads: int | None, seed: int,
              progress: bool, budget: Budget | None) -> str:
    from featdenoise.data.datasets import build_dataset
    from featdenoise.evaluation import report
    from featdenoise.training import load_model, train

    t0, c0 = time.perf_counter(), time.process_time()
    budget = budget or (QUICK if quick else FULL)
    root = data_root or FMNIST_ROOT
    if not os.path.isfile(os.path.join(root, "train-images-idx3-ubyte.gz")) and not \
            os.path.isfile(os.path.join(root, "train-images-idx3-ubyte")):
        raise FileNotFoundError(f"Fashion-MNIST not found in {root}; install the Debian package "
                                "dataset-fashion-mnist (`make data`) or pass --data-root DIR")
    torch.set_num_threads(threads or default_threads())
    # Stale results of an earlier demo: every folder checked first, then deleted.
    outdir.remove_planned(outdir.plan_removal(out_dir, _stale(out_dir), "demo"))

    test_set = build_dataset("fashion_mnist", root, "val", augment=False)
    timings: dict[str, tuple[float, float]] = {}
    models = {}
    for name, arch, kwargs, adversarial in MODELS:
        print(f"[demo] training {name} ({arch}, {'PGD' if adversarial else 'clean'} training)",
              flush=True)
        t, c = time.perf_counter(), time.process_time()
        cfg = _train_config(name, arch, kwargs, adversarial, budget, out_dir, root, seed,
                            progress)
        run_dir = train(cfg)
        timings[f"train {name}"] = (time.perf_counter() - t, time.process_time() - c)
        models[name] = load_model(run_dir).eval()

    summaries = {}
    for name, model in models.items():
        print(f"[demo] evaluating {name}: clean, PGD-{'/'.join(map(str, budget.eval_steps))} "
              f"targeted and untargeted on {budget.eval_images} test images, AutoAttack on "
              f"{budget.aa_images}", flush=True)
        t, c = time.perf_counter(), time.process_time()
        summaries[name] = _evaluate(name, model, test_set, out_dir, budget, seed, progress)
        timings[f"evaluate {name}"] = (time.perf_counter() - t, time.process_time() - c)

    # Accuracy against attack iterations (Fig. 6), every network and both attack modes.
    flat = [s for pair in summaries.values() for s in (pair["targeted"], pair["untargeted"])]
    plot = report.plot_accuracy_vs_iterations(
        flat, os.path.join(out_dir, "accuracy_vs_iterations.png"),
        title=f"Fashion-MNIST, PGD white-box, eps = {EPS} ({EPS * 255:g}/255)")

    # Feature noise (Sec. 3, Figs. 1-3) of the adversarially trained networks.
    from featdenoise.analysis import viz

    print("[demo] drawing the feature-noise pictures", flush=True)
    t, c = time.perf_counter(), time.process_time()
    noise = {}
    x, y = _first_images(test_set, budget.viz_images)
    for name in ("adv-denoise", "adv-baseline"):
        noise[name] = viz.visualize(
            models[name], x, y, os.path.join(out_dir, "feature_noise", name), eps=EPS,
            steps=max(budget.eval_steps[0], 1), step_size=budget.eval_step_size, seed=seed,
            title=name)
    timings["feature-noise pictures"] = (time.perf_counter() - t, time.process_time() - c)
    timings["total"] = (time.perf_counter() - t0, time.process_time() - c0)

    path = _write_report(out_dir, budget, summaries, plot, noise, timings, quick, seed)
    print(f"[demo] done in {timings['total'][0]:.0f} s; report: {path}", flush=True)
    return path


def _aa_words(budget: Budget) -> str:
    if not budget.aa_budget:
        return "the standard version (APGD-CE, APGD-T, FAB-T, Square with 5000 queries)"
    steps, targets, queries = budget.aa_budget
    return (f"a reduced budget ({steps} iterations, {targets} targets, {queries} queries; "
            "weaker than AutoAttack)")


def _first_images(dataset, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` test images and labels: ``[n, C, H, W]``, ``[n]``."""
    items = [dataset[i] for i in range(n)]
    return torch.stack([a for a, _ in items]), torch.tensor([int(b) for _, b in items])


def _write_report(out_dir: str, budget: Budget, summaries: dict, plot: str, noise: dict,
                  timings: dict, quick: bool, seed: int) -> str:
    rel = lambda p: os.path.relpath(p, out_dir)  # noqa: E731
    table = results_table(summaries, budget.eval_steps)
    lines = [
        "# featdenoise demo: Fashion-MNIST" + (" (quick, numbers meaningless)" if quick else ""),
        "",
        f"Three networks of the same size (`small_resnet`, width {budget.width}, one basic "
        f"block per stage): trained on clean images, adversarially trained, and adversarially "
        f"trained with a non-local denoising block (`{budget.denoise}`) after each stage.",
        f"Adversarial training: {budget.train_images} training images, {budget.epochs} epochs, "
        f"{'targeted' if budget.train_targeted else 'untargeted'} PGD-{budget.train_steps} "
        f"(step {budget.train_step_size:g}, 20% of batches from the clean image), "
        f"eps {EPS} on the [0, 1] scale.",
        f"Evaluation: {budget.eval_images} fixed random test images, white-box PGD at eps "
        f"{EPS} ({EPS * 255:g}/255), random start, step max({budget.eval_step_size:g}, "
        f"eps/steps); targeted = a random wrong target per image (paper Sec. 6.1), "
        f"accuracy = prediction equals the label; succ = targeted attack success rate.",
        f"AutoAttack: {_aa_words(budget)} at the same eps on {budget.aa_images} fixed random "
        f"test images (the library's subset for that size and seed).",
        "",
        "## Accuracy (%)",
        "",
        table,
        f"![accuracy vs iterations]({rel(plot)})",
        "",
        "## Feature noise (paper Sec. 3, Figs. 1-3)",
        "",
        "Relative L2 distance ||f(x_adv) - f(x)|| / ||f(x)|| between the features of an image "
        "and of its PGD counterpart (mean over the pictured images), at each stage and right "
        "before / after each denoising operation:",
        "",
    ]
    for name, res in noise.items():
        lines += [f"### {name}", "", res["table"], ""]
        lines += [f"![{name} {os.path.basename(p)}]({rel(p)})" for p in res["pictures"]]
        lines.append("")
    lines += ["## Time", "", "Wall-clock seconds, and CPU seconds used by this process (all "
              "threads; on a machine shared with other jobs the wall time grows, the CPU time "
              "much less).", "", "| step | wall s | CPU s |", "|---|---:|---:|"]
    lines += [f"| {k} | {w:.0f} | {c:.0f} |" for k, (w, c) in timings.items()]
    lines += ["", f"torch threads: {torch.get_num_threads()}, seed {seed}.", ""]
    path = os.path.join(out_dir, "report.md")
    with atomic_write(path, ours=own_text("# featdenoise demo")) as f:
        f.write("\n".join(lines))
    with atomic_write(os.path.join(out_dir, "results.json"),
                      ours=own_json("budget", "summaries")) as f:
        json.dump({"budget": dataclasses.asdict(budget), "summaries": summaries,
                   "feature_noise": {k: v["distances"] for k, v in noise.items()},
                   "timings_s": {k: {"wall": w, "cpu": c} for k, (w, c) in timings.items()}},
                  f, indent=2, sort_keys=True)
    return path
