"""Stand-ins for the vLLM layers a `BaditMLP` wraps, and builders of served routed MLPs on tiny shapes,
shared by the unit tests of the vLLM-side pieces (no engine)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from badit_serve.core.format import BaditBlock

D_IN, INTER, K, R = 16, 12, 4, 2


def badit_block(router: str = "topk", top_k: int = 2, num_experts: int = K, **overrides) -> BaditBlock:
    fields = dict(
        method="badit",
        init="bad",
        base_architecture="LlamaForCausalLM",
        num_experts=num_experts,
        rank=R,
        train_rank=R,
        top_k=top_k,
        scaling=0.5,
        gate_scale=2.0,
        router=router,
        target_modules=["gate_proj"],
        adapted_modules=["model.layers.0.mlp.gate_proj"],
    )
    return BaditBlock(**{**fields, **overrides})


class FakeMerged(nn.Module):
    """Stands in for MergedColumnParallelLinear (TP=1): one [gate; up] weight and the attributes BaditMLP
    reads; `fusable` gives it vLLM's UnquantizedLinearMethod, so A' may be appended to its weight."""

    def __init__(self, gate: nn.Linear, up: nn.Linear, fusable: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.cat([gate.weight.data, up.weight.data]), requires_grad=False)
        self.input_size = gate.in_features
        self.output_partition_sizes = [gate.out_features, up.out_features]
        if fusable:
            from vllm.model_executor.layers.linear import UnquantizedLinearMethod

            self.quant_method = UnquantizedLinearMethod()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        return F.linear(x, self.weight), None


class FakeRow(nn.Module):
    def __init__(self, down: nn.Linear) -> None:
        super().__init__()
        self.down = down

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        return self.down(x), None


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """An activation outside `gated_act`'s table: BaditMLP hands it the concatenated halves."""
    half = gate_up.shape[-1] // 2
    return F.silu(gate_up[..., :half]) * gate_up[..., half:]


def vllm_activations() -> list[nn.Module]:
    """vLLM's SiluAndMul, GeluAndMul('none') and GeluAndMul('tanh'), built as a model would (in a config)."""
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.activation import GeluAndMul, SiluAndMul

    with set_current_vllm_config(VllmConfig()):
        return [SiluAndMul(), GeluAndMul("none"), GeluAndMul("tanh")]


@dataclass
class BaseMLP:
    """The frozen base layers of one MLP (float32 unless converted)."""

    gate: nn.Linear
    up: nn.Linear
    down: nn.Linear

    @classmethod
    def random(cls, seed: int) -> BaseMLP:
        torch.manual_seed(seed)
        return cls(
            nn.Linear(D_IN, INTER, bias=False),
            nn.Linear(D_IN, INTER, bias=False),
            nn.Linear(INTER, D_IN, bias=False),
        )

    def to(self, dtype: torch.dtype) -> BaseMLP:
        """Copies in `dtype` (the originals stay, as the reference)."""
        return BaseMLP(*(copy.deepcopy(m).to(dtype) for m in (self.gate, self.up, self.down)))

    def reference(self, routed_gate: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """down(silu(routed gate(x)) * up(x)): the MLP a BaditMLP must equal."""
        return self.down(F.silu(routed_gate(x)) * self.up(x))  # (T, D_IN)


def expert_tensors(block: BaditBlock, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    n = block.num_experts * block.rank
    experts = {"lora_a": torch.randn(n, D_IN, generator=g), "lora_b": torch.randn(INTER, n, generator=g)}
    if block.router != "none":
        experts["router"] = torch.randn(block.num_experts, D_IN, generator=g)
    return experts


def served_mlp(
    block: BaditBlock,
    base: BaseMLP,
    experts: dict[str, torch.Tensor],
    *,
    fusable: bool = True,
    act_fn: Callable = silu_and_mul,
    dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """A BaditMLP over `base` with `experts` loaded and served in `dtype`, as the model class does it
    (prepare_served after loading, finish_served after vLLM's post-processing)."""
    from badit_serve.vllm_models.mlp import BaditMLP

    mlp = BaditMLP(block, FakeMerged(base.gate, base.up, fusable), FakeRow(base.down), act_fn, tp_rank=0)
    for name, tensor in experts.items():
        getattr(mlp.badit_gate, name).data.copy_(tensor)
    mlp.prepare_served(dtype)
    mlp.finish_served()
    return mlp
