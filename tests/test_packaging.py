"""The wheel as users install it: ``python -m build --wheel`` holds the package and its data, and
the installed wheel (not the source tree) runs.

The tracked files of the checkout are copied to a temporary folder and built there (the shared
working tree is left alone; ``--no-isolation``: the installed setuptools builds it, no network).
Every file that ``[tool.setuptools.package-data]`` of ``pyproject.toml`` declares must be in the
wheel, as must every module of ``src/segcal``. The wheel is then installed with ``--no-deps`` into
a fresh virtual environment that sees this interpreter's packages (torch, numpy, ...) and the
commands run from there: ``segcal --version``, ``segcal demo --help``, ``segcal eval`` of a tiny
folder, and the bundled data (the 3D U-Net weights, the hippocampus split) read through the
installed package. (``segcal demo`` itself takes 1-3 minutes and is not run here.)
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import tomllib
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow  # builds a wheel and a virtual environment (~15-40 s on 2 cores)


def _tracked_tree(dest: Path) -> None:
    """Copy the checkout's tracked files (the whole tree outside git) to ``dest``."""
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z"], capture_output=True, check=True,
                             timeout=30).stdout.decode()
        files = [f for f in out.split("\0") if f]
    except (OSError, subprocess.SubprocessError):
        files = []
    if not files:
        shutil.copytree(ROOT / "src", dest / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        files = ["pyproject.toml", "README.md"]
    for f in files:
        src = ROOT / f
        if src.is_file() and (f.startswith("src/") or "/" not in f):
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / f)


def _declared_data(tree: Path) -> list[str]:
    """Wheel paths of every file that pyproject's package-data declares."""
    meta = tomllib.loads((tree / "pyproject.toml").read_text())
    found = []
    for pkg, patterns in meta["tool"]["setuptools"]["package-data"].items():
        base = tree / "src" / pkg.replace(".", "/")
        for pat in patterns:
            found += [Path(p).relative_to(tree / "src").as_posix() for p in glob.glob(str(base / pat))
                      if Path(p).is_file()]
    return sorted(found)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    pytest.importorskip("build")
    pytest.importorskip("setuptools")
    tree = tmp_path_factory.mktemp("tree")
    _tracked_tree(tree)
    dist = tmp_path_factory.mktemp("dist")
    proc = subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(dist),
                           str(tree)], capture_output=True, text=True, timeout=300, cwd=tree)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    wheels = list(dist.glob("segcal-*.whl"))
    assert len(wheels) == 1, wheels
    wheels[0].with_suffix(".tree").write_text(str(tree))
    return wheels[0]


def test_wheel_holds_the_package_and_its_data(wheel):
    tree = Path(wheel.with_suffix(".tree").read_text())
    names = set(zipfile.ZipFile(wheel).namelist())
    data = _declared_data(tree)
    assert "segcal/models/weights/unet3d_hippocampus.pt" in data and "segcal/py.typed" in data
    missing = [f for f in data if f not in names]
    assert not missing, f"package data missing from the wheel: {missing}"
    modules = sorted(p.relative_to(tree / "src").as_posix() for p in (tree / "src" / "segcal").rglob("*.py"))
    assert [m for m in modules if m not in names] == []
    # the bundled weights are the file itself, not a Git LFS pointer
    with zipfile.ZipFile(wheel).open("segcal/models/weights/unet3d_hippocampus.pt") as fh:
        head = fh.read(64)
    assert not head.startswith(b"version https://git-lfs")
    assert not [n for n in names if "__pycache__" in n or n.endswith((".pyc", ".orig"))]
    entry = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "segcal = segcal.cli:main" in entry


def test_installed_wheel_runs_from_a_fresh_venv(wheel, tmp_path):
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(system_site_packages=True, with_pip=False).create(env_dir)
    bindir = env_dir / ("Scripts" if os.name == "nt" else "bin")
    py = bindir / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    pip = subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
                         capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert pip.returncode == 0, pip.stderr[-3000:]
    probe = ("import json, segcal, torch\n"
             "from segcal.models.unet3d import WEIGHTS_FILE\n"
             "from segcal.datasets.hippocampus import SPLIT_FILE\n"
             "state = torch.load(WEIGHTS_FILE, map_location='cpu', weights_only=True)\n"
             "print(json.dumps({'file': segcal.__file__, 'weights': str(WEIGHTS_FILE), 'n': len(state),"
             " 'split': sorted(json.loads(SPLIT_FILE.read_text()))}))\n")
    out = subprocess.run([str(py), "-c", probe], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    info = json.loads(out.stdout.strip().splitlines()[-1])
    # the installed copy, not the checkout (an editable install of the checkout may also be visible)
    assert Path(info["file"]).resolve().is_relative_to(env_dir.resolve()), info["file"]
    assert Path(info["weights"]).resolve().is_relative_to(env_dir.resolve())
    assert info["n"] > 0 and info["split"]
    exe = bindir / "segcal"
    version = subprocess.run([str(exe), "--version"], capture_output=True, text=True, timeout=120, env=env,
                             cwd=tmp_path)
    assert version.returncode == 0 and "0." in version.stdout + version.stderr
    demo = subprocess.run([str(exe), "demo", "--help"], capture_output=True, text=True, timeout=120, env=env,
                          cwd=tmp_path)
    assert demo.returncode == 0, demo.stderr
    assert "CamVid" in demo.stdout
    # a real command end to end from the installed wheel: eval of a tiny prediction folder
    import numpy as np
    from PIL import Image

    pred, lab = tmp_path / "pred", tmp_path / "labels"
    pred.mkdir()
    lab.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        np.save(pred / f"im{i}.npy", rng.normal(size=(3, 8, 10)).astype(np.float32))
        Image.fromarray(rng.integers(0, 3, (8, 10)).astype(np.uint8)).save(lab / f"im{i}.png")
    ev = subprocess.run([str(exe), "eval", "--pred", str(pred), "--labels", str(lab), "--json", str(tmp_path / "m.json"),
                         "--no-progress"], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert ev.returncode == 0, ev.stderr[-3000:]
    assert json.loads((tmp_path / "m.json").read_text())["n_images"] == 2
