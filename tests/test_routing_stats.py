"""The per-expert routing statistics on the device: real rows from vLLM's padding mask, counting inside a
compiled graph that follows the live row count, the counting op, and `route_and_count` against the
served routing (eager and compiled)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from badit_serve.core.steering import SteeringSpec
from tests.support.vllm_fakes import D_IN, INTER, K, R


def test_routing_stats_skip_padding_rows() -> None:
    """The outer forward's real-row count (from vLLM's padding mask) limits what every layer counts."""
    from vllm.forward_context import override_forward_context

    from badit_serve.vllm_models.routing_stats import count_real_tokens, new_real_row_count

    selected = torch.tensor([[True, False], [True, True], [False, True], [True, True]])  # (T=4, K=2)
    weights = selected.float() * 0.5
    tokens, sums = torch.zeros(2, dtype=torch.int64), torch.zeros(2, dtype=torch.float64)
    num_real = new_real_row_count()
    is_padding = torch.tensor([False, False, True, True])  # rows 2, 3 are padding
    with override_forward_context(SimpleNamespace(is_padding=is_padding)):  # type: ignore[arg-type]
        count_real_tokens(num_real)
    assert int(num_real) == 2
    record_routing(selected, weights, num_real, tokens, sums)
    assert tokens.tolist() == [2, 1] and sums.tolist() == [1.0, 0.5]
    count_real_tokens(num_real)  # no forward context: all rows
    record_routing(selected, weights, num_real, tokens, sums)
    assert tokens.tolist() == [5, 4]
    with override_forward_context(SimpleNamespace(is_padding=None)):  # type: ignore[arg-type]
        count_real_tokens(num_real)  # a runner without a mask: all rows
    record_routing(selected, weights, num_real, tokens, sums)
    assert tokens.tolist() == [8, 7]


def record_routing(
    selected: torch.Tensor,
    weights: torch.Tensor,
    num_real: torch.Tensor,
    tokens: torch.Tensor,
    sums: torch.Tensor,
) -> None:
    """What BaditMLP does with a layer's routing statistics: add the increments into its buffers."""
    from badit_serve.vllm_models.routing_stats import routing_increments

    more_tokens, more_sums = routing_increments(selected, weights, num_real)
    torch.ops.badit.add_routing_stats(tokens, sums, more_tokens, more_sums)


class _Counting(nn.Module):
    """A compiled graph that counts like a routed layer: a shared real-row count read as a buffer."""

    def __init__(self, num_real: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("num_real", num_real, persistent=False)
        self.register_buffer("tokens", torch.zeros(2, dtype=torch.int64), persistent=False)
        self.register_buffer("sums", torch.zeros(2, dtype=torch.float64), persistent=False)

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        selected = logits > 0  # (T, 2)
        record_routing(selected, logits.relu(), self.num_real, self.tokens, self.sums)
        return logits * 2


def test_routing_stats_count_inside_a_compiled_graph_and_follow_the_live_row_count() -> None:
    """Counting is part of the compiled graph (no graph break, not eliminated as dead code), and the graph
    reads the row count the outer forward wrote before each call, not the value it was traced with."""
    from badit_serve.vllm_models.routing_stats import new_real_row_count

    num_real = new_real_row_count()
    layer = _Counting(num_real)
    compiled = torch.compile(layer, fullgraph=True, dynamic=True, backend="aot_eager")
    logits = torch.tensor([[1.0, -1.0], [1.0, 1.0], [-1.0, 1.0], [1.0, 1.0], [1.0, -1.0]])  # (T=5, 2)
    compiled(logits)  # every row
    assert layer.tokens.tolist() == [4, 3]
    num_real.fill_(2)  # rows 2.. are padding
    compiled(logits)
    assert layer.tokens.tolist() == [6, 4] and layer.sums.tolist() == [6.0, 4.0]
    num_real.fill_(0)
    compiled(logits[:3])  # another length, no real row
    assert layer.tokens.tolist() == [6, 4]


class _Routed(nn.Module):
    """Layers that call `route_and_count` as BaditMLP does: A' x a column slice of a wider projection."""

    def __init__(self, experts: list, num_real: torch.Tensor, spec) -> None:
        super().__init__()
        self.experts, self.spec = experts, spec
        self.width = SteeringSpec(spec.num_experts, spec.top_k, spec.mode).width
        self.register_buffer("num_real", num_real, persistent=False)
        self.register_buffer("gate_scale", torch.tensor(spec.gate_scale), persistent=False)

    def forward(self, x: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
        from badit_serve.vllm_models.mlp import route_and_count

        outs = []
        for served in self.experts:
            wide = x @ torch.cat([served.lora_a, served.lora_a]).t()  # (T, 2 * K*R)
            hidden = wide[:, served.lora_a.shape[0] :]  # (T, K*R), strided
            spec = self.spec
            outs.append(
                route_and_count(
                    x, hidden, served.router, self.num_real, spec, self.gate_scale, None, self.width
                )
            )
        return outs


@pytest.mark.parametrize(("mode", "top_k", "num_experts"), [("topk", 2, K), ("dense", K, K), ("none", 1, 1)])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_route_and_count_equals_the_served_routing_and_counts_real_rows(
    compiled: bool, mode: str, top_k: int, num_experts: int
) -> None:
    """The routing of BaditMLP's region gives served_routing's weighted activations and the real rows' statistics, for every layer, at two batch lengths."""
    from badit_serve.vllm_models.routing_stats import new_real_row_count
    from badit_serve.vllm_models.served_experts import RoutingSpec, ServedExperts, served_routing

    gen = torch.Generator().manual_seed(5)
    spec = RoutingSpec(num_experts=num_experts, top_k=top_k, mode=mode, gate_scale=2.0)  # type: ignore[arg-type]
    experts = [
        ServedExperts.build(
            None if mode == "none" else torch.randn(num_experts, D_IN, generator=gen),
            torch.randn(num_experts * R, D_IN, generator=gen),
            torch.randn(INTER, num_experts * R, generator=gen),
            0.5,
            num_experts,
            torch.float32,
        )
        for _ in range(3)
    ]
    num_real = new_real_row_count()
    layers = _Routed(experts, num_real, spec)
    run = torch.compile(layers, fullgraph=True, dynamic=True, backend="aot_eager") if compiled else layers
    for tokens, real in ((7, 7), (5, 3)):
        x = torch.randn(tokens, D_IN, generator=gen)
        num_real.fill_(real)
        for served, (weighted, counts, sums, chosen) in zip(experts, run(x), strict=True):
            weights, selected, expected, expected_chosen = served_routing(x, served, spec, width=layers.width)
            torch.testing.assert_close(weighted, expected)
            assert chosen.tolist() == expected_chosen.tolist()
            assert counts.tolist() == selected[:real].sum(0).tolist()
            torch.testing.assert_close(sums, weights[:real].sum(0).double())
