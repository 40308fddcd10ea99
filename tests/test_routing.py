"""The shared routed function against a slow per-token loop, and its static-shape properties."""

from __future__ import annotations

import pytest
import torch

from badit_serve.routing import routed_delta, routed_delta_reference, routing_weights


@pytest.mark.parametrize("mode,k,top_k", [("topk", 8, 4), ("topk", 8, 1), ("dense", 8, 8), ("none", 1, 1)])
@pytest.mark.parametrize("rank", [1, 8, 16])
def test_routed_delta_matches_per_token_loop(mode: str, k: int, top_k: int, rank: int) -> None:
    gen = torch.Generator().manual_seed(rank * 31 + k)
    tokens, d_in, d_out = 13, 24, 40
    x = torch.randn(tokens, d_in, generator=gen, dtype=torch.float64)
    logits = torch.randn(tokens, k, generator=gen, dtype=torch.float64)
    lora_a = torch.randn(k * rank, d_in, generator=gen, dtype=torch.float64)
    lora_b = torch.randn(d_out, k * rank, generator=gen, dtype=torch.float64)
    weights, selected = routing_weights(logits, top_k, mode, gate_scale=2.5)
    fast = routed_delta(x, weights, lora_a, lora_b, scaling=0.75)
    slow = routed_delta_reference(x, weights, lora_a, lora_b, scaling=0.75)
    torch.testing.assert_close(fast, slow, rtol=1e-10, atol=1e-10)
    assert selected.sum(-1).eq(top_k).all()


def test_topk_weights_are_softmax_over_selected_logits_only() -> None:
    logits = torch.tensor([[3.0, 1.0, 2.0, -5.0]])
    weights, selected = routing_weights(logits, top_k=2, mode="topk", gate_scale=2.0)
    expected = torch.softmax(torch.tensor([3.0, 2.0]), dim=0) * 2.0
    assert selected.tolist() == [[True, False, True, False]]
    torch.testing.assert_close(weights[0, [0, 2]], expected)
    assert weights[0, 1] == 0 and weights[0, 3] == 0
    assert weights.sum().item() == pytest.approx(2.0)


def test_routed_delta_compiles_without_graph_breaks() -> None:
    """Static shapes: torch.compile(fullgraph=True) must trace routing + experts in one graph."""

    def layer(x: torch.Tensor, router: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        weights, _ = routing_weights(x @ router.t(), 4, "topk", 4.0)
        return routed_delta(x, weights, a, b, 1.0)

    x, router = torch.randn(7, 16), torch.randn(8, 16)
    a, b = torch.randn(8 * 4, 16), torch.randn(12, 8 * 4)
    compiled = torch.compile(layer, fullgraph=True, backend="eager", dynamic=True)
    torch.testing.assert_close(compiled(x, router, a, b), layer(x, router, a, b))
    x2 = torch.randn(3, 16)
    torch.testing.assert_close(compiled(x2, router, a, b), layer(x2, router, a, b))
