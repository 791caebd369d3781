"""Model folders on disk: what kind a folder is and its records (`model_dirs`), a folder loaded as
pixels -> probabilities (`classifier`), and the manifest of what featx wrote in an output
folder (`outputs`).

Importing this package loads nothing heavy: each module imports what it needs."""
