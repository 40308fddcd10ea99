"""Reference loader: a Badit export as a plain transformers model with routed layers (no vLLM).

Used for parity tests (training forward == export == vLLM) and by users on plain transformers.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from badit_serve.core.adapter import check_base, load_adapter
from badit_serve.core.export_io import ExportError, LoadedExport, load_export
from badit_serve.core.format import BaditBlock
from badit_serve.core.routing import routed_delta, router_logits, routing_weights, steer_logits, top_experts
from badit_serve.core.steering import SteeringSpec


class RoutedLinear(nn.Module):
    """Inference-time routed layer: y = residual(x) + s * sum_{e in TopK(x)} w_e(x) B_e A_e x."""

    def __init__(self, base: nn.Linear, block: BaditBlock, experts: dict[str, torch.Tensor]):
        super().__init__()
        self.base = base
        self.block = block
        self.lora_a = nn.Parameter(experts["lora_a"].float(), requires_grad=False)  # (K*R, d_in)
        self.lora_b = nn.Parameter(experts["lora_b"].float(), requires_grad=False)  # (d_out, K*R)
        router = experts.get("router")
        self.router = (
            None if router is None else nn.Parameter(router.float(), requires_grad=False)
        )  # (K, d_in)
        self.last_selected: torch.Tensor | None = None
        self.last_experts: torch.Tensor | None = None
        """(T, width) int64: the experts each token of the last forward was routed to, best first."""
        self.steer_bias: torch.Tensor | None = None
        """(K,) float32 added to the router logits (`badit_serve.core.steering`), or None."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.base(x)  # (..., d_out)
        flat = x.reshape(-1, x.shape[-1]).float()  # (T, d_in)
        logits = steer_logits(router_logits(flat, self.router), self.steer_bias)  # (T, K)
        b = self.block
        weights, selected = routing_weights(logits, b.top_k, b.router, b.gate_scale)
        self.last_selected = selected
        self.last_experts = top_experts(logits, SteeringSpec.of(b).width)  # (T, width)
        delta = routed_delta(flat, weights, self.lora_a, self.lora_b, b.scaling)  # (T, d_out)
        return out + delta.view(*x.shape[:-1], -1).to(out.dtype)


def routed_layers(model: nn.Module) -> list[RoutedLinear]:
    """The model's routed layers in `badit.adapted_modules` order (the layer axis of routed experts)."""
    block: BaditBlock = model.badit_block  # type: ignore[assignment]
    return [model.get_submodule(name) for name in block.adapted_modules]  # type: ignore[misc]


def set_steering(model: nn.Module, bias: tuple[float, ...] | None) -> None:
    """Steer every routed layer of a reference model with one request's bias (`Steering.bias`), or stop."""
    for layer in routed_layers(model):
        layer.steer_bias = None if bias is None else torch.tensor(bias, dtype=torch.float32)  # (K,)


def last_routed_experts(model: nn.Module) -> torch.Tensor:
    """(T, layers, width) int64: the experts of every token and routed layer in the last forward (batch 1)."""
    ids = [layer.last_experts for layer in routed_layers(model)]
    if any(i is None for i in ids):
        raise RuntimeError("last_routed_experts before a forward pass")
    return torch.stack(ids, dim=1)  # type: ignore[arg-type]  # (T, L, width)


def _load_base_weights(model: PreTrainedModel, bundle: LoadedExport) -> None:
    """Load the base tensors with an explicit check: every expected tensor present with its shape."""
    expected = model.state_dict()
    given = bundle.base_tensors()
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    missing = sorted(k for k in expected if k not in given and not (tied and k == "lm_head.weight"))
    if missing:
        raise ExportError(f"{bundle.path}: base tensor(s) missing: {missing[:5]}")
    extra = sorted(k for k in given if k not in expected)
    if extra:
        raise ExportError(f"{bundle.path}: unexpected tensor(s): {extra[:5]}")
    for name, tensor in given.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise ExportError(
                f"{bundle.path}: tensor {name!r} has shape {tuple(tensor.shape)}, expected {tuple(expected[name].shape)}"
            )
    model.load_state_dict(given, strict=False)
    if tied:
        model.tie_weights()


def install_routed_layers(
    model: nn.Module, block: BaditBlock, experts: dict[str, dict[str, torch.Tensor]], source: Path
) -> nn.Module:
    """Replace every adapted nn.Linear of `model` by a `RoutedLinear` with its experts (module -> tensors)."""
    for module_name in block.adapted_modules:
        try:
            base = model.get_submodule(module_name)
        except AttributeError as exc:
            raise ExportError(f"{source}: adapted module {module_name!r} not found in the model") from exc
        if not isinstance(base, nn.Linear):
            raise ExportError(f"{source}: adapted module {module_name!r} is not an nn.Linear")
        parent_name, _, child = module_name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, RoutedLinear(base, block, experts[module_name]))
    model.badit_block = block  # type: ignore[assignment]  # torch types Module.__setattr__ values as Tensor | Module
    return model.eval()


def load_reference_model(
    export_dir: str | Path, dtype: torch.dtype = torch.float32, verify_checksums: bool = True
) -> nn.Module:
    """Validate an export and build the routed transformers model from it (in eval mode)."""
    bundle = load_export(export_dir, verify_checksums=verify_checksums)
    config = AutoConfig.from_pretrained(bundle.path)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    _load_base_weights(model, bundle)
    experts = {m: bundle.expert_tensors(m) for m in bundle.block.adapted_modules}
    model.badit_routing_table = bundle.routing_table
    return install_routed_layers(model, bundle.block, experts, bundle.path)


def load_reference_adapter(
    base_dir: str | Path, adapter_dir: str | Path, dtype: torch.dtype = torch.float32
) -> nn.Module:
    """A base model directory plus an adapter directory (`badit_serve.core.adapter`) as one routed model;
    refused when the adapter was trained on another base."""
    adapter = load_adapter(adapter_dir)
    check_base(adapter, Path(base_dir))
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype)
    model.badit_routing_table = adapter.routing_table  # type: ignore[assignment]  # as in install_routed_layers
    return install_routed_layers(model, adapter.block, adapter.experts, adapter.path)
