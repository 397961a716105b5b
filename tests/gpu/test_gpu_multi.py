"""The multi-GPU checks (``multi_gpu.py``): on 2+ GPUs through ``scripts/gpu_check_multi.sh``
(NCCL, then a resume with another number of processes); on the CPU, two gloo processes then one
(the dry run of the same checks)."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import multi_gpu
import pytest
import torch
from helpers import as_rank, free_port

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.split(" ", 1)[0] in ("PASS", "FAIL",
                                                                            "SKIP")]


@pytest.mark.needs_cuda
def test_multi_gpu_ddp_eval_and_resume_with_another_world_size():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 or more CUDA GPUs")
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run([str(ROOT / "scripts" / "gpu_check_multi.sh")], env=env,
                          capture_output=True, text=True, timeout=850)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text
    assert [line.split(" ", 2)[:2] for line in _lines(proc.stdout)] == [
        ["PASS", "multi-ddp:"], ["PASS", "multi-eval:"], ["PASS", "multi-resume:"]], text


def _multi_worker(rank, world, port, out):
    as_rank(rank, world, port)
    rc = multi_gpu.main(["--dry-run", "--stage", "train", "--out", out, "--verbose"])
    if rc:
        raise SystemExit(rc)


def test_multi_dry_run_two_gloo_processes_then_resume_with_one(tmp_path, capfd):
    import torch.multiprocessing as mp

    out = str(tmp_path / "multi")
    mp.start_processes(_multi_worker, args=(2, free_port(), out), nprocs=2, join=True,
                       start_method="fork")
    assert multi_gpu.main(["--dry-run", "--stage", "resume", "--out", out]) == 0
    text = capfd.readouterr().out
    lines = _lines(text)
    assert [line.split(" ", 2)[:2] for line in lines] == [
        ["PASS", "multi-ddp:"], ["PASS", "multi-eval:"], ["PASS", "multi-resume:"]], text
    assert "counted once" in text and "resumed with 1 process(es) at step 4" in text


def test_a_failing_multi_check_is_one_fail_line_and_exit_status_1(tmp_path, capsys):
    def broken():
        raise RuntimeError("NCCL exploded\nsecond line")

    checks = multi_gpu.Checks()
    checks.run("multi-x", broken)
    lines = _lines(capsys.readouterr().out)
    assert checks.failed() == 1
    assert len(lines) == 1 and lines[0].startswith("FAIL multi-x: RuntimeError: NCCL exploded [")


def test_resume_without_the_first_stage_is_a_skip_line(tmp_path, capsys):
    assert multi_gpu.main(["--dry-run", "--stage", "resume", "--out", str(tmp_path)]) == 0
    (line,) = _lines(capsys.readouterr().out)
    assert line.startswith("SKIP multi-resume: no ") and "run --stage train first" in line


def test_without_a_gpu_the_real_run_says_use_dry_run(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert multi_gpu.main(["--stage", "train", "--out", str(tmp_path)]) == 2
    assert "--dry-run" in capsys.readouterr().err
