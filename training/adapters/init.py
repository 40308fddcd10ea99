"""Expert initialisations: BAD (SVD blocks), its literal residual form, LoRA, PiSSA and OLoRA.

Notation: W (d_out, d_in) = U diag(S) Vh. With scaling s, component i of the top N = K*r gets
a_i = sqrt(S_i / s) * Vh_i (a row of A) and b_i = sqrt(S_i / s) * U[:, i] (a column of B), so that
s * b_i a_i = S_i U_i Vh_i. Expert e owns the contiguous block of components [e*r, (e+1)*r).
"""

from __future__ import annotations

import math

import torch


def top_singular_components(
    weight: torch.Tensor, count: int, scaling: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD of `weight` in float32; returns A (count, d_in), B (d_out, count) and S (count,)."""
    d_out, d_in = weight.shape
    if count > min(d_out, d_in):
        raise ValueError(
            f"num_experts * rank = {count} exceeds min(d_out, d_in) = {min(d_out, d_in)} of a {tuple(weight.shape)} weight"
        )
    u, s, vh = torch.linalg.svd(weight.detach().float(), full_matrices=False)  # (d_out, m), (m,), (m, d_in)
    root = torch.sqrt(s[:count] / scaling)  # (count,)
    lora_a = root[:, None] * vh[:count]  # (count, d_in)
    lora_b = u[:, :count] * root[None, :]  # (d_out, count)
    return lora_a, lora_b, s[:count].clone()


def kaiming_lora_a(rows: int, d_in: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """LoRA's A init: Kaiming-uniform with a = sqrt(5) (peft's `init_lora_weights=True`), bound 1/sqrt(d_in)."""
    bound = 1.0 / math.sqrt(d_in)  # gain sqrt(2 / (1 + 5)) * sqrt(3 / d_in)
    return torch.empty(rows, d_in).uniform_(-bound, bound, generator=generator)


def olora_factors(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """OLoRA (peft's `init_lora_weights="olora"`): W = Q R in float32; A = R[:r] (r, d_in) and
    B = Q[:, :r] (d_out, r), orthonormal columns. The caller subtracts s * B A from the frozen weight."""
    d_out, d_in = weight.shape
    if rank > min(d_out, d_in):
        raise ValueError(
            f"rank {rank} exceeds min(d_out, d_in) = {min(d_out, d_in)} of a {tuple(weight.shape)} weight"
        )
    q, r = torch.linalg.qr(weight.detach().float())  # (d_out, m), (m, d_in)
    return r[:rank].contiguous(), q[:, :rank].contiguous()  # (r, d_in), (d_out, r)
