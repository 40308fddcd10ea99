"""Per-expert routing statistics, accumulated on the device by the routed layers' own forward.

Every `BaditMLP` adds, over the REAL tokens of the batch only, the selected-token count per expert into an
int64 (K,) buffer and the routing-weight sum per expert into a float64 (K,) buffer (`routing_increments`,
computed in the layer's compiled region; `add_routing_stats` adds them); the multi-adapter layer does the
same per adapter slot into (S, K) buffers (`record_slot_routing`). These are tensor ops on the device, so
under torch.compile they are part of the graph (inductor fuses the masking and the sums with the routing
kernels; an in-place buffer update is a side effect, never dead-code eliminated), and under CUDA graphs
they replay on the captured buffers. No `.item()`, no host sync, no data-dependent shapes.

The adds into the buffers are one small custom op per layer (`torch.ops.badit.add_routing_stats`, a
mutating op that inductor calls in place where the layer runs). As plain `add_`s, functionalisation moved
every layer's write-back to the end of the graph, and inductor's C++ backend generated them into the
graph's last kernel (the final norm): on the default model a kernel with 60 buffer arguments, 69 KB of C++
that took 11 s to compile at every first start. The op costs a dispatcher call per layer per step.

Padding rows: vLLM 0.32's model runner (the CPU runner inherits `GPUModelRunner`) passes `is_padding=` to
`set_forward_context`, a bool (num_tokens_padded,) view of a persistent buffer, True for the rows past
`num_tokens_unpadded`. A compiled graph cannot read the forward context, so, as vLLM's expert-load
recording does with `num_unpadded_tokens`, the model's (uncompiled) outer forward writes the number of real
rows into one 0-dim device tensor per model (`count_real_tokens`), shared by every routed layer, which
reads it as `real_rows` inside the graph. Without a forward context or mask (tests, other runners) every row
counts. The counts include profiling and warm-up runs, so the host-side collector zeroes the buffers when
the server says start (see `badit_serve.metrics.expert_metrics`).
"""

from __future__ import annotations

import torch
from torch.library import Library

from badit_serve.internals import padding_mask

# torch leaves Library.__init__ unannotated.
LIBRARY = Library("badit", "FRAGMENT")  # type: ignore[no-untyped-call]
"""Owns `torch.ops.badit.*` (an operator lives as long as its library object)."""

ALL_ROWS = 2**62
"""The real-row count that makes every row real (no forward context or no padding mask)."""


def new_real_row_count(device: torch.device | str | None = None) -> torch.Tensor:
    """The shared 0-dim int64 tensor `count_real_tokens` fills before each forward pass."""
    return torch.full((), ALL_ROWS, dtype=torch.int64, device=device)


def count_real_tokens(num_real: torch.Tensor) -> None:
    """Write this forward pass's number of real (non-padding) rows into `num_real` (0-dim int64), reading
    vLLM's padding mask on the device (no host sync; a CUDA graph capturing this reads the live mask)."""
    is_padding = padding_mask()  # (T_padded,) or None
    if is_padding is None:
        num_real.fill_(ALL_ROWS)
        return
    num_real.copy_(torch.logical_not(is_padding).sum())


def real_rows(tokens: int, num_real: torch.Tensor) -> torch.Tensor:
    """(T,) bool on num_real's device: True on the first `num_real` rows (the real tokens), False on padding
    rows."""
    return torch.arange(tokens, device=num_real.device) < num_real  # (T,)


def routing_increments(
    selected: torch.Tensor, weights: torch.Tensor, num_real: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's routing statistics of this forward pass over its real rows: the selected-token count
    (K,) int64 and the routing-weight sum (K,) float64 per expert.

    selected: (T, K) bool; weights: (T, K) float; num_real: 0-dim int64.
    """
    real = real_rows(selected.shape[0], num_real).unsqueeze(-1)  # (T, 1)
    tokens = (selected & real).sum(dim=0, dtype=torch.int64)  # (K,)
    return tokens, (weights * real).sum(dim=0, dtype=torch.float64)  # (K,), (K,)


def add_routing_stats(
    expert_tokens: torch.Tensor,
    router_weight_sums: torch.Tensor,
    tokens: torch.Tensor,
    sums: torch.Tensor,
) -> None:
    """Add one pass's increments into a layer's buffers: expert_tokens (K,) int64 += tokens (K,) int64,
    router_weight_sums (K,) float64 += sums (K,) float64. Registered as `torch.ops.badit.add_routing_stats`;
    call it through the op so torch.compile keeps it in place (see the module docstring)."""
    expert_tokens.add_(tokens)  # (K,)
    router_weight_sums.add_(sums)  # (K,)


def _register_ops() -> None:
    from vllm.utils.torch_utils import direct_register_custom_op

    direct_register_custom_op(
        "add_routing_stats",
        add_routing_stats,
        mutates_args=["expert_tokens", "router_weight_sums"],
        fake_impl=lambda *_: None,
        target_lib=LIBRARY,
    )


_register_ops()


def record_slot_routing(
    slots: torch.Tensor,
    selected: torch.Tensor,
    weights: torch.Tensor,
    expert_tokens: torch.Tensor,
    weight_sums: torch.Tensor,
) -> None:
    """Accumulate one multi-adapter layer's per-slot routing statistics of this forward pass.

    slots (T,) int64; selected (T, K) bool, already False on tokens without an adapter and on padding rows;
    weights (T, K) likewise zero there; expert_tokens (S, K) int64; weight_sums (S, K) float64.
    """
    expert_tokens.index_add_(0, slots, selected.to(torch.int64))  # (S, K)
    weight_sums.index_add_(0, slots, weights.to(torch.float64))  # (S, K)
