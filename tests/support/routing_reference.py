"""A slow per-token, per-expert loop of the routed delta, the reference the vectorised math is tested against."""

from __future__ import annotations

import torch


def routed_delta_reference(
    x: torch.Tensor, weights: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float
) -> torch.Tensor:
    """Slow per-token, per-expert loop computing the same as `routed_delta` (for tests only)."""
    num_tokens, num_experts = weights.shape
    rank = lora_a.shape[0] // num_experts
    out = x.new_zeros(num_tokens, lora_b.shape[0])
    for t in range(num_tokens):
        for e in range(num_experts):
            if weights[t, e] != 0:
                a_e = lora_a[e * rank : (e + 1) * rank]  # (R, d_in)
                b_e = lora_b[:, e * rank : (e + 1) * rank]  # (d_out, R)
                out[t] += scaling * weights[t, e] * (b_e @ (a_e @ x[t]))
    return out
