"""``featdenoise bench agreement``: is the default (accelerated) attack as strong as ``exact=True``?

Every attack runs twice on the same model, images and seed: as a user writes it (the speed
layer :mod:`featdenoise.accel` on) and with ``exact=True`` (PyTorch's own path). An image is
robust when PyTorch's own forward of the returned image still predicts its label (the
evaluator's view). A combination is one (model, seed, CPU kernel set); per combination the
difference ``robust(default) - robust(exact)`` is recorded, and per attack the bench prints its
mean with a 95% Student-t interval over the combinations (:mod:`featdenoise.evaluation.paired`).
An interval entirely above 0 says the default is systematically weaker.

What rounding alone does is measured beside it: the same ``exact=True`` attack on the same
model, images and seed in two kernel sets differs only in float rounding (other summation
orders and vector widths), so the images on which those runs disagree are the ones that rounding
decides. The column "rounding flips" is their mean count per pair of kernel sets.

Beside it, per model and kernel set, how close the default's logits and input gradients are to
``exact=True``'s and to a float64 run of the same model (the logits agree to float rounding; an
input gradient can differ by far more on the few images where a ReLU input or a max-pool window
is within rounding of a tie, since the speed layer's rounding may decide it the other way).

Kernel sets are emulated per worker process through PyTorch's and oneDNN's dispatch variables
(``ATEN_CPU_CAPABILITY``, ``ONEDNN_MAX_CPU_ISA``): ``native``, ``avx2`` (AVX2 kernels, as on a CPU
without AVX-512) and ``default`` (no vector extension beyond SSE4.1). A set the CPU cannot run,
or that resolves to one already measured, is skipped. The models (a max-pool CNN with one conv
that has no BatchNorm, a CNN with strided convolutions, the small ResNet with its non-local
denoising blocks)
are trained in a few seconds on a synthetic 10-class task (1x16x16 images: class templates plus
noise) with each seed, once, in the parent process, so every kernel set attacks the same
weights. Budgets are reduced (``--full``: AutoAttack's standard iterations and queries).
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from featdenoise import accel
from featdenoise.attacks import AutoAttack, build_attack, registry
from featdenoise.evaluation.paired import discordant, mean_interval
from featdenoise.models import create_model

KERNEL_SETS = {
    "native": {},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
    "default": {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41"},
}
MODELS = ("maxpool_cnn", "strided_cnn", "small_resnet_denoise")
# Every iterative attack of the registry (FGSM's one step has no path to compare) and the chain.
ATTACKS = (*(name for name in registry.ATTACKS if name != "fgsm"), *registry.AUTOATTACK_ATTACKS,
           "autoattack")
EPS = 16 / 255
CLASSES = 10
SIZE = 16


def synthetic_task(n: int, seed: int, size: int = SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images ``[n, 1, size, size]`` in [0, 1] and labels ``[n]``: one smooth template per
    class (fixed for every seed) plus Gaussian noise of std 0.15."""
    g = torch.Generator().manual_seed(1234)
    templates = torch.rand(CLASSES, 1, size // 4, size // 4, generator=g)
    templates = nn.functional.interpolate(templates, size=size, mode="bilinear",
                                          align_corners=False)
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    x = 0.5 + 0.6 * (templates[y] - 0.5) + 0.15 * torch.randn(n, 1, size, size, generator=g)
    return x.clamp(0, 1), y


def build(name: str) -> nn.Module:
    """One of :data:`MODELS`, untrained (for 1x16x16 inputs, 10 classes)."""
    if name == "maxpool_cnn":
        return nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(16 * 4 * 4, CLASSES))
    if name == "strided_cnn":
        return nn.Sequential(
            nn.Conv2d(1, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, CLASSES))
    if name == "small_resnet_denoise":
        return create_model("small_resnet", in_channels=1, num_classes=CLASSES, width=8,
                            placement="stages")
    raise ValueError(f"unknown model {name!r}; choose one of {MODELS}")


def train(name: str, seed: int, epochs: int = 6) -> nn.Module:
    """:func:`build` ``(name)`` trained with Adam on 1024 synthetic images (seed ``seed``), each
    batch with uniform noise of +-0.05 (a little robustness, so that some images survive)."""
    torch.manual_seed(seed)
    model = build(name)
    x, y = synthetic_task(1024, seed=seed)
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), 64):
            b = perm[i:i + 64]
            noisy = (x[b] + (torch.rand(x[b].shape, generator=g) * 2 - 1) * 0.05).clamp(0, 1)
            loss = nn.functional.cross_entropy(model(noisy), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def budget(full: bool) -> dict:
    """Iterations, targets and queries of the attacks (reduced unless ``full``)."""
    if full:
        return {"steps": 100, "targets": 9, "queries": 5000}
    return {"steps": 20, "targets": 3, "queries": 200}


def make_attack(name: str, model: nn.Module, seed: int, exact: bool, b: dict):
    """Attack ``name`` of :data:`ATTACKS` at budget ``b`` (PGD family: the paper's targeted
    attack, step 1/255 for ``steps`` iterations)."""
    if name == "autoattack":
        return AutoAttack(model, eps=EPS, seed=seed, exact=exact, steps=b["steps"],
                          n_target_classes=b["targets"], n_queries=b["queries"])
    kw: dict = {"eps": EPS, "seed": seed, "exact": exact}
    if name in ("pgd", "ifgsm", "mifgsm"):
        kw["steps"] = b["steps"]
    elif name == "square":
        kw["n_queries"] = b["queries"]
    else:
        kw["steps"] = b["steps"]
        if name in ("apgd-t", "fab-t"):
            kw["n_target_classes"] = b["targets"]
    return build_attack(name, model, **kw)


@torch.no_grad()
def robust_flags(model: nn.Module, x_adv: torch.Tensor, y: torch.Tensor) -> list[bool]:
    """Per image: PyTorch's own forward of ``x_adv`` still predicts ``y``."""
    return (model(x_adv).argmax(1) == y).tolist()


def input_grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor, fast: bool):
    """``(logits [N, K], d CE / d x [N, C, H, W])``, through the speed layer if ``fast``."""
    xr = x.clone().requires_grad_(True)
    with accel.inference_grad(model, enabled=fast):
        logits = model(xr)
        (grad,) = torch.autograd.grad(
            nn.functional.cross_entropy(logits.float(), y, reduction="sum"), xr)
    return logits.detach().double(), grad.double()


def closeness(a_logits, a_grad, b_logits, b_grad) -> dict:
    """How far ``a`` is from ``b``: logits ``max |a - b| / max |b|``; input gradients per image
    ``max |a - b| / max |b|``, their median and largest, and the images off by more than 1e-3
    (where a ReLU or max-pool near-tie was decided the other way)."""
    per_image = ((a_grad - b_grad).flatten(1).abs().amax(1)
                 / b_grad.flatten(1).abs().amax(1).clamp_min(1e-30))
    return {"logits": float((a_logits - b_logits).abs().max() / b_logits.abs().max()),
            "grad_median": float(per_image.median()), "grad_max": float(per_image.max()),
            "grad_off": int((per_image > 1e-3).sum()), "images": len(per_image)}


def agreement_numbers(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict:
    """Default (speed layer) against ``exact=True``, and each against float64, on ``x``."""
    fast, exact = input_grad(model, x, y, True), input_grad(model, x, y, False)
    wide = input_grad(copy.deepcopy(model).double(), x.double(), y, False)
    return {"default_vs_exact": closeness(*fast, *exact),
            "default_vs_float64": closeness(*fast, *wide),
            "exact_vs_float64": closeness(*exact, *wide)}


def worker(folder: Path, images: int, full: bool, attacks: list[str],
           resnet50: bool = True) -> dict:
    """Attack every model saved in ``folder`` both ways; ``{"capability", "runs"}``, ``runs``
    keyed ``"model/seed/attack/default|exact"`` with per-image robust flags."""
    torch.set_num_threads(1)
    spec = json.loads((folder / "models.json").read_text())
    b = budget(full)
    runs: dict = {}
    numbers: dict = {}
    for entry in spec:
        model = build(entry["model"])
        model.load_state_dict(torch.load(folder / entry["file"], weights_only=True))
        model.eval()
        seed = entry["seed"]
        x, y = synthetic_task(images, seed=1000 + seed)
        if seed == 0:
            numbers[entry["model"]] = agreement_numbers(model, x, y)
        for name in attacks:
            for mode in ("default", "exact"):
                attack = make_attack(name, model, seed, mode == "exact", b)
                x_adv = attack(x, y)
                runs[f"{entry['model']}/{seed}/{name}/{mode}"] = robust_flags(model, x_adv, y)
    if resnet50:  # the bench attacks' large model: agreement numbers only
        torch.manual_seed(0)
        net = create_model("resnet50", num_classes=1000).eval()
        x = torch.rand(8, 3, 64, 64, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            y = net(x).argmax(1)
        numbers["resnet50 (random init, 64 px)"] = agreement_numbers(net, x, y)
    return {"capability": torch.backends.cpu.get_cpu_capability(), "runs": runs,
            "numbers": numbers}


def summarise(results: dict[str, dict], attacks: list[str]) -> list[dict]:
    """One row per attack from the workers' ``results`` (kernel set -> :func:`worker` output):
    combinations, the mean robust count of ``exact=True``, the mean
    ``robust(default) - robust(exact)`` with its 95% interval, the mean
    disagreements ``b`` / ``c`` per combination, and the mean rounding flips (exact runs of
    the same model and seed in two kernel sets)."""
    rows = []
    for name in attacks:
        diffs, bs, cs, flips, robust = [], [], [], [], []
        keys = sorted({k.rsplit("/", 2)[0] for r in results.values() for k in r["runs"]
                       if k.split("/")[2] == name})
        for r in results.values():
            for key in keys:
                fast, ref = r["runs"][f"{key}/{name}/default"], r["runs"][f"{key}/{name}/exact"]
                diffs.append(sum(fast) - sum(ref))
                robust.append(sum(ref))
                b, c = discordant(fast, ref)
                bs.append(b)
                cs.append(c)
        for k1, k2 in itertools.combinations(sorted(results), 2):
            for key in keys:
                b, c = discordant(results[k1]["runs"][f"{key}/{name}/exact"],
                                  results[k2]["runs"][f"{key}/{name}/exact"])
                flips.append(b + c)
        mean, lo, hi = mean_interval(diffs)
        rows.append({"attack": name, "combinations": len(diffs),
                     "robust": sum(robust) / len(robust), "mean": mean, "low": lo, "high": hi,
                     "b": sum(bs) / len(bs), "c": sum(cs) / len(cs),
                     "flips": sum(flips) / len(flips) if flips else float("nan"),
                     "weaker": lo > 0})
    return rows


def table(rows: list[dict], images: int) -> str:
    """The summary as a Markdown table."""
    out = [f"| attack | combinations | robust (exact), mean of {images} | robust default - exact, "
           "mean [95% CI] | default robust / exact robust only, per combination | "
           "rounding flips | verdict |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        verdict = "WEAKER" if r["weaker"] else "not weaker"
        out.append(f"| {r['attack']} | {r['combinations']} | {r['robust']:.1f} | {r['mean']:+.2f} "
                   f"[{r['low']:+.2f}, {r['high']:+.2f}] | {r['b']:.2f} / {r['c']:.2f} | "
                   f"{r['flips']:.2f} | {verdict} |")
    return "\n".join(out)


def numbers_table(results: dict[str, dict]) -> str:
    """Logit and input-gradient agreement per model and kernel set, as a Markdown table."""
    out = ["| model | kernel set | logits: default vs exact | input gradient per image: default "
           "vs exact, median / max | images off > 1e-3 | exact vs float64: logits / gradient "
           "max | default vs float64: gradient max |", "|---|---|---|---|---|---|---|"]
    for kernel, r in results.items():
        for model, n in r.get("numbers", {}).items():
            d, e, f = n["default_vs_exact"], n["exact_vs_float64"], n["default_vs_float64"]
            out.append(f"| {model} | {kernel} | {d['logits']:.1e} | {d['grad_median']:.1e} / "
                       f"{d['grad_max']:.1e} | {d['grad_off']} of {d['images']} | "
                       f"{e['logits']:.1e} / {e['grad_max']:.1e} | {f['grad_max']:.1e} |")
    return "\n".join(out)


def _spawn(kernel: str, folder: Path, args: argparse.Namespace, attacks: list[str]):
    env = {**os.environ, **KERNEL_SETS[kernel], "OMP_NUM_THREADS": "1"}
    out = folder / f"result_{kernel}.json"
    cmd = [sys.executable, "-m", "featdenoise.benchmarks.agreement", "--worker", str(folder),
           "--images", str(args.images), "--attacks", ",".join(attacks), "--out", str(out)]
    if args.full:
        cmd.append("--full")
    if args.models:  # a chosen subset: no ResNet-50 row
        cmd.append("--no-resnet50")
    return subprocess.Popen(cmd, env=env), out


def run(args: argparse.Namespace) -> int:
    """Train the models, attack them in every kernel set (one worker process each, run side by
    side), print the table and return 1 if some attack's default is systematically weaker."""
    attacks = list(ATTACKS) if not args.attacks else args.attacks.split(",")
    kernels = args.kernels.split(",")
    unknown = [k for k in kernels if k not in KERNEL_SETS]
    if unknown:
        raise SystemExit(f"--kernels: unknown kernel set(s) {unknown}; "
                         f"choose from {list(KERNEL_SETS)}")
    models = list(MODELS) if not args.models else args.models.split(",")
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        raise SystemExit(f"--models: unknown model(s) {unknown}; choose from {list(MODELS)}")
    unknown = [a for a in attacks if a not in ATTACKS]
    if unknown:
        raise SystemExit(f"--attacks: unknown attack(s) {unknown}; choose from {list(ATTACKS)}")
    if args.seeds < 1 or args.images < 1:
        raise SystemExit(f"--seeds {args.seeds} --images {args.images}: both must be >= 1")
    seeds = list(range(args.seeds))
    with tempfile.TemporaryDirectory(prefix="featdenoise-agreement-") as tmp:
        folder = Path(tmp)
        spec = []
        for model, seed in tqdm(list(itertools.product(models, seeds)), desc="train models"):
            net = train(model, seed)
            file = f"{model}_{seed}.pt"
            torch.save(net.state_dict(), folder / file)
            spec.append({"model": model, "seed": seed, "file": file})
        (folder / "models.json").write_text(json.dumps(spec))
        print(f"attacking {len(spec)} models x {len(attacks)} attacks x 2 modes in kernel sets "
              f"{kernels} ({args.images} images each; one worker process per kernel set)",
              flush=True)
        jobs = [(k, *_spawn(k, folder, args, attacks)) for k in kernels]
        results: dict[str, dict] = {}
        for kernel, proc, out in jobs:
            if proc.wait() != 0:
                print(f"kernel set {kernel}: worker failed (exit {proc.returncode}); skipped")
                continue
            result = json.loads(out.read_text())
            seen = {r["capability"]: k for k, r in results.items()}
            if result["capability"] in seen and kernel != "native":
                print(f"kernel set {kernel}: resolves to {result['capability']} like "
                      f"{seen[result['capability']]}; skipped")
                continue
            results[kernel] = result
            print(f"kernel set {kernel}: CPU capability {result['capability']}")
    if not results:
        raise SystemExit("bench agreement: no kernel set ran")
    print("Logits and input gradients (cross-entropy), seed 0 of each model, on the bench's "
          "images:")
    print(numbers_table(results))
    print()
    rows = summarise(results, attacks)
    print(table(rows, args.images))
    weaker = [r["attack"] for r in rows if r["weaker"]]
    if weaker:
        print(f"systematically weaker by default (95% interval above 0): {weaker}")
        return 1
    print("no attack's default is weaker than exact=True at 95%")
    return 0


def add_arguments(p: argparse._ArgumentGroup) -> None:
    p.add_argument("--kernels", default="native,avx2,default",
                   help="CPU kernel sets to emulate, comma-separated (native, avx2, default)")
    p.add_argument("--seeds", type=int, default=3, help="training and attack seeds per model")
    p.add_argument("--images", type=int, default=200, help="test images per combination")
    p.add_argument("--models", default="",
                   help=f"comma-separated subset of {','.join(MODELS)} (default: all, and "
                        "ResNet-50's logit and gradient agreement)")
    p.add_argument("--attacks", default="",
                   help=f"comma-separated subset of {','.join(ATTACKS)} (default: all)")


def _worker_main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="featdenoise.benchmarks.agreement")
    p.add_argument("--worker", type=Path, required=True)
    p.add_argument("--images", type=int, required=True)
    p.add_argument("--attacks", required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--full", action="store_true")
    p.add_argument("--no-resnet50", dest="resnet50", action="store_false")
    a = p.parse_args(argv)
    result = worker(a.worker, a.images, a.full, a.attacks.split(","), a.resnet50)
    a.out.write_text(json.dumps(result))


if __name__ == "__main__":
    _worker_main(sys.argv[1:])
