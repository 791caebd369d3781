"""bench/pipeline.py: its measuring helpers, and a --quick run on a few real photos (no timings)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REAL_DATA, WEIGHTS_FILE, load_bench

BENCH = Path(__file__).resolve().parents[1] / "bench" / "pipeline.py"


@pytest.fixture(scope="module")
def pipeline():
    return load_bench("pipeline")


def test_run_step_measures_the_peak_memory_of_that_child_alone(pipeline, tmp_path):
    grab = "b = bytearray(300 * 2**20); b[::4096] = b'x' * len(b[::4096]); print('done')"
    big = pipeline.run_step("big", [sys.executable, "-c", grab], tmp_path)
    small = pipeline.run_step("small", [sys.executable, "-c", "print('hi')"], tmp_path)
    assert big["returncode"] == 0 and big["stdout"].strip() == "done"
    assert 300 <= big["peak_mb"] < 600
    assert small["peak_mb"] < 150  # not the earlier, bigger child's peak
    assert big["seconds"] > 0


def test_a_failed_step_keeps_its_exit_status_and_the_end_of_stderr(pipeline, tmp_path):
    code = (
        "import sys; print('first'); print('boom: what went wrong', file=sys.stderr); sys.exit(3)"
    )
    step = pipeline.run_step("bad", [sys.executable, "-c", code], tmp_path)
    assert step["returncode"] == 3
    assert "boom: what went wrong" in step["error"]


def test_quick_subset_links_the_first_images_of_each_class_and_leaves_the_data_alone(
    pipeline, tiny_dataset, tmp_path
):
    data = tiny_dataset(layout="splits", per_class=9, splits=("train", "validation"))
    before = sorted((p, p.stat().st_mtime_ns) for p in data.rglob("*"))
    subset = pipeline.quick_subset(data, tmp_path / "subset", per_train=4, per_val=2)
    for split, n in (("train", 4), ("validation", 2)):
        for cls in ("cats", "dogs"):
            files = sorted((subset / split / cls).iterdir())
            assert len(files) == n
            assert all(f.is_symlink() for f in files)
            assert [f.resolve() for f in files] == sorted((data / split / cls).iterdir())[:n]
    assert sorted((p, p.stat().st_mtime_ns) for p in data.rglob("*")) == before


def test_json_and_accuracy_are_read_from_what_featx_prints(pipeline):
    printed = 'warning: something\n{\n  "validation": {"accuracy": 0.75},\n  "train": {}\n}\n'
    assert pipeline.validation_accuracy(pipeline.last_json(printed)) == 0.75
    assert pipeline.validation_accuracy({"metrics": {"validation": {"accuracy": 1}}}) == 1.0
    assert pipeline.validation_accuracy({"train": {"accuracy": 1}}) is None
    assert pipeline.last_json("no json here") is None


def test_capabilities_are_read_from_featx_help(pipeline):
    caps = pipeline.featx_capabilities(pipeline.featx_command())
    assert {"extract", "info"} <= set(caps["commands"])
    assert caps["fit_head"] == ("fit-head" in caps["commands"])
    if caps["engines"]:
        assert {"keras", "onnx"} <= set(caps["engines"])
        assert caps["default_engine"] in caps["engines"]


def test_ratios_divide_classic_seconds_by_each_featx_row(pipeline):
    rows = [
        pipeline.row("classic", "classic", seconds=100, accuracy=0.98),
        pipeline.row("extract_onnx", "extract", seconds=8),
        pipeline.row("cold_logreg_onnx", "cold onnx", seconds=10, accuracy=0.99),
        pipeline.row("cold_dense_onnx", "cold dense", seconds=20, accuracy=0.99),
        pipeline.row("cold_logreg_keras", "cold keras", status="missing"),
        pipeline.row("warm_logreg", "warm", seconds=4, accuracy=0.99),
    ]
    ratios = {r["id"]: r for r in pipeline.ratios(rows)}
    assert set(ratios) == {"classic_over_cold_onnx", "classic_over_cold_keras", "classic_over_warm"}
    assert ratios["classic_over_cold_onnx"]["value"] == 10.0
    assert ratios["classic_over_warm"]["value"] == 25.0
    assert ratios["classic_over_cold_keras"]["value"] is None
    assert ratios["classic_over_cold_onnx"]["classic_val_accuracy"] == 0.98
    assert ratios["classic_over_cold_onnx"]["featx_val_accuracy"] == 0.99


@pytest.mark.slow
@pytest.mark.real
@pytest.mark.skipif(not REAL_DATA.is_dir(), reason=f"real photos not found at {REAL_DATA}")
@pytest.mark.skipif(not WEIGHTS_FILE.is_file(), reason=f"ImageNet weights not in {WEIGHTS_FILE}")
def test_quick_benchmark_reports_every_row_with_sane_numbers(tmp_path):
    out = tmp_path / "pipeline.json"
    argv = [sys.executable, str(BENCH), "--quick", "--quick-train", "40", "--quick-val", "20"]
    argv += ["--epochs", "1", "--data", str(REAL_DATA), "--json-out", str(out)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=900)
    assert out.is_file(), done.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = {r["id"]: r for r in result["rows"]}
    missing = [r["label"] for r in result["rows"] if r["status"] == "missing"]
    assert not missing, f"featx lacks a step the benchmark needs: {missing}"
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]

    assert {"date", "command", "machine", "counts", "rows", "ratios", "markdown"} <= set(result)
    assert result["machine"]["nproc"] >= 1 and result["machine"]["ram_gb"] > 0
    assert "--quick" in result["command"]
    assert result["counts"] == {"train": 80, "validation": 40}
    engines = {e for e in result["featx"]["engines"] if e != "auto"} or {
        result["featx"]["default_engine_used"]
    }
    expected = {"classic", "warm_logreg"}
    for engine in engines:
        expected |= {f"extract_{engine}", f"cold_logreg_{engine}", f"cold_dense_{engine}"}
    if "onnx" in engines:
        expected.add("onnx_export")
    assert set(rows) == expected
    for r in rows.values():
        assert r["status"] == "ok", r
        assert r["seconds"] > 0 and r["peak_mb"] > 50
        assert r["label"] in result["markdown"]
        if not r["id"].startswith(("extract_", "onnx_export")):  # no head, no accuracy
            assert 0.0 <= r["val_accuracy"] <= 1.0
    assert rows["classic"]["images_through_base"] == 1 * 80 + 1 * 40
    assert len(rows["classic"]["val_accuracy_per_epoch"]) == 1
    for engine in engines:
        assert rows[f"extract_{engine}"]["images_through_base"] == 120
        cold = rows[f"cold_logreg_{engine}"]
        assert cold["images_through_base"] == 120
        assert cold["seconds"] > rows[f"extract_{engine}"]["seconds"]  # extract + fit-head
    assert rows["warm_logreg"]["images_through_base"] == 0
    # The warm run fits the same head on the same cache as the default engine's cold run.
    default = result["featx"]["default_engine_used"]
    assert rows["warm_logreg"]["val_accuracy"] == rows[f"cold_logreg_{default}"]["val_accuracy"]
    ratios = {r["id"]: r for r in result["ratios"]}
    assert set(ratios) == {f"classic_over_cold_{e}" for e in engines} | {"classic_over_warm"}
    for engine in engines:
        ratio = ratios[f"classic_over_cold_{engine}"]
        assert ratio["value"] == pytest.approx(
            rows["classic"]["seconds"] / rows[f"cold_logreg_{engine}"]["seconds"], rel=0.01
        )
        assert ratio["classic_val_accuracy"] == rows["classic"]["val_accuracy"]
    if "onnx" in engines:  # exported once beforehand: the cold run reuses the exported model
        assert rows["extract_onnx"]["onnx_export_seconds"] is None
        assert rows["onnx_export"]["images_through_base"] == 4  # one per class and split
        ratio = ratios["classic_over_cold_onnx"]
        assert ratio["value_including_onnx_export"] < ratio["value"]
