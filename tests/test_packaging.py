"""The installed package: folder mapping (targets/, devices/), package data, console script.

pyproject.toml lists packages explicitly because `targets/` and `devices/` install under
`liftedge.`; these tests build the real wheel so a folder or data file that would be lost
on a non-editable install fails here rather than on a user's machine.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAPPED = {"liftedge": ROOT / "liftedge", "liftedge.targets": ROOT / "targets", "liftedge.devices": ROOT / "devices"}


# Folders of data files only (no __init__.py), listed as packages so that setuptools installs
# their package data without warnings.
DATA_PACKAGES = {"liftedge.lattice.codebooks": ROOT / "liftedge/lattice/codebooks",
                 "liftedge.targets.executorch.kernels": ROOT / "targets/executorch/kernels"}


def _tree_packages() -> set[str]:
    found = {name for name, folder in DATA_PACKAGES.items() if folder.is_dir()}
    for prefix, folder in MAPPED.items():
        for init in folder.rglob("__init__.py"):
            rel = init.parent.relative_to(folder).parts
            found.add(".".join((prefix, *rel)))
    return found


def test_package_list_matches_the_tree():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    assert listed == _tree_packages()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(out), str(ROOT)], check=True, capture_output=True)
    (path,) = out.glob("liftedge-*.whl")
    return zipfile.ZipFile(path)


def test_wheel_holds_mapped_folders_and_data(wheel):
    names = set(wheel.namelist())
    for required in ("liftedge/targets/reference/liftquant.py", "liftedge/devices/pixel-8a.toml",
                     "liftedge/lattice/codebooks/menu.json", "liftedge/lattice/codebooks/lq-24-10.safetensors",
                     "liftedge/lattice/kernel.c", "liftedge/targets/executorch/kernels/lq_linear.cpp",
                     "liftedge/targets/executorch/CMakeLists.txt"):
        assert required in names, required
    shipped = {p.name for p in (ROOT / "liftedge/lattice/codebooks").iterdir()}
    assert {n.rsplit("/", 1)[1] for n in names if n.startswith("liftedge/lattice/codebooks/")} == shipped
    devices = {p.name for p in (ROOT / "devices").glob("*.toml")}
    assert {n.rsplit("/", 1)[1] for n in names if n.startswith("liftedge/devices/") and n.endswith(".toml")} == devices
    assert not any(n.startswith("targets/") or n.startswith("devices/") for n in names)


def test_console_script_is_declared(wheel):
    (entry,) = [n for n in wheel.namelist() if n.endswith("entry_points.txt")]
    assert "liftedge = liftedge.cli:entry" in wheel.read(entry).decode()


def test_build_prints_no_setuptools_warnings(tmp_path):
    # Setting up used to print pages of setuptools warnings (license table, data folders not in
    # `packages`); a newcomer's first screen must hold none.
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-v",
                           "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True, check=True)
    noise = [line for line in (done.stdout + done.stderr).splitlines()
             if "Warning" in line and ("setuptools" in line.lower() or "!!" in line)]
    assert noise == []


def test_library_code_never_imports_the_cli_layer():
    """Library modules (all but `liftedge.cli` and `liftedge.commands`) and the targets must not
    import the argument-parsing layer: the dependency points from the CLI to them."""
    import ast

    library = [p for p in (ROOT / "liftedge").rglob("*.py")
               if p != ROOT / "liftedge" / "cli.py" and "commands" not in p.relative_to(ROOT / "liftedge").parts]
    offenders = []
    for path in library + sorted((ROOT / "targets").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n == "liftedge.cli" or n.startswith("liftedge.commands") for n in names):
                offenders.append(str(path.relative_to(ROOT)))
    assert not offenders, offenders
