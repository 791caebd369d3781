"""The Keras subclasses `featx finetune` uses: the image loader (a keras.utils.PyDataset) and two
callbacks. They live apart from commands.finetune so that importing that module, and checking the
command's arguments, does not load Keras and TensorFlow (seconds)."""

from __future__ import annotations

import math
import time
from pathlib import Path

import keras
import numpy as np

from featx import config
from featx.errors import FeatxError
from featx.files import save_keras_atomic
from featx.images import decoder


class ImageBatches(keras.utils.PyDataset):
    """(pixels, labels) batches decoded from disk with `decoder.load_image`.

    `workers` threads decode whole batches ahead of the model (at most `max_queue_size` waiting),
    so only a few batches are ever in memory. With `shuffle`, the order is a new seeded
    permutation every epoch. With `drop_remainder` (for training), the last partial batch of an
    epoch is left out, so every step has the same shape and the training step is traced once; the
    reshuffle lets other images fall out each epoch. A file that fails to decode is left out of its
    batch and recorded in `failed` ({path: reason}); it never stops training.
    """

    def __init__(
        self,
        root: str | Path,
        paths: list[str],
        labels: np.ndarray,
        image_size: int,
        batch_size: int = config.FINETUNE_BATCH_SIZE,
        *,
        shuffle: bool = False,
        drop_remainder: bool = False,
        seed: int = config.SEED,
        workers: int | None = None,
        max_queue_size: int = config.PREFETCH_BATCHES,
    ):
        super().__init__(
            workers=workers or config.decode_workers(),
            use_multiprocessing=False,
            max_queue_size=max_queue_size,
        )
        self.root, self.paths = Path(root), list(paths)
        self.labels = np.asarray(labels, np.int32)
        self.image_size, self.batch_size, self.shuffle = image_size, batch_size, shuffle
        self.drop_remainder = drop_remainder and len(self.paths) >= batch_size
        self.failed: dict[str, str] = {}
        self._rng = np.random.default_rng(seed)
        self._order = self._new_order()

    def _new_order(self) -> np.ndarray:
        n = len(self.paths)
        return self._rng.permutation(n) if self.shuffle else np.arange(n)

    def __len__(self) -> int:
        if self.drop_remainder:
            return len(self.paths) // self.batch_size
        return math.ceil(len(self.paths) / self.batch_size)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Batch `index` as (float32 pixels, labels, row indices of the images that decoded)."""
        rows = self._order[index * self.batch_size : (index + 1) * self.batch_size]
        pixels, kept = [], []
        for i in rows:
            path = self.paths[i]
            try:
                pixels.append(decoder.load_image(self.root / path, self.image_size))
                kept.append(i)
            except Exception as e:  # unreadable, deleted or corrupt since extraction
                self.failed[path] = str(e) or type(e).__name__
        if not kept:
            raise FeatxError(
                f"None of the {len(rows)} images of a batch could be read from '{self.root}' "
                f"(first: {self.paths[rows[0]]}: {self.failed.get(self.paths[rows[0]])}). "
                "Check that the data folder recorded in the cache is still there."
            )
        kept = np.asarray(kept)
        return np.stack(pixels).astype(np.float32), self.labels[kept], kept

    def __getitem__(self, index: int):
        x, y, _ = self.load(index)
        return x, y

    def on_epoch_end(self) -> None:
        if self.shuffle:
            self._order = self._new_order()


class BatchProgress(keras.callbacks.Callback):
    """Calls progress(done, total, rate) after each training batch, over every epoch asked for
    (early stopping ends it sooner)."""

    def __init__(self, progress, epochs: int, steps: int):
        super().__init__()
        self.progress, self.total, self.steps = progress, epochs * steps, steps
        self.epoch, self.t0 = 0, time.perf_counter()

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        done = self.epoch * self.steps + batch + 1
        self.progress(done, self.total, done / max(time.perf_counter() - self.t0, 1e-9))


class _EpochLog(keras.callbacks.Callback):
    """One line per epoch through `log`; keeps the history of finished epochs (also on Ctrl-C)."""

    def __init__(self, log, epochs: int):
        super().__init__()
        self.log, self.epochs, self.t0 = log, epochs, 0.0
        self.seconds: list[float] = []
        self.history: dict[str, list[float]] = {}

    def on_epoch_begin(self, epoch, logs=None):
        self.t0 = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        self.seconds.append(time.perf_counter() - self.t0)
        for k, v in logs.items():
            self.history.setdefault(k, []).append(float(v))
        values = " ".join(
            f"{k} {float(logs[k]):.4f}"
            for k in ("loss", "accuracy", "val_loss", "val_accuracy")
            if k in logs
        )
        lr = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
        seconds = self.seconds[-1]
        self.log(f"epoch {epoch + 1}/{self.epochs}: {values} lr {lr:.1e} ({seconds:.0f} s)")


class _KeepBest(keras.callbacks.Callback):
    """Keeps the best weights, starting from the warm start's: an epoch is better when it gets
    more validation images right, or as many with a lower validation loss. Each new best is also
    saved to `path` (a checkpoint in the staging folder of the output, see artifacts.outputs)."""

    def __init__(self, path: Path, n_val: int, correct: int, loss: float, weights: list):
        super().__init__()
        self.path, self.n_val = path, n_val
        self.best, self.best_epoch, self.weights = (correct, -loss), 0, weights

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        if "val_accuracy" not in logs:
            return
        score = (round(float(logs["val_accuracy"]) * self.n_val), -float(logs["val_loss"]))
        if score > self.best:
            self.best, self.best_epoch = score, epoch + 1
            self.weights = self.model.get_weights()
            save_keras_atomic(self.model, self.path)
