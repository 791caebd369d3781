"""The layout change (#22) changed no result: the code before it (commit BEFORE, taken from this
repository's history) and the code now extract the same folder to the same cache and fit the same
head on it, array for array."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from helpers import write_images

from featx.cache import store

ROOT = Path(__file__).resolve().parents[1]
BEFORE = "3206e45"  # main before the layout change of #22
RUN = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    import featx
    assert featx.__file__.startswith(sys.argv[3]), featx.__file__
    if sys.argv[4] == "before":
        from featx.extract import extract
        from featx.fit_head import fit_head
    else:
        extract, fit_head = featx.extract, featx.fit_head
    out = Path(sys.argv[2])
    extract(sys.argv[1], out / "c.h5", weights="none", alpha=0.35, image_size=48,
            engine="keras", batch_size=8, val_split=0.25, seed=3)
    fit_head(out / "c.h5", "logreg", out / "head", C=1.0)
    """
)


def _has_commit() -> bool:
    try:
        found = subprocess.run(["git", "-C", str(ROOT), "cat-file", "-e", BEFORE + "^{commit}"],
                               capture_output=True)  # fmt: skip
    except OSError:
        return False
    return found.returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(not _has_commit(), reason=f"commit {BEFORE} is not in this clone's history")
def test_the_code_before_the_layout_change_writes_the_same_cache_and_head(tmp_path):
    before = tmp_path / "before-src"
    before.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", BEFORE, "featx"],
                             capture_output=True, check=True).stdout  # fmt: skip
    subprocess.run(["tar", "-x", "-C", str(before)], input=archive, check=True)
    data = write_images(tmp_path / "data", {"cats": 9, "dogs": 9, "birds": 9}, size=(48, 40))
    for name, src in (("before", before), ("now", ROOT)):
        env = {**os.environ, "PYTHONPATH": str(src)}
        args = [str(data), str(tmp_path / name), str(src / "featx"), name]
        done = subprocess.run([sys.executable, "-c", RUN, *args], env=env, cwd=tmp_path,
                              capture_output=True, text=True)  # fmt: skip
        assert done.returncode == 0, f"{name}: {done.stderr[-2000:]}"
    a, b = (store.read_cache(tmp_path / n / "c.h5") for n in ("before", "now"))
    assert a.paths == b.paths and list(a.splits) == list(b.splits)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.features, b.features)
    assert a.fingerprint == b.fingerprint and a.class_names == b.class_names
    heads = [np.load(tmp_path / n / "head" / "head.npz") for n in ("before", "now")]
    assert heads[0].files == heads[1].files
    for key in heads[0].files:
        np.testing.assert_array_equal(heads[0][key], heads[1][key])
    metrics = [json.loads((tmp_path / n / "head" / "metrics.json").read_text()) for n in
               ("before", "now")]  # fmt: skip
    for split in ("train", "validation"):  # every number it wrote; the new keys (intervals,
        old, new = metrics[0][split], metrics[1][split]  # calibration) come on top
        assert {k: new[k] for k in old} == old
    shutil.rmtree(before)
