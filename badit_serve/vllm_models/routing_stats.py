"""The routing-statistics custom ops: per-expert routing statistics accumulated on the device.

`vllm.badit_record_routing` is called from every `BaditMLP` forward with the layer's (T, K) selection mask
and routing weights. It adds, over the REAL tokens of the batch only, the selected-token count per expert
into an int64 (K,) buffer and the routing-weight sum per expert into a float64 (K,) buffer.
`vllm.badit_record_slot_routing` does the same per adapter slot ((S, K) buffers) for the multi-adapter
layer, whose selection is already False on padding and base-model tokens. Everything stays on the device:
no `.item()`, no host sync, no data-dependent shapes.

Padding rows: vLLM 0.32's model runner (the CPU runner inherits `GPUModelRunner`) passes
`is_padding=` to `set_forward_context`, a bool (num_tokens_padded,) view of a persistent buffer that is True
for the rows past `num_tokens_unpadded`; `get_forward_context().is_padding` exposes it. It is a persistent
buffer, so a CUDA-graph capture of this op reads the live mask on replay. When there is no forward context
or no mask (tests, other runners) every row counts.

Both ops are registered (`ensure_registered`, once per process) as mutating custom ops (`mutates_args` = the two buffers), so torch.compile keeps it
(a side-effect-free op would be dead-code eliminated) and treats it as opaque. It counts unconditionally —
profiling and warm-up runs included — so the host-side collector zeroes the buffers when the server says
start (see `badit_serve.expert_metrics`).
"""

from __future__ import annotations

import torch

OP_NAME = "badit_record_routing"
SLOT_OP_NAME = "badit_record_slot_routing"


def real_token_mask(tokens: int) -> torch.Tensor | None:
    """(T,) bool, False on the padding rows of this forward pass; None when every row is real: without a
    forward context or mask, and on CPU when the mask has no padding row (a host tensor there, so asking
    costs no device sync; CPU runs no CUDA graphs, so the answer cannot go stale in a replay). On a GPU the
    mask is always returned: a graph captured with it reads the live buffer on replay."""
    from vllm.forward_context import get_forward_context, is_forward_context_available

    if not is_forward_context_available():
        return None
    is_padding = get_forward_context().is_padding
    if is_padding is None or is_padding.shape[0] != tokens:
        return None
    if is_padding.device.type == "cpu" and not bool(is_padding.any()):
        return None  # no padding row: the masking ops would change nothing
    return ~is_padding  # (T,)


def _record_routing(
    selected: torch.Tensor, weights: torch.Tensor, expert_tokens: torch.Tensor, weight_sums: torch.Tensor
) -> None:
    """selected: (T, K) bool; weights: (T, K) float; expert_tokens: (K,) int64; weight_sums: (K,) float64."""
    real = real_token_mask(selected.shape[0])
    if real is not None:
        selected = selected & real.unsqueeze(-1)  # (T, K)
        weights = weights * real.unsqueeze(-1)  # (T, K)
    expert_tokens.add_(selected.sum(dim=0, dtype=torch.int64))  # (K,)
    weight_sums.add_(weights.sum(dim=0, dtype=torch.float64))  # (K,)


def _record_slot_routing(
    slots: torch.Tensor,
    selected: torch.Tensor,
    weights: torch.Tensor,
    expert_tokens: torch.Tensor,
    weight_sums: torch.Tensor,
) -> None:
    """slots (T,) int64; selected (T, K) bool (already False on tokens without an adapter and padding rows);
    weights (T, K); expert_tokens (S, K) int64; weight_sums (S, K) float64."""
    expert_tokens.index_add_(0, slots, selected.to(torch.int64))  # (S, K)
    weight_sums.index_add_(0, slots, weights.to(torch.float64))  # (S, K)


def _no_output(*args: torch.Tensor) -> None:
    """The fake (meta) implementation of both ops: they only mutate their buffers."""
    return None


OPS = {OP_NAME: _record_routing, SLOT_OP_NAME: _record_slot_routing}


def ensure_registered() -> None:
    """Register `torch.ops.vllm.badit_record_routing` and `badit_record_slot_routing` once per process."""
    from vllm.utils.torch_utils import direct_register_custom_op

    for name, func in OPS.items():
        if not hasattr(torch.ops.vllm, name):
            direct_register_custom_op(
                op_name=name,
                op_func=func,
                mutates_args=["expert_tokens", "weight_sums"],
                fake_impl=_no_output,
            )


def record_routing(
    selected: torch.Tensor, weights: torch.Tensor, expert_tokens: torch.Tensor, weight_sums: torch.Tensor
) -> None:
    """Accumulate one layer's routing statistics of this forward pass (see the module docstring)."""
    torch.ops.vllm.badit_record_routing(selected, weights, expert_tokens, weight_sums)


def record_slot_routing(
    slots: torch.Tensor,
    selected: torch.Tensor,
    weights: torch.Tensor,
    expert_tokens: torch.Tensor,
    weight_sums: torch.Tensor,
) -> None:
    """Accumulate one multi-adapter layer's per-slot routing statistics of this forward pass."""
    torch.ops.vllm.badit_record_slot_routing(slots, selected, weights, expert_tokens, weight_sums)
