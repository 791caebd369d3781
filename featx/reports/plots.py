"""The confusion-matrix and training-curve plots (matplotlib, imported when a plot is drawn)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from featx.files import replaced_atomically


def _save_figure(fig, path: Path) -> None:
    with replaced_atomically(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    return plt


def plot_confusion_matrices(matrices: dict, class_names: list[str], path: Path) -> Path:
    """Per split, two panels side by side: the counts, and the row-normalised matrix (each row
    sums to 1: the share of a true class given each prediction, so small classes show too)."""
    plt = _pyplot()
    k = len(class_names)
    side = min(max(4.0, 2.0 + 0.45 * k), 14.0)
    fig, axes = plt.subplots(
        len(matrices), 2, figsize=(2 * side, side * len(matrices)), squeeze=False
    )
    for (ax_counts, ax_share), (split, cm) in zip(axes, matrices.items()):
        cm = np.asarray(cm)
        rows = cm.sum(axis=1, keepdims=True)
        share = np.divide(cm, rows, out=np.zeros(cm.shape), where=rows > 0)
        acc = np.trace(cm) / max(cm.sum(), 1)
        ax_counts.imshow(cm, cmap="Blues", vmin=0, vmax=max(int(cm.max()), 1))
        ax_counts.set_title(f"{split}: counts ({cm.sum()} images, accuracy {acc:.4f})")
        ax_share.imshow(share, cmap="Blues", vmin=0, vmax=1)
        ax_share.set_title(f"{split}: normalised per true class (rows sum to 1)")
        for ax, values in ((ax_counts, cm), (ax_share, share)):
            ax.set_xlabel("predicted")
            ax.set_ylabel("true")
            if k > 30:  # beyond that, labels and numbers are unreadable anyway
                continue
            ax.set_xticks(range(k), class_names, rotation=45, ha="right")
            ax.set_yticks(range(k), class_names)
            top = values.max() or 1
            size = 10 if k <= 10 else 8
            for i in range(k):
                for j in range(k):
                    text = str(values[i, j]) if values is cm else f"{values[i, j]:.2f}"
                    if values is share and cm[i, j] == 0:
                        text = ""  # an empty cell reads faster than a column of 0.00
                    color = "white" if values[i, j] > 0.5 * top else "black"
                    ax.text(j, i, text, ha="center", va="center", color=color, fontsize=size)
    fig.tight_layout()
    _save_figure(fig, path)
    plt.close(fig)
    return path


def plot_training_curves(
    history: dict, path: Path, best_epoch: int | None = None, warm_start: dict | None = None
) -> Path:
    """Loss and accuracy per epoch, training and validation, as metrics.json measures them.

    history: per-epoch lists. The dense head's "log_loss", "val_log_loss" and
        "inference_accuracy" (no dropout, no L2 penalty: what metrics.json reports) are plotted
        when present, with Keras' own objective ("loss", "val_loss": L2 included; "accuracy":
        dropout on) dotted beside them. Otherwise (finetune) "loss"/"accuracy" are the training
        objective with augmentation and dropout, and "val_loss"/"val_accuracy" the validation log
        loss and accuracy.
    best_epoch: the epoch whose weights were kept (0: the warm start), marked by a line.
    warm_start: {"val_loss", "val_accuracy", "loss", "accuracy"} of the starting weights, drawn as
        epoch 0 (finetune), so a one-epoch run is a line and not a lone point.
    """
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    clean = "log_loss" in history
    lines = {
        "loss": [
            ("log_loss" if clean else "loss", "train" if clean else "train (augmented, dropout)"),
            ("val_log_loss" if clean else "val_loss", "validation"),
        ],
        "accuracy": [
            (
                "inference_accuracy" if clean else "accuracy",
                "train" if clean else "train (augmented, dropout)",
            ),
            ("val_accuracy", "validation"),
        ],
    }
    objective = {
        "loss": [("loss", "train objective (dropout, + L2)"), ("val_loss", "validation + L2")],
        "accuracy": [("accuracy", "train, dropout on")],
    }
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in zip(axes, ("loss", "accuracy")):
        values_seen = []
        for key, label in lines[metric]:
            values = list(history.get(key) or [])
            if not values:
                continue
            epochs = list(range(1, len(values) + 1))
            start = (warm_start or {}).get(key)
            if start is not None:
                epochs, values = [0, *epochs], [start, *values]
            color = "C1" if key.startswith("val_") else "C0"
            ax.plot(epochs, values, marker="o", markersize=4, color=color, label=label)
            values_seen += values
        if clean:
            for key, label in objective[metric]:
                values = history.get(key) or []
                color = "C1" if key.startswith("val_") else "C0"
                if values:
                    ax.plot(
                        range(1, len(values) + 1), values, ":", color=color, alpha=0.6, label=label
                    )
        if best_epoch is not None:
            kept = "warm start" if best_epoch == 0 else f"epoch {best_epoch}"
            ax.axvline(best_epoch, color="gray", linestyle="--", linewidth=1, label=f"kept: {kept}")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if metric == "accuracy" and values_seen:  # never an axis above 1 (or a 0.96-1.04 range)
            low = min(values_seen)
            ax.set_ylim(max(0.0, low - max(0.02, 0.1 * (1 - low))), 1.0 + 0.005)
        ax.set_xlabel("epoch" + (" (0: warm start)" if warm_start else ""))
        ax.set_ylabel("log loss" if metric == "loss" else metric)
        ax.legend(fontsize="small")
    fig.tight_layout()
    _save_figure(fig, path)
    plt.close(fig)
    return path
