"""The HDF5 feature cache: its main file and readers (`store`), its immutable part files and the
journal of a running extraction (`parts`), how an extraction writes as it goes (`stream`), and
the Ray executor whose actors write part files (`ray_executor`). The only h5py user.

Importing this package loads nothing heavy: each module imports what it needs."""
