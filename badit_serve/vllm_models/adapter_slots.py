"""Many Badit adapters over one base in one vLLM engine, chosen per request through vLLM's LoRA machinery.

`badit-serve BASE --adapter NAME=DIR ...` starts vLLM with --enable-lora: each adapter is a `LoRARequest`
(resolved from the request's `model` field, listed by /v1/models, kept apart in the prefix cache), and
vLLM's punica wrapper keeps the per-token slot index of every batch (`_token_lora_indices`, -1 = base).
`BaditSlotsGateUp` takes the place of each adapted layer's `gate_up_proj` and consumes those indices with
the Badit routed math (`badit_serve.slot_routing`) instead of running LoRA kernels:

- It is a `BaseLayerWithLoRA` built by the model itself, so vLLM's LoRA manager registers it as it is
  (no vLLM wrapper matches it) when --lora-target-modules is gate_up_proj; vLLM's loader hands it each
  adapter's PEFT tensors (`badit_serve.adapter`) through `set_lora(slot, [A; router], B)`.
- Stacked float32 buffers with a slot per adapter; static shapes; slot -1 tokens and padding rows get no
  delta (vLLM's CPU LoRA ops would apply the last slot to -1 tokens, so the gather here is masked).
- Routing statistics per slot, (S, K), through the `badit_record_slot_routing` custom op.
"""

from __future__ import annotations

import torch
from torch import nn
from vllm.lora.layers import BaseLayerWithLoRA

from badit_serve.adapter import LORA_TARGET, SLOTS_CONFIG_KEY, SlotGeometry
from badit_serve.slot_routing import slot_routed_delta
from badit_serve.vllm_models.routing_stats import real_token_mask


def read_slot_geometry(hf_config: object) -> SlotGeometry | None:
    raw = getattr(hf_config, SLOTS_CONFIG_KEY, None)
    return None if raw is None else SlotGeometry.model_validate(raw)


class BaditSlotsGateUp(BaseLayerWithLoRA):
    """gate_up_proj + per-token routed delta on the gate half, one adapter slot per LoRA slot."""

    quant_method = None
    """The wrapped base layer is post-processed as its own module; without this, BaseLayerWithLoRA's
    attribute forwarding would make vLLM process (and repack) the same weights twice."""
    embedding_modules = {LORA_TARGET: LORA_TARGET}
    """vLLM's LoRA manager lists the module names adapters may target from LinearBase modules and from the
    keys of any module's `embedding_modules` (vllm/lora/utils.py); this layer is not a LinearBase (its base
    layer is), so it names itself here: adapters' `gate_proj` tensors then pack into it."""

    def __init__(self, base_layer: nn.Module, geometry: SlotGeometry, tp_rank: int) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.geometry, self.tp_rank = geometry, tp_rank
        slots, k = geometry.max_adapters, geometry.num_experts
        self.n = k * geometry.rank
        self.rows = self.n + (0 if geometry.router == "none" else k)
        self.intermediate_local = int(base_layer.output_partition_sizes[0])
        self.n_slices = 2
        d_in, device = int(base_layer.input_size), base_layer.weight.device
        f32 = dict(dtype=torch.float32, device=device)
        self.register_buffer("a_router", torch.zeros(slots * self.rows, d_in, **f32), persistent=False)
        self.register_buffer(
            "lora_b", torch.zeros(self.intermediate_local, slots * self.n, **f32), persistent=False
        )
        self.register_buffer(
            "expert_tokens", torch.zeros(slots, k, dtype=torch.int64, device=device), persistent=False
        )
        self.register_buffer(
            "router_weight_sums", torch.zeros(slots, k, dtype=torch.float64, device=device), persistent=False
        )
        # Shapes vLLM reads to build its zero warm-up adapters (create_dummy_lora); never computed with.
        meta = dict(dtype=base_layer.weight.dtype, device="meta")
        self.lora_a_stacked = tuple(torch.empty(slots, 1, self.n, d_in, **meta) for _ in range(2))
        self.lora_b_stacked = tuple(
            torch.empty(slots, 1, self.intermediate_local, self.n, **meta) for _ in range(2)
        )
        self.slot_listener = None  # called with (slot) when a slot's adapter changes (expert metrics)
        self.record_stats = True
        ensure_slot_op_registered()

    def reset_lora(self, index: int) -> None:
        self._notify(index)
        self.a_router[index * self.rows : (index + 1) * self.rows].zero_()
        self.lora_b[:, index * self.n : (index + 1) * self.n].zero_()

    def set_lora(self, index: int, lora_a, lora_b) -> None:  # lists [gate, up] from PackedLoRALayerWeights
        a = lora_a[0] if isinstance(lora_a, (list, tuple)) else lora_a
        b = lora_b[0] if isinstance(lora_b, (list, tuple)) else lora_b
        if a is None or b is None or (tuple(a.shape) != (self.rows, self.a_router.shape[1]) and not a.any()):
            self.reset_lora(index)  # vLLM's zero warm-up adapters
            return
        full_out = self.intermediate_local * self.base_layer.tp_size
        if tuple(a.shape) != (self.rows, self.a_router.shape[1]) or tuple(b.shape) != (full_out, self.n):
            raise ValueError(
                f"Badit adapter tensors lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit the "
                f"slot shapes ({self.rows}, {self.a_router.shape[1]}) / ({full_out}, {self.n})"
            )
        self._notify(index)
        b_local = b.narrow(0, self.tp_rank * self.intermediate_local, self.intermediate_local)  # (I_local, n)
        self.a_router[index * self.rows : (index + 1) * self.rows].copy_(a)
        self.lora_b[:, index * self.n : (index + 1) * self.n].copy_(b_local)

    def _notify(self, index: int) -> None:
        if self.slot_listener is not None:
            self.slot_listener(index)

    def token_slots(self, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(slot (T,) long in [0, S), valid (T,) bool) of this batch's tokens, from vLLM's punica wrapper."""
        indices = self.punica_wrapper._token_lora_indices[:tokens]  # (T,) -1 = base model
        valid = indices >= 0  # (T,)
        real = real_token_mask(tokens)
        if real is not None:
            valid = valid & real  # (T,)
        return indices.clamp(min=0), valid

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        gate_up, bias = self.base_layer(x)  # (T, 2 * I_local)
        flat = x.reshape(-1, x.shape[-1]).float()  # (T, d_in)
        slots, valid = self.token_slots(flat.shape[0])  # (T,), (T,)
        g = self.geometry
        delta, weights, selected = slot_routed_delta(
            flat,
            slots,
            valid,
            self.a_router,
            self.lora_b,
            num_slots=g.max_adapters,
            num_experts=g.num_experts,
            top_k=g.top_k,
            mode=g.router,  # type: ignore[arg-type]
        )  # (T, I_local), (T, K), (T, K)
        if self.record_stats:
            record_slot_routing(slots, selected, weights, self.expert_tokens, self.router_weight_sums)
        gate_up[..., : self.intermediate_local] += delta.view(*gate_up.shape[:-1], -1).to(gate_up.dtype)
        return gate_up, bias


def install_slot_layers(model: nn.Module, geometry: SlotGeometry) -> dict[str, BaditSlotsGateUp]:
    """Wrap the gate_up_proj of every adapted layer (after the base weights are loaded and before vLLM's
    LoRA manager is built). Returns adapted gate module name -> layer."""
    from vllm.distributed import get_tensor_model_parallel_rank

    tp_rank = get_tensor_model_parallel_rank()
    installed: dict[str, BaditSlotsGateUp] = {}
    for gate_name in geometry.adapted_modules:
        mlp_name = gate_name.removesuffix(".gate_proj")
        try:
            mlp = model.get_submodule(mlp_name)
        except AttributeError:
            continue  # a layer of another pipeline stage
        if not hasattr(mlp, LORA_TARGET):
            raise ValueError(
                f"{mlp_name} ({type(mlp).__name__}) has no gate_up_proj: cannot serve Badit adapters"
            )
        layer = BaditSlotsGateUp(mlp.gate_up_proj, geometry, tp_rank)
        mlp.gate_up_proj = layer
        installed[gate_name] = layer
    return installed


OP_NAME = "badit_record_slot_routing"


def _record(
    slots: torch.Tensor,
    selected: torch.Tensor,
    weights: torch.Tensor,
    expert_tokens: torch.Tensor,
    weight_sums: torch.Tensor,
) -> None:
    """slots (T,) long; selected (T, K) bool (already False on invalid tokens); weights (T, K);
    expert_tokens (S, K) int64; weight_sums (S, K) float64."""
    expert_tokens.index_add_(0, slots, selected.to(torch.int64))  # (S, K)
    weight_sums.index_add_(0, slots, weights.to(torch.float64))  # (S, K)


def _record_fake(slots, selected, weights, expert_tokens, weight_sums) -> None:
    return None


def ensure_slot_op_registered() -> None:
    """Register `torch.ops.vllm.badit_record_slot_routing` once per process (a mutating op, so that
    torch.compile keeps it)."""
    if hasattr(torch.ops.vllm, OP_NAME):
        return
    from vllm.utils.torch_utils import direct_register_custom_op

    direct_register_custom_op(
        op_name=OP_NAME,
        op_func=_record,
        mutates_args=["expert_tokens", "weight_sums"],
        fake_impl=_record_fake,
    )


def record_slot_routing(slots, selected, weights, expert_tokens, weight_sums) -> None:
    """Accumulate one layer's per-slot routing statistics of this forward pass."""
    getattr(torch.ops.vllm, OP_NAME)(slots, selected, weights, expert_tokens, weight_sums)
