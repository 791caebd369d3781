"""What the cached features say about the data: exact and near-duplicate photos and
train/validation leakage (`duplicates`).

Importing this package loads nothing heavy: each module imports what it needs."""
