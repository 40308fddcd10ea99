"""The Badit export format (version 1): one self-contained model directory.

    config.json              base config; `architectures` = the Badit class; a `badit` block (`BaditBlock`)
    model.safetensors        base weights (each adapted weight replaced by its frozen residual) + experts +
                             routers; sharded with model.safetensors.index.json past the shard limit
    tokenizer files, chat template, generation_config.json (from the base model)
    routing_table.json       `RoutingTable`: components per expert, DOG history, ability labels
    badit_manifest.json      `Manifest`: sha256 and size of every other file

Expert tensors of the adapted module `<prefix>.<name>_proj` are stored as `<prefix>.badit_<name>.lora_a`
(K*R, d_in), `.lora_b` (d_out, K*R) and `.router` (K, d_in): names without `.gate_proj`, which vLLM's
loaders rewrite into the fused `gate_up_proj`. See docs/FORMAT.md.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from badit_serve.core.routing import RouterMode

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
ROUTING_TABLE_FILE = "routing_table.json"
MANIFEST_FILE = "badit_manifest.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"

EXPERT_MARK = ".badit_"
"""Every expert tensor name contains this (`<prefix>.badit_gate.lora_a`); no base tensor does."""

STRICT = ConfigDict(extra="forbid", use_attribute_docstrings=True)
"""The one pydantic config of the project's typed files (format, adapters, HTTP schemas, training configs):
unknown keys refused, attribute docstrings become field descriptions."""


class BaditBlock(BaseModel):
    """The `badit` block of config.json: everything needed to run the routed layers."""

    model_config = STRICT

    format_version: int = FORMAT_VERSION
    """Export format version; readers reject versions they do not know."""
    method: str
    """Training method preset (badit, lora, pissa, loramoe, ...), informational."""
    init: str
    """Expert initialisation used in training (bad, bad-residual, lora)."""
    base_architecture: str
    """The base model's architecture class, e.g. LlamaForCausalLM."""
    num_experts: int = Field(ge=1)
    """K, experts per adapted layer."""
    rank: int = Field(ge=1)
    """R, stored rank of each expert (2r for BAD delta experts [A; A0], [B, -B0])."""
    train_rank: int = Field(ge=1)
    """r, the trained rank per expert."""
    top_k: int = Field(ge=1)
    """Experts selected per token."""
    scaling: float = Field(gt=0)
    """s = alpha / r."""
    gate_scale: float = Field(gt=0)
    """Multiplier on the softmax routing weights."""
    router: RouterMode
    """Routing mode (see badit_serve.core.routing.routing_weights)."""
    target_modules: list[str] = Field(min_length=1)
    """Adapted module names, e.g. ['gate_proj']."""
    adapted_modules: list[str] = Field(min_length=1)
    """Full names of every adapted module, e.g. model.layers.0.mlp.gate_proj."""


class Component(BaseModel):
    """One rank-1 component: where it came from."""

    model_config = STRICT

    svd_index: int = Field(ge=0)
    """Index in the base weight's SVD (or the initial slot for LoRA-initialised experts)."""
    singular_value: float = Field(ge=0)
    """Its singular value in the base weight (0 for LoRA-initialised experts)."""


class ExpertEntry(BaseModel):
    """One expert of one layer."""

    model_config = STRICT

    expert: int = Field(ge=0)
    components: list[Component]
    """Its rank-1 components in slot order."""
    label: str | None = None
    """Ability label: the tasks that route to it most (None until measured)."""
    task_shares: dict[str, float] = Field(default_factory=dict)
    """Task -> share of that task's tokens selecting this expert, measured on the evaluation sets."""


class LayerEntry(BaseModel):
    """The experts of one adapted module."""

    model_config = STRICT

    module: str
    """Full module name, e.g. model.layers.0.mlp.gate_proj."""
    experts: list[ExpertEntry]


class RoutingTable(BaseModel):
    """routing_table.json."""

    model_config = STRICT

    format_version: int = FORMAT_VERSION
    layers: list[LayerEntry]
    dog_history: list[dict[str, Any]] = Field(default_factory=list)
    """Regroup events of training (step, components moved, angles, drift)."""
    expert_labels: dict[str, str] = Field(default_factory=dict)
    """Expert index (as a string) -> label aggregated across layers (for metrics)."""


class FileEntry(BaseModel):
    model_config = STRICT

    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)


class Manifest(BaseModel):
    """badit_manifest.json: every file of the export except itself."""

    model_config = STRICT

    format_version: int = FORMAT_VERSION
    files: dict[str, FileEntry]


def expert_prefix(module_name: str) -> str:
    """`model.layers.3.mlp.gate_proj` -> `model.layers.3.mlp.badit_gate` (never contains `.gate_proj`)."""
    parent, _, leaf = module_name.rpartition(".")
    short = leaf.removesuffix("_proj")
    mark = EXPERT_MARK.lstrip(".")
    return f"{parent}.{mark}{short}" if parent else f"{mark}{short}"


def expert_tensor_shapes(block: BaditBlock, d_in: int, d_out: int) -> dict[str, tuple[int, ...]]:
    """Suffix -> shape of the expert tensors of one adapted module."""
    n = block.num_experts * block.rank
    shapes: dict[str, tuple[int, ...]] = {"lora_a": (n, d_in), "lora_b": (d_out, n)}
    if block.router != "none":
        shapes["router"] = (block.num_experts, d_in)
    return shapes
