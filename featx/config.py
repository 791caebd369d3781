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
