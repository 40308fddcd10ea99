"""Typed, self-validating configuration of a routed adapter (Badit and its baselines)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from badit_serve.core.format import STRICT
from badit_serve.core.routing import RouterMode

InitMode = Literal["bad", "bad-residual", "lora", "pissa", "olora"]
Branching = Literal["sum", "gated"]
"""Per-task branches: 'sum' (O-LoRA: every branch weight 1) or 'gated' (GainLoRA: a learned gate each)."""


@dataclass(frozen=True)
class MethodPreset:
    """What a method name stands for; fields an `AdapterConfig` leaves unset default from here."""

    num_experts: int
    top_k: int
    init: InitMode
    router: RouterMode
    dog: bool
    """Whether the method regroups with DOG (`adapter.dog.enabled` can still turn it off)."""
    gate_scale_top_k: bool = False
    """Default gate_scale = top_k (Badit: uniform logits give each selected expert weight 1), else 1."""
    about: str = ""
    branching: Branching | None = None
    """Per-task branches (O-LoRA, GainLoRA), one per training stage; None for routed experts."""


METHODS: dict[str, MethodPreset] = {
    "badit": MethodPreset(8, 4, "bad", "topk", True, True, "BAD init + top-k router + DOG"),
    "badit_no_dog": MethodPreset(8, 4, "bad", "topk", False, True, "ablation: no DOG regrouping"),
    "badit_no_bad": MethodPreset(8, 4, "lora", "topk", True, True, "ablation: LoRA-initialised experts"),
    # LoRAMoE as the paper compares it: its "w/o BAD & DOG" rows (Table 2) equal its LoRAMoE rows, i.e.
    # Badit's router (8 experts, top-4, same gate scale) with plain LoRA init and no DOG; only BAD and DOG
    # differ from badit. The authors' released config/loramoe_k{3..6}.config instead run LoRAMoE dense
    # (num_experts = top_k): that is loramoe_dense.
    "loramoe": MethodPreset(
        8, 4, "lora", "topk", False, True, "Badit's top-4 router over LoRA experts, no DOG"
    ),
    "loramoe_dense": MethodPreset(8, 8, "lora", "dense", False, False, "LoRA experts, dense softmax router"),
    "lora": MethodPreset(1, 1, "lora", "none", False, False, "one LoRA expert"),
    "pissa": MethodPreset(1, 1, "pissa", "none", False, False, "one expert, top-r SVD components"),
    "olora": MethodPreset(1, 1, "olora", "none", False, False, "one expert, peft's QR (OLoRA) init"),
    "o-lora": MethodPreset(1, 1, "lora", "none", False, False, "O-LoRA: orthogonal per-task branches", "sum"),
    "gainlora": MethodPreset(
        1, 1, "lora", "dense", False, False, "GainLoRA: gated per-task branches", "gated"
    ),
}
"""The method registry: adding a method is one entry here."""

PRESET_FIELDS: tuple[str, ...] = ("num_experts", "top_k", "init", "router", "gate_scale", "dog.enabled")
"""Dotted `adapter.` fields whose default comes from the method preset (see `AdapterConfig.resolved`).
The preset owns them: a value a config layer wrote while another method was in force (a base config, or
the file under `--set adapter.method=...`) yields to the preset; see `training.config.load_config`."""


@dataclass(frozen=True)
class ResolvedAdapter:
    """An `AdapterConfig` with its method preset applied: every setting has a value."""

    num_experts: int
    top_k: int
    init: InitMode
    router: RouterMode
    alpha: float
    gate_scale: float
    dog: bool
    branching: Branching | None = None


class DogConfig(BaseModel):
    """Dynamically orthogonal grouping (DOG): when and how rank-1 components are regrouped."""

    model_config = STRICT

    enabled: bool = True
    """Regroup components during training (False gives the 'w/o DOG' ablation)."""
    schedule: Literal["epoch_first_half", "every_n_steps"] = "epoch_first_half"
    """'epoch_first_half': at each epoch end during the first half of training (the paper's choice);
    'every_n_steps': every `every_n_steps` optimiser steps."""
    every_n_steps: int = Field(100, ge=1, le=1_000_000)
    """Regroup period in optimiser steps when schedule is 'every_n_steps'."""
    max_iters: int = Field(10, ge=1, le=100)
    """Maximum orthogonalise-and-reassign iterations after the initial spherical k-means."""
    kmeans_iters: int = Field(50, ge=1, le=1000)
    """Maximum Lloyd iterations of the initial spherical k-means."""
    restarts: int = Field(4, ge=1, le=64)
    """Independent k-means++ starts (seeds seed, seed+1, ...); the most cohesive grouping wins."""
    seed: int = Field(0, ge=0)
    """Seed of the k-means++ initialisation (identical on every data-parallel rank)."""


class BranchConfig(BaseModel):
    """Per-task branches of the continual-learning baselines (O-LoRA, GainLoRA): one LoRA branch of rank
    `adapter.rank` per training stage; earlier branches are frozen while a later stage trains."""

    model_config = STRICT

    count: int = Field(1, ge=1, le=64)
    """Branches allocated; at least the number of sequential stages (mixed and single use one)."""
    orthogonal_lambda: float = Field(0.5, ge=0.0, le=100.0)
    """Weight of O-LoRA's loss sum_layers |A_earlier A_current^T|_1 (the O-LoRA scripts use 0.5)."""
    gate_energy: float = Field(0.95, gt=0.0, lt=1.0)
    """GainLoRA: fraction of earlier tasks' input energy whose subspace new gates are kept orthogonal to."""


class AdapterConfig(BaseModel):
    """Which layers get routed experts, how many, how they are initialised and routed.

    `method` picks a preset; the `PRESET_FIELDS` default from it (see `resolved()`), and any field
    given explicitly (not None) wins. Invalid combinations (e.g. top_k > num_experts) are rejected with
    a message that names the explicit field and the preset it contradicts. `load_config` drops the preset
    fields a config layer wrote for another method, so switching `method` alone switches the shape.
    """

    model_config = STRICT

    method: str = "badit"
    """Preset from `METHODS`: badit (BAD init + top-k router + DOG), lora, pissa, olora (peft's QR init),
    loramoe (Badit's router, LoRA init, no DOG), loramoe_dense (dense softmax router), badit_no_dog,
    badit_no_bad, o-lora (orthogonal per-task branches), gainlora (gated per-task branches)."""
    target_modules: list[str] = Field(default_factory=lambda: ["gate_proj"], min_length=1)
    """Names (last path component) of the nn.Linear modules to adapt, e.g. ['gate_proj']."""
    num_experts: int | None = Field(None, ge=1, le=256)
    """K, experts per adapted layer (badit/loramoe/loramoe_dense default 8; lora/pissa 1)."""
    rank: int = Field(8, ge=1, le=1024)
    """r, the rank of each expert."""
    top_k: int | None = Field(None, ge=1, le=256)
    """Experts selected per token (badit default 4; dense routers use all K)."""
    alpha: float | None = Field(None, gt=0, le=4096)
    """LoRA alpha; the scaling is s = alpha / r. Defaults to r (s = 1)."""
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    """Dropout on the adapter input (training only)."""
    init: InitMode | None = None
    """Expert initialisation: bad (SVD delta, exact at init), bad-residual (paper's literal residual,
    not exact under top-k), lora (A Kaiming, B zero), pissa (K=1 SVD residual), olora (K=1 QR residual)."""
    router: RouterMode | None = None
    """topk (softmax over the selected logits), dense (softmax over all K), none (K=1, weight 1)."""
    gate_scale: float | None = Field(None, gt=0, le=256)
    """Multiplier on the routing weights. Defaults to top_k for badit so that uniform logits give every
    selected expert weight 1, as the paper's routing weights initialised to 1; 1.0 elsewhere."""
    aux_loss_coef: float = Field(0.0, ge=0.0, le=10.0)
    """Weight of the load-balancing auxiliary loss (0 disables it)."""
    dog: DogConfig = Field(default_factory=DogConfig)
    """Regrouping settings (only used by methods with DOG)."""
    branches: BranchConfig = Field(default_factory=BranchConfig)
    """Per-task branch settings (only used by o-lora and gainlora)."""

    @field_validator("method")
    @classmethod
    def _known_method(cls, method: str) -> str:
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
        return method

    @model_validator(mode="after")
    def _check(self) -> AdapterConfig:
        r = self.resolved()
        problem = self._branch_conflict() or self._shape_conflict(r)
        if problem is not None:
            raise ValueError(problem)
        return self

    def _explicit(self, name: str) -> bool:
        """Whether the preset field `name` was given (None, also when written, defers to the preset)."""
        return getattr(self, name) is not None

    def _branch_conflict(self) -> str | None:
        """Per-task-branch methods size themselves by branches.count: any explicit shape contradicts them."""
        given = [f"adapter.{name}" for name in ("num_experts", "top_k", "router") if self._explicit(name)]
        if METHODS[self.method].branching is None or not given:
            return None
        return (
            f"adapter.method={self.method!r} has one branch per task, sized by adapter.branches.count: "
            f"drop {', '.join(given)}"
        )

    def _shape_conflict(self, r: ResolvedAdapter) -> str | None:
        """The first resolved invariant that fails, naming its two fields (explicit first)."""
        if r.top_k > r.num_experts:
            return self._clash("top_k", "num_experts", r, "top_k cannot exceed num_experts")
        if r.init in ("pissa", "olora") and r.num_experts != 1:
            return self._clash(
                "num_experts", "init", r, f"init {r.init!r} takes one expert (use 'bad' for K>1)"
            )
        if r.router == "none" and r.num_experts != 1:
            return self._clash("num_experts", "router", r, "router 'none' takes one expert")
        return None

    def _clash(self, first: str, second: str, r: ResolvedAdapter, why: str) -> str:
        """`adapter.<a>=.. contradicts adapter.<b>=.. (preset of adapter.method=..): why`, explicit field first."""
        a, b = sorted((first, second), key=lambda name: not self._explicit(name))
        return f"{self._said(a, r)} contradicts {self._said(b, r)}: {why}"

    def _said(self, name: str, r: ResolvedAdapter) -> str:
        """`adapter.<name>=<resolved value>`, marked as the method's preset when not given explicitly."""
        said = f"adapter.{name}={getattr(r, name)!r}"
        return said if self._explicit(name) else f"{said} (preset of adapter.method={self.method!r})"

    def resolved(self) -> ResolvedAdapter:
        """The method preset merged with the explicitly given fields."""
        p = METHODS[self.method]
        preset_experts = self.branches.count if p.branching == "gated" else p.num_experts  # a gate per branch
        num_experts = self.num_experts if self.num_experts is not None else preset_experts
        router = self.router if self.router is not None else p.router
        default_top_k = num_experts if router in ("dense", "none") else min(p.top_k, num_experts)
        top_k = self.top_k if self.top_k is not None else default_top_k
        return ResolvedAdapter(
            num_experts=num_experts,
            top_k=top_k,
            init=self.init if self.init is not None else p.init,
            router=router,
            alpha=self.alpha if self.alpha is not None else float(self.rank),
            gate_scale=self.gate_scale
            if self.gate_scale is not None
            else (float(top_k) if p.gate_scale_top_k else 1.0),
            dog=p.dog and self.dog.enabled,
            branching=p.branching,
        )
