"""Typed run configuration: one pydantic model per YAML section, loaded with dotted overrides."""

from __future__ import annotations

import copy
import os
from functools import reduce
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, PositiveInt, ValidationError

from badit_serve.core.format import STRICT
from training.adapters.config import PRESET_FIELDS, AdapterConfig

DEFAULT_MODEL = "smollm2-135m-instruct"
SUPERNI_DIR_ENV = "BADIT_SUPERNI_DIR"
"""Environment variable naming the SuperNI directory when the config's `data.superni_dir` is not set."""


def superni_dir_from_env() -> Path | None:
    """`$BADIT_SUPERNI_DIR` as a path, or None when unset (never a path derived from the install location)."""
    value = os.environ.get(SUPERNI_DIR_ENV, "").strip()
    return Path(value).expanduser() if value else None


class ModelConfig(BaseModel):
    """The base model to adapt."""

    model_config = STRICT

    name_or_path: str = DEFAULT_MODEL
    """A local Hugging Face model directory, or the alias 'smollm2-135m-instruct' (prepared offline)."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Parameter dtype of the frozen base weights (adapters always train in float32)."""


class DataConfig(BaseModel):
    """Which SuperNI tasks and how they become token sequences."""

    model_config = STRICT

    superni_dir: Path | None = Field(default_factory=superni_dir_from_env)
    """Directory with one folder per task holding train.json and test.json (read in place, never copied);
    default $BADIT_SUPERNI_DIR (`make` and CI set it to ../shared/superni beside the repository)."""
    tasks: list[str] | None = None
    """Task names to use (None: every task folder in superni_dir, sorted)."""
    max_train_per_task: int | None = Field(None, ge=1)
    """Keep at most this many training instances per task (first N, deterministic)."""
    max_train_by_task: dict[str, PositiveInt] | None = None
    """Per-task overrides of max_train_per_task, e.g. more examples of a task whose one-token answers
    carry little of the per-token loss (None: no overrides). `tasks` decides what runs: a key that is a
    task of superni_dir but not one of `tasks` is ignored with a warning; one that is no task is an error."""
    max_test_per_task: int | None = Field(None, ge=1)
    """Keep at most this many test instances per task (first N, deterministic)."""
    prompt_format: Literal["chat", "raw"] = "chat"
    """chat: the model's chat template (what the OpenAI chat API serves); raw: 'Definition: ... Output: '."""
    max_length: int = Field(1024, ge=16, le=131072)
    """Maximum tokens of prompt + response; the input text is cut, never the instruction or the answer."""
    max_target_tokens: int = Field(50, ge=1, le=4096)
    """Maximum response tokens kept for training (the answer is cut at its end beyond this)."""
    reference_seed: int = Field(0, ge=0)
    """Seed of the per-instance choice of one training reference among several."""


class TrainConfig(BaseModel):
    """Optimiser, schedule and training mode."""

    model_config = STRICT

    mode: Literal["mixed", "sequential", "single"] = "mixed"
    """mixed: all tasks shuffled together; sequential: one task after another; single: each task alone."""
    task_order: list[str] | Literal["order1", "order2"] | None = None
    """Sequential task order: a list of task names, 'order1'/'order2' from the SuperNI README, or None (seeded shuffle)."""
    epochs: float = Field(10.0, gt=0, le=1000)
    """Passes over the training data (per stage in sequential mode)."""
    max_steps: int | None = Field(None, ge=1)
    """Stop after this many optimiser steps (overrides epochs when smaller)."""
    batch_size: int = Field(4, ge=1, le=4096)
    """Sequences per micro-batch, summed over data-parallel ranks (each rank takes batch_size / world size)."""
    grad_accum: int = Field(1, ge=1, le=4096)
    """Micro-batches per optimiser step."""
    lr: float = Field(2e-4, gt=0, le=1.0)
    """Peak learning rate of AdamW."""
    weight_decay: float = Field(0.0, ge=0, le=1.0)
    """AdamW decoupled weight decay."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    max_grad_norm: float | None = Field(1.0, gt=0)
    """Clip the global gradient norm (None: no clipping)."""
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    """Learning-rate decay after warmup."""
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    """Fraction of the steps spent warming up linearly from 0."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    autocast_bf16: bool | None = None
    """bf16 autocast (None: on where the hardware supports it well, i.e. CUDA; fp32 on CPU)."""
    seed: int = Field(0, ge=0)
    """Seed of data order, dropout and initialisation."""


class EvalConfig(BaseModel):
    """Greedy-generation evaluation."""

    model_config = STRICT

    max_new_tokens: int = Field(50, ge=1, le=4096)
    """Generated tokens per test instance."""
    batch_size: int = Field(16, ge=1, le=4096)
    """Prompts per generation batch (left padded)."""
    enabled: bool = True
    """Evaluate at the end of training (and after each stage in sequential mode)."""
    single_run: Path | None = None
    """Run directory of a `single`-mode run on the same tasks: enables the Forward metric."""


class OutputConfig(BaseModel):
    """Where a run writes and how often it checkpoints."""

    model_config = STRICT

    dir: Path = Path("runs/latest")
    """Run directory (config, metrics.jsonl, checkpoints, scores, report)."""
    checkpoint_every: int | None = Field(None, ge=1)
    """Save a resumable checkpoint every N optimiser steps (None: only at stage ends)."""
    log_every: int = Field(10, ge=1)
    """Write a metrics line every N optimiser steps."""


class RunConfig(BaseModel):
    """A complete Badit run: one YAML file in configs/ maps onto exactly this model."""

    model_config = STRICT

    model: ModelConfig = Field(default_factory=ModelConfig)
    """The base model."""
    data: DataConfig = Field(default_factory=DataConfig)
    """SuperNI data and prompt format."""
    adapter: AdapterConfig = Field(default_factory=AdapterConfig)
    """Adapter method, experts, router and DOG."""
    train: TrainConfig = Field(default_factory=TrainConfig)
    """Optimiser, schedule and mode."""
    eval: EvalConfig = Field(default_factory=EvalConfig)
    """Evaluation."""
    output: OutputConfig = Field(default_factory=OutputConfig)
    """Run directory and checkpointing."""


class ConfigError(ValueError):
    """A config file or override that does not validate; the message names the file and field."""


def apply_override(tree: dict[str, Any], assignment: str) -> None:
    """Apply one `dotted.key=value` override in place; the value is parsed as YAML (`1e-4`, `[a, b]`)."""
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r} is not of the form key=value")
    key, raw = assignment.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {assignment!r} has an empty key component")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {assignment!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None


BASE_KEY = "base"
"""Top-level key of a config file naming the config it overrides (a path relative to the file)."""


def merge_trees(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """`override` on top of `base`: sections merge key by key, any other value (lists included) replaces."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_trees(merged[key], value)
        else:
            merged[key] = value
    return merged


def _read_layers(path: Path, chain: tuple[Path, ...] = ()) -> list[dict[str, Any]]:
    """The YAML trees of `path`'s `base:` chain, deepest base first, `path` last (cycles are an error)."""
    path = path.resolve()
    if path in chain:
        raise ConfigError(f"{path}: base chain loops: {' -> '.join(str(p) for p in (*chain, path))}")
    try:
        loaded = yaml.safe_load(path.read_text())
    except FileNotFoundError as exc:
        where = f" (base of {chain[-1]})" if chain else ""
        raise ConfigError(f"config file not found: {path}{where}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    tree = dict(loaded or {})
    base = tree.pop(BASE_KEY, None)
    if base is None:
        return [tree]
    if not isinstance(base, str):
        raise ConfigError(f"{path}: {BASE_KEY} must be a path to another config file, got {base!r}")
    return [*_read_layers(path.parent / base, (*chain, path)), tree]


def _written(section: object, dotted: str) -> bool:
    """Whether the raw `section` mapping holds the dotted key (a nested key only under a mapping)."""
    *parents, leaf = dotted.split(".")
    for part in parents:
        section = section.get(part) if isinstance(section, dict) else None
    return isinstance(section, dict) and leaf in section


def _forget(section: object, dotted: str) -> None:
    """Remove the dotted key from the raw `section` mapping (nothing when it is absent)."""
    *parents, leaf = dotted.split(".")
    for part in parents:
        section = section.get(part) if isinstance(section, dict) else None
    if isinstance(section, dict):
        section.pop(leaf, None)


def _override_layer(overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """The `--set` overrides together as one layer over the config file: the keys they write."""
    layer: dict[str, Any] = {}
    for assignment in overrides:
        apply_override(layer, assignment)
    return layer


def stale_preset_fields(layers: list[dict[str, Any]]) -> list[str]:
    """The `PRESET_FIELDS` that their last writer wrote while another method than the final one was in force.

    Each layer (a file of the base chain, deepest first, then the `--set` overrides together) writes
    its values for the method in force once it is applied. A preset field written for the method that
    ends up in force is explicit and wins over the preset; one written for another method (badit's
    num_experts in a base of a LoRA config, or in the file under `--set adapter.method=lora`) is stale:
    the new method's preset owns that field."""
    method = AdapterConfig.model_fields["method"].default
    written_for: dict[str, object] = {}
    for layer in layers:
        section = layer.get("adapter")
        if not isinstance(section, dict):
            continue
        method = section.get("method", method)
        written_for.update({name: method for name in PRESET_FIELDS if _written(section, name)})
    return [name for name, for_method in written_for.items() if for_method != method]


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Load a YAML run config (or the defaults when `path` is None) and apply dotted overrides.

    A file may start from another: `base: other.yaml` (relative to the file) loads that one first and
    lays this file's values over it, so a baseline config lists only what differs from its base.
    The method preset owns its shape: adapter fields from `PRESET_FIELDS` written for another method
    than the one finally in force are dropped (see `stale_preset_fields`), so `--set adapter.method=lora`
    on a badit config needs no `num_experts` / `top_k` of its own."""
    layers = _read_layers(Path(path)) if path is not None else []
    tree: dict[str, Any] = copy.deepcopy(reduce(merge_trees, layers, {}))
    for assignment in overrides:
        # in place: a --set mapping replaces the file's mapping, it does not merge into it as a layer would
        apply_override(tree, assignment)
    for name in stale_preset_fields([*layers, _override_layer(overrides)]):
        _forget(tree.get("adapter"), name)
    source = "<defaults>" if path is None else str(path)
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as exc:
        lines = [f"{source}: invalid config"]
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"])
            lines.append(f"  {loc}: {err['msg']}")
        raise ConfigError("\n".join(lines)) from exc


def dump_config(config: RunConfig) -> str:
    """The resolved config as YAML (paths as strings), suitable for `load_config`."""
    text: str = yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
    return text
