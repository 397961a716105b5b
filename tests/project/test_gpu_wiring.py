"""The GPU checks' wiring on a CPU: the tests of tests/gpu are collected and skipped with the
reason without a GPU, the scripts parse and refuse bad arguments (and a real run without a GPU),
``featdenoise bench gpu`` runs its tiny stand-in with ``--quick`` and refuses a CPU otherwise."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from helpers import ROOT

from featdenoise.cli import main

SCRIPTS = ROOT / "scripts"
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")


@no_gpu
def test_without_a_gpu_the_gpu_tests_are_collected_and_skipped_with_the_reason():
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                           "-m", "needs_cuda", "tests/gpu"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert "needs a CUDA GPU" in out and "passed" not in out and "failed" not in out, out
    # env, ops, sync, attacks, train_bf16, train_resume, train_compile, pgd_r152, eval_resume,
    # accel, bench (ops, attacks) and the multi-GPU run
    skipped = int(out.strip().splitlines()[-1].split(" skipped")[0].split()[-1])
    assert skipped >= 13, out


def test_bench_gpu_quick_runs_the_stand_in_and_a_cpu_is_refused_otherwise(capsys):
    assert main(["bench", "gpu", "--quick", "--device", "cpu"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("[2,3,16,16] one PGD iteration: fp32 ") and "tf32+chunked" in line
    assert main(["bench", "gpu", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "--device cpu" in err and "--quick" in err and len(err.strip().splitlines()) == 1


def test_scripts_parse_and_refuse_bad_arguments():
    for name in ("gpu_check.sh", "gpu_check_multi.sh"):
        path = SCRIPTS / name
        assert os.access(path, os.X_OK), f"{name} is not executable"
        assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    bad = subprocess.run([str(SCRIPTS / "gpu_check_multi.sh"), "two"], capture_output=True,
                         text=True)
    assert bad.returncode == 2 and "usage" in bad.stderr
    bad = subprocess.run([str(SCRIPTS / "gpu_check.sh"), "--device", "gpu0"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "--device gpu0" in bad.stderr


@no_gpu
def test_without_a_gpu_the_real_run_says_use_dry_run():
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run([str(SCRIPTS / "gpu_check.sh")], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "--dry-run" in proc.stderr, proc.stdout + proc.stderr


@pytest.mark.slow
def test_whole_dry_runs_of_both_scripts():
    env = {**os.environ, "PYTHON": sys.executable}
    for name, done in (("gpu_check.sh", " passed"), ("gpu_check_multi.sh", "PASS multi-resume")):
        proc = subprocess.run([str(SCRIPTS / name), "--dry-run"], env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert done in proc.stdout and "FAIL" not in proc.stdout and "failed" not in proc.stdout
