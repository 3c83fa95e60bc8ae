# mathtune: the two commands a newcomer needs are `make demo` and `make test` (see README.md).
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
CONFIG  ?= configs/flan-t5-large.yaml
PYTEST_ARGS ?=
ARGS    ?=

.PHONY: setup demo test test-cluster test-all test-fast bench lint submit clean gpu-pack gpu-check gpu-check-dry

# Creates .venv and installs the project + dev tools from pyproject.toml. Re-runs only when
# pyproject.toml changes (the stamp), so it is ~instant when already done.
# pip installs uv and torch first: torch at pyproject's exact pin, so pip's configuration picks the CPU
# build where one lies on disk (uv looks only at the index, where that pin is a multi-GB CUDA build).
# uv then installs the rest (torch already satisfies the pin), resolving and downloading in parallel.
# Bytecode is compiled at install (pip by default, uv with --compile-bytecode; uv alone leaves none):
# where PYTHONDONTWRITEBYTECODE is set (CI images) every process, each Ray worker included, would
# otherwise compile torch/transformers/ray at import: `make test` from a fresh clone took 2x as long.
TORCH_PIN = $(shell grep -o '"torch==[^"]*"' pyproject.toml)
setup: $(STAMP)
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q uv $(TORCH_PIN)
	$(BIN)/uv pip install -q --compile-bytecode --python $(BIN)/python -e ".[dev]"
	touch $(STAMP)

# The main job end to end on the embedded default (offline, CPU): pipeline -> eval before -> train -> eval after.
# Extra flags go through ARGS: make demo ARGS="--train.max-steps 20 --eval.max-rows 100"
demo: setup
	$(BIN)/python -m cluster.run --config configs/demo.yaml $(ARGS)

# The test suite (CPU, local Ray); GPU tests skip themselves. The multi-node and `ray job submit`
# end-to-end runs take 5-10 more minutes on 2 cores: `make test-cluster` (or `make test-all`).
test: setup
	$(BIN)/python -m pytest -m "not cluster" $(PYTEST_ARGS)

test-cluster: setup
	$(BIN)/python -m pytest -m cluster $(PYTEST_ARGS)

test-all: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Everything but the `slow` tests (the Ray Train, eval-pool and end-to-end runs): ~2.5 min on 2 cores.
test-fast: setup
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

# CPU benchmarks, each a side-by-side ratio against its baseline; numbers go in bench/RESULTS.md.
# GPU ones (need a GPU): python -m bench.train_gpu_bench, python -m bench.eval_bench --gpu --rows 10000
bench: setup
	$(BIN)/python -m bench.pipeline_bench --rows 200000
	$(BIN)/python -m bench.train_bench
	$(BIN)/python -m bench.eval_bench

lint: setup
	$(BIN)/ruff check .

# Submit the end-to-end job to a running cluster: RAY_ADDRESS=http://127.0.0.1:8265 make submit CONFIG=... ARGS=...
submit: setup
	@test -n "$$RAY_ADDRESS" || (echo "set RAY_ADDRESS (e.g. http://127.0.0.1:8265 via 'ray dashboard cluster/aws.yaml')"; exit 2)
	$(BIN)/ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- python -m cluster.run --config $(CONFIG) $(ARGS)

clean:
	rm -rf outputs .pytest_cache

# ---- GPU device check (bench/gpu_check.sh; results in bench/RESULTS.md) ----
# Build .gpu/ here (needs PyPI): Ray 2.60 for Python 3.12 + the wheels the GPU image lacks, < 60 MiB.
gpu-pack: setup
	PY=$(BIN)/python bash bench/gpu_pack.sh

# Prints how to run the check through the device tool (a lent GPU machine has no Ray and no network).
gpu-check:
	@test -f .gpu/ray.tar.xz || (echo "first: make gpu-pack"; exit 2)
	@echo "Run these two calls back to back (the machine stays warm only ~30 s between calls):"
	@echo "  1. run  command: bash bench/gpu_check.sh 1   carry: [\".gpu\"]   timeout_s: 420"
	@echo "  2. run  command: GPU_CHECK_DEADLINE=D bash bench/gpu_check.sh 2   carry: []   timeout_s: D + 30"
	@echo "     with D = min(560, lease.budget_left_s of call 1's reply - 50): the speedrun trains what D"
	@echo "     leaves after its start-up and eval (D - ~175 s, at most 300 s: the full speedrun at D >= 475)"
	@echo "Each call returns \$$OUT/RESULTS.md (bench/RESULTS.md + the new GPU sections): copy its"
	@echo "'## GPU device check' section into bench/RESULTS.md. Then give_back."

# The same script at toy sizes on this CPU machine (the dev venv's Ray; the image's missing packages blocked).
gpu-check-dry: setup
	@test -f .gpu/ray.tar.xz || (echo "first: make gpu-pack"; exit 2)
	PYTHON=$(BIN)/python bash bench/gpu_check.sh all --dry-run
