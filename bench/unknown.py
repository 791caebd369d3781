"""Unknown inputs (#23): which novelty score tells photos a head was never trained on from its own.

For each cache (default: the four shared sets in /work/caches, made by a default `featx extract`):

- NEAR, leave-one-class-out: a logistic-regression head (featx's, with the scaling and C its
  cross-validation chose on all classes) and the score's memory are fitted on the train split
  without class c; the known images are the validation images of the other classes, the unknown
  ones every image of class c. Reported: the mean over c.
- FAR, other domains: the head on a set's whole train split; known: its validation images;
  unknown: every image of the three other sets.

The known validation images are halved at random (seeded): the threshold (and a fused score's
normalisers) is calibrated on one half at --rate false rejections; AUROC, the share of unknown
images flagged, and the false-rejection rate actually reached are measured on the other half.
The threshold never sees an unknown image.

Methods (higher = less like the training images):
    msp          1 - the head's highest probability (max-softmax)
    knn1, knn10  cosine distance to the 1st / 10th nearest training feature (L2-normalised;
                 Sun et al. 2022)
    mahalanobis  distance to the closest class mean, shared Ledoit-Wolf covariance (Lee et al. 2018)
    max(msp,knn1)  each divided by its own quantile at 1 - rate on the calibration half, the larger
    mean(msp,knn1) the same, the mean
    rank_max     the larger of the two scores' empirical p-values on the calibration half
    featx        what featx ships (featx.heads.novelty), fitted as fit-head fits it

    python bench/unknown.py                 # ~3 min on 2 busy cores
    python bench/unknown.py --rate 0.05 --json bench/results/unknown.json
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
from featx.heads import estimators, novelty  # noqa: E402

SETS = ("cats_and_dogs_filtered", "oxford_flowers17", "neu_surface_defects", "clothing_small")
SHORT = {
    "cats_and_dogs_filtered": "cats/dogs",
    "oxford_flowers17": "flowers",
    "neu_surface_defects": "NEU",
    "clothing_small": "clothing",
}
METHODS = (
    "msp",
    "knn1",
    "knn10",
    "mahalanobis",
    "max(msp,knn1)",
    "mean(msp,knn1)",
    "rank_max",
    "featx",
)


def auroc(known, unknown) -> float:
    """P(score of an unknown image > score of a known one), ties counting half."""
    from sklearn.metrics import roc_auc_score

    y = np.r_[np.zeros(len(known)), np.ones(len(unknown))]
    return float(roc_auc_score(y, np.r_[known, unknown]))


def unit(X):
    return X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)


def knn(bank_unit, X, k):
    sims = unit(X) @ bank_unit.T
    k = min(k, sims.shape[1])
    return 1.0 - np.partition(-sims, k - 1, axis=1)[:, k - 1] * -1


class Scores:
    """Every method's raw score for the rows of X, given a head and train features."""

    def __init__(self, head, X_train, y_train):
        from sklearn.covariance import LedoitWolf

        self.head = head
        self.bank = unit(X_train)
        classes = np.unique(y_train)
        self.means = np.stack([X_train[y_train == c].mean(0) for c in classes])
        centred = X_train - self.means[np.searchsorted(classes, y_train)]
        # squared Mahalanobis distance = squared Euclidean distance after X @ cholesky(precision)
        self.whiten = np.linalg.cholesky(LedoitWolf().fit(centred).precision_)
        self.means_white = self.means @ self.whiten

    def __call__(self, X) -> dict:
        proba = self.head.predict_proba(X)
        W = X @ self.whiten
        maha = (
            (W**2).sum(1)[:, None] - 2 * W @ self.means_white.T + (self.means_white**2).sum(1)[None]
        ).min(1)
        return {
            "msp": 1.0 - proba.max(1),
            "knn1": knn(self.bank, X, 1),
            "knn10": knn(self.bank, X, 10),
            "mahalanobis": maha,
            "proba": proba,
        }


def evaluate(scores_cal, scores_known, scores_unknown, rate, featx_state):
    """{method: (auroc, flagged share of unknown, false rejections on held-out known)}."""
    out = {}

    def add(name, f):
        cal, kn, un = f(scores_cal), f(scores_known), f(scores_unknown)
        t = np.quantile(cal, 1 - rate, method="higher")
        out[name] = (auroc(kn, un), float((un > t).mean()), float((kn > t).mean()))

    for m in ("msp", "knn1", "knn10", "mahalanobis"):
        add(m, lambda s, m=m: s[m])
    q = {m: np.quantile(scores_cal[m], 1 - rate) for m in ("msp", "knn1")}
    q = {m: max(v, 1e-9) for m, v in q.items()}
    add("max(msp,knn1)", lambda s: np.maximum(s["msp"] / q["msp"], s["knn1"] / q["knn1"]))
    add("mean(msp,knn1)", lambda s: (s["msp"] / q["msp"] + s["knn1"] / q["knn1"]) / 2)

    def pvalue(m, s):  # share of calibration scores at or above: low = unusual
        ref = np.sort(scores_cal[m])
        return 1.0 - np.searchsorted(ref, s[m], side="left") / len(ref)

    add("rank_max", lambda s: -np.minimum(pvalue("msp", s), pvalue("knn1", s)))
    if featx_state is not None:
        state = featx_state(scores_cal)
        add("featx", lambda s: novelty.score(state, s["knn_bank16"], s["proba"]))
    return out


def split_half(n, seed):
    idx = np.random.default_rng(seed).permutation(n)
    return idx[: n // 2], idx[n // 2 :]


def fitted_head(X, y, template=None):
    if template is None:
        return estimators.LogRegHead().fit(X, y)
    return estimators.LogRegHead(C=template.C_, scaling=template.scaling_).fit(X, y)


def run_case(X_train, y_train, X_known, X_unknown, rate, template, seed):
    head = fitted_head(X_train, y_train, template)
    scorer = Scores(head, X_train, y_train)
    bank16 = novelty.memory(X_train)
    cal_i, test_i = split_half(len(X_known), seed)

    def all_scores(X):
        s = scorer(X)
        s["knn_bank16"] = novelty.nearest_distance(bank16, X)
        return s

    cal, kn, un = all_scores(X_known[cal_i]), all_scores(X_known[test_i]), all_scores(X_unknown)

    def featx_state(cal_scores):
        return novelty.calibrate(bank16, cal_scores["knn_bank16"], cal_scores["proba"], rate)

    return evaluate(cal, kn, un, rate, featx_state), head


def load(name, cache_dir):
    c = store.read_cache(Path(cache_dir) / f"{name}.h5")
    X = c.features.astype(np.float32)
    return X, c.labels.astype(np.int64), np.asarray(c.splits), c.class_names


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache-dir", default="/work/caches")
    ap.add_argument("--rate", type=float, default=novelty.DEFAULT_RATE)
    ap.add_argument("--sets", nargs="+", default=list(SETS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    t0 = time.time()
    data = {s: load(s, args.cache_dir) for s in args.sets}
    near, far = {}, {}
    for name, (X, y, splits, classes) in data.items():
        tr, va = splits == "train", splits == "validation"
        res, head = run_case(
            X[tr],
            y[tr],
            X[va],
            np.concatenate([d[0] for other, d in data.items() if other != name]),
            args.rate,
            None,
            args.seed,
        )
        far[name] = res
        per_class = []
        if len(classes) < 3:  # leaving one class out would leave one
            continue
        for c in range(len(classes)):
            keep = y != c
            y_known = y - (y > c)  # labels 0..C-2 without c
            r, _ = run_case(
                X[tr & keep],
                y_known[tr & keep],
                X[va & keep],
                X[y == c],
                args.rate,
                head,
                args.seed,
            )
            per_class.append(r)
        near[name] = {
            m: tuple(float(np.mean([r[m][i] for r in per_class])) for i in range(3))
            for m in per_class[0]
        }
        print(f"{name}: done ({time.time() - t0:.0f} s)", file=sys.stderr)
    print(table(near, far, args.rate))
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "rate": args.rate,
                    "near": near,
                    "far": far,
                    "command": " ".join(sys.argv),
                    "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                },
                indent=1,
            )
        )


def table(near, far, rate):
    cols = [("NEAR", near, s) for s in near if near[s]] + [("FAR", far, s) for s in far]
    head = "| method | " + " | ".join(f"{k} {SHORT.get(s, s)}" for k, _, s in cols) + " |"
    lines = [
        f"AUROC / share of unknown flagged / false rejections (known, held out) at rate {rate}",
        head,
        "|---" * (len(cols) + 1) + "|",
    ]
    for m in METHODS:
        if m not in next(iter(near.values())):
            continue
        cells = [f"{d[s][m][0]:.3f} / {d[s][m][1]:.0%} / {d[s][m][2]:.0%}" for _, d, s in cols]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
