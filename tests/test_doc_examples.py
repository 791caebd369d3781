"""Every Python example in README.md and docs/ runs as printed (#24): in a folder holding a small
`photos/` data set and the files the examples name, with the real ImageNet weights the examples
use by default. Blocks that start with `featx.NAME(` are signatures, not examples."""

import re
import shutil
from pathlib import Path

import pytest
from helpers import COLOURS, WEIGHTS_FILE, write_image, write_images

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def examples(page: Path) -> list[str]:
    return examples_in(page.read_text())


def test_the_pages_have_examples():
    assert examples(ROOT / "README.md") and examples(ROOT / "docs" / "python-api.md")
    assert not examples_in("```python\nfeatx.info(path) -> dict\n```")


def examples_in(text: str) -> list[str]:
    return [
        b for b in re.findall(r"```python\n(.*?)```", text, re.S) if re.match(r"(import|from) ", b)
    ]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A user's folder after the tutorial's first steps: photos/CLASS/*.jpg, new_photos/,
    new.jpg, other.png, a.jpg, b.png, and cache/photos.h5 with cache/photos-logreg/ (a page may
    start anywhere in the tutorial)."""
    import featx

    root = tmp_path_factory.mktemp("project")
    write_images(root / "photos", dict.fromkeys(COLOURS, 12), size=(64, 64), noise=40)
    write_images(root / "new_photos", dict.fromkeys(COLOURS, 2), size=(64, 64), seed=9)
    for name, fmt in (("new.jpg", None), ("other.png", "PNG"), ("a.jpg", None), ("b.png", "PNG")):
        write_image(root / name, COLOURS["cats"], seed=len(name), size=(64, 64), fmt=fmt)
    featx.extract(root / "photos", root / "cache" / "photos.h5", progress=False)
    featx.fit_head(root / "cache" / "photos.h5", output=root / "cache" / "photos-logreg")
    return root


@pytest.fixture
def project(prepared, tmp_path, monkeypatch):
    shutil.copytree(prepared, tmp_path / "project")
    monkeypatch.chdir(tmp_path / "project")
    return tmp_path / "project"


@pytest.mark.slow
@pytest.mark.real
@pytest.mark.skipif(not WEIGHTS_FILE.is_file(), reason=f"ImageNet weights not at {WEIGHTS_FILE}")
@pytest.mark.parametrize("page", [p for p in PAGES if examples(p)], ids=lambda p: p.name)
def test_every_example_runs_as_printed(page, project):
    namespace = {"__name__": "__main__"}  # the examples of a page share their names, in order
    for i, code in enumerate(examples(page)):
        try:
            exec(compile(code, f"{page.name} example {i + 1}", "exec"), namespace)
        except Exception as e:
            raise AssertionError(f"{page.name}, example {i + 1} fails: {e!r}\n{code}") from e
