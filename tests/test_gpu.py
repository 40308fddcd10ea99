"""The CUDA checks of `make gpu-check`: every test here needs a GPU and is skipped without one.

bf16 base weights under bf16 autocast, as training on a GPU runs: a few train steps and a regroup for each
method, router logits in float32, resume equality, and an export of a CUDA-trained model whose reference
loader (on the CPU, float32) reproduces the CUDA model's logits. The regroup tests of test_adapters.py
run on CUDA as well (their `cuda-bf16-autocast` case)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from badit_serve.core.reference import load_reference_model
from tests.support.devices import CUDA, Precision
from tests.support.training_runs import RESUME_OVERRIDES, InterruptAfter, train_overrides
from training.adapters import (
    AdapterConfig,
    accumulate_dog_signal,
    adapted_layers,
    apply_adapters,
    regroup,
    trainable_parameters,
)
from training.adapters.config import METHODS
from training.checkpoint import latest_checkpoint, load_checkpoint
from training.config import load_config
from training.export import export_model
from training.run import run

pytestmark = [pytest.mark.gpu, CUDA]

GPU = Precision("cuda", torch.bfloat16, True)


def _tokens(seed: int) -> torch.Tensor:
    ids = torch.randint(3, 1000, (2, 16), generator=torch.Generator().manual_seed(seed))
    return ids.to(GPU.device)  # (B, L)


def _trained_on_gpu(model_dir: Path, method: str, steps: int = 3) -> torch.nn.Module:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=GPU.base_dtype).to(GPU.device)
    apply_adapters(model, AdapterConfig(method=method, rank=4, dropout=0.0), seed=0)
    optimizer = torch.optim.AdamW(trainable_parameters(model), lr=1e-2)
    model.train()
    for step in range(steps):
        ids = _tokens(step)
        with GPU.context():
            loss = model(input_ids=ids, labels=ids).loss
        assert torch.isfinite(loss), f"{method}: loss {loss} at step {step}"
        loss.backward()
        accumulate_dog_signal(model)
        optimizer.step()
        optimizer.zero_grad()
    if AdapterConfig(method=method).resolved().dog:
        assert regroup(model, optimizer, probe_batch={"input_ids": _tokens(99)}).moved >= 0
    return model.eval()


@pytest.mark.parametrize("method", sorted(METHODS))
def test_train_steps_in_bf16_autocast(tiny_model_dirs: dict[str, Path], method: str) -> None:
    model = _trained_on_gpu(tiny_model_dirs["llama"], method)
    for layer in adapted_layers(model).values():
        assert layer.lora_a.dtype == torch.float32 and layer.lora_a.device.type == "cuda"
        assert bool(torch.isfinite(layer.lora_b).all())
        x = torch.randn(5, layer.in_features, device="cuda", dtype=torch.bfloat16)
        with GPU.context():
            logits, _, _ = layer.route(x)
        assert logits.dtype == torch.float32


def test_export_of_a_cuda_model_round_trips_through_the_reference_loader(
    tiny_model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    model = _trained_on_gpu(tiny_model_dirs["qwen3"], "badit")
    out = export_model(model, tiny_model_dirs["qwen3"], tmp_path / "export")
    reference = load_reference_model(out)  # CPU, float32, from the exported bf16 base
    model = model.float().cpu()
    ids = _tokens(7).cpu()
    with torch.no_grad():
        torch.testing.assert_close(reference(ids).logits, model(ids).logits, atol=1e-4, rtol=0)


@pytest.mark.train
def test_killed_run_resumes_to_the_same_weights_on_cuda(tiny_model_dirs, superni_dir, tmp_path) -> None:
    """run() picks CUDA when present (bf16 autocast on by default there). cuBLAS may reorder sums, so
    the comparison allows float32 noise rather than demanding bitwise equality."""
    extra = RESUME_OVERRIDES
    model_dir = tiny_model_dirs["llama"]
    whole = load_config(None, train_overrides(model_dir, superni_dir, tmp_path / "whole", **extra))
    run(whole, show_progress=False)
    killed = load_config(None, train_overrides(model_dir, superni_dir, tmp_path / "killed", **extra))
    with pytest.raises(KeyboardInterrupt):
        run(killed, show_progress=False, hooks=[InterruptAfter(3)])
    run(killed, resume=True, show_progress=False)
    a = load_checkpoint(latest_checkpoint(tmp_path / "whole")).adapter
    b = load_checkpoint(latest_checkpoint(tmp_path / "killed")).adapter
    for key in a:
        torch.testing.assert_close(b[key].float(), a[key].float(), atol=1e-4, rtol=1e-3, msg=key)
