"""Packaging: ``python -m build`` makes a wheel and an sdist, and the wheel installs into a fresh venv and runs.

Offline and fast: the build uses the setuptools already installed (``--no-isolation``), on a copy of the tree
(so the working tree gets no ``build/`` or ``egg-info``); the fresh venv is made without pip, the wheel is
installed into it by this venv's pip (``pip --python``, ``--no-deps --no-index``) and only then given this
venv's site-packages through a ``.pth`` line, so torch and the other dependencies are reused, not
downloaded, while ``cnnlens`` itself comes from the wheel (its own ``site-packages`` is searched first).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from email.parser import Parser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "cnnlens"
DATA_GLOBS = ("report/templates/*.html", "report/templates/*.css", "serve/static/**/*", "py.typed")

pytestmark = pytest.mark.slow


def _run(*args: str | Path, cwd: Path, env: dict[str, str] | None = None, timeout: int = 240) -> str:
    done = subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert done.returncode == 0, f"{args} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel and sdist, built once per test session even when the tests are spread over xdist workers."""
    from filelock import FileLock

    if os.environ.get("PYTEST_XDIST_WORKER"):  # the session's base folder, seen by every worker
        tree = tmp_path_factory.getbasetemp().parent / "wheel-tree"
    else:
        tree = tmp_path_factory.mktemp("tree")
    with FileLock(f"{tree}.lock"):
        if not list((tree / "dist").glob("*.whl")):
            _build(tree)
    return tree / "dist"


def _build(tree: Path) -> None:
    tree.mkdir(exist_ok=True)
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, tree / name)
    shutil.copytree(
        PACKAGE, tree / "src" / "cnnlens", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"), dirs_exist_ok=True
    )
    out = tree / "dist"
    _run(sys.executable, "-m", "build", "--no-isolation", "--wheel", "--sdist", "--outdir", out, ".", cwd=tree)


def _package_data() -> set[str]:
    return {p.relative_to(PACKAGE.parent).as_posix() for g in DATA_GLOBS for p in PACKAGE.glob(g) if p.is_file()}


def test_wheel_and_sdist_carry_the_package_data_license_and_extras(dist: Path) -> None:
    (wheel,) = dist.glob("cnnlens-*-py3-none-any.whl")
    (sdist,) = dist.glob("cnnlens-*.tar.gz")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        (meta_name,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        metadata = Parser().parsestr(zf.read(meta_name).decode("utf-8"))
        entry_points = zf.read(meta_name.replace("METADATA", "entry_points.txt")).decode("utf-8")
    data = _package_data()
    assert any(d.startswith("cnnlens/serve/static/") for d in data) and any("templates" in d for d in data)
    assert data <= names, f"package data missing from the wheel: {sorted(data - names)}"
    assert {n for n in names if n.startswith("cnnlens/") and n.endswith(".py")} == {
        p.relative_to(PACKAGE.parent).as_posix() for p in PACKAGE.rglob("*.py")
    }
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert metadata["License-Expression"] == "MIT"
    assert not metadata.get_all("Classifier", []) or not any("License ::" in c for c in metadata.get_all("Classifier"))
    assert {"keras", "ray", "serve", "dev", "docs"} <= set(metadata.get_all("Provides-Extra"))
    requires = metadata.get_all("Requires-Dist")
    assert any(r.startswith("fastapi") and 'extra == "serve"' in r for r in requires)
    assert any(r.startswith("ray[data]") and 'extra == "ray"' in r for r in requires)
    assert any(r.startswith("keras") and 'extra == "keras"' in r for r in requires)
    assert "cnnlens = cnnlens.cli:main" in entry_points
    with tarfile.open(sdist) as tf:
        members = {m.split("/", 1)[1] for m in tf.getnames() if "/" in m}
    assert {"LICENSE", "pyproject.toml", "README.md", "src/cnnlens/__init__.py"} <= members
    assert {f"src/{d}" for d in data} <= members


def test_wheel_installs_into_a_fresh_venv_and_runs(dist: Path, tmp_path: Path) -> None:
    (wheel,) = dist.glob("cnnlens-*.whl")
    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp_path)
    python = venv / "bin" / "python"
    _run(
        sys.executable, "-m", "pip", "--python", python, "install", "--quiet", "--no-deps", "--no-index", wheel,
        cwd=tmp_path,
    )  # fmt: skip
    purelib = Path(
        _run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=tmp_path).strip()
    )
    # the dependencies (torch...) from this venv, searched after the fresh venv's own site-packages
    (purelib / "zz_reuse_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n", encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env |= {"OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg", "PATH": f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"}

    where = json.loads(
        _run(
            python, "-c",
            "import json, importlib.metadata as m, cnnlens, cnnlens.report as r; "
            "print(json.dumps([cnnlens.__file__, m.version('cnnlens'), r.__file__]))",
            cwd=tmp_path, env=env,
        )
    )  # fmt: skip
    assert all(Path(p).is_relative_to(purelib) for p in (where[0], where[2])), where  # the wheel, not the checkout
    version = _run(python, "-m", "cnnlens", "--version", cwd=tmp_path, env=env)
    assert where[1] in version
    helptext = _run(venv / "bin" / "cnnlens", "--help", cwd=tmp_path, env=env)
    assert "explain" in helptext and "compare-layers" in helptext

    photo = tmp_path / "chelsea.png"
    from cnnlens.data.samples import sample_image

    Image.fromarray(sample_image("chelsea")).save(photo)
    printed = _run(venv / "bin" / "cnnlens", "explain", photo, "--out", tmp_path / "out", cwd=tmp_path, env=env)
    assert "tiger cat" in printed or "tabby" in printed, printed
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text("utf-8"))
    assert manifest["model"]["name"] == "efficientnet_lite0"
    overlays = list((tmp_path / "out").rglob("*.overlay.png"))
    assert len(overlays) == 1
    assert np.asarray(Image.open(overlays[0])).std() > 10  # a drawn overlay, not a blank file
    assert (tmp_path / "out" / "index.html").read_text("utf-8").count("<img") >= 1  # the packaged template ran
