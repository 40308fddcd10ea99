"""The routed-adapter math, defined once and shared by training, the reference loader and vLLM.

For tokens x (T, d_in) with K experts of rank R each (A_e: (R, d_in), B_e: (d_out, R)):

    delta(x) = s * sum_{e in TopK(x)} w_e(x) * B_e A_e x,    w = gate_scale * softmax(selected logits)

Everything has static shapes: routing produces a dense (T, K) weight matrix via topk + scatter, and the
experts run as two matmuls over their concatenation (K*R rows of A, K*R columns of B). No `.item()`, no
data-dependent shapes, so the same code runs under torch.compile and CUDA graphs.

Serving runs the same math in a cheaper arrangement (`badit_serve.vllm_models.served_experts`).
"""

from __future__ import annotations

from typing import Literal

import torch

RouterMode = Literal["topk", "dense", "none"]


def router_logits(x: torch.Tensor, router: torch.Tensor | None) -> torch.Tensor:
    """Router logits (T, K) for tokens x (T, d_in) and router weight (K, d_in); (T, 1) zeros when the
    layer has a single expert and no router (mode 'none')."""
    if router is None:
        return x.new_zeros(x.shape[0], 1)  # (T, 1)
    return x @ router.t()  # (T, K)


def routing_weights(
    logits: torch.Tensor, top_k: int, mode: RouterMode, gate_scale: float | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense routing weights and the selection mask.

    logits: (T, K) router logits (ignored values for mode 'none', which needs K == 1); gate_scale: a number
    or a 0-dim tensor (what a compiled region takes: no float argument to specialise on).
    Returns weights (T, K) — zero outside the selected experts — and selected (T, K) bool.
    """
    if mode == "none":
        selected = torch.ones_like(logits, dtype=torch.bool)  # (T, 1)
        return torch.ones_like(logits) * gate_scale, selected
    if mode == "dense":
        weights = torch.softmax(logits.float(), dim=-1).to(logits.dtype) * gate_scale  # (T, K)
        return weights, torch.ones_like(logits, dtype=torch.bool)
    top_logits, top_idx = torch.topk(logits, top_k, dim=-1)  # (T, k), (T, k)
    top_weights = torch.softmax(top_logits.float(), dim=-1).to(logits.dtype) * gate_scale  # (T, k)
    weights = torch.zeros_like(logits).scatter(-1, top_idx, top_weights)  # (T, K)
    selected = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, top_idx, True)  # (T, K)
    return weights, selected


def routed_delta(
    x: torch.Tensor, weights: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float
) -> torch.Tensor:
    """The weighted sum of the experts' low-rank outputs.

    x: (T, d_in); weights: (T, K); lora_a: (K*R, d_in), expert e's rows at [e*R, (e+1)*R);
    lora_b: (d_out, K*R), expert e's columns likewise. Returns (T, d_out).
    """
    num_tokens, num_experts = weights.shape
    rank = lora_a.shape[0] // num_experts
    hidden = x @ lora_a.t()  # (T, K*R)
    hidden = hidden.view(num_tokens, num_experts, rank) * weights.unsqueeze(-1)  # (T, K, R)
    return (hidden.view(num_tokens, num_experts * rank) @ lora_b.t()) * scaling  # (T, d_out)


def steer_logits(logits: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Router logits (T, K) float32 plus a per-token steering bias (T, K) or (K,) float32 (-inf on masked
    experts, `badit_serve.core.steering`); None or zeros leave them bit for bit (x + 0.0 == x)."""
    return logits if bias is None else logits + bias  # (T, K)


def top_experts(logits: torch.Tensor, width: int) -> torch.Tensor:
    """The experts each token is routed to, best first: (T, width) int64 from logits (T, K). For mode
    'topk' width = top_k (the same `topk` as `routing_weights`); 'dense' lists all K; 'none' (T, 1) zeros."""
    return torch.topk(logits, width, dim=-1).indices  # (T, width)
