"""The shared routed function against a slow per-token loop, and its static-shape properties."""

from __future__ import annotations

import pytest
import torch

from badit_serve.core.routing import routed_delta, router_logits, routing_weights
from badit_serve.vllm_models.served_experts import (
    RoutingSpec,
    ServedExperts,
    SlotIndex,
    SlotShape,
    add_served_delta,
    balanced_factors,
    served_routing,
)
from tests.support.routing_reference import routed_delta_reference


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
    weights, selected, weighted, _ = served_routing(x, experts, spec)
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


def _slot_adapters(mode: str, k: int, slots: int, gen: torch.Generator) -> list[tuple]:
    """(router or None, lora_a, lora_b, scaling) of `slots` random adapters."""
    rank, d_in, d_out = 2, 16, 20
    return [
        (
            None if mode == "none" else torch.randn(k, d_in, generator=gen),
            torch.randn(k * rank, d_in, generator=gen),
            torch.randn(d_out, k * rank, generator=gen),
            float(torch.rand((), generator=gen)) + 0.5,
        )
        for _ in range(slots)
    ]


@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize(("mode", "k", "top_k"), [("topk", 4, 2), ("dense", 3, 3), ("none", 1, 1)])
def test_slots_give_each_token_its_own_adapters_routed_delta(
    mode: str, k: int, top_k: int, grouped: bool
) -> None:
    """Three adapters in four slots (one left empty); per token a slot, -1 (no adapter) or a padding row:
    each valid token gets exactly its adapter's `routed_delta`, the others nothing, in both slot forms."""
    gen = torch.Generator().manual_seed(11)
    adapters = _slot_adapters(mode, k, 3, gen)
    d_in, d_out = adapters[0][1].shape[1], adapters[0][2].shape[0]
    spec = RoutingSpec(num_experts=k, top_k=top_k, mode=mode, gate_scale=2.0)
    shape = SlotShape(0 if mode == "none" else k, adapters[0][1].shape[0], d_in, d_out)
    stacked = ServedExperts.empty_slots(4, shape, torch.float32, "cpu")
    for index, (router, a, b, scaling) in zip((2, 0, 1), adapters, strict=True):  # slot 3 stays empty
        stacked.set_slot(index, ServedExperts.build(router, a, b, scaling, k, torch.float32))
    indices = torch.tensor([0, 1, 2, 2, -1, 1, 0, 0, 1, 2, 3, 0])  # (T,) slot 2 holds adapter 0, ...
    real = torch.tensor([True] * 10 + [False, False])  # the last two rows are padding
    slots = SlotIndex.of(indices, 4, real, grouped=grouped)
    x = torch.randn(indices.shape[0], d_in, generator=gen)
    base = torch.randn(indices.shape[0], 2 * d_out, generator=gen)
    out = base.clone()
    weights, selected, weighted, _ = served_routing(x, stacked, spec, slots)
    add_served_delta(out[:, :d_out], weighted, stacked, slots)
    owner = {2: 0, 0: 1, 1: 2}  # slot -> adapter
    for t, slot in enumerate(indices.tolist()):
        row = x[t : t + 1]
        if slot < 0 or not real[t]:
            assert not selected[t].any() and not weights[t].any()
            torch.testing.assert_close(out[t], base[t], rtol=0, atol=0)
            continue
        router, a, b, scaling = adapters[owner[slot]]
        w, sel = routing_weights(router_logits(row, router), top_k, mode, 2.0)
        assert torch.equal(selected[t : t + 1], sel)
        torch.testing.assert_close(weights[t : t + 1], w, rtol=1e-5, atol=1e-6)
        delta = out[t : t + 1, :d_out] - base[t : t + 1, :d_out]
        torch.testing.assert_close(delta, routed_delta(row, w, a, b, scaling), rtol=1e-4, atol=1e-4)
    assert torch.equal(out[:, d_out:], base[:, d_out:])


def test_grouped_and_dense_slot_forms_agree_and_reset_empties_a_slot() -> None:
    gen = torch.Generator().manual_seed(3)
    k = 4
    adapters = _slot_adapters("topk", k, 3, gen)
    d_in, d_out = adapters[0][1].shape[1], adapters[0][2].shape[0]
    spec = RoutingSpec(num_experts=k, top_k=2, mode="topk", gate_scale=1.0)
    stacked = ServedExperts.empty_slots(
        3, SlotShape(k, adapters[0][1].shape[0], d_in, d_out), torch.float32, "cpu"
    )
    for index, (router, a, b, scaling) in enumerate(adapters):
        stacked.set_slot(index, ServedExperts.build(router, a, b, scaling, k, torch.float32))
    indices = torch.randint(-1, 3, (40,), generator=gen)  # (T,)
    x = torch.randn(40, d_in, generator=gen)

    def delta(grouped: bool) -> torch.Tensor:
        slots = SlotIndex.of(indices, 3, grouped=grouped)
        return add_served_delta(
            torch.zeros(40, d_out), served_routing(x, stacked, spec, slots)[2], stacked, slots
        )

    torch.testing.assert_close(delta(True), delta(False), rtol=1e-5, atol=1e-5)
    assert delta(False)[indices == 1].abs().sum() > 0
    stacked.reset_slot(1)
    assert delta(False)[indices == 1].abs().sum() == 0 and delta(True)[indices == 1].abs().sum() == 0
    assert delta(False)[indices == 0].abs().sum() > 0


def test_slot_index_groups_tokens_by_slot_with_static_shapes() -> None:
    indices = torch.tensor([2, -1, 0, 2, 2, 0])
    slots = SlotIndex.of(indices, 4, grouped=True)
    assert slots.valid.tolist() == [True, False, True, True, True, True]
    assert slots.slot.tolist() == [2, 0, 0, 2, 2, 0]  # -1 rides in slot 0, masked by `valid`
    assert slots.order is not None and slots.offsets is not None
    assert slots.offsets.dtype == torch.int32 and slots.offsets.tolist() == [3, 3, 6, 6]  # (S,) always
    assert slots.slot[slots.order].tolist() == [0, 0, 0, 2, 2, 2]
    assert SlotIndex.of(indices, 4, grouped=False).order is None


def test_set_slot_refuses_other_shapes() -> None:
    gen = torch.Generator().manual_seed(1)
    router, a, b, scaling = _slot_adapters("topk", 4, 1, gen)[0]
    stacked = ServedExperts.empty_slots(
        2, SlotShape(4, a.shape[0] * 2, a.shape[1], b.shape[0]), torch.float32, "cpu"
    )
    with pytest.raises(ValueError, match="do not fit a slot"):
        stacked.set_slot(0, ServedExperts.build(router, a, b, scaling, 4, torch.float32))
    with pytest.raises(IndexError, match="outside"):
        stacked.reset_slot(2)
