"""Turn an adapted training model into a Badit export directory (format: `badit_serve.core.format`)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedConfig

from badit_serve.core.adapter import (
    AdapterInfo,
    base_dir_fingerprint,
    check_shareable,
    read_base_tensors,
    write_adapter,
)
from badit_serve.core.export_io import ExportError, export_directory, write_export
from badit_serve.core.format import (
    EXPERT_MARK,
    BaditBlock,
    Component,
    ExpertEntry,
    LayerEntry,
    RoutingTable,
    expert_prefix,
)
from badit_serve.core.tensor_files import write_tensors
from training.adapters import AdapterConfig, adapted_layers
from training.adapters.apply import ADAPTER_CONFIG_ATTR
from training.loss import mean_token_kl

COPIED_MODEL_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
)


def export_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Base weights with residuals in place of adapted weights, plus every layer's servable factors."""
    layers = adapted_layers(model)
    tensors: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        owner = next((name for name in layers if key.startswith(f"{name}.")), None)
        if owner is None:
            tensors[key] = value
        elif key.startswith(f"{owner}.base."):
            tensors[f"{owner}.{key[len(owner) + len('.base.') :]}"] = value
    if getattr(model.config, "tie_word_embeddings", False):
        tensors.pop("lm_head.weight", None)
    for name, layer in layers.items():
        prefix = expert_prefix(name)
        lora_a, lora_b = layer.expert_factors()
        tensors[f"{prefix}.lora_a"] = lora_a.detach().float()
        tensors[f"{prefix}.lora_b"] = lora_b.detach().float()
        if layer.router is not None:
            tensors[f"{prefix}.router"] = layer.router.weight.detach().float()
    return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}


def badit_block(model: nn.Module) -> BaditBlock:
    """The config.json `badit` block describing the model's adapted layers."""
    config: AdapterConfig = getattr(model, ADAPTER_CONFIG_ATTR)
    layers = adapted_layers(model)
    spec = next(iter(layers.values())).spec
    architectures = getattr(model.config, "architectures", None) or [type(model).__name__]
    return BaditBlock(
        method=config.method,
        init=spec.init,
        base_architecture=architectures[0],
        num_experts=spec.num_experts,
        rank=spec.rank * (2 if spec.is_delta else 1),
        train_rank=spec.rank,
        top_k=spec.top_k,
        scaling=spec.scaling,
        gate_scale=spec.gate_scale,
        router=spec.router,
        target_modules=list(config.target_modules),
        adapted_modules=list(layers),
    )


def _label(shares: dict[str, float], top: int = 2) -> str | None:
    if not shares:
        return None
    ranked = sorted(shares, key=lambda task: (-shares[task], task))[:top]
    return "+".join(task.split("_", 1)[0] for task in ranked)


def routing_table(
    model: nn.Module,
    dog_history: list[dict[str, Any]] | None = None,
    task_shares: dict[str, dict[str, list[float]]] | None = None,
) -> RoutingTable:
    """Components per expert (original SVD index and singular value), DOG history and, when measured,
    per-expert task shares: task_shares[module][task][expert] = share of the task's tokens selecting it."""
    entries = []
    aggregate: dict[int, dict[str, float]] = {}
    for name, layer in adapted_layers(model).items():
        r = layer.spec.rank
        ids, sing = layer.component_ids.tolist(), layer.singular_values.tolist()
        experts = []
        for e in range(layer.spec.num_experts):
            shares = {task: per_expert[e] for task, per_expert in (task_shares or {}).get(name, {}).items()}
            for task, share in shares.items():
                aggregate.setdefault(e, {}).setdefault(task, 0.0)
                aggregate[e][task] += share
            components = [
                Component(svd_index=ids[j], singular_value=sing[j]) for j in range(e * r, (e + 1) * r)
            ]
            experts.append(
                ExpertEntry(expert=e, components=components, label=_label(shares), task_shares=shares)
            )
        entries.append(LayerEntry(module=name, experts=experts))
    labels = {str(e): label for e, shares in aggregate.items() if (label := _label(shares)) is not None}
    return RoutingTable(layers=entries, dog_history=dog_history or [], expert_labels=labels)


@torch.no_grad()
def measure_routing(
    model: nn.Module, sequences_by_task: Mapping[str, Iterable[list[int]]]
) -> tuple[dict[str, dict[str, list[float]]], dict[str, list[float]]]:
    """Run each task's token sequences through the model (one at a time, so no padding is counted).

    Returns (task_shares, mean_weights): task_shares[module][task][expert] = share of the task's tokens
    that selected the expert; mean_weights[module][expert] = mean routing weight over all tokens.
    """
    layers = adapted_layers(model)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    shares: dict[str, dict[str, list[float]]] = {name: {} for name in layers}
    weight_totals = {
        name: torch.zeros(layer.spec.num_experts, dtype=torch.float64) for name, layer in layers.items()
    }
    all_tokens = 0
    try:
        for task, sequences in sequences_by_task.items():
            for layer in layers.values():
                layer.selection_counts = torch.zeros(
                    layer.spec.num_experts, dtype=torch.float64, device=device
                )
                layer.weight_sums = torch.zeros(layer.spec.num_experts, dtype=torch.float64, device=device)
            tokens = 0
            for ids in sequences:
                model(input_ids=torch.tensor([ids], device=device))
                tokens += len(ids)
            all_tokens += tokens
            for name, layer in layers.items():
                assert layer.selection_counts is not None and layer.weight_sums is not None  # set above
                shares[name][task] = (layer.selection_counts / max(tokens, 1)).tolist()
                weight_totals[name] += layer.weight_sums.cpu()
    finally:
        for layer in layers.values():
            layer.selection_counts = None
            layer.weight_sums = None
        model.train(was_training)
    mean_weights = {name: (total / max(all_tokens, 1)).tolist() for name, total in weight_totals.items()}
    return shares, mean_weights


def measure_task_shares(
    model: nn.Module, sequences_by_task: Mapping[str, Iterable[list[int]]]
) -> dict[str, dict[str, list[float]]]:
    """Per module, per task, the share of the task's tokens that selected each expert."""
    return measure_routing(model, sequences_by_task)[0]


def dense_tensors(model: nn.Module, mean_weights: dict[str, list[float]]) -> dict[str, torch.Tensor]:
    """Plain base-architecture weights: every expert folded into its weight by its mean routing weight,
    W' = R + s * sum_e wbar_e B_e A_e (servable by any engine, no plugin)."""
    layers = adapted_layers(model)
    tensors = {k: v for k, v in export_tensors(model).items() if EXPERT_MARK not in k}
    for name, layer in layers.items():
        lora_a, lora_b = layer.expert_factors()  # (K*R, d_in), (d_out, K*R)
        k = layer.spec.num_experts
        rank = lora_a.shape[0] // k
        wbar = torch.tensor(mean_weights[name], dtype=torch.float32).repeat_interleave(rank)  # (K*R,)
        fold = (
            layer.spec.scaling * (lora_b.detach().float() * wbar[None, :]) @ lora_a.detach().float()
        )  # (d_out, d_in)
        weight = tensors[f"{name}.weight"]
        tensors[f"{name}.weight"] = (weight.float() + fold).to(weight.dtype)
    return tensors


def check_exportable(model: nn.Module) -> None:
    """ExportError unless badit_serve's routed math computes every adapted layer (GainLoRA's gates: no)."""
    for name, layer in adapted_layers(model).items():
        if not layer.servable:
            method = getattr(model, ADAPTER_CONFIG_ATTR).method
            raise ExportError(
                f"adapter.method={method!r} cannot be exported: layer {name} ({type(layer).__name__}) weighs "
                "its branches with a learned gate that the export format's routers (topk, dense, none) do "
                "not compute; evaluate it with badit-train instead"
            )


@dataclass(frozen=True)
class ExportParts:
    """What every export of a model writes, full or adapter-only."""

    block: BaditBlock
    tensors: dict[str, torch.Tensor]
    routing_table: RoutingTable


def export_parts(
    model: nn.Module,
    dog_history: list[dict[str, Any]] | None,
    task_shares: dict[str, dict[str, list[float]]] | None,
) -> ExportParts:
    """The badit block, tensors and routing table of `model`, once it is known to be servable."""
    check_exportable(model)
    return ExportParts(
        badit_block(model), export_tensors(model), routing_table(model, dog_history, task_shares)
    )


def export_model(
    model: nn.Module,
    model_dir: Path,
    out_dir: Path,
    *,
    dog_history: list[dict[str, Any]] | None = None,
    task_shares: dict[str, dict[str, list[float]]] | None = None,
    force: bool = False,
) -> Path:
    """Write `model` (adapted, from the base directory `model_dir`) as a self-contained export."""
    parts = export_parts(model, dog_history, task_shares)
    model_config = model.config
    assert isinstance(model_config, PreTrainedConfig)  # a transformers model's config
    config = model_config.to_dict()
    config.pop("badit", None)
    copy_files = [model_dir / f for f in COPIED_MODEL_FILES if (model_dir / f).is_file()]
    return write_export(
        Path(out_dir),
        config=config,
        block=parts.block,
        tensors=parts.tensors,
        routing_table=parts.routing_table,
        copy_files=copy_files,
        force=force,
    )


def export_adapter(
    model: nn.Module,
    model_dir: Path,
    out_dir: Path,
    *,
    dog_history: list[dict[str, Any]] | None = None,
    task_shares: dict[str, dict[str, list[float]]] | None = None,
    force: bool = False,
) -> Path:
    """Write only the experts, routers and routing table of `model` (see `badit_serve.core.adapter`), with the
    fingerprint of the base in `model_dir`. Refused when a residual differs from the base weight."""
    parts = export_parts(model, dog_history, task_shares)
    block, tensors = parts.block, parts.tensors
    check_shareable(block)
    base = read_base_tensors(Path(model_dir), [f"{m}.weight" for m in block.adapted_modules])
    for module in block.adapted_modules:
        if not torch.equal(tensors[f"{module}.weight"].float(), base[f"{module}.weight"].float()):
            raise ExportError(
                f"{module}: the trained residual weight differs from the base weight in {model_dir}, "
                "so the adapter cannot share that base (use a full export)"
            )
    experts = {}
    for module in block.adapted_modules:
        prefix = expert_prefix(module)
        experts[module] = {
            k: v for k in ("lora_a", "lora_b", "router") if (v := tensors.get(f"{prefix}.{k}")) is not None
        }
    fingerprint = base_dir_fingerprint(Path(model_dir), block.adapted_modules, base)  # no second read
    info = AdapterInfo(block=block, base_fingerprint=fingerprint, base_model=str(model_dir))
    return write_adapter(
        Path(out_dir), info=info, experts=experts, routing_table=parts.routing_table, force=force
    )


def write_plain_model(
    out_dir: Path,
    config: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    copy_files: list[Path],
    force: bool = False,
) -> Path:
    """A standard transformers directory (base architecture), written atomically."""
    out_dir = Path(out_dir)
    with export_directory(out_dir, force) as staging:
        (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        write_tensors(
            staging / "model.safetensors",
            {k: v.contiguous() for k, v in tensors.items()},
            metadata={"format": "pt"},
        )
        for src in copy_files:
            shutil.copy2(src, staging / src.name)
    return out_dir


def interleaved_probe(prompts_by_task: dict[str, list[list[int]]], size: int) -> list[list[int]]:
    """Up to `size` prompts taken round-robin over the tasks (first of each task, then second, ...), so a
    probe smaller than the test sets still covers every task."""
    probe: list[list[int]] = []
    for i in range(max(map(len, prompts_by_task.values()), default=0)):
        for prompts in prompts_by_task.values():
            if i < len(prompts) and len(probe) < size:
                probe.append(prompts[i])
    return probe


@torch.no_grad()
def mean_kl(model_p: nn.Module, model_q: nn.Module, sequences: Iterable[list[int]]) -> float:
    """Mean over tokens of KL(p || q) between the two models' next-token distributions."""
    total, count = 0.0, 0
    for ids in sequences:
        x = torch.tensor([ids])
        log_p = torch.log_softmax(model_p(input_ids=x).logits.float(), dim=-1)  # (1, T, V)
        log_q = torch.log_softmax(model_q(input_ids=x).logits.float(), dim=-1)  # (1, T, V)
        total += mean_token_kl(log_p, log_q) * len(ids)
        count += len(ids)
    return total / max(count, 1)


def export_dense(
    model: nn.Module,
    model_dir: Path,
    out_dir: Path,
    mean_weights: dict[str, list[float]],
    force: bool = False,
) -> Path:
    """Write the folded plain model (`dense_tensors`) as a base-architecture directory."""
    model_config = model.config
    assert isinstance(model_config, PreTrainedConfig)  # a transformers model's config
    config = model_config.to_dict()
    copy_files = [model_dir / f for f in COPIED_MODEL_FILES if (model_dir / f).is_file()]
    return write_plain_model(out_dir, config, dense_tensors(model, mean_weights), copy_files, force=force)
