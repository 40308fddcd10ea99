"""The routed-adapter math, defined once and shared by training, the reference loader and vLLM.

For tokens x (T, d_in) with K experts of rank R each (A_e: (R, d_in), B_e: (d_out, R)):

    delta(x) = s * sum_{e in TopK(x)} w_e(x) * B_e A_e x,    w = gate_scale * softmax(selected logits)

Everything has static shapes: routing produces a dense (T, K) weight matrix via topk + scatter, and the
experts run as two matmuls over their concatenation (K*R rows of A, K*R columns of B). No `.item()`, no
data-dependent shapes, so the same code runs under torch.compile and CUDA graphs.

Serving uses the same math in a cheaper arrangement (`ServedExperts`, built once at load):

- each expert's product B_e A_e is refactorised in float64 into balanced factors of the same rank
  (`balanced_factors`), so a BAD delta expert ([B, -B0] [A; A0]) is computed as one rank-2r product with no
  cancellation of two large terms: safe in bfloat16;
- the router and every A_e are one float32 matmul (router logits stay float32, so top-k matches the
  reference); the scaling s is folded into B; B runs in the model dtype and adds straight into the output.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

RouterMode = Literal["topk", "dense", "none"]


def router_logits(x: torch.Tensor, router: torch.Tensor | None) -> torch.Tensor:
    """Router logits (T, K) for tokens x (T, d_in) and router weight (K, d_in); (T, 1) zeros when the
    layer has a single expert and no router (mode 'none')."""
    if router is None:
        return x.new_zeros(x.shape[0], 1)  # (T, 1)
    return x @ router.t()  # (T, K)


def routing_weights(
    logits: torch.Tensor, top_k: int, mode: RouterMode, gate_scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense routing weights and the selection mask.

    logits: (T, K) router logits (ignored values for mode 'none', which needs K == 1).
    Returns weights (T, K) — zero outside the selected experts — and selected (T, K) bool.
    """
    if mode == "none":
        selected = torch.ones_like(logits, dtype=torch.bool)  # (T, 1)
        return torch.full_like(logits, gate_scale), selected
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


def balanced_factors(
    lora_a: torch.Tensor, lora_b: torch.Tensor, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Refactorise every expert's product B_e A_e into B'_e A'_e with B'_e A'_e == B_e A_e (in float64) and
    balanced factors: B'_e = Q_b U sqrt(S), A'_e = sqrt(S) V^T Q_a^T from QR of B_e and A_e^T and the SVD of
    the small R x R core. For a BAD delta expert the factors then carry the (small) trained change instead
    of two large cancelling terms. Same layout and rank R as the input; returned in float64.

    lora_a: (K*R, d_in); lora_b: (d_out, K*R). Needs R <= min(d_in, d_out).
    """
    n, d_in = lora_a.shape
    d_out = lora_b.shape[0]
    rank = n // num_experts
    if rank > min(d_in, d_out):
        raise ValueError(f"expert rank {rank} exceeds min(d_in={d_in}, d_out={d_out}): cannot refactorise")
    a = lora_a.double().view(num_experts, rank, d_in)  # (K, R, d_in)
    b = lora_b.double().view(d_out, num_experts, rank).permute(1, 0, 2)  # (K, d_out, R)
    q_b, r_b = torch.linalg.qr(b)  # (K, d_out, R), (K, R, R)
    q_a, r_a = torch.linalg.qr(a.transpose(1, 2))  # (K, d_in, R), (K, R, R)
    u, s, vh = torch.linalg.svd(r_b @ r_a.transpose(1, 2))  # (K, R, R), (K, R), (K, R, R)
    root = s.sqrt().unsqueeze(1)  # (K, 1, R)
    new_b = (q_b @ u) * root  # (K, d_out, R)
    new_a = ((q_a @ vh.transpose(1, 2)) * root).transpose(1, 2)  # (K, R, d_in)
    return new_a.reshape(n, d_in), new_b.permute(1, 0, 2).reshape(d_out, n)


@dataclass(frozen=True)
class RoutingSpec:
    """What routes a layer: the fields of the export's `badit` block that the math needs."""

    num_experts: int
    top_k: int
    mode: RouterMode
    gate_scale: float


class ServedExperts(nn.Module):
    """The experts of one adapted layer in serving form (see the module docstring), for S >= 1 adapters
    stacked slot after slot; non-persistent buffers.

    router_a: (S * (N_router + K*R), d_in) float32: per slot the router's K rows (none in mode 'none'),
        then A'.
    lora_b: (d_out, S * K*R) in the model dtype: per slot s * B'.
    """

    def __init__(
        self, router_a: torch.Tensor, lora_b: torch.Tensor, num_router: int, num_slots: int = 1
    ) -> None:
        super().__init__()
        self.register_buffer("router_a", router_a, persistent=False)
        self.register_buffer("lora_b", lora_b, persistent=False)
        self.num_router = num_router
        self.num_slots = num_slots

    @classmethod
    def build(
        cls,
        router: torch.Tensor | None,
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        scaling: float,
        num_experts: int,
        dtype: torch.dtype,
    ) -> ServedExperts:
        """One adapter (S = 1) from the export's tensors (router (K, d_in) or None, lora_a (K*R, d_in),
        lora_b (d_out, K*R)), on their device."""
        a, b = balanced_factors(lora_a, lora_b, num_experts)  # (K*R, d_in), (d_out, K*R) float64
        rows = a if router is None else torch.cat([router.double(), a])  # (N_router + K*R, d_in)
        num_router = 0 if router is None else router.shape[0]
        return cls(rows.float().contiguous(), (b * scaling).to(dtype).contiguous(), num_router)

    @classmethod
    def stack(cls, adapters: list[ServedExperts]) -> ServedExperts:
        """Several single adapters of the same shapes as the slots 0..S-1 of one stacked form."""
        first = adapters[0]
        if any(
            e.router_a.shape != first.router_a.shape or e.lora_b.shape != first.lora_b.shape for e in adapters
        ):
            raise ValueError("stacked adapters must have the same expert shapes")
        router_a = torch.cat([e.router_a for e in adapters])  # (S * N, d_in)
        lora_b = torch.cat([e.lora_b for e in adapters], dim=1)  # (d_out, S * K*R)
        return cls(router_a, lora_b, first.num_router, len(adapters))


def _per_slot(x: torch.Tensor, width: int, slot: torch.Tensor | None) -> torch.Tensor:
    """x: (T, S * width) -> (T, width), each token's own slot (slot: (T,) int64; None: S == 1)."""
    if slot is None:
        return x
    every = x.view(x.shape[0], -1, width)  # (T, S, width)
    return every.gather(1, slot.view(-1, 1, 1).expand(-1, 1, width)).squeeze(1)  # (T, width)


def served_routing(
    x: torch.Tensor, experts: ServedExperts, spec: RoutingSpec, slot: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Router and A in one float32 matmul. x: (T, d_in) any dtype; slot: (T,) int64 adapter slot of each
    token (None with a single adapter).

    Returns weights (T, K) and selected (T, K) as `routing_weights` gives them, and the weighted expert
    activations (T, K*R) in the dtype of `experts.lora_b`, ready for `add_served_delta`.
    """
    num_tokens, num_router = x.shape[0], experts.num_router
    width = experts.router_a.shape[0] // experts.num_slots
    proj = _per_slot(x.float() @ experts.router_a.t(), width, slot)  # (T, N_router + K*R)
    if num_router:
        logits, hidden = proj.split([num_router, width - num_router], dim=-1)  # (T, K), (T, K*R)
    else:
        logits, hidden = proj.new_zeros(num_tokens, 1), proj  # (T, 1), (T, K*R)
    weights, selected = routing_weights(logits, spec.top_k, spec.mode, spec.gate_scale)  # (T, K), (T, K)
    rank = hidden.shape[1] // spec.num_experts
    weighted = hidden.reshape(num_tokens, spec.num_experts, rank) * weights.unsqueeze(-1)  # (T, K, R)
    return weights, selected, weighted.view(num_tokens, -1).to(experts.lora_b.dtype)  # (T, K*R)


def add_served_delta(
    out: torch.Tensor, weighted: torch.Tensor, experts: ServedExperts, slot: torch.Tensor | None = None
) -> torch.Tensor:
    """out (T, d_out) += weighted (T, K*R) @ (the token's slot of lora_b).T, in place; `out` may be a column
    slice of a wider tensor. With S slots the activations are spread into (T, S*K*R), zeros outside the
    token's slot, for one static-shape matmul. Returns out."""
    if slot is not None:
        num_tokens, width = weighted.shape
        spread = weighted.new_zeros(num_tokens, experts.num_slots, width)  # (T, S, K*R)
        spread.scatter_(1, slot.view(-1, 1, 1).expand(-1, 1, width), weighted.unsqueeze(1))
        weighted = spread.view(num_tokens, -1)  # (T, S * K*R)
    return out.addmm_(weighted, experts.lora_b.t())  # (T, d_out)
