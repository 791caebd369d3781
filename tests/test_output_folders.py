"""Output folders written whole (#27 items 1, 2 and 15, #26 item 2): a run killed at any rename,
at the swap or at the sync after it leaves the old folder or the new one, never a mix; one
writer at a time; a user's files are never written over; the same run replaces its own output
and says so, anything else needs --overwrite; stale exports go."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import TINY, assert_one_line_error

from featx.artifacts import outputs
from featx.artifacts.classifier import load_classifier
from featx.cli import cli
from featx.commands.audit import audit
from featx.commands.extract import extract
from featx.commands.fit_head import fit_head
from featx.errors import FeatxError

# Runs featx's CLI and ends the process (os._exit, as a kill -9 would: no clean-up runs) just
# before the Nth rename (os.replace, os.rename or the swap's renameat2), or, with "swap", before
# the swap, or, with "sync", at the first fsync after the swap. The process exits 0 when it ran
# to the end before that.
KILLER = textwrap.dedent(
    """
    import os, sys
    from featx.artifacts import outputs

    at, moment = int(sys.argv[1]), sys.argv[2]
    calls, swapped = [0], [False]

    def rename(call, swap=False):
        def wrapped(*args, **kwargs):
            calls[0] += 1
            if (moment == "rename" and calls[0] == at) or (moment == "swap" and swap):
                os._exit(9)
            result = call(*args, **kwargs)
            swapped[0] = swapped[0] or swap
            return result
        return wrapped

    def fsync(fd, _call=os.fsync):
        if moment == "sync" and swapped[0]:
            os._exit(9)
        return _call(fd)

    os.replace, os.rename, os.fsync = rename(os.replace), rename(os.rename), fsync
    outputs._renameat2 = rename(outputs._renameat2, swap=True)
    sys.argv = ["featx", *sys.argv[3:]]
    from featx.cli import main
    main()
    """
)


def killed_at(at: int, moment: str, *args) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", KILLER, str(at), moment, *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def file_contents(folder: Path) -> dict:
    """{name: bytes} of a folder's files, the manifest without its generation id."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            data = p.read_bytes()
            if p.name == outputs.MANIFEST:
                data = json.dumps({**json.loads(data), "generation": None}).encode()
            out[str(p.relative_to(folder))] = data
    return out


@pytest.fixture(scope="module")
def two_caches(tiny_model, tmp_path_factory):
    """The tiny model's data under other class names (zebra, aardvark), extracted: a second
    cache whose heads predict other classes."""
    root = tmp_path_factory.mktemp("two-caches")
    renamed = {"cats": "zebra", "dogs": "aardvark"}
    for split in ("train", "validation"):
        for old, new in renamed.items():
            shutil.copytree(tiny_model.data / split / old, root / "d2" / split / new)
    extract(root / "d2", root / "c2.h5", batch_size=8, engine="keras", **TINY)
    return tiny_model.cache, root / "c2.h5"


# --- 2. a user's files, and #26 item 2: which runs replace a folder ------------------------------


def test_a_users_files_in_output_are_never_written_over(tiny_model, tmp_path):
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "metrics.json").write_text('{"mine":1}')
    for args in (
        ["fit-head", tiny_model.cache, "--output", proj],
        ["fit-head", tiny_model.cache, "--output", proj, "--overwrite"],  # not featx's: never
        ["audit", tiny_model.cache, "--output", proj],
    ):
        res = CliRunner().invoke(cli, list(map(str, args)))
        assert_one_line_error(res, f"'{proj}' holds files featx did not write (metrics.json)")
    assert (proj / "metrics.json").read_text() == '{"mine":1}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["proj"]  # not even a lock file
    with pytest.raises(FeatxError, match="is a file"):
        fit_head(tiny_model.cache, "logreg", proj / "metrics.json")


def test_the_same_head_replaces_its_output_anything_else_needs_overwrite(tiny_model, tmp_path):
    out = tmp_path / "banana-logreg"
    fit_head(tiny_model.cache, "logreg", out, C=1.0)
    # An export inside, as `featx export` leaves it (its own manifest).
    with outputs.writing(
        out / "export-keras", outputs.made_by("export", out / "export-keras", out)
    ) as s:
        (s / "export.json").write_text("{}")
    before = file_contents(out)

    res = CliRunner().invoke(cli, ["fit-head", str(tiny_model.cache), "--head", "dense",
                                   "--output", str(out)])  # fmt: skip
    assert_one_line_error(res, f"'{out}' holds the output of `featx fit-head", "--overwrite")
    assert "--head logreg" in res.output
    assert file_contents(out) == before  # refused before any work

    messages = []
    fit_head(tiny_model.cache, "logreg", out, C=0.5, log=messages.append)
    assert f"replaced {out}: the output of an earlier `featx fit-head" in "\n".join(messages)
    assert any("removed export-keras" in m and "exports of the model" in m for m in messages)
    assert not (out / "export-keras").exists()
    assert json.loads((out / "head.json").read_text())["options"]["C"] == 0.5

    messages = []
    fit_head(tiny_model.cache, "dense", out, epochs=2, overwrite=True, log=messages.append)
    assert f"replaced {out} (--overwrite)" in messages
    assert (out / "head.keras").is_file() and not (out / "head.npz").exists()
    manifest = json.loads((out / outputs.MANIFEST).read_text())
    assert manifest["made_by"]["head"] == "dense"
    assert not [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_a_reader_refuses_an_incomplete_folder_in_one_line(tiny_model, tmp_path):
    out = tmp_path / "h"
    shutil.copytree(tiny_model.logreg, out)
    (out / "head.npz").unlink()
    with pytest.raises(FeatxError, match=r"is incomplete \(head.npz, listed in featx-files"):
        load_classifier(out, "keras")
    res = CliRunner().invoke(cli, ["predict", str(out), str(tiny_model.data)])
    assert_one_line_error(res, "is incomplete")


def test_a_reader_loads_again_when_a_new_folder_was_swapped_in(tiny_model, tmp_path, monkeypatch):
    out = tmp_path / "h"
    shutil.copytree(tiny_model.logreg, out)
    real, calls = outputs.generation, []

    def swapped_once(folder, rebuilt=()):
        calls.append(folder)
        if len(calls) == 2:  # after the first load: another run committed meanwhile
            return "another generation"
        return real(folder, rebuilt)

    monkeypatch.setattr(outputs, "generation", swapped_once)
    load_classifier(out, "keras")
    assert len(calls) == 4  # loaded twice


# --- 1. one writer at a time ---------------------------------------------------------------------

HOLD = textwrap.dedent(
    """
    import sys
    from featx.artifacts import outputs
    with outputs.writing(sys.argv[1], {"command": "fit-head"}, overwrite=True):
        print("held", flush=True)
        sys.stdin.read()
        raise SystemExit(0)  # an error inside: nothing is committed
    """
)


@pytest.mark.slow
def test_a_second_writer_of_one_output_folder_is_refused(tiny_model, tmp_path):
    out = tmp_path / "h"
    shutil.copytree(tiny_model.logreg, out)
    before = file_contents(out)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        cmd = [sys.executable, "-m", "featx", "fit-head", str(tiny_model.cache), "--output",
               str(out), "--C", "0.5", "--overwrite"]  # fmt: skip
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert res.returncode == 1, res.stderr
        last = res.stderr.strip().splitlines()[-1]
        assert last.startswith("Error: Another featx run (pid ") and f"writing '{out}'" in last
        assert "Traceback" not in res.stderr
        assert file_contents(out) == before
    finally:
        holder.communicate("", timeout=60)
    assert holder.returncode == 0 and file_contents(out) == before  # nothing was committed


# --- 1. a run killed at every rename -------------------------------------------------------------


def predictions(folder: Path, images: list[Path]):
    classifier = load_classifier(folder, "keras")
    return classifier.class_names, classifier.predict_proba(images)


@pytest.mark.slow
def test_fit_head_killed_at_any_moment_leaves_the_old_head_or_the_new_one(
    tiny_model, two_caches, tmp_path
):
    """Before: a kill between head.npz and head.json paired c2's weights with c's class names."""
    c1, c2 = two_caches
    images = sorted((tiny_model.data / "validation").rglob("*.jpg"))[::2]
    old = predictions(tiny_model.logreg, images)
    fit_head(c2, "logreg", tmp_path / "new", C=0.5)
    new = predictions(tmp_path / "new", images)
    assert old[0] != new[0]
    out = tmp_path / "H"
    seen, moments = set(), [(n, "rename") for n in range(1, 40)]
    for at, moment in [*moments[:1], (0, "sync"), *moments[1:]]:
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(tiny_model.logreg, out)
        args = ["fit-head", c2, "--output", out, "--C", "0.5", "--overwrite"]
        res = killed_at(at, moment, *args)
        assert "Traceback" not in res.stderr, res.stderr
        names, proba = predictions(out, images)
        state = "old" if names == old[0] else "new"
        assert names == (old if state == "old" else new)[0]
        assert np.array_equal(proba, (old if state == "old" else new)[1]), (at, moment)
        seen.add((moment, state, res.returncode))
        if res.returncode == 0:
            break  # ran to the end: every rename was a kill point
        assert res.returncode == 9, res.stderr
    assert {("rename", "old", 9), ("sync", "new", 9), ("rename", "new", 0)} <= seen, seen
    # The next run removes what the killed runs left (staging folders of dead PIDs).
    killed_at(3, "rename", "fit-head", c2, "--output", out, "--C", "0.5", "--overwrite")
    fit_head(c2, "logreg", out, C=0.5, overwrite=True)
    assert not [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name]
    assert not [p.name for p in out.iterdir() if ".tmp-" in p.name]


@pytest.mark.slow
def test_the_two_rename_swap_killed_between_its_renames_is_finished_by_the_next_run(
    tiny_model, two_caches, tmp_path
):
    """Where renameat2 is missing: the old folder stays until the new one is in place, and a
    run killed between the two renames is recovered by the next one."""
    c1, c2 = two_caches
    out = tmp_path / "H"
    shutil.copytree(tiny_model.logreg, out)
    no_exchange = KILLER.replace(
        "outputs._renameat2 = rename(outputs._renameat2, swap=True)",
        "outputs._renameat2 = lambda old, new: False",
    )
    args = ["fit-head", c2, "--output", out, "--C", "0.5", "--overwrite"]
    for at in range(1, 40):  # the first rename of the folder itself (target -> .H.tmp-PID.old)
        cmd = [sys.executable, "-c", no_exchange, str(at), "rename", *map(str, args)]
        subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if not out.exists():
            break
        shutil.rmtree(out)
        shutil.copytree(tiny_model.logreg, out)
    assert not out.exists() and [p for p in tmp_path.iterdir() if p.name.endswith(".old")]
    res = CliRunner().invoke(cli, list(map(str, ["fit-head", c2, "--output", out, "--C", "0.5"])))
    assert_one_line_error(res, "--overwrite")  # the old folder is back, and it is c's
    assert (out / "head.json").is_file()
    assert not [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name]


@pytest.mark.slow
def test_audit_killed_at_any_moment_leaves_the_old_audit_or_the_new_one(two_caches, tmp_path):
    """Before: a kill mid-write left audit.json of one cache beside the CSVs of another."""
    c1, c2 = two_caches
    audit(c1, tmp_path / "old", progress=False)
    audit(c2, tmp_path / "new", progress=False)
    old, new = (file_contents(tmp_path / n) for n in ("old", "new"))
    for contents in (old, new):  # the manifest names the cache; compare the rest
        contents.pop(outputs.MANIFEST)
    out, states = tmp_path / "A", set()
    for at, moment in [(1, "rename"), (0, "sync"), *((n, "rename") for n in range(2, 40))]:
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(tmp_path / "old", out)
        res = killed_at(at, moment, "audit", c2, "--output", out, "--overwrite")
        assert "Traceback" not in res.stderr, res.stderr
        now = file_contents(out)
        now.pop(outputs.MANIFEST)
        assert now in (old, new), (at, moment)
        states.add((now == new, res.returncode))
        if res.returncode == 0:
            break
    assert {(False, 9), (True, 9), (True, 0)} <= states


@pytest.mark.slow
def test_export_killed_at_the_swap_leaves_the_old_export_or_the_new_one(tiny_model, tmp_path):
    """Before: a re-export replaced model.keras, checked it for seconds, then wrote labels.txt;
    a predict meanwhile read the new model with the old labels."""
    head = tmp_path / "head"
    shutil.copytree(tiny_model.logreg, head)
    out = tmp_path / "E"
    assert subprocess.run([sys.executable, "-m", "featx", "export", str(head), "--output",
                           str(out)], capture_output=True, timeout=300).returncode == 0  # fmt: skip
    old = file_contents(out)
    for moment in ("swap", "sync"):  # re-exporting the same head, killed before or after it
        res = killed_at(0, moment, "export", head, "--output", out)
        assert res.returncode == 9 and "Traceback" not in res.stderr, res.stderr
        now = file_contents(out)
        assert (now == old) == (moment == "swap"), moment
        if moment == "sync":  # the new export, whole: its files agree with each other
            info = json.loads((out / "export.json").read_text())
            assert (out / "labels.txt").read_text().split() == info["class_names"]
            assert load_classifier(out, None).class_names == info["class_names"]
            assert now != old


@pytest.mark.slow
def test_finetune_killed_at_the_swap_leaves_the_old_model_or_the_new_one(
    tiny_model, two_caches, tmp_path
):
    """Before: finetune wrote finetune.json (new classes) before model.keras, and predict took a
    "complete": false folder silently."""
    c1, c2 = two_caches
    head2 = tmp_path / "head2"
    fit_head(c2, "logreg", head2, C=1.0)
    fast = ["--epochs", "1", "--batch-size", "8", "--unfreeze-layers", "0", "--no-augment"]
    out = tmp_path / "F"
    first = [sys.executable, "-m", "featx", "finetune", str(c1), "--head", str(tiny_model.logreg),
             "--output", str(out), *fast]  # fmt: skip
    assert subprocess.run(first, capture_output=True, timeout=300).returncode == 0
    old = file_contents(out)
    images = sorted((tiny_model.data / "validation").rglob("*.jpg"))[::2]
    for moment in ("swap", "sync"):  # another cache and head: killed before or after the swap
        args = ["finetune", c2, "--head", head2, "--output", out, "--overwrite", *fast]
        res = killed_at(0, moment, *args)
        assert res.returncode == 9 and "Traceback" not in res.stderr, res.stderr
        assert (file_contents(out) == old) == (moment == "swap"), moment
        names, _ = predictions(out, images)
        assert names == predictions(tiny_model.logreg if moment == "swap" else head2, images)[0]
    info = json.loads((out / "finetune.json").read_text())
    info["complete"] = False  # as an older featx killed mid-run left it
    (out / "finetune.json").write_text(json.dumps(info))
    res = CliRunner().invoke(cli, ["predict", str(out), str(images[0])])
    assert_one_line_error(res, "did not finish")


def test_an_export_of_another_model_inside_a_model_folder_is_kept(tiny_model, tmp_path):
    """Only the folder's own exports (made_by source ".") go with the model a run replaces; an
    export of another model that a user put inside is theirs."""
    out = tmp_path / "m"
    fit_head(tiny_model.cache, "logreg", out, C=1.0)
    for name, source in (("export-keras", out), ("other-export", tiny_model.logreg)):
        with outputs.writing(out / name, outputs.made_by("export", out / name, source)) as s:
            (s / "export.json").write_text("{}")
    fit_head(tiny_model.cache, "logreg", out, C=0.5)
    assert not (out / "export-keras").exists()
    assert (out / "other-export" / "export.json").read_text() == "{}"


def test_without_linux_renameat2_a_folder_is_replaced_by_two_renames(
    tiny_model, tmp_path, monkeypatch
):
    """On Windows ctypes.CDLL(None) is a TypeError (no C library by that name): the swap must
    not reach it, and falls back to the two renames."""

    def no_cdll(*args, **kwargs):
        raise TypeError("argument of type 'NoneType' is not iterable")

    monkeypatch.setattr(outputs.sys, "platform", "win32")
    monkeypatch.setattr(outputs.ctypes, "CDLL", no_cdll)
    out = tmp_path / "m"
    fit_head(tiny_model.cache, "logreg", out, C=1.0)
    fit_head(tiny_model.cache, "logreg", out, C=0.5)
    assert json.loads((out / "head.json").read_text())["options"]["C"] == 0.5
    assert not [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_made_by_keeps_a_url_as_given(tmp_path):
    made_by = outputs.made_by("fit-head", tmp_path / "out", "s3://bucket/c.h5", head="logreg")
    assert made_by["source"] == "s3://bucket/c.h5"
    assert outputs.describe(made_by) == "`featx fit-head s3://bucket/c.h5 --head logreg`"
