# featx — `make demo` and `make test` are all a new user needs; both install into .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Real photos: $FEATX_DATA, else ../shared/data (this project's machines), else the public zip (downloaded once).
SHARED_DATA := ../shared/data/cats_and_dogs_filtered
DATA_URL := https://storage.googleapis.com/mledu-datasets/cats_and_dogs_filtered.zip
DATA ?= $(or $(FEATX_DATA),$(wildcard $(SHARED_DATA)),cache/data/cats_and_dogs_filtered)
# Keras looks for downloaded weights here; copying ours there makes weights="imagenet" work offline.
KERAS_MODELS := $(HOME)/.keras/models
WEIGHTS_SRC := ../shared/weights/mobilenet_v2_1.0_224_no_top.RECONSTRUCTED_from_slim_npy.h5
WEIGHTS_DST := $(KERAS_MODELS)/mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5

# The versions CI tested: every dependency of featx and of these extras, pinned by `make lock`.
LOCK := .ci/requirements.lock
LOCK_EXTRAS := dev onnx ray cloud
LOCK_PYTHON := 3.11
LOCK_PLATFORM := x86_64-manylinux_2_28

.PHONY: install lock weights demo test test-fast lint format docs bench bench-finetune clean

install: $(VENV)/.installed weights

# The locked versions first, then featx itself (editable) without resolving anything again; a lock
# that no longer matches pyproject.toml fails tests/test_lock.py (run `make lock`).
$(VENV)/.installed: pyproject.toml $(LOCK) | $(BIN)/uv
	$(BIN)/uv pip install --quiet --python $(BIN)/python -r $(LOCK)
	$(BIN)/uv pip install --quiet --python $(BIN)/python --no-deps -e .
	touch $@

# uv at the locked version: it installs the lock in seconds where pip takes minutes.
$(BIN)/uv:
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$$(grep -m1 '^uv==' $(LOCK))"

# Rewrites the lock after a dependency changed in pyproject.toml. Versions already pinned stay
# (uv keeps the pins of the file it rewrites) unless pyproject.toml rules them out; a new dependency
# gets its newest release for Python $(LOCK_PYTHON) on Linux. `make lock UPGRADE=1` moves every pin.
lock: | $(BIN)/uv
	$(BIN)/uv pip compile pyproject.toml $(LOCK_EXTRAS:%=--extra %) --python-version $(LOCK_PYTHON) \
		--python-platform $(LOCK_PLATFORM) $(if $(UPGRADE),--upgrade) --quiet -o $(LOCK)

weights:
	@if [ -f $(WEIGHTS_SRC) ] && [ ! -f $(WEIGHTS_DST) ]; then \
		mkdir -p $(KERAS_MODELS) && cp $(WEIGHTS_SRC) $(WEIGHTS_DST) && echo "copied ImageNet weights to $(WEIGHTS_DST)"; \
	fi

cache/data/cats_and_dogs_filtered:
	mkdir -p cache/data
	$(BIN)/python -c "import urllib.request; urllib.request.urlretrieve('$(DATA_URL)', 'cache/data/cats_and_dogs_filtered.zip')"
	cd cache/data && $(BIN)/python -m zipfile -e cats_and_dogs_filtered.zip .

demo: install $(DATA)
	$(BIN)/featx extract $(DATA) --cache cache/cats_and_dogs.h5
	$(BIN)/featx fit-head cache/cats_and_dogs.h5 --head logreg
	$(BIN)/featx fit-head cache/cats_and_dogs.h5 --head dense

test: install
	$(BIN)/python -m pytest

# The loop while you work: every test but those marked slow (> ~5 s each); `make test` runs all.
test-fast: install
	$(BIN)/python -m pytest -m "not slow"

lint: install
	$(BIN)/ruff check featx tests bench
	$(BIN)/ruff format --check featx tests bench

format: install
	$(BIN)/ruff check --fix featx tests bench
	$(BIN)/ruff format featx tests bench

# docs/cli.md is generated from `featx --help`; tests/test_docs.py fails when it is out of date.
docs: install
	$(BIN)/python tests/test_docs.py --write

bench: install $(DATA)
	$(BIN)/python bench/cores.py --data $(DATA)
	$(BIN)/python bench/decode_memory.py
	$(BIN)/python bench/scale.py
	$(BIN)/python bench/extract.py --data $(DATA)
	$(BIN)/python bench/ray_overhead.py --data $(DATA)
	$(BIN)/python bench/remote_read.py --data $(DATA)
	$(BIN)/python bench/pipeline.py --data $(DATA)
	$(BIN)/python bench/quality.py --timing
	$(BIN)/python bench/cold_start.py --data $(DATA) --json bench/results/cold_start.json

bench-finetune: install $(DATA)
	$(BIN)/python bench/pipeline.py --data $(DATA) --with-finetune --json-out bench/results/pipeline-finetune.json

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
