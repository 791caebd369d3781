"""report.html, `featx report`, the plots, the imbalance hint and reused output folders
(tiny generated images, random MobileNetV2 at 32 px; one test in a real headless Chromium)."""

import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import TINY, write_images
from PIL import Image

from featx.artifacts import outputs
from featx.cli import cli
from featx.commands.extract import extract
from featx.commands.fit_head import fit_head
from featx.reports import html_report, plots
from featx.reports.evaluation import with_interval


def write_noise(root: Path, counts: dict, seed: int = 0) -> Path:
    """root/SPLIT/CLASS/*.png of pure noise: classes a head cannot tell apart, so mistakes."""
    noise = dict(colour=(128, 128, 128), noise=128, size=(32, 24))
    return write_images(root, counts, name="{c}{i:02d}.png", seed=seed, **noise)


@pytest.fixture(scope="module")
def noisy(tmp_path_factory):
    root = tmp_path_factory.mktemp("reports")
    counts = {
        "train": {"cats": 10, "dogs": 10, "owls": 10},
        "validation": {"cats": 6, "dogs": 6, "owls": 6},
        "test": {"cats": 4, "dogs": 4, "owls": 4},
    }
    data = write_noise(root / "data", counts)
    cache_path = root / "noisy.h5"
    extract(data, cache_path, engine="keras", batch_size=16, **TINY)
    out = root / "noisy-logreg"
    metrics = fit_head(cache_path, "logreg", out, C=1.0)
    return {"root": root, "data": data, "cache": cache_path, "out": out, "metrics": metrics}


def test_report_html_holds_every_section_and_embeds_its_images(noisy):
    page = (noisy["out"] / "report.html").read_text()
    m = noisy["metrics"]
    for split in ("train", "validation", "test"):
        assert f"<td class='big'>{with_interval(m[split], 'accuracy')}</td>" in page
        assert f"{m[split]['accuracy_interval'][0]:.2f}" in page  # with its 95 % interval
        assert f"<td>{m[split]['log_loss']:.4f}</td>" in page
    assert "Confusion matrix: validation" in page and "Confusion matrix: test" in page
    assert "normalised per true class" in page
    c = m["validation"]["per_class"]["owls"]
    assert f"<td class='name'>owls</td><td>{c['precision']:.4f}</td><td>{c['recall']:.4f}</td>" in (
        page
    )
    wrong = m["validation"]["n"] + m["test"]["n"]
    wrong -= round(m["validation"]["accuracy"] * m["validation"]["n"])
    wrong -= round(m["test"]["accuracy"] * m["test"]["n"])
    assert wrong > 0  # noise: there are mistakes to show
    thumbs = re.findall(r"<img class='thumb' src='data:image/jpeg;base64,", page)
    assert len(thumbs) == min(wrong, 24)
    assert f"of {wrong} misclassified validation and test images" in page
    # Self-contained: nothing is fetched from anywhere.
    assert not re.search(r"(src|href)=['\"](?!data:)", page)


def test_confused_pairs_are_the_largest_off_diagonal_cells():
    cm = [[5, 3, 0], [1, 7, 1], [4, 0, 2]]
    pairs = html_report.confused_pairs(cm, ["a", "b", "c"], n=3)
    assert pairs == [
        {"true": "c", "predicted": "a", "count": 4, "share": round(4 / 6, 4)},
        {"true": "a", "predicted": "b", "count": 3, "share": 0.375},
        {"true": "b", "predicted": "a", "count": 1, "share": round(1 / 9, 4)},
    ]


def test_featx_report_rebuilds_the_page_and_refuses_other_folders(noisy, tmp_path):
    folder = tmp_path / "moved"
    shutil.copytree(noisy["out"], folder)
    (folder / "report.html").unlink()
    res = CliRunner().invoke(cli, ["report", str(folder)])
    assert res.exit_code == 0 and res.output.strip() == f"wrote {folder / 'report.html'}"
    rebuilt = (folder / "report.html").read_text()
    original = (noisy["out"] / "report.html").read_text()
    strip = re.compile(r"model folder <code>[^<]*</code>|featx [\d.]+, [\d-]+ [\d:]+ UTC")
    assert strip.sub("", rebuilt) == strip.sub("", original)

    res = CliRunner().invoke(cli, ["report", str(tmp_path / "nope")])
    assert isinstance(res.exception, SystemExit) and res.exit_code == 1
    assert res.output.startswith("Error: Model folder not found")
    res = CliRunner().invoke(cli, ["report", str(noisy["data"])])
    assert res.exit_code == 1 and "No metrics.json in" in res.output
    assert len(res.output.strip().splitlines()) == 1


def test_images_gone_since_fitting_show_as_missing_not_as_an_error(noisy, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(noisy["out"], folder)
    # misclassified.csv holds paths relative to the data folder metrics.json records (#26)
    metrics = (folder / "metrics.json").read_text()
    assert str(noisy["data"].resolve()) in metrics
    (folder / "metrics.json").write_text(metrics.replace(str(noisy["data"].resolve()), "/gone"))
    page = html_report.render(folder)
    assert "class='thumb'" not in page and "image not found" in page


def test_a_reused_output_folder_keeps_no_file_of_the_other_head(noisy, tmp_path):
    out = tmp_path / "head"
    fit_head(noisy["cache"], "dense", out, epochs=3)
    assert (out / "head.keras").is_file() and (out / "training_curves.png").is_file()
    (out / "my notes.txt").write_text("mine")
    messages = []
    fit_head(noisy["cache"], "logreg", out, C=1.0, overwrite=True, log=messages.append)
    assert not (out / "head.keras").exists() and not (out / "training_curves.png").exists()
    assert (out / "my notes.txt").read_text() == "mine"  # not featx's: never touched
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [outputs.MANIFEST, "my notes.txt", "head.json", "head.npz", "metrics.json"]
        + ["confusion_matrix.png", "misclassified.csv", "report.html", "novelty.npz"]
    )
    assert any("removed head.keras, training_curves.png" in m for m in messages)

    # A folder written before manifests existed: featx's own file names only.
    (out / outputs.MANIFEST).unlink()
    (out / "training_curves.png").write_bytes(b"old plot")
    (out / "other.png").write_bytes(b"mine too")
    messages = []
    fit_head(noisy["cache"], "logreg", out, C=1.0, overwrite=True, log=messages.append)
    assert any("removed training_curves.png" in m for m in messages), messages
    assert (out / "other.png").is_file() and (out / "my notes.txt").is_file()
    assert not (out / "training_curves.png").exists()
    # A manifest naming paths outside the folder is not followed.
    manifest = json.loads((out / outputs.MANIFEST).read_text())
    (out / outputs.MANIFEST).write_text(json.dumps({**manifest, "files": ["../x", "head.json"]}))
    (tmp_path / "x").write_text("outside")
    fit_head(noisy["cache"], "logreg", out, C=1.0)
    assert (tmp_path / "x").read_text() == "outside"


def test_dense_curves_plot_what_metrics_json_reports(noisy, tmp_path, monkeypatch):
    figures = []
    monkeypatch.setattr(plots, "_save_figure", lambda fig, path: figures.append((fig, path)))
    metrics = fit_head(noisy["cache"], "dense", tmp_path / "dense", epochs=6)
    history = json.loads((tmp_path / "dense" / "head.json").read_text())["history"]
    best = metrics["fitted"]["best_epoch"]
    # The weights kept are the best epoch's: its curve values are metrics.json's numbers.
    assert history["val_log_loss"][best - 1] == pytest.approx(
        metrics["validation"]["log_loss"], abs=1e-4
    )
    assert history["log_loss"][best - 1] == pytest.approx(metrics["train"]["log_loss"], abs=1e-4)
    assert history["inference_accuracy"][best - 1] == pytest.approx(
        metrics["train"]["accuracy"], abs=1e-6
    )
    (fig,) = [f for f, p in figures if p.name == "training_curves.png"]
    loss_ax, accuracy_ax = fig.axes
    plotted = {line.get_label(): list(line.get_ydata()) for line in loss_ax.lines}
    assert plotted["validation"] == pytest.approx(history["val_log_loss"])
    assert plotted["validation + L2"] == pytest.approx(history["val_loss"])  # labelled, dotted
    assert f"kept: epoch {best}" in plotted
    assert accuracy_ax.get_ylim()[1] <= 1.005


def test_a_one_epoch_finetune_curve_starts_at_the_warm_start(tmp_path, monkeypatch):
    figures = []
    monkeypatch.setattr(plots, "_save_figure", lambda fig, path: figures.append(fig))
    history = {"loss": [0.2], "accuracy": [0.97], "val_loss": [0.15], "val_accuracy": [0.99]}
    plots.plot_training_curves(
        history, tmp_path / "c.png", 1, {"val_loss": 0.16, "val_accuracy": 0.985}
    )
    loss_ax, accuracy_ax = figures[0].axes
    validation = [line for line in accuracy_ax.lines if line.get_label() == "validation"][0]
    assert list(validation.get_xdata()) == [0, 1]
    assert list(validation.get_ydata()) == [0.985, 0.99]
    low, high = accuracy_ax.get_ylim()
    assert high <= 1.005 and low < 0.97
    assert "warm start" in accuracy_ax.get_xlabel()


def test_confusion_matrix_png_has_counts_beside_the_normalised_matrix(tmp_path, monkeypatch):
    figures = []
    monkeypatch.setattr(plots, "_save_figure", lambda fig, path: figures.append(fig))
    cm = [[8, 2], [0, 3]]
    plots.plot_confusion_matrices({"validation": cm}, ["a", "b"], tmp_path / "cm.png")
    counts_ax, share_ax = figures[0].axes
    assert [t.get_text() for t in counts_ax.texts] == ["8", "2", "0", "3"]
    assert [t.get_text() for t in share_ax.texts] == ["0.80", "0.20", "", "1.00"]
    assert "normalised" in share_ax.get_title()


def test_fit_head_suggests_balanced_class_weights_for_uneven_classes(tmp_path):
    counts = {"train": {"cats": 12, "dogs": 3}, "validation": {"cats": 3, "dogs": 3}}
    data = write_noise(tmp_path / "data", counts, seed=1)
    cache_path = tmp_path / "uneven.h5"
    extract(data, cache_path, engine="keras", batch_size=8, **TINY)
    hint = "hint: uneven classes: 'cats' has 12 training images, 'dogs' 3 (4.0x)"
    res = CliRunner().invoke(cli, ["fit-head", str(cache_path), "--C", "1"])
    assert res.exit_code == 0 and hint in res.output and "--class-weight balanced" in res.output
    args = ["fit-head", str(cache_path), "--C", "1", "--class-weight", "balanced"]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0 and "hint: uneven" not in res.output
    page = (tmp_path / "uneven-logreg" / "report.html").read_text()
    assert "hint: uneven" not in page  # rewritten by the balanced run
    CliRunner().invoke(cli, ["fit-head", str(cache_path), "--C", "1"])
    page = (tmp_path / "uneven-logreg" / "report.html").read_text()
    assert html.escape(hint) in page


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
def test_the_report_renders_in_a_headless_browser_with_every_thumbnail(noisy, tmp_path):
    page = noisy["out"] / "report.html"
    shot = tmp_path / "report.png"
    common = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
    dom = subprocess.run(
        [*common, "--virtual-time-budget=5000", "--dump-dom", page.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    n = len(re.findall(r"<img class=\"thumb\"", dom))
    assert n > 0 and f"{n} of {n} thumbnails shown" in dom  # every thumbnail decoded
    subprocess.run(
        [*common, f"--screenshot={shot}", "--window-size=1200,2400", page.as_uri()],
        capture_output=True,
        timeout=120,
    )
    pixels = np.asarray(Image.open(shot).convert("L"))
    assert pixels.shape == (2400, 1200) and pixels.std() > 10  # drawn, not a blank page


def test_finetune_refuses_to_write_into_its_own_head_folder(noisy):
    from featx.commands.finetune import finetune
    from featx.errors import FeatxError

    before = sorted(p.name for p in noisy["out"].iterdir())
    with pytest.raises(FeatxError, match="is the --head folder"):
        finetune(noisy["cache"], noisy["out"], noisy["out"], epochs=0)
    assert sorted(p.name for p in noisy["out"].iterdir()) == before
