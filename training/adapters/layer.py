"""`RoutedAdapterLinear`: a frozen nn.Linear plus K routed low-rank experts (Badit and its baselines)."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from badit_serve.core.routing import RouterMode, routed_delta, router_logits, routing_weights
from training.adapters.init import kaiming_lora_a, olora_factors, top_singular_components


def float32_region(x: torch.Tensor) -> contextlib.AbstractContextManager[None]:
    """Autocast off on x's device: what runs inside computes in the dtype of its inputs (float32 here)."""
    return torch.autocast(device_type=x.device.type, enabled=False)


@dataclass(frozen=True)
class LayerSpec:
    """Resolved per-layer adapter hyper-parameters."""

    num_experts: int
    rank: int
    top_k: int
    scaling: float
    gate_scale: float
    router: RouterMode
    init: str
    dropout: float
    branching: str | None = None
    """Per-task branches: 'sum' (O-LoRA) or 'gated' (GainLoRA); None for routed experts."""
    branch_rank: int = 0
    """Rank of one per-task branch (rows [b*branch_rank, (b+1)*branch_rank) of A are branch b)."""

    @property
    def num_components(self) -> int:
        return self.num_experts * self.rank

    @property
    def is_delta(self) -> bool:
        """BAD delta form: W stays frozen and experts train as B A - B0 A0 (exact at init)."""
        return self.init == "bad"


@dataclass(frozen=True)
class StoredInit:
    """A delta-form layer's initial factors as a checkpoint stores them (slots as last regrouped); the
    layer is rebuilt from these instead of recomputing the SVD of its weight (export of a large model)."""

    lora_a0: torch.Tensor  # (K*r, d_in)
    lora_b0: torch.Tensor  # (d_out, K*r)
    singular_values: torch.Tensor  # (K*r,)

    @classmethod
    def from_state(cls, state: Mapping[str, torch.Tensor], layer: str) -> StoredInit | None:
        """The stored factors of `layer` in an `adapter_state_dict`, or None when it holds none."""
        keys = [f"{layer}.{k}" for k in ("lora_a0", "lora_b0", "singular_values")]
        return cls(*(state[k] for k in keys)) if all(k in state for k in keys) else None


def _make_router(d_in: int, spec: LayerSpec, generator: torch.Generator | None) -> nn.Linear | None:
    """The token router (K, d_in), uniform in +-1/sqrt(d_in); None for router 'none'."""
    if spec.router == "none":
        return None
    router = nn.Linear(d_in, spec.num_experts, bias=False)
    bound = 1.0 / d_in**0.5
    with torch.no_grad():
        router.weight.copy_(torch.empty(spec.num_experts, d_in).uniform_(-bound, bound, generator=generator))
    return router


class RoutedAdapterLinear(nn.Module):
    """y = base(x) + s * sum_{e in TopK(x)} w_e(x) * (B_e A_e [- B0_e A0_e]) dropout(x).

    Parameters: `lora_a` (K*r, d_in), `lora_b` (d_out, K*r), `router.weight` (K, d_in) (absent when K=1).
    Buffers: `lora_a0`/`lora_b0` (delta form only), `component_ids` (K*r,) — each slot's original SVD
    index (or its initial slot for LoRA init) — and `singular_values` (K*r,), both moved by regrouping.
    """

    servable: ClassVar[bool] = True
    """Whether the export format (badit_serve's routed math) computes this layer; subclasses may say no."""

    # Buffers (registered in __init__), declared for the type checker.
    lora_a0: torch.Tensor | None
    lora_b0: torch.Tensor | None
    component_ids: torch.Tensor
    singular_values: torch.Tensor
    dog_grad_a: torch.Tensor
    dog_grad_b: torch.Tensor
    dog_steps: torch.Tensor

    def __init__(
        self,
        base: nn.Linear,
        spec: LayerSpec,
        generator: torch.Generator | None = None,
        stored: StoredInit | None = None,
    ):
        super().__init__()
        self.spec = spec
        self.base = base
        for param in base.parameters():
            param.requires_grad_(False)
        d_out, d_in = base.weight.shape
        n = spec.num_components
        self.in_features, self.out_features = d_in, d_out
        self.dropout = nn.Dropout(spec.dropout) if spec.dropout > 0 else nn.Identity()
        self.router = _make_router(d_in, spec, generator)
        self.register_buffer("lora_a0", None)
        self.register_buffer("lora_b0", None)
        self.register_buffer("component_ids", torch.arange(n))
        self.register_buffer("singular_values", torch.zeros(n))
        lora_a, lora_b = self._init_experts(generator, stored)
        self.lora_a = nn.Parameter(lora_a.contiguous())
        self.lora_b = nn.Parameter(lora_b.contiguous())
        # DOG signal: gradients of each component's factors summed since the last regroup (never d_out x d_in).
        self.register_buffer("dog_grad_a", torch.zeros_like(lora_a), persistent=False)
        self.register_buffer("dog_grad_b", torch.zeros_like(lora_b), persistent=False)
        self.register_buffer("dog_steps", torch.zeros((), dtype=torch.long), persistent=False)
        self.last_aux_loss: torch.Tensor | None = None
        self.last_load: torch.Tensor | None = None
        self.selection_counts: torch.Tensor | None = None
        """When set to a (K,) tensor, every forward adds its per-expert selected-token counts (measurement)."""
        self.weight_sums: torch.Tensor | None = None
        """When set to a (K,) tensor, every forward adds its per-expert routing-weight sums (measurement)."""

    def _init_experts(
        self, generator: torch.Generator | None, stored: StoredInit | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Initial A (K*r, d_in) and B (d_out, K*r) by `spec.init`; sets singular values, A0/B0 (delta
        form) or the residual base weight (literal residual). A delta-form layer given its `stored`
        factors takes them instead of an SVD (the literal residual needs the SVD to rebuild its weight)."""
        spec, base = self.spec, self.base
        d_out, d_in = base.weight.shape
        n = spec.num_components
        if spec.init == "lora":
            return kaiming_lora_a(n, d_in, generator), torch.zeros(d_out, n)
        if spec.is_delta and stored is not None:
            if stored.lora_a0.shape != (n, d_in) or stored.lora_b0.shape != (d_out, n):
                raise ValueError(
                    f"stored initial factors of shapes {tuple(stored.lora_a0.shape)}, "
                    f"{tuple(stored.lora_b0.shape)} do not fit a ({d_out}, {d_in}) weight with {n} components"
                )
            self.singular_values.copy_(stored.singular_values)
            self.lora_a0, self.lora_b0 = stored.lora_a0.float().clone(), stored.lora_b0.float().clone()
            return self.lora_a0.clone(), self.lora_b0.clone()
        if spec.init == "olora":  # peft's OLoRA: QR factors; the frozen weight keeps the residual
            lora_a, lora_b = olora_factors(base.weight, n)
            with torch.no_grad():
                residual = base.weight.float() - spec.scaling * (lora_b @ lora_a)  # (d_out, d_in)
                base.weight.copy_(residual.to(base.weight.dtype))
            return lora_a, lora_b
        # bad, bad-residual, pissa: the top K*r singular components
        lora_a, lora_b, sing = top_singular_components(base.weight, n, spec.scaling)
        self.singular_values.copy_(sing)
        if spec.is_delta:
            self.lora_a0, self.lora_b0 = lora_a.clone(), lora_b.clone()
        else:  # literal residual: the frozen weight loses what the experts now carry
            with torch.no_grad():
                residual = base.weight.float() - spec.scaling * (lora_b @ lora_a)  # (d_out, d_in)
                base.weight.copy_(residual.to(base.weight.dtype))
        return lora_a, lora_b

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Router logits (T, K), dense weights (T, K) and selection mask (T, K) for tokens x (T, d_in).

        Always float32 with autocast off, as evaluation, the reference loader and vLLM compute them, so a
        near-tie between two experts picks the same top-k in training and in serving."""
        router = None if self.router is None else self.router.weight.float()  # (K, d_in)
        with float32_region(x):
            logits = router_logits(x.float(), router)  # (T, K)
            weights, selected = routing_weights(
                logits, self.spec.top_k, self.spec.router, self.spec.gate_scale
            )  # (T, K), (T, K)
        return logits, weights, selected

    def expert_delta(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """s * sum_e w_e B_e A_e x (minus the frozen B0_e A0_e x in the delta form): (T, d_out) float32.

        Autocast is off here: the BAD delta is a small difference of two large products, and rounding each
        product to bfloat16 (about 2^-9 |s B0 A0 x|) would drown what A and B have learned."""
        s = self.spec.scaling
        with float32_region(x):
            x, weights = x.float(), weights.float()  # (T, d_in), (T, K)
            delta = routed_delta(x, weights, self.lora_a.float(), self.lora_b.float(), s)  # (T, d_out)
            if self.spec.is_delta:  # separate call: bitwise-identical terms cancel exactly at init
                assert self.lora_a0 is not None and self.lora_b0 is not None  # set in the delta form
                a0, b0 = self.lora_a0.float(), self.lora_b0.float()  # (K*r, d_in), (d_out, K*r)
                delta = delta - routed_delta(x, weights, a0, b0, s)  # (T, d_out)
        return delta

    def expert_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The servable factors: A (K*R, d_in), B (d_out, K*R) with R = r, or 2r in the delta form
        (expert e's block is [A_e; A0_e] and [B_e, -B0_e]) — what the export writes."""
        if not self.spec.is_delta:
            return self.lora_a, self.lora_b
        assert self.lora_a0 is not None and self.lora_b0 is not None  # set in the delta form
        k, r = self.spec.num_experts, self.spec.rank
        a = torch.cat([self.lora_a.view(k, r, -1), self.lora_a0.view(k, r, -1)], dim=1)  # (K, 2r, d_in)
        b = torch.cat([self.lora_b.view(-1, k, r), -self.lora_b0.view(-1, k, r)], dim=2)  # (d_out, K, 2r)
        return a.reshape(k * 2 * r, -1), b.reshape(-1, k * 2 * r)  # (K*2r, d_in), (d_out, K*2r)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.base(x)  # (..., d_out)
        flat = x.reshape(-1, self.in_features)  # (T, d_in)
        logits, weights, selected = self.route(flat)  # (T, K) each, float32
        delta = self.expert_delta(self.dropout(flat.float()), weights)  # (T, d_out) float32
        if self.training:
            self._record_router_stats(logits, selected)
        if self.selection_counts is not None:
            self.selection_counts += selected.sum(0).to(self.selection_counts)
        if self.weight_sums is not None:
            self.weight_sums += weights.detach().sum(0).to(self.weight_sums)
        return out + delta.view(*x.shape[:-1], self.out_features).to(out.dtype)

    def _record_router_stats(self, logits: torch.Tensor, selected: torch.Tensor) -> None:
        """Keep this forward's expert load and Switch-style balance loss (overwritten, never summed,
        so a recomputation under gradient checkpointing cannot count twice)."""
        load = selected.float().mean(0)  # (K,) fraction of tokens selecting each expert
        self.last_load = load.detach()
        if self.router is None or self.spec.router != "topk":
            self.last_aux_loss = None
            return
        probs = torch.softmax(logits.float(), dim=-1).mean(0)  # (K,)
        self.last_aux_loss = self.spec.num_experts * torch.sum(load / self.spec.top_k * probs)

    @torch.no_grad()
    def accumulate_dog_signal(self) -> None:
        """Add the current gradients of A and B (after any all-reduce) to the DOG accumulators."""
        if self.lora_a.grad is None or self.lora_b.grad is None:
            return
        if self.dog_grad_a.dtype != torch.float32:  # a model-wide .to(bfloat16) cast the sums as well
            self.dog_grad_a, self.dog_grad_b = self.dog_grad_a.float(), self.dog_grad_b.float()
        self.dog_grad_a += self.lora_a.grad.float()
        self.dog_grad_b += self.lora_b.grad.float()
        self.dog_steps += 1

    def dog_signal(self) -> torch.Tensor:
        """Per-component signal (K*r, d_in + d_out): component i's A-row and B-column gradients."""
        return torch.cat([self.dog_grad_a, self.dog_grad_b.t()], dim=1)

    @torch.no_grad()
    def permute_components(self, perm: torch.Tensor) -> None:
        """New slot j takes old component perm[j]: rows of A (A0), columns of B (B0), ids, singular values.
        The DOG accumulators restart from zero."""
        n = self.spec.num_components
        if perm.shape != (n,) or not torch.equal(
            torch.sort(perm).values, torch.arange(n, device=perm.device)
        ):
            raise ValueError(f"not a permutation of {n} components: {perm.tolist()}")
        self.lora_a.copy_(self.lora_a[perm])
        self.lora_b.copy_(self.lora_b[:, perm])
        if self.spec.is_delta:
            assert self.lora_a0 is not None and self.lora_b0 is not None  # set in the delta form
            self.lora_a0.copy_(self.lora_a0[perm])
            self.lora_b0.copy_(self.lora_b0[:, perm])
        self.component_ids.copy_(self.component_ids[perm])
        self.singular_values.copy_(self.singular_values[perm])
        self.reset_dog_signal()

    @torch.no_grad()
    def reset_dog_signal(self) -> None:
        """Forget the accumulated DOG signal (after a regroup, and at every training stage's start)."""
        self.dog_grad_a.zero_()
        self.dog_grad_b.zero_()
        self.dog_steps.zero_()

    def extra_repr(self) -> str:
        s = self.spec
        return (
            f"in={self.in_features}, out={self.out_features}, experts={s.num_experts}, rank={s.rank}, "
            f"top_k={s.top_k}, router={s.router}, init={s.init}, scaling={s.scaling:g}, gate_scale={s.gate_scale:g}"
        )
