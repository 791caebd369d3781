"""Every default in one place. Change them here, or per run with the matching CLI option."""

import os

VERSION = "0.1.0"  # featx's own version (pyproject reads it from here), recorded in what it writes

# --- backbone ------------------------------------------------------------------------------------
BACKBONE = "MobileNetV2"  # the only backbone for now; recorded in every fingerprint
IMAGE_SIZE = 224  # square input in pixels; ImageNet weights exist for 96/128/160/192/224
ALPHA = 1.0  # width multiplier; 1.0 gives 1280-d features (so does anything below 1.0)
MAX_ALPHA = 1.4  # the widest MobileNetV2 Keras publishes weights for
WEIGHTS = "imagenet"  # "imagenet", "none" (random, seeded: for tests) or a path to a .h5 file
RANDOM_WEIGHTS_SEED = 0  # makes weights="none" reproducible across processes
# MobileNetV2's own preprocess_input maps pixels 0..255 to [-1, 1]; every stage uses this one map.
PREPROCESSING = "mobilenet_v2.preprocess_input: x / 127.5 - 1"

# --- decoding ------------------------------------------------------------------------------------
RESIZE = "bilinear-antialias, aspect ratio not kept"  # like image_dataset_from_directory
BACKGROUND = (255, 255, 255)  # transparent pixels are composited on white
# The formats decoded, and no other: Pillow's EPS/PDF plugins run external helpers (Ghostscript)
# found on PATH, so a PostScript file named holiday.jpg must not reach them. JPEG opens the
# MPO files of cameras too; DIB: the BMP variant; HEIF covers HEIC (pillow-heif).
IMAGE_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "DIB", "WEBP", "TIFF", "HEIF", "AVIF")
MAX_IMAGE_PIXELS = 89_478_485  # decompression-bomb guard (Pillow's default limit)
# Pixels being decoded at once by all decoding threads together (~3 bytes each, plus a copy or
# two while converting): a few huge photos wait for each other instead of adding up. Photos of
# ordinary size (12 MP and less) never wait. One image over the budget still decodes, alone.
DECODE_PIXEL_BUDGET = 100_000_000
# The largest file featx reads as an image: an image file is read whole before decoding, so a huge
# non-image file (a 40 GB disk image in the data folder) would be a MemoryError on every run. The
# largest plausible image file is far smaller: a 89 MP (MAX_IMAGE_PIXELS) 16-bit RGBA TIFF
# without compression is 716 MB. Larger files are rejected without being read.
MAX_FILE_BYTES = 768 * 1024 * 1024
# The address space featx needs at least: importing TensorFlow maps ~2 GB (it failed under
# `ulimit -v 2000000` and worked under 3000000, tiny model). Under a lower limit, a failure is
# reported as too little memory, whatever exception the allocation that failed turned into.
MIN_ADDRESS_SPACE = 3 * 1024**3
# A reader that finds a part missing because a writer committed a new main file (and deleted the
# old parts) while it read reads the new main file again, up to this many tries in all: 1 read
# in 4,156 met such a commit during three `extract --overwrite`. A part missing under an
# unchanged main file is an error at once.
CACHE_READ_TRIES = 3
PILLOW_BLOCK_SIZE = 64 * 1024 * 1024  # see images.py: huge decoded images go back to the system

# --- extraction ----------------------------------------------------------------------------------
BATCH_SIZE = 32  # fixed-size batches (the last one is padded) so the model compiles once
GPU_BATCH_SIZE = 256  # the default instead when Keras runs the backbone on a GPU: keeps it busy
# Bounds checked before any work. MobileNetV2 activations grow with image_size**2 x batch_size:
# at 1024 px a batch of 32 needs ~4 GB; larger sizes only exhaust memory (10000 px died at 9 GB).
MIN_IMAGE_SIZE = 32  # MobileNetV2's smallest input
MAX_IMAGE_SIZE = 1024
MAX_BATCH_SIZE = 1024
MAX_BATCH_PIXELS = 32 * 1024 * 1024  # batch_size x image_size**2: 32 images of 1024 px
# Decoding workers. None: one per core this process may use (os.sched_getaffinity); `extract
# --workers N` overrides it.
DECODE_WORKERS = None


def cores() -> int:
    """The cores this process may run on (os.sched_getaffinity: a container's or taskset's share,
    not the machine's); the one core count of featx (decoding, ONNX Runtime, cross-validation)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def decode_workers() -> int:
    """DECODE_WORKERS, else one per core this process may run on."""
    return DECODE_WORKERS or cores()


MAX_DECODE_WORKERS = 256
# Object storage (featx.images.remote): each call is tried this many times in all when the store
# is busy (S3 SlowDown, throttling) or the network fails, waiting 0.5 s, 1 s, 2 s, ... between.
# The client underneath (botocore, gcsfs) retries on its own too; these bound featx's own share.
REMOTE_ATTEMPTS = 3
REMOTE_BACKOFF_SECONDS = 0.5
# Threads or processes (featx/decoding.py). Processes decode small images up to 2.4x faster on
# 2 cores (Pillow's Python code holds the GIL), photos as fast as threads, and take ~0.3 s to
# start. "auto" takes them where decoding sets the pace: the model on a GPU, 2 workers or more,
# PROCESS_DECODE_MIN_IMAGES images or more; a model on this CPU is 10x slower than decoding.
DECODE_IN = "auto"
DECODE_INS = ("auto", "threads", "processes")
PROCESS_DECODE_MIN_IMAGES = 1000
PREFETCH_BATCHES = 4  # decoded batches waiting for the model; bounds memory
# --- the cache's part files (featx/parts.py) --------------------------------------------------
# Images per part file: 4,096 x 1,280 float32 = 21 MB. Larger parts mean fewer files (245 for a
# million images) but more memory while one is built and more work redone after a kill.
PART_ROWS = 4096
# A journal write that finds at least PART_MIN_ROWS rows waiting and no journal batch for the part
# being gathered writes them as a part at once (a fast pipeline writes each feature once, not as a
# batch and then in its part). Parts hold PART_MIN_ROWS to PART_ROWS rows then (the last one less).
PART_MIN_ROWS = 1024
# extract journals its finished batches (one .npz) at most every JOURNAL_SECONDS: a slow batch
# (a real model) is journalled alone, fast ones (small images, a GPU) are gathered into one write,
# so the journal's fsyncs do not cap the pipeline. A kill -9 redoes at most this much work.
JOURNAL_SECONDS = 0.25
# extract rewrites every feature into fresh parts (compaction) when the parts hold more dead rows
# (deleted or changed images) than live ones, or the cache's rows map to more than this many runs
# of consecutive part rows (each is one mapping of the /features virtual dataset).
COMPACT_DEAD_FRACTION = 0.5
COMPACT_MAX_BLOCKS = 4096
FEATURE_DTYPE = "float32"  # "float16" halves the cache; features are stored, not recomputed
FEATURE_DTYPES = ("float32", "float16")  # a cache keeps its dtype unless --dtype asks for the other
# --flip: also store the features of every image mirrored left-right (about 2x the model time, and
# 2x in predict and the export). Off by default: on bench/quality.py it gained +0.02 point of mean
# validation accuracy with the default logreg head (+1.4 with --head dense, +0.5 with --scaling
# standard), which does not pay for doubling extraction. Turn it on when accuracy matters more.
FLIP = False
CACHE_DIR = "cache"  # default folder for caches and trained heads
# What featx writes, which it never reads back as data (`featx extract .` in a project folder):
# the marker of a cache's parts folder (`CACHE.h5.parts/`), and the files that mark its output
# folders (fit-head, finetune, export, report, audit). A folder holding one is skipped whole.
JOURNAL_MARKER = ".featx-journal"
OUTPUT_MARKERS = frozenset({
    JOURNAL_MARKER, "featx.json", "head.json", "finetune.json", "export.json", "metrics.json",
    "audit.json", "featx-files.json",
})  # fmt: skip

# --- splits --------------------------------------------------------------------------------------
VAL_SPLIT = 0.2  # fraction of each class held out for validation when the folder has no splits
SEED = 0  # seeds the split and the heads
# A flat folder's split keeps each group of copies (featx audit's duplicate groups) on one side, up
# to this many images: burst shots and copies are a few; near-copy links chain larger groups of
# look-alikes (textures: one of 828 images in NEU surface defects) that, kept whole, would empty a
# class's validation. Those are split as single images, and `featx audit` lists them.
SPLIT_GROUP_MAX_IMAGES = 10
SPLITS = ("train", "validation", "test")
SPLIT_FOLDER_NAMES = {
    "train": "train",
    "validation": "validation",
    "val": "validation",
    "test": "test",
}

# --- engines -------------------------------------------------------------------------------------
# "auto": ONNX Runtime when it is installed (`pip install 'featx[onnx]'`), Keras sees no GPU and
# the Keras backend can export ONNX (about 2x faster than TensorFlow on a CPU), else Keras.
# "keras" or "onnx" force one.
ENGINES = ("auto", "keras", "onnx")
ENGINE = "auto"
# The exported backbone-<key>.onnx (8.9 MB, 8-15 s to make) is the same for every data set, so it is
# kept once per user: in $FEATX_HOME, else $XDG_CACHE_HOME/featx, else ~/.cache/featx. Files left
# next to caches by older versions are still used.
ONNX_DIR = None  # a folder here wins over that per-user folder
HOME_ENV = "FEATX_HOME"  # the environment variable naming featx's per-user folder
ONNX_THREADS = None  # ONNX Runtime intra-op threads; None: every core the process may use
PRECISIONS = ("fp32", "int8")  # --precision of extract; int8: see featx/int8.py
PRECISION = "fp32"
INT8_CALIBRATION_IMAGES = 320  # --precision int8: training images that set the activation ranges
ONNX_SPIN = "0"  # "1" lets idle ONNX Runtime threads spin (steals cores from decoding)
# extract --executor ray (featx/ray_executor.py): decoding threads in each Ray actor. Not one per
# core as in a single run: an actor reserves one CPU and shares its node with the other actors.
RAY_DECODE_THREADS = 4
# "local": this process decodes and runs the backbone; "ray": a Ray cluster does
# (`featx extract --executor ray`, `pip install 'featx[ray]'`).
EXECUTORS = ("local", "ray")
EXECUTOR = "local"
GPUS_PER_WORKER = 0  # GPUs reserved per Ray actor; 0: CPU only, 0.5: two actors share one GPU

# --- finetune (stage 3) --------------------------------------------------------------------------
# The top 39 layers of MobileNetV2 are everything from block_13_expand on: the last four
# inverted-residual blocks (13-16, the 7x7 stage) and Conv_1. They hold the most specific features
# and are cheap to train (small spatial size). More layers adapt more but overfit small data sets
# and cost time; 0 trains only the head (with augmentation). BatchNormalization never trains.
FINETUNE_UNFREEZE_LAYERS = 39
FINETUNE_EPOCHS = 5  # at most; early stopping usually ends sooner. Each epoch reads every image
FINETUNE_PATIENCE = 2  # epochs without a lower validation loss before stopping
FINETUNE_LEARNING_RATE = 1e-5  # AdamW; low, so the pretrained weights adapt instead of being lost
FINETUNE_LR_FACTOR = 0.2  # --reduce-lr-on-plateau multiplies the learning rate by this
FINETUNE_BATCH_SIZE = 32
FINETUNE_DROPOUT = 0.2  # in front of the head, as in the Keras transfer-learning guide
# Augmentation, on 0..255 pixels in training only: a mirrored or slightly turned, zoomed or
# contrasted photo is still the same class. Rotation is a fraction of a full turn (0.05 = +-18 deg).
AUGMENT_FLIP = "horizontal"  # "horizontal_and_vertical" for images without an up (microscopy)
AUGMENT_ROTATION = 0.05
AUGMENT_ZOOM = 0.1  # +-10 % zoom
AUGMENT_CONTRAST = 0.1  # contrast factor in [0.9, 1.1]

# --- heads (featx fit-head) ----------------------------------------------------------------------
HEAD = "logreg"  # "logreg" (seconds, the strong default) or "dense" (a small Keras head)
HEADS = ("logreg", "dense")
CLASS_WEIGHT = "none"  # "balanced": each class weighs n / (classes * count); for uneven classes
CLASS_WEIGHTS = ("none", "balanced")
# Feature scaling in front of a head (estimators.fit_scaling): "standard" (per-feature mean and
# standard deviation), "none" (the raw features, centred, in one global unit), "l2" (each image's
# features to unit length first) or "auto": the logistic regression's cross-validation compares
# SCALING_CHOICES together with C and keeps the pair with the lowest held-out log loss.
SCALING = "auto"
SCALING_CHOICES = ("none", "standard", "l2")  # ties, and caches too small to validate: the first
SCALINGS = ("auto", *SCALING_CHOICES)
DENSE_SCALING = "standard"  # the Dense head's; "auto" runs the logistic regression's choice first
# Logistic regression: C is chosen by stratified k-fold cross-validation on the train split
# (lowest held-out log loss) unless --C is given. Each C starts from the previous fit, so the
# grid is cheap; time grows with the folds.
LOGREG_CS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0)  # half-decades
LOGREG_CV_FOLDS = 5
LOGREG_MAX_ITER = 500  # lbfgs iterations per fit; standardised features converge in ~10-30
LOGREG_BLAS_THREADS = 1  # BLAS threads while fitting; more are slower on 2,000 x 1,280 features
LOGREG_CV_THREADS = None  # cross-validation fits run in this many threads; None: one per core
LOGREG_FALLBACK_C = 1.0  # used when a class has < 2 training images (no cross-validation)
# Dense head: Normalization -> [Dense(hidden, relu)] -> Dropout -> Dense(C, softmax), AdamW,
# early stopping on the validation loss with the best epoch's weights restored.
DENSE_HIDDEN = 0  # units of the hidden layer; 0: none. Try 256 when classes are not linear
DENSE_DROPOUT = 0.5  # on the (standardised) features, or on the hidden layer when there is one
DENSE_EPOCHS = 50  # upper bound; early stopping usually ends training much sooner
DENSE_BATCH_SIZE = 128
DENSE_LEARNING_RATE = 3e-3
DENSE_WEIGHT_DECAY = 0.1  # AdamW decoupled weight decay (times the learning rate per step); 0: Adam
DENSE_L2 = 0.01  # L2 on the Dense kernels; like logreg's C=0.03 on 2,000 images (1/(2*C*n))
DENSE_PATIENCE = 5  # epochs without a better validation loss before stopping

# --- predict and export --------------------------------------------------------------------------
PREDICT_TOP_K = 3  # classes listed per image, most probable first (fewer when the model has fewer)
PREDICT_PROGRESS_MIN = 100  # show a progress bar from this many images on
PREDICT_MIN_CONFIDENCE = None  # --min-confidence: rows below it are predicted UNKNOWN_CLASS; off
UNKNOWN_CLASS = "unknown"  # the prediction of a row below --min-confidence
# Unknown images (heads.novelty): the threshold flags this share of known held-out images (the
# validation split) as unknown; --unknown-rate changes it when predicting; --no-unknown: off.
UNKNOWN_RATE = 0.05
# Training images remembered (float16, 2.5 KB each at 1,280 dims); a seeded subset above that.
NOVELTY_MEMORY_CAP = 5000
UNKNOWN_WARN_SHARE = 0.25  # predict warns when more than this share of its images are unknown
# "keras" (any backend), "savedmodel" or "tflite" (TensorFlow backend), "onnx" (the onnx extra:
# tf2onnx writes it, ONNX Runtime checks and runs it)
EXPORT_FORMAT = "keras"
EXPORT_FORMATS = ("keras", "savedmodel", "tflite", "onnx")
EXPORT_QUANTIZES = ("none", "float16", "dynamic")
# TFLite only. "float16" halves the file; "dynamic" stores int8 weights (3.6x smaller). With the
# cats_and_dogs_filtered logreg model, probabilities on 8 check images moved by 1e-4 (float16) and
# 5e-4 (dynamic); validation accuracy 0.989 stayed 0.989 / became 0.988. No full-integer option.
EXPORT_QUANTIZE = "none"
# The name of the class probabilities among an export's outputs. An ONNX export names each output:
# this for a model with one output, the Keras output names for a model with several (its other
# outputs, such as a novelty score, carry over under their own names).
EXPORT_PROBABILITIES = "probabilities"
EXPORT_CHECK_IMAGES = 8  # images compared between the exported and the in-process model
EXPORT_TOLERANCE = 1e-4  # largest probability difference accepted for float exports
EXPORT_QUANTIZED_TOLERANCE = 0.1  # the same for quantized TFLite (a warning, not an error)

# --- reports (report.html, confusion_matrix.png, the fit-head summary) ---------------------------
CALIBRATION_BINS = 10  # confidence bins of the reliability diagram and the calibration error
INTERVAL_LEVEL = 0.95  # accuracy and balanced accuracy carry a 95 % interval (reports.evaluation)
INTERVAL_DRAWS = 4000  # balanced accuracy's interval: seeded draws of the per-class posteriors
REPORT_TOP_LOSSES = 24  # misclassified images shown in report.html, most confidently wrong first
REPORT_THUMBNAIL = 128  # longest side of their thumbnails in pixels (JPEG, embedded in the page)
REPORT_CONFUSED_PAIRS = 10  # most-confused class pairs listed in report.html
IMBALANCE_RATIO = 3.0  # fit-head suggests --class-weight balanced when the largest class has this
# many times the training images of the smallest

# --- audit ---------------------------------------------------------------------------------------
# Near duplicates: two images whose features have a cosine similarity >= this. Calibrated with the
# ImageNet MobileNetV2 at 224 px (bench/audit.py; the README has the table). oxford_flowers17's 70
# listed near-identical pairs (dHash distance <= 4) score 0.88-1.0; 0.90 finds 69 of them and flags
# 30 other pairs, about two thirds of them the same photo cropped or stamped (dHash misses those),
# the rest look-alike close-ups of one species. Among cats_and_dogs_filtered it flags one pair (the
# same photo twice). Edited copies of 30 photos found at 0.90: brightness +20 % and stamped text
# all, 75 % size and JPEG quality 30 93 %, 5 % crop 87 %, half size and blur 73 %, 10 % crop 13 %,
# quarter size none. Unrelated nearest neighbours score 0.84 at the 99.9th percentile.
# Lower finds more crops and more look-alikes; random-weight backbones (tests) need a higher value.
AUDIT_NEAR_DUPLICATE = 0.90
AUDIT_BLOCK_SIZE = 2048  # rows per tile of the all-pairs search: 2048 x 2048 float32 = 16 MB
# ... when the features are read from the cache's parts a tile at a time (extract's split, merge):
# smaller tiles, so extraction's peak memory stays that of its batches (two 5 MB tiles, 4 MB of S)
AUDIT_STORED_BLOCK_SIZE = 1024
AUDIT_MAX_PAIRS = 2_000_000  # more pairs above the threshold than this is an error, not a list
AUDIT_NEIGHBORS = 10  # outlier score: mean cosine distance to this many most similar images
# Outlier: robust z-score of that distance, (score - median) / (1.4826 * MAD), above this. It flags
# 5 of 3,000 cats_and_dogs_filtered photos and 1 of 1,360 flowers; of 10 flower photos planted among
# the cats and dogs it flags 5, of 10 cat/dog photos planted among the flowers 9 (bench/audit.py).
AUDIT_OUTLIER_Z = 3.0
AUDIT_CV_FOLDS = LOGREG_CV_FOLDS  # out-of-fold probabilities for the label-issue search
# cleanlab.filter.find_label_issues(filter_by=...): "prune_by_noise_rate" is cleanlab's default
AUDIT_FILTER_BY = "prune_by_noise_rate"
AUDIT_IMBALANCE_RATIO = IMBALANCE_RATIO  # hint --class-weight balanced (largest / smallest class)
AUDIT_QUICK_MAX_IMAGES = 20_000  # extract/fit-head look for near copies up to this many images
AUDIT_SHEET_ITEMS = 24  # duplicate groups, label issues and outliers shown in each contact sheet
AUDIT_SHEET_COLUMNS = 6  # thumbnails per row of a contact sheet
AUDIT_THUMBNAIL = 160  # thumbnail side in pixels
