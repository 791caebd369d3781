"""Every default in one place. Change them here, or per run with the matching CLI option."""

# --- backbone ------------------------------------------------------------------------------------
BACKBONE = "MobileNetV2"  # the only backbone for now; recorded in every fingerprint
IMAGE_SIZE = 224  # square input in pixels; ImageNet weights exist for 96/128/160/192/224
ALPHA = 1.0  # width multiplier; 1.0 gives 1280-d features (so does anything below 1.0)
WEIGHTS = "imagenet"  # "imagenet", "none" (random, seeded: for tests) or a path to a .h5 file
RANDOM_WEIGHTS_SEED = 0  # makes weights="none" reproducible across processes
# MobileNetV2's own preprocess_input maps pixels 0..255 to [-1, 1]; every stage uses this one map.
PREPROCESSING = "mobilenet_v2.preprocess_input: x / 127.5 - 1"

# --- decoding ------------------------------------------------------------------------------------
RESIZE = "bilinear-antialias, aspect ratio not kept"  # like image_dataset_from_directory
BACKGROUND = (255, 255, 255)  # transparent pixels are composited on white
MAX_IMAGE_PIXELS = 89_478_485  # decompression-bomb guard (Pillow's default limit)

# --- extraction ----------------------------------------------------------------------------------
BATCH_SIZE = 32  # fixed-size batches (the last one is padded) so the model compiles once
DECODE_THREADS = 4  # Pillow releases the GIL while decoding; more threads than cores is fine
PREFETCH_BATCHES = 4  # decoded batches waiting for the model; bounds memory
FEATURE_DTYPE = "float32"  # "float16" halves the cache; features are stored, not recomputed
# --flip: also store the features of every image mirrored left-right (about 2x the model time, and
# 2x in predict and the export). Off by default: on bench/quality.py it gained +0.02 point of mean
# validation accuracy with the default logreg head (+1.4 with --head dense, +0.5 with --scaling
# standard), which does not pay for doubling extraction. Turn it on when accuracy matters more.
FLIP = False
CACHE_DIR = "cache"  # default folder for caches and trained heads

# --- splits --------------------------------------------------------------------------------------
VAL_SPLIT = 0.2  # fraction of each class held out for validation when the folder has no splits
SEED = 0  # seeds the split and the heads
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
ONNX_DIR = None  # folder for the exported backbone-<key>.onnx files; None: next to the cache
ONNX_THREADS = None  # ONNX Runtime intra-op threads; None: every core the process may use
PRECISIONS = ("fp32", "int8")  # --precision of extract; int8: see featx/int8.py
INT8_CALIBRATION_IMAGES = 320  # --precision int8: training images that set the activation ranges
ONNX_SPIN = "0"  # "1" lets idle ONNX Runtime threads spin (steals cores from decoding)

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
CLASS_WEIGHT = "none"  # "balanced": each class weighs n / (classes * count); for uneven classes
# Feature scaling in front of a head (featx.heads.fit_scaling): "standard" (per-feature mean and
# standard deviation), "none" (the raw features, centred, in one global unit), "l2" (each image's
# features to unit length first) or "auto": the logistic regression's cross-validation compares
# SCALING_CHOICES together with C and keeps the pair with the lowest held-out log loss.
SCALING = "auto"
SCALING_CHOICES = ("none", "standard", "l2")  # ties, and caches too small to validate: the first
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
EXPORT_FORMAT = "keras"  # "keras" (any backend), "savedmodel" or "tflite" (TensorFlow backend)
# TFLite only. "float16" halves the file; "dynamic" stores int8 weights (3.6x smaller). With the
# cats_and_dogs_filtered logreg model, probabilities on 8 check images moved by 1e-4 (float16) and
# 5e-4 (dynamic); validation accuracy 0.989 stayed 0.989 / became 0.988. No full-integer option.
EXPORT_QUANTIZE = "none"
EXPORT_CHECK_IMAGES = 8  # images compared between the exported and the in-process model
EXPORT_TOLERANCE = 1e-4  # largest probability difference accepted for float exports
EXPORT_QUANTIZED_TOLERANCE = 0.1  # the same for quantized TFLite (a warning, not an error)
