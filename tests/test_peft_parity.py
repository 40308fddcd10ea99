"""LoRA, PiSSA and OLoRA presets against peft's `LoraConfig` on the same layers (litgpt-style parity)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from training.adapters import AdapterConfig, adapted_layers, apply_adapters

peft = pytest.importorskip("peft")


def _load(model_dir: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def _peft_model(model_dir: Path, init: bool | str, rank: int, alpha: float) -> torch.nn.Module:
    config = peft.LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=["gate_proj"], init_lora_weights=init
    )
    return peft.get_peft_model(_load(model_dir), config).eval()


def _peft_layers(model: torch.nn.Module) -> list:
    return [m for n, m in model.named_modules() if n.endswith("gate_proj") and hasattr(m, "lora_A")]


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_lora_matches_peft(tiny_model_dirs: dict[str, Path], family: str) -> None:
    rank, alpha = 4, 16.0
    ours = apply_adapters(
        _load(tiny_model_dirs[family]), AdapterConfig(method="lora", rank=rank, alpha=alpha, dropout=0.0)
    )
    theirs = _peft_model(tiny_model_dirs[family], True, rank, alpha)
    gen = torch.Generator().manual_seed(0)
    for layer, peft_layer in zip(adapted_layers(ours).values(), _peft_layers(theirs), strict=True):
        # Same init distribution (Kaiming-uniform, a=sqrt(5)): both inside the bound 1/sqrt(d_in); B zero.
        bound = 1 / layer.in_features**0.5
        assert peft_layer.lora_A["default"].weight.abs().max() <= bound
        assert layer.lora_a.abs().max() <= bound and layer.lora_a.abs().max() > 0.9 * bound
        assert layer.lora_b.abs().max() == 0
        # Same function once they hold the same (non-zero) factors.
        with torch.no_grad():
            a = torch.randn(layer.lora_a.shape, generator=gen)
            b = torch.randn(layer.lora_b.shape, generator=gen)
            layer.lora_a.copy_(a)
            layer.lora_b.copy_(b)
            peft_layer.lora_A["default"].weight.copy_(a)
            peft_layer.lora_B["default"].weight.copy_(b)
    ids = torch.randint(3, 1000, (2, 10), generator=gen)
    torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("method", "family", "alpha", "seed"),
    [
        ("pissa", "llama", 8.0, 1),
        ("pissa", "gemma2", 8.0, 1),
        # `olora` is peft's init_lora_weights="olora" (the authors' config/olora.config): QR factors,
        # residual base, B orthonormal.
        ("olora", "llama", 32.0, 2),
        ("olora", "qwen3", 32.0, 2),
    ],
)
def test_factor_initialised_presets_match_peft(
    tiny_model_dirs: dict[str, Path], method: str, family: str, alpha: float, seed: int
) -> None:
    """PiSSA and OLoRA: the same factors and residual base as peft's init, so the same logits."""
    rank = 4
    ours = apply_adapters(
        _load(tiny_model_dirs[family]), AdapterConfig(method=method, rank=rank, alpha=alpha, dropout=0.0)
    )
    theirs = _peft_model(tiny_model_dirs[family], method, rank, alpha)
    for layer, peft_layer in zip(adapted_layers(ours).values(), _peft_layers(theirs), strict=True):
        torch.testing.assert_close(layer.lora_a, peft_layer.lora_A["default"].weight, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(layer.lora_b, peft_layer.lora_B["default"].weight, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(layer.base.weight, peft_layer.base_layer.weight, atol=1e-6, rtol=1e-6)
        if method == "olora":
            eye = torch.eye(rank)
            torch.testing.assert_close(layer.lora_b.t() @ layer.lora_b, eye, atol=1e-5, rtol=0)
    ids = torch.randint(3, 1000, (2, 10), generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, atol=1e-5, rtol=1e-5)
