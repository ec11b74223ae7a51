"""The wheel a user installs holds every package of the source tree."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def source_modules() -> set[str]:
    """Every ``.py`` file of the library as the installed path: integrations/ lands in robust_reg/integrations/."""
    paths = set()
    for top, installed in (("robust_reg", "robust_reg"), ("integrations", "robust_reg/integrations")):
        for path in (ROOT / top).rglob("*.py"):
            if "__pycache__" not in path.parts:
                paths.add(f"{installed}/{path.relative_to(ROOT / top).as_posix()}")
    return paths


@pytest.fixture(scope="module")
def wheel_files(tmp_path_factory) -> set[str]:
    out = tmp_path_factory.mktemp("wheel")
    # Build from a clean copy: a build/ folder left in the checkout would lend the wheel stale files.
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    for name in ("robust_reg", "integrations"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    # --no-build-isolation: the build backend comes from this environment (no index needed).
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(src)]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300)
    (wheel,) = out.glob("robust_reg-*.whl")
    return set(zipfile.ZipFile(wheel).namelist())


def test_wheel_ships_every_module_of_the_source_tree(wheel_files):
    missing = sorted(source_modules() - wheel_files)
    assert not missing, f"the wheel lacks {missing}: add their packages to [tool.setuptools] packages"


def test_wheel_installs_integrations_as_a_subpackage_only(wheel_files):
    assert "robust_reg/integrations/lightly.py" in wheel_files
    assert not any(name.startswith("integrations/") for name in wheel_files)


def test_wheel_ships_no_tests_examples_or_benchmarks(wheel_files):
    tops = {name.split("/")[0] for name in wheel_files}
    assert tops <= {"robust_reg", *{n.split("/")[0] for n in wheel_files if ".dist-info" in n.split("/")[0]}}


def test_wheel_ships_the_py_typed_marker(wheel_files):
    assert "robust_reg/py.typed" in wheel_files


def test_the_wheels_version_is_the_packages_single_version(wheel_files):
    import robust_reg

    assert f"robust_reg-{robust_reg.__version__}.dist-info/METADATA" in wheel_files
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert not re.search(r'^version = "', pyproject, re.M), "one version: robust_reg.__version__"
