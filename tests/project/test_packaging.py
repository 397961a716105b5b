"""The built wheel carries the shipped configs, and a config is found by name outside the tree."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from helpers import ROOT

from featdenoise.configs import list_configs


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """Build the wheel from a copy of the sources (the checkout gets no build/ or egg-info)."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "src", src / "src", symlinks=False,
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    out = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "--no-index", "-q", "-w", str(out), str(src)], check=True, timeout=300)
    (whl,) = out.glob("featdenoise-*.whl")
    return whl


def test_wheel_ships_every_config(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    shipped = sorted(n[len("featdenoise/configs/"):-len(".yaml")] for n in names
                     if n.startswith("featdenoise/configs/") and n.endswith(".yaml"))
    assert shipped == list_configs()
    assert "imagenet_r152_denoise_all" in shipped and "fashion_mnist_quick" in shipped


@pytest.mark.slow  # ~10 s: a fresh interpreter imports torch; name lookup is in test_config.py
def test_installed_wheel_finds_config_by_name_from_another_folder(wheel, tmp_path):
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)  # what pip install puts in site-packages
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    script = (
        "import sys, featdenoise; from featdenoise.cli import main\n"
        "assert featdenoise.__file__.startswith(sys.argv[1]), featdenoise.__file__\n"
        "for spec in sys.argv[2:]:\n"
        "    print('---', spec, flush=True)\n"
        "    assert main(['train', '--config', spec, '--print-config']) == 0\n")
    specs = ["fashion_mnist_quick", "configs/fashion_mnist_quick.yaml"]
    run = subprocess.run([sys.executable, "-c", script, str(site), *specs], cwd=elsewhere,
                         env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    outputs = run.stdout.split("--- ")[1:]
    assert len(outputs) == 2
    for out in outputs:
        assert "name: fashion_mnist" in out and "out_dir: runs/fashion_mnist_quick" in out


def _requirements() -> list[str]:
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    return project["dependencies"] + extras["dev"] + extras["docs"]


def test_dependencies_are_ranges_and_constraints_pin_each_within_its_range():
    """pyproject.toml states ranges (the library installs next to other packages); the tested
    versions are pinned in constraints.txt, each inside its range."""
    from packaging.requirements import Requirement

    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[name.lower().replace("_", "-")] = version
    runtime = [Requirement(r) for r in _requirements()]
    assert runtime
    for req in runtime:
        assert not any(s.operator == "==" for s in req.specifier), f"{req} is pinned exactly"
        name = req.name.lower().replace("_", "-")
        assert name in pins, f"{req.name} has no exact version in constraints.txt"
        assert req.specifier.contains(pins[name], prereleases=True), (req, pins[name])
    assert pins["torchattacks"] == "3.5.1"  # installed by make without its dependencies
