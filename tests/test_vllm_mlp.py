"""BaditMLP, the routed MLP of the vLLM model classes, on tiny shapes without an engine: equal to the
reference routed gate (A' apart or in gate_up_proj, float32 and bfloat16), one traced compile region for
every layer, the activation table, TP sharding of lora_b, and which exports it can serve."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from badit_serve.core.reference import RoutedLinear
from tests.support.vllm_fakes import (
    D_IN,
    INTER,
    BaseMLP,
    K,
    R,
    badit_block,
    expert_tensors,
    served_mlp,
    silu_and_mul,
    vllm_activations,
)


@pytest.mark.parametrize("fusable", [False, True], ids=["A-apart", "A-in-gate_up"])
@pytest.mark.parametrize(
    ("router", "top_k", "num_experts"), [("topk", 2, K), ("dense", K, K), ("none", 1, 1)]
)
def test_badit_mlp_matches_reference_routed_linear(
    router: str, top_k: int, num_experts: int, fusable: bool
) -> None:
    """The routed MLP equals the reference routed gate, with A' run on its own or appended to the base
    projection's weight (an unquantized gate_up_proj)."""
    block = badit_block(router, top_k, num_experts)
    base, experts = BaseMLP.random(0), expert_tensors(block)
    mlp = served_mlp(block, base, experts, fusable=fusable)
    n = block.num_experts * block.rank
    assert mlp.fused_rows == (n if fusable else 0)
    assert mlp.gate_up_proj.weight.shape[0] == 2 * INTER + mlp.fused_rows
    x = torch.randn(7, D_IN)
    with torch.no_grad():
        expected = base.reference(RoutedLinear(base.gate, block, experts), x)  # (T, D_IN)
        torch.testing.assert_close(mlp(x), expected, atol=1e-5, rtol=1e-5)
    selected_per_token = top_k if router == "topk" else num_experts
    assert int(mlp.expert_tokens.sum()) == 7 * selected_per_token  # no forward context: every row counts
    assert float(mlp.router_weight_sums.sum()) == pytest.approx(7 * block.gate_scale, rel=1e-6)


class _Stack(nn.Module):
    def __init__(self, mlps: list[nn.Module]) -> None:
        super().__init__()
        self.mlps = nn.ModuleList(mlps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for mlp in self.mlps:
            x = x + mlp(x)  # (T, D_IN)
        return x


@pytest.mark.parametrize("act", ["function", "vllm-SiluAndMul"])
@pytest.mark.parametrize("fusable", [False, True], ids=["A-apart", "A-in-gate_up"])
def test_every_layer_calls_one_traced_mlp_region(fusable: bool, act: str) -> None:
    """Under torch.compile (the batch dimension dynamic, as vLLM marks it) the routed MLPs of all layers are
    calls of one traced region (so the compile does not grow with the number of layers), and the compiled
    stack gives the eager outputs and counts. vLLM's SiluAndMul runs on the two halves (no concatenation);
    an activation outside the table gets the concatenated halves."""
    gated = act != "function"
    act_fn = vllm_activations()[0] if gated else silu_and_mul
    block = badit_block()
    mlps = [
        served_mlp(block, BaseMLP.random(seed), expert_tensors(block, seed), fusable=fusable, act_fn=act_fn)
        for seed in range(3)
    ]
    stack = _Stack(mlps)
    graphs: list[torch.fx.GraphModule] = []

    def capture(gm: torch.fx.GraphModule, _inputs: list[torch.Tensor]):  # noqa: ANN202
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(stack, backend=capture, fullgraph=True)
    x = torch.randn(5, D_IN)  # (T, D_IN)
    torch._dynamo.mark_dynamic(x, 0)
    with torch.no_grad():
        expected = stack(x)  # (T, D_IN)
        eager_counts = [mlp.expert_tokens.clone() for mlp in stack.mlps]
        for mlp in stack.mlps:
            mlp.expert_tokens.zero_()
        got = compiled(x)  # (T, D_IN)
    (graph,) = graphs
    calls = [n for n in graph.graph.nodes if n.target is torch.ops.higher_order.invoke_subgraph]
    assert len(calls) == 3
    assert len({call.args[0].target for call in calls}) == 1  # one subgraph, called by every layer
    region = getattr(graph, calls[0].args[0].target)
    outside = [
        n.target
        for n in graph.graph.nodes
        if n.op == "call_function" and n.target is not torch.ops.higher_order.invoke_subgraph
    ]
    inside = [n.target for n in region.graph.nodes if n.op == "call_function"]
    linear = torch._C._nn.linear
    assert inside.count(linear) == 2 and linear not in outside  # the base projections are in the region
    # Each layer adds its counts through the op, in place (not as write-backs at the end of the graph).
    assert outside.count(torch.ops.badit.add_routing_stats) == 3
    assert (torch.cat in inside) is not gated
    torch.testing.assert_close(got, expected)
    assert [mlp.expert_tokens.tolist() for mlp in stack.mlps] == [c.tolist() for c in eager_counts]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("index", range(3), ids=["SiluAndMul", "GeluAndMul-none", "GeluAndMul-tanh"])
def test_gated_activation_equals_the_vllm_activation_of_the_concatenation(
    index: int, dtype: torch.dtype
) -> None:
    from badit_serve.vllm_models.gated_act import gated_activation

    act = vllm_activations()[index]
    gate, up = torch.randn(2, 7, INTER, dtype=dtype) * 3  # (T, I) x2
    two_halves = gated_activation(act)
    assert two_halves is not None
    # Equal up to rounding: the halves are contiguous here and strided in the concatenation, which can
    # take another vectorised path (float32 ulps apart, observed ~1e-7 relative).
    expected = act.forward_native(torch.cat([gate, up], dim=-1))  # (T, I)
    torch.testing.assert_close(two_halves(gate, up), expected)


def test_activations_outside_the_table_get_the_concatenation() -> None:
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.activation import MulAndSilu

    from badit_serve.vllm_models.gated_act import gated_activation

    assert gated_activation(silu_and_mul) is None
    with set_current_vllm_config(VllmConfig()):
        assert gated_activation(MulAndSilu()) is None  # the same halves, the other way round


def test_lora_b_weight_loader_takes_this_ranks_rows() -> None:
    from badit_serve.vllm_models.mlp import GateExpertWeights

    block = badit_block()
    full = torch.arange(2 * INTER * K * R, dtype=torch.float32).view(2 * INTER, K * R)  # (d_out, K*R), TP=2
    for rank in (0, 1):
        gate = GateExpertWeights(block, D_IN, INTER, tp_rank=rank)
        gate.lora_b.weight_loader(gate.lora_b, full)
        torch.testing.assert_close(gate.lora_b.data, full[rank * INTER : (rank + 1) * INTER])


def test_badit_mlp_in_bfloat16_stays_close_to_the_float32_reference() -> None:
    """The serving default: base layers and B' in bfloat16, router logits float32 (same selection)."""
    block = badit_block()
    base, experts = BaseMLP.random(1), expert_tensors(block, seed=1)
    mlp = served_mlp(block, base.to(torch.bfloat16), experts, dtype=torch.bfloat16)
    assert mlp.fused_rows == block.num_experts * block.rank  # A' rides in the bfloat16 base projection
    assert mlp.served.lora_b.dtype == torch.bfloat16 and mlp.served.lora_a.dtype == torch.bfloat16
    assert mlp.served.router.dtype == torch.float32
    x = torch.randn(7, D_IN)
    with torch.no_grad():
        expected = base.reference(RoutedLinear(base.gate, block, experts), x)  # (T, D_IN)
        got = mlp(x.bfloat16())
    assert got.dtype == torch.bfloat16
    assert (got.float() - expected).norm() / expected.norm() < 2e-2  # bfloat16: 8 mantissa bits
    assert int(mlp.expert_tokens.sum()) == 7 * block.top_k


def test_only_gate_proj_exports_are_servable() -> None:
    from badit_serve.vllm_models.mlp import read_badit_block

    good = badit_block()
    assert read_badit_block(SimpleNamespace(badit=good.model_dump())) == good
    with pytest.raises(ValueError, match=r"target_modules=\['gate_proj', 'up_proj'\] cannot be served"):
        read_badit_block(
            SimpleNamespace(badit=badit_block(target_modules=["gate_proj", "up_proj"]).model_dump())
        )
    with pytest.raises(ValueError, match="no 'badit' block"):
        read_badit_block(SimpleNamespace())
