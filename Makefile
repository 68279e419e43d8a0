# tensorpress — the two quick-start commands are `make run` and `make test`.
PY      ?= python3
VENV    := .venv
PEERS   := .venv-peers
BIN     := $(VENV)/bin
RECIPE  ?= gptq-w4g64
MODEL   ?= default
OUT     ?= runs/$(RECIPE)-$(shell date +%Y%m%d-%H%M%S)
THREADS ?= $(shell nproc 2>/dev/null || echo 2)
PYTEST_ARGS ?=

.PHONY: run test env peers assets clean-env bench-gptq bench-lowrank bench-pruning bench-compare

## run: create the environment, fetch the default model and text, compress with the default recipe,
##      print the dense-vs-compressed report table
run: env assets
	$(BIN)/tensorpress compress $(MODEL) --recipe $(RECIPE) -o $(OUT) --threads $(THREADS)

## test: the whole test suite (creates both environments and fetches the assets first)
test: env peers
	-$(BIN)/python -m tensorpress.assets > /dev/null
	$(BIN)/python -m pytest -n 2 $(PYTEST_ARGS)

env: $(VENV)/.installed
$(VENV)/.installed: setup.py constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check --upgrade pip
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e ".[kernels,test]"
	touch $@

peers: $(PEERS)/.installed
$(PEERS)/.installed: requirements-peers.txt constraints.txt
	$(PY) -m venv $(PEERS)
	$(PEERS)/bin/pip install -q --disable-pip-version-check --upgrade pip
	GPTQMODEL_CPU_WORKERS=2 $(PEERS)/bin/pip install -q -c constraints.txt -r requirements-peers.txt
	touch $@

## assets: fetch and convert the default model and text into $$TENSORPRESS_CACHE (~/.cache/tensorpress)
assets: env
	$(BIN)/python -m tensorpress.assets

## bench-gptq: our GPTQ w4g64 vs llm-compressor's on the protocol (writes benchmarks/results/)
bench-gptq: env peers assets
	$(BIN)/python benchmarks/gptq_vs_llmcompressor.py --threads $(THREADS)

## bench-lowrank: the low-rank family and GPTQModel's GPTQ + EoRA on the protocol (writes benchmarks/results/)
bench-lowrank: env peers assets
	$(BIN)/python benchmarks/lowrank.py --threads $(THREADS)

## bench-pruning: Wanda/SparseGPT (vs llm-compressor's), ARMOR, Wanda+EoRA, LOST vs SVD on the protocol (writes benchmarks/results/)
bench-pruning: env peers assets
	$(BIN)/python benchmarks/pruning.py --threads $(THREADS)

## bench-compare: every shipped method beside the CPU peers (llm-compressor, GPTQModel, bitsandbytes, HQQ):
##      one table and two plots, results into benchmarks/results/ and the README (about 8 h on 2 cores;
##      BENCH_ARGS=--reuse finishes an interrupted run)
BENCH_ARGS ?=
bench-compare: env peers assets
	$(BIN)/python -c "import matplotlib" 2>/dev/null || $(BIN)/pip install -q -c constraints.txt -e ".[bench]"
	$(BIN)/python benchmarks/compare.py --threads $(THREADS) --readme $(BENCH_ARGS)

clean-env:
	rm -rf $(VENV) $(PEERS)
