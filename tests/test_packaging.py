"""The core install (``pip install .`` from the clone, no extras) imports every module of the package; the wheel
declares every extra, ships the package data, and installs with the extras this environment has.

Offline, a fresh ``pip install`` cannot download the dependencies, so the fresh virtual environment gets
exactly the distributions the package's declared requirements resolve to (markers and requested extras
evaluated, recursively), linked from this environment's installed copies; then pip builds and installs the
package itself into it from this checkout (non-editable: package data must ship). An import that needs an
undeclared package, or an optional one imported eagerly, fails here.
"""

from __future__ import annotations

import importlib.metadata as metadata
import os
import shutil
import subprocess
import sys
import sysconfig
from collections import defaultdict
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.conftest import REPO

IMPORT_EVERY_MODULE = """
import importlib, pkgutil, sys
import camouflage_train
assert "site-packages" in camouflage_train.__file__, camouflage_train.__file__  # the installed copy
names = ["camouflage_train"] + [m.name for m in pkgutil.walk_packages(camouflage_train.__path__, "camouflage_train.")]
failed = []
for name in names:
    try:
        importlib.import_module(name)
    except Exception as error:
        failed.append(f"{name}: {type(error).__name__}: {error}")
print(len(names), "modules")
print("\\n".join(failed))
sys.exit(1 if failed else 0)
"""


def _closure(root: str, extras: tuple[str, ...] = ()) -> set[str]:
    """Canonical names of ``root`` and every distribution its requirements pull in (for ``extras`` of root)."""
    seen: set[str] = set()
    pending: list[tuple[str, tuple[str, ...]]] = [(root, extras)]
    while pending:
        name, wanted = pending.pop()
        key = canonicalize_name(name)
        if key in seen and not wanted:
            continue
        seen.add(key)
        for line in metadata.requires(name) or []:
            requirement = Requirement(line)
            environments = [{"extra": extra} for extra in ("", *wanted)]
            if requirement.marker is None or any(requirement.marker.evaluate(env) for env in environments):
                pending.append((requirement.name, tuple(requirement.extras)))
    return seen


def _link_distributions(names: set[str], site: Path) -> None:
    """Make the installed files of ``names`` visible in ``site`` (whole top-level folders where no other
    installed distribution shares them, file by file where one does, e.g. namespace packages)."""
    owners: dict[str, set[str]] = defaultdict(set)
    files: dict[str, list[Path]] = {}
    here = Path(sysconfig.get_paths()["purelib"])
    # Only this environment's own installs: once setuptools is imported (by torch's inductor, say) sys.path also holds
    # setuptools/_vendor, whose vendored copies (e.g. an older `packaging`) would shadow the real ones' file lists.
    for dist in metadata.distributions(path=[str(here)]):
        key = canonicalize_name(dist.metadata["Name"])
        paths = [Path(str(f)) for f in dist.files or [] if not str(f).startswith("..")]
        files[key] = paths
        for path in paths:
            owners[path.parts[0]].add(key)
    for key in names - {"camouflage-train"}:
        for top in {p.parts[0] for p in files.get(key, [])}:
            if owners[top] <= names:
                if not (site / top).exists():
                    (site / top).symlink_to(here / top)
                continue
            for path in (p for p in files[key] if p.parts[0] == top):
                target = site / path
                target.parent.mkdir(parents=True, exist_ok=True)
                if not target.exists() and (here / path).exists():
                    target.symlink_to(here / path)


def _fresh_venv(venv: Path) -> tuple[Path, Path]:
    """A new virtual environment without pip: its python and its site-packages folder."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    code = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    return python, Path(subprocess.run([python, "-c", code], capture_output=True, text=True, check=True).stdout.strip())


def _copy_sources(source: Path) -> Path:
    """The package sources outside the repository (setuptools writes build/ next to them)."""
    shutil.copytree(
        REPO / "camouflage_train", source / "camouflage_train", ignore=shutil.ignore_patterns("__pycache__")
    )
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    return source


@pytest.mark.slow
def test_core_install_without_extras_imports_every_module(tmp_path):
    python, site = _fresh_venv(tmp_path / "venv")
    core = _closure("camouflage-train")
    assert {"torch", "lightning", "diffusers", "pyyaml", "tqdm"} <= core
    assert not {"insightface", "onnxruntime", "opencv-python", "controlnet-aux"} & core  # extras stay out
    # Build backend (only to build the package, as pip's isolated build would provide it).
    _link_distributions(core | _closure("setuptools") | _closure("wheel"), site)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    source = _copy_sources(tmp_path / "source")
    install = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index",
         "--no-build-isolation", "--quiet", str(source)],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert install.returncode == 0, install.stderr[-3000:]
    done = subprocess.run(
        [python, "-c", IMPORT_EVERY_MODULE], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert int(done.stdout.split()[0]) > 40  # the walk found the package's modules


# Extras whose packages this environment has (`make` installs the dev extra): the wheel is installed with them offline.
# annotators (controlnet_aux) and faces-gpu (onnxruntime-gpu) are checked in the wheel's metadata only.
EXTRAS_INSTALLED_HERE = ("faces", "cluster", "test")
EXTRA_MODULES = {"faces": ["insightface", "onnxruntime", "cv2"], "cluster": ["hydra_plugins.hydra_submitit_launcher"],
                 "test": ["pytest", "xdist", "pytest_timeout"]}  # fmt: skip


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel pip builds from a copy of the sources (no build isolation: offline)."""
    root = tmp_path_factory.mktemp("wheel")
    source = _copy_sources(root / "source")
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-index", "--no-build-isolation", "--quiet",
         "-w", str(root / "dist"), str(source)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr[-3000:]
    return next((root / "dist").glob("camouflage_train-*.whl"))


def test_the_wheel_declares_every_extra_and_ships_the_package_data(wheel):
    import zipfile

    import tomllib

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        meta = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    provided = {line.split(":", 1)[1].strip() for line in meta.splitlines() if line.startswith("Provides-Extra:")}
    assert provided == set(extras)
    declared = [Requirement(line.split(":", 1)[1]) for line in meta.splitlines() if line.startswith("Requires-Dist:")]
    for extra, requirements in extras.items():
        wanted = {canonicalize_name(Requirement(r).name) for r in requirements}
        got = {canonicalize_name(r.name) for r in declared if r.marker and r.marker.evaluate({"extra": extra})}
        assert wanted <= got, (extra, wanted - got)
    assert "camouflage_train/models/configs/tiny/unet.json" in names
    assert any(n.startswith("camouflage_train/miniworld/weights/") for n in names)


@pytest.mark.slow
def test_the_wheel_installs_with_its_extras_and_they_import(wheel, tmp_path):
    python, site = _fresh_venv(tmp_path / "venv")
    _link_distributions(_closure("camouflage-train", EXTRAS_INSTALLED_HERE), site)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    # --no-index: pip must find every requirement of the extras already installed, or it fails.
    install = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-index", "--quiet",
         f"{wheel}[{','.join(EXTRAS_INSTALLED_HERE)}]"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert install.returncode == 0, install.stderr[-3000:]
    modules = [m for extra in EXTRAS_INSTALLED_HERE for m in EXTRA_MODULES[extra]]
    check = "import importlib, camouflage_train; assert 'site-packages' in camouflage_train.__file__\n"
    check += "".join(f"importlib.import_module({m!r})\n" for m in modules)
    done = subprocess.run([python, "-c", check], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
