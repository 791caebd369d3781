"""docs/quickstart.ipynb runs in a real Jupyter kernel (nbclient + ipykernel), on tiny generated
photos, and shows what a notebook user should see: a progress widget, results displayed as HTML
tables, a prediction for a PIL image, an exported model (#24)."""

import importlib.util
import json
from pathlib import Path

import pytest
from helpers import TINY, write_split_data

nbformat = pytest.importorskip("nbformat", reason="the notebook test needs `make install` (dev)")
nbclient = pytest.importorskip("nbclient", reason="the notebook test needs `make install` (dev)")
if importlib.util.find_spec("ipykernel") is None:  # not imported here: featx would see a kernel
    pytest.skip("the notebook test needs `make install` (dev)", allow_module_level=True)

NOTEBOOK = Path(__file__).resolve().parents[1] / "docs" / "quickstart.ipynb"
WIDGET = "application/vnd.jupyter.widget-view+json"


def outputs(cell) -> dict:
    """{mime type or 'stdout'/'stderr': text} of one executed cell."""
    found = {}
    for out in cell.get("outputs", []):
        if out["output_type"] == "stream":
            found[out["name"]] = found.get(out["name"], "") + out["text"]
        elif out["output_type"] == "error":
            raise AssertionError(f"{out['ename']}: {out['evalue']}")
        for mime, value in out.get("data", {}).items():
            found[mime] = value if isinstance(value, str) else json.dumps(value)
    return found


@pytest.mark.slow
def test_the_quickstart_notebook_runs_and_shows_its_results(tmp_path):
    data = write_split_data(tmp_path / "photos", train=6, validation=3)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    (params,) = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    options = {**TINY, "engine": "keras", "batch_size": 8}
    params.source = f"DATA = {str(data)!r}\nOPTIONS = {options!r}"
    client = nbclient.NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    cells = {c.source.split("\n")[0]: outputs(c) for c in nb.cells if c.cell_type == "code"}
    (extract,) = [v for k, v in cells.items() if k.startswith("import featx")]
    assert WIDGET in extract, "no progress widget (tqdm.auto in Jupyter)"
    assert "<table>" in extract["text/html"] and "extracted 18" in extract["text/html"]
    (audit,) = [v for k, v in cells.items() if k.startswith("audit =")]
    assert "near groups" in audit["text/html"]
    (fit,) = [v for k, v in cells.items() if k.startswith("metrics =")]
    assert "balanced accuracy" in fit["text/html"] and "true cats" in fit["text/html"]
    (classify,) = [v for k, v in cells.items() if k.startswith("from pathlib")]
    first_line = classify["stdout"].splitlines()
    assert first_line[0].startswith("Classifier(") and "classes=['cats', 'dogs']" in first_line[0]
    assert first_line[1].split()[0] in ("cats", "dogs")
    (export,) = [v for k, v in cells.items() if k.startswith("exported =")]
    model = tmp_path / export["stdout"].strip()  # relative to the notebook's folder
    assert model.name == "model.keras" and model.is_file()
    assert (tmp_path / "cache" / "quickstart-logreg" / "metrics.json").is_file()
