"""Stage 0: the photos. Find them in a folder layout and assign splits (`finder`), decode any
format robustly to RGB arrays (`decoder`), read and decode a few batches ahead in threads or
processes (`decoding`), and put each image in one shard (`shards`). No TensorFlow here.

Importing this package loads nothing heavy: each module imports what it needs."""
