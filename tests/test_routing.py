"""The shared routed function against a slow per-token loop, and its static-shape properties."""

from __future__ import annotations

import pytest
import torch

from badit_serve.routing import (
    RoutingSpec,
    ServedExperts,
    add_served_delta,
    balanced_factors,
    routed_delta,
    routed_delta_reference,
    router_logits,
    routing_weights,
    served_routing,
)


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


def _bad_delta_experts(k: int, r: int, d_in: int, d_out: int, change: float, gen: torch.Generator):
    """BAD delta experts [A; A0], [B, -B0] of rank 2r: large frozen factors and a small trained change."""
    a0 = torch.randn(k, r, d_in, generator=gen, dtype=torch.float64) * 3
    b0 = torch.randn(k, d_out, r, generator=gen, dtype=torch.float64) * 3
    a = a0 + change * torch.randn(a0.shape, generator=gen, dtype=torch.float64)
    b = b0 + change * torch.randn(b0.shape, generator=gen, dtype=torch.float64)
    lora_a = torch.cat([a, a0], dim=1).reshape(k * 2 * r, d_in)  # (K*2r, d_in)
    lora_b = torch.cat([b, -b0], dim=2).permute(1, 0, 2).reshape(d_out, k * 2 * r)  # (d_out, K*2r)
    return lora_a, lora_b


def test_balanced_factors_keep_every_expert_product() -> None:
    gen = torch.Generator().manual_seed(3)
    k, r = 4, 3
    lora_a, lora_b = _bad_delta_experts(k, r, 20, 28, 0.01, gen)
    new_a, new_b = balanced_factors(lora_a, lora_b, k)
    assert new_a.shape == lora_a.shape and new_b.shape == lora_b.shape
    for e in range(k):
        rows = slice(e * 2 * r, (e + 1) * 2 * r)
        torch.testing.assert_close(new_b[:, rows] @ new_a[rows], lora_b[:, rows] @ lora_a[rows])
    # Balanced: the factors are as small as the (small) product, not as large as the frozen terms.
    assert new_a.norm() < 0.2 * lora_a.norm() and new_b.norm() < 0.2 * lora_b.norm()


@pytest.mark.parametrize("mode,k,top_k", [("topk", 8, 4), ("dense", 4, 4), ("none", 1, 1)])
def test_served_path_matches_routed_delta(mode: str, k: int, top_k: int) -> None:
    """Router + A in one matmul, s folded into B, refactorised experts: same weights, selection, delta."""
    gen = torch.Generator().manual_seed(k + top_k)
    tokens, d_in, d_out, rank = 11, 24, 40, 4
    x = torch.randn(tokens, d_in, generator=gen)
    lora_a = torch.randn(k * rank, d_in, generator=gen)
    lora_b = torch.randn(d_out, k * rank, generator=gen)
    router = None if mode == "none" else torch.randn(k, d_in, generator=gen)
    spec = RoutingSpec(num_experts=k, top_k=top_k, mode=mode, gate_scale=2.5)
    ref_weights, ref_selected = routing_weights(router_logits(x, router), top_k, mode, 2.5)
    expected = routed_delta(x, ref_weights, lora_a, lora_b, scaling=0.75)  # (T, d_out)
    experts = ServedExperts.build(router, lora_a, lora_b, 0.75, k, torch.float32)
    base = torch.randn(tokens, 2 * d_out, generator=gen)  # the delta lands in the first half, in place
    out = base.clone()
    weights, selected, weighted = served_routing(x, experts, spec)
    add_served_delta(out[:, :d_out], weighted, experts)
    assert torch.equal(selected, ref_selected)
    torch.testing.assert_close(weights, ref_weights, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[:, :d_out] - base[:, :d_out], expected, rtol=1e-4, atol=1e-4)
    assert torch.equal(out[:, d_out:], base[:, d_out:])


def test_served_bfloat16_delta_has_no_bad_cancellation() -> None:
    """A BAD delta expert in bfloat16: computing B A x - B0 A0 x directly loses the small change to rounding of
    the large terms; the refactorised served path keeps it within bfloat16's relative precision."""
    gen = torch.Generator().manual_seed(5)
    k, r, d_in, d_out, tokens = 8, 8, 64, 96, 32
    lora_a, lora_b = _bad_delta_experts(k, r, d_in, d_out, 1e-3, gen)
    router = torch.randn(k, d_in, generator=gen, dtype=torch.float64)
    x = torch.randn(tokens, d_in, generator=gen, dtype=torch.float64)
    spec = RoutingSpec(num_experts=k, top_k=4, mode="topk", gate_scale=4.0)
    weights, _ = routing_weights(router_logits(x, router), 4, "topk", 4.0)
    exact = routed_delta(x, weights, lora_a, lora_b, scaling=2.0)  # (T, d_out) float64
    naive = routed_delta(x.bfloat16(), weights.bfloat16(), lora_a.bfloat16(), lora_b.bfloat16(), 2.0)
    experts = ServedExperts.build(router.float(), lora_a.float(), lora_b.float(), 2.0, k, torch.bfloat16)
    served = torch.zeros(tokens, d_out, dtype=torch.bfloat16)
    add_served_delta(served, served_routing(x.bfloat16(), experts, spec)[2], experts)
    scale = exact.norm()
    assert (naive.double() - exact).norm() / scale > 0.5  # the naive product is mostly rounding noise
    assert (served.double() - exact).norm() / scale < 0.02


def test_stacked_slots_give_each_token_its_own_adapter() -> None:
    """Three adapters stacked; a per-token slot picks one: each token gets exactly its adapter's result."""
    gen = torch.Generator().manual_seed(11)
    k, rank, d_in, d_out, tokens = 4, 2, 16, 20, 9
    spec = RoutingSpec(num_experts=k, top_k=2, mode="topk", gate_scale=2.0)
    singles = [
        ServedExperts.build(
            torch.randn(k, d_in, generator=gen),
            torch.randn(k * rank, d_in, generator=gen),
            torch.randn(d_out, k * rank, generator=gen),
            0.5,
            k,
            torch.float32,
        )
        for _ in range(3)
    ]
    stacked = ServedExperts.stack(singles)
    x = torch.randn(tokens, d_in, generator=gen)
    slot = torch.tensor([0, 1, 2, 2, 1, 0, 0, 1, 2])  # (T,)
    weights, selected, weighted = served_routing(x, stacked, spec, slot)
    out = add_served_delta(torch.zeros(tokens, d_out), weighted, stacked, slot)
    for t in range(tokens):
        single = singles[int(slot[t])]
        w, sel, h = served_routing(x[t : t + 1], single, spec)
        torch.testing.assert_close(weights[t : t + 1], w)
        assert torch.equal(selected[t : t + 1], sel)
        torch.testing.assert_close(out[t : t + 1], add_served_delta(torch.zeros(1, d_out), h, single))
