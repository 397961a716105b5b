"""``torchrun`` evaluation: two processes count every image once and match one process exactly."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from helpers import folder_dataset, tiny_checkpoint


@pytest.mark.slow
def test_torchrun_two_processes_match_one(tmp_path):
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    if torchrun is None:
        pytest.skip("torchrun is not installed next to this Python")
    folder, labels = folder_dataset(tmp_path, n=7)
    ck = tiny_checkpoint(tmp_path)
    common = ["eval", "--checkpoint", str(ck), "--data", "folder", "--data-root", str(folder),
              "--labels", str(labels), "--steps", "1,3", "--batch-size", "2", "--device", "cpu",
              "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    one = subprocess.run([sys.executable, "-m", "featdenoise.cli", *common, "--out",
                          str(tmp_path / "one")], env=env, capture_output=True, text=True)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", "-m",
                          "featdenoise.cli", *common, "--out", str(tmp_path / "two")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    parts = sorted(os.listdir(tmp_path / "two" / "parts"))
    assert parts == ["outcomes-rank0.jsonl", "outcomes-rank1.jsonl"]  # both ranks worked

    def load(name):
        with open(tmp_path / name / "outcomes.jsonl") as f:
            return [json.loads(line) for line in f]

    assert load("two") == load("one")
    a, b = (json.load(open(tmp_path / n / "summary.json")) for n in ("one", "two"))
    assert a["attacks"] == b["attacks"] and a["clean"] == b["clean"] and b["num_images"] == 7
