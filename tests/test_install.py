"""The package as a wheel (not an editable install): built from this checkout, installed into a folder of
its own, then run from an empty directory. The shipped configs travel inside it, so `--config shapes-tiny`,
the built-in data's VAE config and `tmot demo` work wherever the user stands. (`.ci/run` also installs the
wheel with its dependencies into a fresh virtual environment.)"""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from helpers import REPO


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(site folder holding only this package, its wheel). No network: setuptools comes with torch."""
    root = tmp_path_factory.mktemp("wheel")
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(REPO),
                            "-w", str(root / "dist")], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-3000:]
    wheel = next((root / "dist").glob("transfusion_mot-*.whl"))
    site = root / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site),
                              str(wheel)], capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr[-3000:]
    return site, wheel


def run_installed(site: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    # the wheel's copy comes first on the path (an editable install's finder only answers what the path cannot)
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "transfusion_mot", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=900)


def test_wheel_holds_every_package_and_the_configs(installed):
    site, wheel = installed
    names = zipfile.ZipFile(wheel).namelist()
    for package in ("transfusion_mot", "transfusion_mot/common", "transfusion_mot/data", "transfusion_mot/training",
                    "transfusion_mot/inference", "transfusion_mot/recipes", "vae", "eval"):
        assert f"{package}/__init__.py" in names, package
    repo_configs = sorted(str(p.relative_to(REPO)) for p in (REPO / "configs").glob("*/*.yaml"))
    assert sorted(n.removeprefix("transfusion_mot/") for n in names
                  if n.startswith("transfusion_mot/configs/") and n.endswith(".yaml")) == repo_configs
    # the shipped VAE and shapes classifier, every file of them
    shipped = sorted(str(p.relative_to(REPO)) for pkg in ("vae", "eval") for p in (REPO / pkg / "pretrained").rglob("*")
                     if p.is_file())
    assert len(shipped) >= 5 and sorted(n for n in names if "/pretrained/" in n) == shipped
    # every module of the source tree is in the wheel
    sources = sorted(str(p.relative_to(REPO)) for pkg in ("transfusion_mot", "vae", "eval") for p in (REPO / pkg).rglob("*.py"))
    assert sorted(n for n in names if n.endswith(".py")) == sources


def test_train_by_config_name_and_demo_from_an_empty_directory(installed, tmp_path):
    site, _ = installed
    work = tmp_path / "empty"
    work.mkdir()
    small = ["--set", "data.builtin_num_images=120", "--set", "data.builtin_vae_steps=2", "--set", "train.batch_size=8",
             "--set", "train.eval_every=0", "--no-progress"]
    r = run_installed(site, work, "train", "--config", "shapes-tiny", "--max-steps", "2", "--out", "r", *small)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (work / "r" / "checkpoints" / "step_2" / "model.safetensors").is_file()
    weights = "diffusion_pytorch_model.safetensors"  # the shipped VAE, copied from the installed package
    copied = work / "tmot_data" / "shapes-32" / "vae" / weights
    assert copied.read_bytes() == (REPO / "vae" / "pretrained" / "shapes-32" / weights).read_bytes()
    r = run_installed(site, work, "demo", "--out", "d", "--steps", "2", "--num-images", "120", "--fid-images", "0",
                      "--sample-steps", "2", "--no-progress")  # the shipped VAE and classifier
    assert r.returncode == 0, r.stderr[-3000:]
    assert (work / "d" / "report.md").is_file() and (work / "d" / "samples.png").is_file()
    r = run_installed(site, work, "info", "--config", "760m", "--json")
    assert r.returncode == 0 and '"total_params"' in r.stdout
    r = run_installed(site, work, "train", "--config", "no-such-config", "--out", "x")
    assert r.returncode == 2 and "shapes-tiny" in r.stderr and len(r.stderr.strip().splitlines()) == 1
