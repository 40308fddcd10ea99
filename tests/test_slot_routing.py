"""The per-token adapter-slot math equals each adapter's own routed delta (badit_serve.routing)."""

from __future__ import annotations

import pytest
import torch

from badit_serve.routing import routed_delta, router_logits, routing_weights
from badit_serve.slot_routing import slot_routed_delta


@pytest.mark.parametrize(("mode", "num_experts", "top_k"), [("topk", 4, 2), ("dense", 3, 3), ("none", 1, 1)])
def test_slot_delta_matches_each_adapters_own_delta(mode: str, num_experts: int, top_k: int) -> None:
    torch.manual_seed(0)
    slots_n, rank, d_in, d_out, tokens = 3, 2, 16, 12, 10
    n = num_experts * rank
    adapters = []
    for _ in range(slots_n):
        a, b = torch.randn(n, d_in), torch.randn(d_out, n)
        router = None if mode == "none" else torch.randn(num_experts, d_in)
        adapters.append((a, b, router, float(torch.rand(()) + 0.5), float(torch.rand(()) + 0.5)))
    a_router = torch.cat([torch.cat([a] + ([r] if r is not None else [])) for a, _, r, _, _ in adapters])
    lora_b = torch.cat([b * s * g for _, b, _, s, g in adapters], dim=1)  # scaling * gate_scale folded in
    x = torch.randn(tokens, d_in)
    slots = torch.tensor([0, 1, 2, 1, 0, 2, 2, 0, 1, 0])
    valid = torch.tensor([True] * 8 + [False, False])
    delta, weights, selected = slot_routed_delta(
        x, slots, valid, a_router, lora_b, num_slots=slots_n, num_experts=num_experts, top_k=top_k, mode=mode
    )
    for t in range(tokens):
        a, b, router, scaling, gate_scale = adapters[int(slots[t])]
        row = x[t : t + 1]
        w, sel = routing_weights(router_logits(row, router), top_k, mode, gate_scale)
        expected = routed_delta(row, w, a, b, scaling)[0] if valid[t] else torch.zeros(d_out)
        torch.testing.assert_close(delta[t], expected, atol=1e-4, rtol=1e-4)
        assert torch.equal(selected[t], sel[0] & valid[t])
        torch.testing.assert_close(weights[t] * gate_scale, w[0] * valid[t])
