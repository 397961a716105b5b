"""The multi-GPU checks, one process per GPU under torchrun (``scripts/gpu_check_multi.sh``;
NCCL on GPUs, gloo with ``--dry-run`` on CPUs), one ``PASS|FAIL|SKIP name: detail`` line each:

* ``multi-ddp``: parameter and BatchNorm-buffer checksums equal on every rank after DDP training;
* ``multi-eval``: every evaluation image counted once, one summary writer;
* ``multi-resume`` (``--stage resume``, launched with another number of processes): resume from
  the first stage's checkpoint with another world size.

Run as a script (``torchrun ... tests/gpu/multi_gpu.py --stage train --out DIR``): the exit
status is 1 if a check failed, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from collections.abc import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # gpu_utils, run as a script
import gpu_utils as gu  # noqa: E402

from featdenoise.models import create_model  # noqa: E402
from featdenoise.runtime import backends  # noqa: E402
from featdenoise.runtime import distributed as dist  # noqa: E402


class Skip(Exception):
    """A check that does not apply here (no checkpoint from the first stage)."""


class Checks:
    """Runs checks and prints one ``PASS|FAIL|SKIP name: detail`` line each (rank 0 only)."""

    def __init__(self, verbose: bool = False):
        self.verbose = verbose
        self.results: list[tuple[str, str, str]] = []

    def run(self, name: str, fn: Callable[[], str]) -> None:
        start = time.perf_counter()
        try:
            status, detail = "PASS", fn()
        except Skip as why:
            status, detail = "SKIP", str(why)
        except AssertionError as err:
            status, detail = "FAIL", str(err) or "assertion failed"
        except Exception as err:  # a crash is a failed check, reported on one line
            status, detail = "FAIL", f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
            if self.verbose:
                traceback.print_exc()
        took = time.perf_counter() - start
        self.results.append((status, name, detail))
        if dist.is_main():
            print(f"{status} {name}: {detail} [{took:.1f} s]", flush=True)

    def failed(self) -> int:
        return sum(s == "FAIL" for s, _, _ in self.results)


def run_multi(checks: Checks, device: torch.device, work: str, stage: str) -> None:
    from featdenoise.evaluation.whitebox import evaluate_whitebox
    from featdenoise.hub import checkpoints as ckpt
    from featdenoise.training import loop
    from featdenoise.training.recipes import pgd

    data = os.path.join(work, "data")
    run_dir = os.path.join(work, "run")
    if dist.is_main():
        gu.fake_fashion_mnist(data, n_train=64, n_val=8)
    dist.barrier()
    world = dist.world_size()

    if stage == "train":
        def trained() -> str:
            cfg = gu.train_cfg(data, run_dir, device, "run.stop_after=4")
            seen = []
            real = pgd.train_step

            def spy(model, *args, **kw):  # the DDP-wrapped network each rank trains
                seen[:] = [model]
                return real(model, *args, **kw)

            pgd.train_step = spy
            try:
                loop.train(cfg)  # stops after 4 steps: checkpoint, rank 0's BN statistics
            finally:
                pgd.train_step = real
            params, buffers = gu.checksums(dist.unwrap(seen[0]))
            assert gu.same_on_every_rank(params), "parameters differ between ranks"
            assert gu.same_on_every_rank(buffers), "BatchNorm buffers differ between ranks"
            return (f"{world} ranks: {len(params)} parameter and {len(buffers)} buffer "
                    f"checksums equal on every rank after 4 DDP steps")

        checks.run("multi-ddp", trained)

        def counted() -> str:
            torch.manual_seed(0)
            model = create_model("small_resnet_denoise", in_channels=3, width=8).eval()
            out = os.path.join(work, "eval")
            summary = evaluate_whitebox(model, gu.Images(21, 16), out, steps=[1], batch_size=4,
                                        eps=8 / 255, step_size=4 / 255, device=device,
                                        progress=False)
            dist.barrier()
            n = dist.all_reduce_sum([0 if summary is None else summary["num_images"]])[0]
            writers = dist.all_reduce_sum([float(summary is not None)])[0]
            ids = []  # the images each rank's records are about (one line per attack)
            for name in sorted(os.listdir(os.path.join(out, "parts"))):
                with open(os.path.join(out, "parts", name)) as f:
                    ids += sorted({json.loads(line)["index"] for line in f if line.strip()})
            assert writers == 1, f"{writers:g} processes wrote the summary"
            assert n == 21 and len(ids) == len(set(ids)) == 21, \
                f"{len(ids)} records, {len(set(ids))} distinct, summary {n:g}"
            return f"21 images over {world} ranks counted once; one summary writer"

        checks.run("multi-eval", counted)
    else:
        def resumed() -> str:
            path = os.path.join(run_dir, ckpt.CHECKPOINT)
            if not os.path.isfile(path):
                raise Skip(f"no {path}: run --stage train first")
            before = ckpt.load_checkpoint(path)["step"]
            cfg = gu.train_cfg(data, run_dir, device, "run.final_eval_steps=0", "run.eval_every=0")
            loop.train(cfg)
            after = ckpt.load_checkpoint(path)
            finite = all(torch.isfinite(v).all() for v in after["model"].values()
                         if v.is_floating_point())
            assert after["step"] > before and finite, f"step {before} -> {after['step']}"
            return f"resumed with {world} process(es) at step {before}, finished at " \
                   f"{after['step']}"

        checks.run("multi-resume", resumed)


def main(argv: list[str] | None = None) -> int:
    """The checks of ``--stage`` in folder ``--out`` (the same for both stages); the number of
    failed checks capped at 1 as the exit status (2: bad arguments)."""
    p = argparse.ArgumentParser(prog="tests/gpu/multi_gpu.py", description=__doc__.split("\n")[0])
    p.add_argument("--dry-run", action="store_true",
                   help="the CPU (gloo) instead of the GPUs, tiny settings")
    p.add_argument("--stage", choices=["train", "resume"], default="train",
                   help="first run (train, evaluate) or resume with another world size")
    p.add_argument("--out", required=True, help="work folder (the same for both stages)")
    p.add_argument("--verbose", action="store_true", help="tracebacks of failed checks")
    args = p.parse_args(argv)
    # Deterministic checks need cuBLAS's fixed workspace, read when cuBLAS starts.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    if args.dry_run:
        torch.set_num_threads(min(2, torch.get_num_threads()))
    try:
        device = dist.init("cpu" if args.dry_run else "cuda", what="--device")
    except ValueError as err:
        print(f"error: {err}; use --dry-run on a machine without GPUs", file=sys.stderr)
        return 2
    backends.configure(device)
    checks = Checks(verbose=args.verbose)
    try:
        run_multi(checks, device, args.out, args.stage)
    finally:
        dist.shutdown()
    return 1 if checks.failed() else 0


if __name__ == "__main__":
    sys.exit(main())
