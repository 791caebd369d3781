"""The lock `make install` installs (.ci/requirements.lock) still matches pyproject.toml: every
dependency of featx and of the extras make installs is pinned there, at a version pyproject.toml
allows. A dependency added to pyproject.toml without `make lock` fails here, before a fresh
machine installs something other than what CI tested."""

import re
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11, what CI and `make lock` use

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / ".ci" / "requirements.lock"


def makefile_value(name: str) -> str:
    """`NAME := value` of the Makefile."""
    (value,) = re.findall(rf"^{name}\s*:=\s*(.*)$", (ROOT / "Makefile").read_text(), re.M)
    return value.strip()


def read_lock(text: str) -> dict[str, Version]:
    """{canonical name: pinned version} of a `uv pip compile` output."""
    pins = {}
    for line in text.splitlines():
        line = line.split("#")[0].strip()
        if line:
            req = Requirement(line)
            (spec,) = req.specifier  # exactly one `==` pin a line
            assert spec.operator == "==", f"{line!r} in {LOCK.name} is not pinned with =="
            pins[canonicalize_name(req.name)] = Version(spec.version)
    return pins


def unmet(requirements: list[str], pins: dict[str, Version], python: str) -> list[str]:
    """The requirements (pyproject.toml strings) the pins leave unpinned or out of range, for
    Linux and the lock's Python version."""
    env = {"python_version": python, "python_full_version": f"{python}.0", "sys_platform": "linux"}
    env |= {"platform_system": "Linux", "os_name": "posix"}
    problems = []
    for text in requirements:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate({**env, "extra": ""}):
            continue  # not needed on the machines the lock is for
        pinned = pins.get(canonicalize_name(req.name))
        if pinned is None:
            problems.append(f"{text}: not in the lock")
        elif not req.specifier.contains(pinned, prereleases=True):
            problems.append(f"{text}: the lock pins {pinned}")
    return problems


def project_requirements(project: dict, extras: list[str]) -> list[str]:
    optional = project.get("optional-dependencies", {})
    missing = [extra for extra in extras if extra not in optional]
    assert not missing, f"the Makefile installs extras pyproject.toml lacks: {missing}"
    return list(project["dependencies"]) + [r for extra in extras for r in optional[extra]]


def test_the_lock_pins_every_dependency_of_featx_and_its_installed_extras():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = makefile_value("LOCK_EXTRAS").split()
    assert {"dev", "onnx"} <= set(extras)  # what `make test` needs
    requirements = project_requirements(project, extras)
    problems = unmet(requirements, read_lock(LOCK.read_text()), makefile_value("LOCK_PYTHON"))
    assert not problems, "the lock is out of date; run `make lock`:\n" + "\n".join(problems)
    # and it was compiled for these extras, so their own dependencies are pinned too
    header = LOCK.read_text().split("\n", 2)[1]
    assert all(f"--extra {extra}" in header for extra in extras), header


def test_the_check_finds_a_dependency_missing_from_the_lock_or_pinned_out_of_range():
    pins = read_lock("numpy==1.26.4\n    # via featx\nh5py==3.8.0\nray==2.40.0\n")
    requirements = ["numpy>=2.0", "h5py>=3.8", "ray[data]>=2.40", "s3fs>=2024.1"]
    requirements.append("pywin32>=300; sys_platform == 'win32'")  # not for Linux
    assert unmet(requirements, pins, "3.11") == [
        "numpy>=2.0: the lock pins 1.26.4",
        "s3fs>=2024.1: not in the lock",
    ]
    with pytest.raises(AssertionError, match="not pinned"):
        read_lock("numpy>=1.26\n")
