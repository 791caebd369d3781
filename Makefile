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

.PHONY: install weights demo test test-fast lint format docs bench bench-finetune clean

install: $(VENV)/.installed weights

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,onnx,ray,cloud]'
	touch $@

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

bench-finetune: install $(DATA)
	$(BIN)/python bench/pipeline.py --data $(DATA) --with-finetune --json-out bench/results/pipeline-finetune.json

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
