"""The routed experts in serving form, built once at load from the math of `badit_serve.core.routing`:

- each expert's product B_e A_e is refactorised in float64 into balanced factors of the same rank
  (`balanced_factors`), so a BAD delta expert ([B, -B0] [A; A0]) is computed as one rank-2r product with no
  cancellation of two large terms: safe in bfloat16;
- the router runs in float32 (its logits stay float32, so top-k matches the reference); A' and s * B' (the
  scaling folded into B) run in the model dtype through a `Gemm` each, plain matmuls by default or a
  prepacked kernel (vLLM's oneDNN GEMM on CPU, the one its own linear layers use), and the delta is added
  into the output.

Several adapters served side by side are slots of one `ServedExperts` (`empty_slots`, `set_slot`,
`reset_slot`), and each token names its slot (`SlotIndex`: -1 and padding rows get no delta). The slot
matmuls take a dense form (every token runs every slot, keeps its own: S times the FLOPs, plain matmuls)
or a grouped form (tokens sorted by slot, `torch._grouped_mm` with device-side offsets: one adapter's
FLOPs); both have static shapes and no host sync. The single-export layer is the S = 1, no-index case.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from badit_serve.core.routing import RouterMode, router_logits, routing_weights, steer_logits, top_experts
from badit_serve.internals import grouped_mm, module_apply


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


Gemm = Callable[[torch.Tensor], torch.Tensor]
"""x (T, k) -> x @ W.T (T, n) for the weight W (n, k) the Gemm was made from (and reads at call time)."""

GemmFactory = Callable[[torch.Tensor], Gemm]
"""Makes the Gemm of a weight (n, k): `TorchGemm`, or a prepacked kernel such as vLLM's oneDNN GEMM on CPU
(`badit_serve.vllm_models.cpu_gemm`), whose packed copy must be made again when the weight changes."""


@dataclass(frozen=True)
class TorchGemm:
    """The plain matmul: reads the weight at every call (so slot updates are seen)."""

    weight: torch.Tensor
    """(n, k)."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.t()  # (T, n)


class ServedExperts(nn.Module):
    """The experts of one adapted layer in serving form (see the module docstring), for S >= 1 adapters
    stacked slot after slot; non-persistent buffers.

    router: (S * N_router, d_in) float32, per slot the router's K rows (no rows in mode 'none').
    lora_a: (S * K*R, d_in) in the model dtype: per slot A'.
    lora_b: (d_out, S * K*R) in the model dtype: per slot s * B'.
    A and B run through Gemms made by a `GemmFactory` (`use_gemm`; plain matmuls by default); the router is
    a plain float32 matmul. A prepacking factory's Gemms hold copies of the weights: a slot change marks
    them stale and the next use makes them again, once however many slots changed in between (vLLM
    activates every adapter new to a step before it runs the step).
    """

    router: torch.Tensor
    lora_a: torch.Tensor
    lora_b: torch.Tensor

    def __init__(
        self,
        router: torch.Tensor,
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        num_router: int,
        num_slots: int = 1,
    ) -> None:
        super().__init__()
        self.register_buffer("router", router, persistent=False)
        self.register_buffer("lora_a", lora_a, persistent=False)
        self.register_buffer("lora_b", lora_b, persistent=False)
        self.num_router = num_router
        self.num_slots = num_slots
        self.gemm_factory: GemmFactory = TorchGemm
        self.packs = 0
        """Times the Gemms were made (one per batch of slot changes with a prepacking factory)."""
        self._pack()

    @property
    def slot_rank(self) -> int:
        """Rows of lora_a (columns of lora_b) per slot: K*R."""
        return self.lora_a.shape[0] // self.num_slots

    def use_gemm(self, factory: GemmFactory) -> None:
        """Run A and B through Gemms made by `factory` from now on (made again after each slot change)."""
        self.gemm_factory = factory
        self._pack()

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> ServedExperts:
        """Moving or casting the buffers (.to(), .cuda(), ...) makes the Gemms again (they hold the old
        tensors)."""
        moved = module_apply(self, fn, recurse)
        self._pack()
        return moved

    def _pack(self) -> None:
        self.router_gemm: Gemm = TorchGemm(self.router)
        self._a_gemm: Gemm = self.gemm_factory(self.lora_a)
        self._b_gemm: Gemm = self.gemm_factory(self.lora_b)
        self._stale = False
        self.packs += 1

    def _slots_changed(self) -> None:
        """A slot's values changed: Gemms holding packed copies are made again at their next use. The plain
        matmul reads the weights at call time and is never stale (so a compiled graph's guard on `_stale`
        never fails on CUDA, where slot changes happen between steps)."""
        self._stale = self.gemm_factory is not TorchGemm

    def _repack_if_stale(self) -> None:
        """Make the Gemms again if a slot changed since they were made."""
        if self._stale:
            self._pack()

    @property
    def a_gemm(self) -> Gemm:
        self._repack_if_stale()
        return self._a_gemm

    @property
    def b_gemm(self) -> Gemm:
        self._repack_if_stale()
        return self._b_gemm

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
        if router is None:
            router = lora_a.new_zeros(0, lora_a.shape[1])  # (0, d_in)
        return cls(
            router.float().contiguous(),  # (N_router, d_in)
            a.to(dtype).contiguous(),  # (K*R, d_in)
            (b * scaling).to(dtype).contiguous(),  # (d_out, K*R)
            router.shape[0],
        )

    @classmethod
    def empty_slots(
        cls, num_slots: int, like: SlotShape, dtype: torch.dtype, device: torch.device | str
    ) -> ServedExperts:
        """S zero slots (a zero slot adds nothing), filled later one adapter at a time with `set_slot`."""
        return cls(
            torch.zeros(num_slots * like.num_router, like.d_in, dtype=torch.float32, device=device),
            torch.zeros(num_slots * like.slot_rank, like.d_in, dtype=dtype, device=device),
            torch.zeros(like.d_out, num_slots * like.slot_rank, dtype=dtype, device=device),
            like.num_router,
            num_slots,
        )

    def set_slot(self, index: int, adapter: ServedExperts) -> None:
        """Copy a single adapter (`build`, S = 1, same shapes) into slot `index`, on this form's device."""
        if (
            adapter.router.shape[0] != self.num_router
            or adapter.lora_a.shape[0] != self.slot_rank
            or adapter.lora_b.shape[1] != self.slot_rank
        ):
            raise ValueError(
                f"adapter experts router {tuple(adapter.router.shape)} / lora_a "
                f"{tuple(adapter.lora_a.shape)} / lora_b {tuple(adapter.lora_b.shape)} do not fit a slot "
                f"({self.num_router}, ·) / ({self.slot_rank}, ·) / (·, {self.slot_rank})"
            )
        routers, rows = self._slot_ranges(index)
        self.router[routers].copy_(adapter.router)  # (N_router, d_in)
        self.lora_a[rows].copy_(adapter.lora_a)  # (K*R, d_in), cast to the model dtype
        self.lora_b[:, rows].copy_(adapter.lora_b)  # (d_out, K*R), cast to the model dtype
        self._slots_changed()

    def reset_slot(self, index: int) -> None:
        """Zero slot `index` (its tokens then get no delta until the next `set_slot`)."""
        routers, rows = self._slot_ranges(index)
        self.router[routers].zero_()
        self.lora_a[rows].zero_()
        self.lora_b[:, rows].zero_()
        self._slots_changed()

    def _slot_ranges(self, index: int) -> tuple[slice, slice]:
        if not 0 <= index < self.num_slots:
            raise IndexError(f"adapter slot {index} outside [0, {self.num_slots})")
        return (
            slice(index * self.num_router, (index + 1) * self.num_router),
            slice(index * self.slot_rank, (index + 1) * self.slot_rank),
        )


@dataclass(frozen=True)
class SlotShape:
    """The per-slot shapes of a stacked `ServedExperts`."""

    num_router: int
    slot_rank: int
    """K*R."""
    d_in: int
    d_out: int


GROUPED_MIN_TOKENS = 64
"""Eager batches of at least this many tokens take the grouped form (see `SlotIndex.of`)."""


@dataclass(frozen=True)
class SlotIndex:
    """Which adapter slot each token of a batch uses, in the form the slot matmuls take; static shapes.

    Dense form (order None): every token runs every slot's projections and keeps its own slot's (S times
    one adapter's FLOPs, two plain matmuls). Grouped form: tokens sorted by slot, one grouped matmul per
    projection (`torch._grouped_mm` with device-side offsets: one adapter's FLOPs, no host sync).
    """

    slot: torch.Tensor
    """(T,) int64 in [0, S)."""
    valid: torch.Tensor
    """(T,) bool: False for tokens without an adapter (base model) and padding rows, which get no delta."""
    order: torch.Tensor | None = None
    """(T,) int64: the token indices sorted by slot (grouped form)."""
    offsets: torch.Tensor | None = None
    """(S,) int32: cumulative token count of slots 0..s in `order` (grouped form)."""

    @classmethod
    def of(
        cls,
        indices: torch.Tensor,
        num_slots: int,
        real: torch.Tensor | None = None,
        grouped: bool | None = None,
    ) -> SlotIndex:
        """indices: (T,) int slot per token, -1 = no adapter; real: (T,) bool, False on padding rows.
        grouped None: the grouped form under torch.compile (a static choice, no guard on T) and for
        eager batches of at least GROUPED_MIN_TOKENS tokens, the dense form for smaller eager ones."""
        valid = indices >= 0  # (T,)
        if real is not None:
            valid = valid & real  # (T,)
        slot = indices.clamp(min=0).long()  # (T,)
        if grouped is None:
            grouped = torch.compiler.is_compiling() or indices.shape[0] >= GROUPED_MIN_TOKENS
        if not grouped:
            return cls(slot, valid)
        order = torch.argsort(slot, stable=True)  # (T,)
        counts = torch.zeros(num_slots, dtype=torch.int64, device=slot.device)  # (S,)
        counts.index_add_(0, slot, torch.ones_like(slot))  # (S,)
        return cls(slot, valid, order, counts.cumsum(0).to(torch.int32))


def _per_slot(x: torch.Tensor, width: int, slot: torch.Tensor) -> torch.Tensor:
    """x: (T, S * width) -> (T, width), each token's own slot (slot: (T,) int64)."""
    every = x.view(x.shape[0], -1, width)  # (T, S, width)
    return every.gather(1, slot.view(-1, 1, 1).expand(-1, 1, width)).squeeze(1)  # (T, width)


def _can_group(weight: torch.Tensor, *strides: int) -> bool:
    """Whether `torch._grouped_mm` over this slot buffer is a real grouped kernel without a host sync: on CPU
    any dtype; on CUDA only bfloat16 (other dtypes take ATen's fallback, which copies the offsets to the host
    and loops over groups: a sync, and no CUDA-graph capture). Strides (in elements) must be multiples of
    16 bytes (true for real models; tiny odd shapes take the dense form)."""
    native = weight.device.type == "cpu" or weight.dtype == torch.bfloat16
    return native and all(stride * weight.element_size() % 16 == 0 for stride in strides)


def _grouped_in_token_order(x: torch.Tensor, stacked: torch.Tensor, slots: SlotIndex) -> torch.Tensor:
    """x (T, k) @ each token's slot of stacked (S, k, n) -> (T, n): one grouped matmul over the tokens sorted
    by slot (`slots.order`, `slots.offsets`), then back in token order."""
    assert slots.order is not None and slots.offsets is not None  # the grouped form
    grouped = grouped_mm(x[slots.order], stacked, slots.offsets)  # (T, n), sorted
    return torch.empty_like(grouped).index_copy_(0, slots.order, grouped)  # (T, n)


def _project(
    x: torch.Tensor, weight: torch.Tensor, gemm: Gemm, num_slots: int, slots: SlotIndex | None
) -> torch.Tensor:
    """x (T, d_in) @ each token's slot of weight.T (weight: (S * W, d_in), `gemm` its Gemm) -> (T, W), in
    x's dtype (grouped only where `_can_group`: on CPU; float32 on CUDA runs the dense form)."""
    width = weight.shape[0] // num_slots
    if slots is None:
        return gemm(x)  # (T, W)
    if slots.order is None or not _can_group(weight, x.shape[1], width):
        return _per_slot(gemm(x), width, slots.slot)  # (T, W)
    return _grouped_in_token_order(x, weight.view(num_slots, width, -1).transpose(1, 2), slots)  # (T, W)


NO_EXPERT = -1
"""The routed expert of a token that went through none of the layer's experts (a base-model request among
adapters, or a prompt token served from the prefix cache)."""


class Routed(NamedTuple):
    """One routed layer's routing of a batch."""

    weights: torch.Tensor
    """(T, K) routing weights, zero outside the selected experts."""
    selected: torch.Tensor
    """(T, K) bool."""
    weighted: torch.Tensor
    """(T, K*R) the weighted expert activations, ready for `served_delta`."""
    experts: torch.Tensor
    """(T, W) int64 the experts each token was routed to, best first (W = 0 when not asked for)."""


def steered_choice(
    logits: torch.Tensor,
    top_k: int,
    mode: RouterMode,
    gate_scale: float | torch.Tensor,
    bias: torch.Tensor | None,
    width: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`routing_weights` of the steered logits (T, K) float32 (bias: (T, K) or None), and the top `width`
    experts per token (T, width) int64, (T, 0) for width 0."""
    logits = steer_logits(logits, bias)  # (T, K)
    weights, selected = routing_weights(logits, top_k, mode, gate_scale)  # (T, K), (T, K)
    experts = top_experts(logits, width) if width else logits.new_empty(logits.shape[0], 0, dtype=torch.int64)
    return weights, selected, experts  # (T, K), (T, K), (T, width)


def served_routing(
    x: torch.Tensor,
    experts: ServedExperts,
    spec: RoutingSpec,
    slots: SlotIndex | None = None,
    bias: torch.Tensor | None = None,
    width: int = 0,
) -> Routed:
    """The router in float32, A in the model dtype. x: (T, d_in) any dtype; slots: each token's adapter slot
    (None with a single adapter); tokens that are not `slots.valid` get zero weights, no selection, no delta
    and NO_EXPERT (-1) as their experts; bias: (T, K) float32 steering of the router logits, or None; width:
    how many experts per token to return (0: none).

    Returns weights (T, K) and selected (T, K) as `routing_weights` gives them, the weighted expert
    activations (T, K*R) in the dtype of `experts.lora_b`, and the routed experts (T, width).
    """
    num_tokens = x.shape[0]
    if experts.num_router:
        logits = _project(x.float(), experts.router, experts.router_gemm, experts.num_slots, slots)  # (T, K)
    else:
        logits = x.new_zeros(num_tokens, 1, dtype=torch.float32)  # (T, 1)
    hidden = _project(x.to(experts.lora_a.dtype), experts.lora_a, experts.a_gemm, experts.num_slots, slots)
    weights, selected, chosen = steered_choice(
        logits, spec.top_k, spec.mode, spec.gate_scale, bias, width
    )  # (T, K) x2, (T, width)
    if slots is not None:
        keep = slots.valid.unsqueeze(-1)  # (T, 1)
        weights, selected = weights * keep, selected & keep  # (T, K), (T, K)
        chosen = chosen.masked_fill(~keep, NO_EXPERT)  # (T, width)
    return Routed(weights, selected, weigh_experts(hidden, weights, experts.lora_b.dtype), chosen)


def served_router_logits(x: torch.Tensor, router: torch.Tensor) -> torch.Tensor:
    """`router_logits` in float32 for a served router buffer: x (T, d_in) any dtype, router (K, d_in)
    float32 with no rows in mode 'none' -> (T, K), or (T, 1) zeros."""
    return router_logits(x.float(), router if router.shape[0] else None)  # (T, K)


def weigh_experts(hidden: torch.Tensor, weights: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Each expert's activations scaled by its routing weight: hidden (T, K*R) = A' x, weights (T, K) ->
    (T, K*R) in `dtype` (the product in float32)."""
    num_tokens, num_experts = weights.shape
    rank = hidden.shape[1] // num_experts
    weighted = hidden.reshape(num_tokens, num_experts, rank) * weights.unsqueeze(-1)  # (T, K, R) float32
    return weighted.reshape(num_tokens, num_experts * rank).to(dtype)  # (T, K*R)


def served_delta(
    weighted: torch.Tensor, experts: ServedExperts, slots: SlotIndex | None = None
) -> torch.Tensor:
    """weighted (T, K*R) @ (the token's slot of lora_b).T -> the delta (T, d_out) in the model dtype. Dense
    slot form: the activations are spread into (T, S*K*R), zeros outside the token's slot, for one
    static-shape matmul; grouped form: one grouped matmul over the sorted tokens."""
    if slots is not None and slots.order is not None and _can_group(experts.lora_b, experts.slot_rank):
        stacked = experts.lora_b.view(experts.lora_b.shape[0], experts.num_slots, -1).permute(1, 2, 0)
        return _grouped_in_token_order(weighted, stacked, slots)  # (T, d_out)
    if slots is not None:
        num_tokens, width = weighted.shape
        spread = weighted.new_zeros(num_tokens, experts.num_slots, width)  # (T, S, K*R)
        spread.scatter_(1, slots.slot.view(-1, 1, 1).expand(-1, 1, width), weighted.unsqueeze(1))
        weighted = spread.view(num_tokens, -1)  # (T, S * K*R)
    return experts.b_gemm(weighted)  # (T, d_out)


def add_served_delta(
    out: torch.Tensor, weighted: torch.Tensor, experts: ServedExperts, slots: SlotIndex | None = None
) -> torch.Tensor:
    """out (T, d_out) += `served_delta`, in place; `out` may be a column slice of a wider tensor. Returns out."""
    return out.add_(served_delta(weighted, experts, slots).to(out.dtype))  # (T, d_out)
