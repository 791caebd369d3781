"""Is the Dense head over-confident, and does temperature scaling fix it? (#23 item 5)

For each cache (default: the four shared sets in /work/caches): featx's default Dense head, fitted
as fit-head fits it (train split, early stopping on validation), its expected calibration error on
the validation split (featx.reports.evaluation.calibration, 10 bins); then a temperature T fitted
on held-out folds of the train split only (--folds Dense heads, each fitted on the other folds and
early-stopped on the held-out fold, T minimising the log loss of the out-of-fold probabilities),
and the ECE and log loss of the full head's validation probabilities softened by T, as they are and
with T shrunk halfway to 1. The validation split never chooses T.

    python bench/temperature.py            # ~5-10 min on 2 busy cores
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from featx.cache import store  # noqa: E402
from featx.heads import estimators  # noqa: E402
from featx.reports.evaluation import calibration  # noqa: E402

SETS = ("cats_and_dogs_filtered", "oxford_flowers17", "neu_surface_defects", "clothing_small")


def soften(p, T):
    z = np.log(np.clip(p, 1e-15, 1.0)) / T
    z -= z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def log_loss(y, p):
    return float(-np.log(np.clip(p[np.arange(len(y)), y], 1e-15, 1)).mean())


def fit_temperature(y, p):
    grid = np.exp(np.linspace(np.log(0.25), np.log(4.0), 241))
    return float(grid[np.argmin([log_loss(y, soften(p, T)) for T in grid])])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache-dir", default="/work/caches")
    ap.add_argument("--sets", nargs="+", default=list(SETS))
    ap.add_argument("--folds", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    rows = {}
    for name in args.sets:
        t0 = time.time()
        c = store.read_cache(Path(args.cache_dir) / f"{name}.h5")
        X, y, s = c.features.astype(np.float32), c.labels.astype(np.int64), np.asarray(c.splits)
        tr, va = s == "train", s == "validation"
        Xt, yt = X[tr], y[tr]
        p_val = estimators.DenseHead().fit(Xt, yt, X[va], y[va]).predict_proba(X[va])
        fold = np.random.default_rng(0).permutation(len(yt)) % args.folds
        oof = np.zeros((len(yt), int(y.max()) + 1))
        for f in range(args.folds):
            a, b = fold != f, fold == f
            oof[b] = estimators.DenseHead().fit(Xt[a], yt[a], Xt[b], yt[b]).predict_proba(Xt[b])
        T = fit_temperature(yt, oof)
        row = {"T": round(T, 3)}
        for label, Tx in (("before", 1.0), ("after", T), ("half", (1.0 + T) / 2)):
            p = soften(p_val, Tx)
            row[label] = {
                "ece": calibration(y[va], p)["ece"],
                "log_loss": round(log_loss(y[va], p), 4),
                "accuracy": round(float((p.argmax(1) == y[va]).mean()), 4),
            }
        rows[name] = row
        print(name, json.dumps(row), f"{time.time() - t0:.0f} s", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
