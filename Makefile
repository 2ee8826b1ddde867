# One-command set-up, demo and tests. See README.md "Install" for why the order matters.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DIR ?= runs/demo
# CUDA hosts take the CUDA builds of torch/fbgemm; everything else the CPU ones.
HAS_CUDA := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
FBGEMM := $(if $(HAS_CUDA),fbgemm-gpu==1.8.0,fbgemm-gpu-cpu==1.8.0)
PYTEST_ARGS ?=

.PHONY: setup demo test test-fast bench-prepare clean

setup: $(STAMP)

# Re-runs only when the install recipe or the project metadata changed.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet $(FBGEMM)
	$(BIN)/python -m pip install --quiet --no-deps torchrec==1.8.0
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	$(BIN)/python -c "import torch, torchrec, fbgemm_gpu, lightning, polars, pyarrow; print('stack ok: torch', torch.__version__)"
	touch $(STAMP)

demo: setup
	$(BIN)/msit-rec generate --config configs/generate/demo.yaml --out $(DEMO_DIR)/raw --overwrite
	$(BIN)/msit-rec prepare --config configs/datasets/synthetic.yaml --source $(DEMO_DIR)/raw --out $(DEMO_DIR)/examples --overwrite
	$(BIN)/msit-rec fit --data $(DEMO_DIR)/examples --model configs/model/msit.yaml --trainer configs/trainer/multiprocess.yaml --out $(DEMO_DIR)/msit --set trainer.max_epochs=1 --overwrite --quiet
	$(BIN)/msit-rec fit --data $(DEMO_DIR)/examples --model configs/model/shared.yaml --trainer configs/trainer/multiprocess.yaml --out $(DEMO_DIR)/shared --set trainer.max_epochs=1 --overwrite --quiet
	$(BIN)/msit-rec evaluate --run $(DEMO_DIR)/msit --run $(DEMO_DIR)/shared --split test --out $(DEMO_DIR)/evaluation --overwrite --quiet
	$(BIN)/msit-rec compare $(DEMO_DIR)/evaluation --out $(DEMO_DIR)/comparison --overwrite --quiet
	$(BIN)/msit-rec export --run $(DEMO_DIR)/msit --out $(DEMO_DIR)/artifact --overwrite --quiet
	$(BIN)/msit-rec export --run $(DEMO_DIR)/msit --out $(DEMO_DIR)/artifact_int8 --precision int8 --overwrite --quiet
	$(BIN)/msit-rec requests --data $(DEMO_DIR)/examples --rows 20 --out $(DEMO_DIR)/requests.jsonl --overwrite --quiet
	$(BIN)/msit-rec predict --artifact $(DEMO_DIR)/artifact --input $(DEMO_DIR)/requests.jsonl --out $(DEMO_DIR)/scored.jsonl --overwrite --quiet
	@echo "demo outputs under $(DEMO_DIR): raw/ (logs), examples/ (dataset.json + shards),"
	@echo "  msit/ and shared/ (2-process runs: checkpoints/, logs/), evaluation/ (metrics.json, report.md, *.png),"
	@echo "  comparison/ (per-scenario AUC difference with bootstrap CIs), artifact/ and artifact_int8/ (serving"
	@echo "  artifacts: manifest.json with parity), requests.jsonl -> scored.jsonl (raw requests scored by predict)."
	@echo "  Try the service: $(BIN)/msit-rec serve --artifact $(DEMO_DIR)/artifact --port 8080"

test: setup
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# Everything but the tests that train or spawn processes (marker `slow`): the loop to iterate with.
test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

bench-prepare: setup
	$(BIN)/python benchmarks/bench_prepare.py

clean:
	rm -rf $(VENV) runs .pytest_cache
