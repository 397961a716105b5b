"""The GPU check scripts, run in their CPU dry-run mode: wiring, output lines, exit status."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest
import torch
from gloo import as_rank, free_port

from featdenoise.benchmarks import gpu_check

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.split(" ", 1)[0] in ("PASS", "FAIL",
                                                                            "SKIP")]


def test_dry_run_of_some_checks_prints_one_line_each(capsys):
    rc = gpu_check.main(["--dry-run", "--only", "env,pgd,accel,bench"])
    out = capsys.readouterr().out
    lines = _lines(out)
    names = [line.split(" ", 2)[1].rstrip(":") for line in lines]
    assert names == ["env", "pgd-r152", "accel", "bench-ops", "bench-attacks"]
    assert rc == 0 and all(not line.startswith("FAIL") for line in lines), out
    assert "one PGD iteration: fp32" in out and "bf16" in out and "chunked" in out
    assert "passed" in out.splitlines()[-1]


def test_a_failing_check_is_one_fail_line_and_exit_status_1(monkeypatch, capsys):
    def broken(device):
        raise RuntimeError("kernel exploded\nsecond line")

    monkeypatch.setattr(gpu_check, "check_env", broken)
    assert gpu_check.main(["--dry-run", "--only", "env"]) == 1
    lines = _lines(capsys.readouterr().out)
    assert len(lines) == 1 and lines[0].startswith("FAIL env: RuntimeError: kernel exploded [")


def test_without_a_gpu_the_real_run_says_use_dry_run(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert gpu_check.main(["--device", "cpu"]) == 2
    assert "--dry-run" in capsys.readouterr().err
    assert gpu_check.main(["--device", "bogus"]) == 2
    assert "'bogus'" in capsys.readouterr().err


def test_bench_gpu_is_a_bench_target():
    from featdenoise.cli import main

    with pytest.raises(SystemExit) as done:
        main(["bench", "gpu", "--help"])
    assert done.value.code == 0


def test_scripts_parse_and_refuse_bad_arguments():
    for name in ("gpu_check.sh", "gpu_check_multi.sh"):
        path = ROOT / "scripts" / name
        assert os.access(path, os.X_OK), f"{name} is not executable"
        assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    bad = subprocess.run([str(ROOT / "scripts" / "gpu_check_multi.sh"), "two"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "usage" in bad.stderr


def _multi_worker(rank, world, port, out):
    as_rank(rank, world, port)
    rc = gpu_check.main(["--dry-run", "--multi", "--stage", "train", "--out", out])
    if rc:
        raise SystemExit(rc)


def test_multi_dry_run_two_gloo_processes_then_resume_with_one(tmp_path, capfd):
    import torch.multiprocessing as mp

    out = str(tmp_path / "multi")
    mp.start_processes(_multi_worker, args=(2, free_port(), out), nprocs=2, join=True,
                       start_method="fork")
    assert gpu_check.main(["--dry-run", "--multi", "--stage", "resume", "--out", out]) == 0
    text = capfd.readouterr().out
    lines = _lines(text)
    assert [line.split(" ", 2)[:2] for line in lines] == [
        ["PASS", "multi-ddp:"], ["PASS", "multi-eval:"], ["PASS", "multi-resume:"]], text
    assert "counted once" in text and "resumed with 1 process(es) at step 4" in text


@pytest.mark.slow
def test_whole_dry_runs_of_both_scripts():
    env = {**os.environ, "PYTHON": sys.executable}
    for name in ("gpu_check.sh", "gpu_check_multi.sh"):
        proc = subprocess.run([str(ROOT / "scripts" / name), "--dry-run"], env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert _lines(proc.stdout) and "FAIL" not in proc.stdout
