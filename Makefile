# rpt-pipeline. `make demo` and `make test` each set up .venv on a fresh machine first.
SHELL := /bin/bash
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONFIG ?= configs/demo.yaml
SET ?=
comma := ,
RPT := $(BIN)/rpt
# faiss comes from one of two extras that both provide the module `faiss`: `make setup FAISS=gpu` on a
# CUDA machine. EXTRAS adds more (e.g. EXTRAS=,s3,ray).
FAISS ?= cpu
EXTRAS ?=
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml requirements/lock.txt | sha256sum | cut -c1-12)-$(FAISS)$(subst $(comma),-,$(EXTRAS))

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM ?= true

# Where a torch is already installed system-wide (a GPU machine's CUDA build), the venv sees it
# and keeps it; otherwise the local CPU build of torch 2.13.0 is installed.
SYSTORCH := $(shell $(PY) -c "import torch" >/dev/null 2>&1 && echo --system-site-packages)

.PHONY: setup demo test test-fast lint format bench bench-scale neighbors documents tokenize chunks bm25 \
        embeddings dense reference scores train evaluate retrofit report flow clean

setup: $(STAMP)

# pip's notices about the offline index mirrors' missing folders are noise; real errors still show, and
# pipefail makes a failed install stop the set-up at that step instead of being swallowed by grep.
PIPQUIET := grep -v "^WARNING: Location" || true

$(STAMP): pyproject.toml requirements/lock.txt
	@$(PY) -c "import sys; assert sys.version_info >= (3, 11), 'rpt-pipeline needs Python >= 3.11 (found ' + sys.version.split()[0] + '); set PY=python3.11 or newer'"
	@test -x $(BIN)/python || $(PY) -m venv $(SYSTORCH) $(VENV) || { echo "setup: '$(PY) -m venv' failed; on Debian/Ubuntu install python3-venv (apt install python3-venv)" >&2; rm -rf $(VENV); exit 1; }
	@set -o pipefail; $(BIN)/python -m pip install -q --upgrade pip 2>&1 | { $(PIPQUIET); }
	@$(BIN)/python -c "import torch" >/dev/null 2>&1 || { set -o pipefail; $(BIN)/python -m pip install -q torch==2.13.0 2>&1 | { $(PIPQUIET); }; }
	@set -o pipefail; $(BIN)/python -m pip install -q -c requirements/lock.txt -e ".[dev,$(FAISS)$(EXTRAS)]" 2>&1 | { $(PIPQUIET); }
	@# from outside the checkout, so the import proves the install (not the repo root on sys.path), and
	@# through the console script that `make demo` calls
	@cd / && $(abspath $(BIN))/python -c "import torch, faiss, app.cli, app.flows, pipeline, stages, model, data; print('setup ok: torch', torch.__version__)"
	@$(RPT) --help >/dev/null
	@rm -f $(VENV)/.installed-*; touch $@

# The full flow (neighbors, supervision, four variants, evaluation) with the tiny preset, then the report.
# One torch thread per task: the flow runs a wave's tasks side by side, and on a small CPU threads that
# spin against each other cost more than they give (OMP_NUM_THREADS=N make demo to change it).
demo: setup
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(RPT) flow full -c $(CONFIG) $(SET)
	$(RPT) report -c $(CONFIG) $(SET)

test: setup
	RPT_PROGRESS=0 $(BIN)/python -m pytest -q

test-fast: setup
	RPT_PROGRESS=0 $(BIN)/python -m pytest -q -m "not slow and not prefect"

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: setup
	$(BIN)/python -m bench.ingest
	$(BIN)/python -m bench.bm25
	$(BIN)/python -m bench.dense
	$(BIN)/python -m bench.train
	$(BIN)/python -m bench.scores speed
	$(BIN)/python -m bench.evaluate metrics
	$(BIN)/python -m bench.flows --target chunks

# The corpus-scale run (docs/corpus-scale.md): ~10^7 database chunks, about 45 minutes on 2 cores, ~10 GB disk
bench-scale: setup
	$(BIN)/python -m bench.corpus_scale --root $(or $(SCALE_ROOT),/tmp/rpt-scale) --unsharded dense

# one target per stage: `make bm25 CONFIG=configs/gutenberg.yaml SET="--set bm25.k=10"`
documents tokenize chunks bm25 embeddings dense reference scores train evaluate retrofit: setup
	$(RPT) run $(if $(filter tokenize,$@),tokenizer,$@) -c $(CONFIG) --with-deps $(SET)

# `make report CONFIG=configs/gutenberg-cpu.yaml`: the tables of the evaluate artifact that CONFIG (and SET) resolve to (docs/evaluate.md)
report: setup
	$(RPT) report -c $(CONFIG) $(SET)

# Prefect flows (cached on artifact versions; shards mapped over runner.kind): `make neighbors`,
# `make flow FLOW=full CONFIG=configs/gutenberg.yaml SET="--set runner.kind=dask"`
FLOW ?= neighbors
neighbors: setup
	$(RPT) flow neighbors -c $(CONFIG) $(SET)

flow: setup
	$(RPT) flow $(FLOW) -c $(CONFIG) $(SET)

clean:
	rm -rf artifacts
