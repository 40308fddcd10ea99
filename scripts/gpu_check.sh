#!/usr/bin/env bash
# The GPU check (`make gpu-check`): on a CUDA machine, the `gpu`-marked tests (train steps in bf16 autocast
# for every method, regroup on CUDA, resume equality, export round trip and reference-loader parity), then
# a 200-step training-step timing of Badit vs LoRA vs LoRAMoE on the default model, printed as a table and
# written to benchmarks/results/train_step_gpu.json. Output goes to the terminal and to gpu-check.log.
#
# What a bare GPU machine needs besides a CUDA build of torch (nothing is downloaded here):
#   - this repository and a venv with its runtime dependencies (pyproject [project.dependencies]) plus
#     pytest: e.g. a wheelhouse made with `pip download -d wheels . pytest` on a machine with the same
#     Python, installed with `pip install --no-index -f wheels -e . pytest` (vLLM is not needed);
#   - the prepared default model directory, $BADIT_HOME/models/smollm2-135m-instruct (~0.5 GiB; the timing
#     trains it; the tests build tiny models and a tiny tokenizer themselves);
#   - the SuperNI task folders task363_sst2_polarity_classification and
#     task073_commonsenseqa_answer_generation (~0.5 MiB), pointed to by $BADIT_SUPERNI_DIR (resume test).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
STEPS=${STEPS:-200}
LOG=${LOG:-gpu-check.log}

if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu-check: no CUDA device visible to $PY (torch.cuda.is_available() is False); nothing run" >&2
  exit 2
fi
{
  echo "== $(date -u +%FT%TZ) $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo 'nvidia-smi unavailable')"
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  echo "== gpu-marked tests"
  "$PY" -m pytest -q -m gpu -rs tests
  echo "== $STEPS-step timing on the default model (batch 4 x 512 tokens, 50 response tokens)"
  "$PY" benchmarks/train_step.py --steps "$STEPS" --methods lora loramoe badit \
    --out benchmarks/results/train_step_gpu.json
} 2>&1 | tee "$LOG"
