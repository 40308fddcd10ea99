"""Routed math for many adapters in one batch: each token picks its adapter's experts by a slot index.

Adapter slot s holds, for one adapted module, `a_router[s]` = [A; router] ((K*R + K, d_in), the router
rows absent in mode 'none') and `lora_b[:, s*K*R:(s+1)*K*R]` = B with `scaling * gate_scale` folded in
(d_out, K*R). For tokens x (T, d_in) with slot (T,) in [0, S) and valid (T,) (False: base-model or padding
token, no delta):

    proj   = x @ a_router_all.T                  (T, S*(K*R + K)), then each token's own slot gathered
    w      = routing_weights(proj[:, K*R:], ...)  the same top-k / softmax as `badit_serve.routing`
    delta  = spread(proj[:, :K*R] * w) @ lora_b.T  (T, d_out): the weighted hidden goes in the token's
                                                   slot's K*R columns, zeros elsewhere

Static shapes throughout (no sort, no .item(), no data-dependent indexing), so it runs under CUDA graphs.
The cost is S times one adapter's two projections, the price of choosing per token without grouping.
"""

from __future__ import annotations

import torch

from badit_serve.routing import RouterMode, routing_weights


def gather_slot(proj: torch.Tensor, slots: torch.Tensor, rows: int) -> torch.Tensor:
    """proj (T, S*rows), slots (T,) -> each token's own slot's `rows` columns (T, rows)."""
    tokens = proj.shape[0]
    per_slot = proj.view(tokens, -1, rows)  # (T, S, rows)
    index = slots.view(tokens, 1, 1).expand(tokens, 1, rows)  # (T, 1, rows)
    return per_slot.gather(1, index).squeeze(1)  # (T, rows)


def slot_routed_delta(
    x: torch.Tensor,
    slots: torch.Tensor,
    valid: torch.Tensor,
    a_router: torch.Tensor,
    lora_b: torch.Tensor,
    *,
    num_slots: int,
    num_experts: int,
    top_k: int,
    mode: RouterMode,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (T, d_in) float32, slots (T,) long in [0, S), valid (T,) bool, a_router (S*rows, d_in),
    lora_b (d_out, S*K*R). Returns delta (T, d_out), routing weights (T, K) and selection (T, K), both
    zero / False on invalid tokens (weights without gate_scale, which is folded into lora_b)."""
    tokens = x.shape[0]
    n = lora_b.shape[1] // num_slots  # K*R
    rows = a_router.shape[0] // num_slots  # K*R (+ K)
    proj = gather_slot(x @ a_router.t(), slots, rows)  # (T, rows)
    hidden = proj[:, :n]  # (T, K*R)
    logits = proj[:, n:] if mode != "none" else x.new_zeros(tokens, 1)  # (T, K)
    weights, selected = routing_weights(logits, top_k, mode, 1.0)  # (T, K), (T, K)
    keep = valid.unsqueeze(-1)  # (T, 1)
    weights = weights * keep  # (T, K)
    selected = selected & keep  # (T, K)
    weighted = (hidden.view(tokens, num_experts, -1) * weights.unsqueeze(-1)).view(tokens, n)  # (T, K*R)
    one_hot = torch.nn.functional.one_hot(slots, num_slots).to(x.dtype)  # (T, S)
    spread = (one_hot.unsqueeze(-1) * weighted.unsqueeze(1)).view(tokens, num_slots * n)  # (T, S*K*R)
    return spread @ lora_b.t(), weights, selected  # (T, d_out), (T, K), (T, K)
