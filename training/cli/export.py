"""`badit-export`: a training run (or one of its checkpoints) as a self-contained Badit model directory."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from badit_serve.core.exit_codes import run_cli
from badit_serve.core.export_io import ExportError
from training.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, restore_training_state
from training.config import ConfigError, RunConfig, load_config
from training.data import DataError, Task, encode_eval_prompts, load_tasks
from training.eval import evaluate_tasks
from training.export import (
    check_exportable,
    export_adapter,
    export_dense,
    export_model,
    interleaved_probe,
    mean_kl,
    measure_routing,
)
from training.metrics_log import MetricsLog
from training.model_store import ModelNotFoundError, resolve_model
from training.run import build_model
from training.run_dir import RunDir


def _locate(path: Path) -> tuple[RunDir, Path]:
    """(run, checkpoint_dir) from a run directory or a checkpoint directory."""
    if RunDir.at(path).is_run():
        checkpoint = latest_checkpoint(path)
        if checkpoint is None:
            raise ExportError(f"{path}: run has no complete checkpoint to export")
        return RunDir.at(path), checkpoint
    run = RunDir.of_checkpoint(path)
    if run is not None:
        return run, path
    raise ExportError(
        f"{path}: neither a run directory (with {RunDir.CONFIG}) nor a checkpoint directory (with {RunDir.STATE})"
    )


def export_run(
    source: Path,
    out_dir: Path,
    force: bool = False,
    dense: bool = False,
    probe_size: int = 32,
    adapter_only: bool = False,
) -> Path:
    """Export a run's checkpoint; with `dense`, also `<out_dir>-dense` and its KL to the routed model."""
    run, checkpoint = _locate(source)
    cfg = load_config(run.config)
    model_dir = resolve_model(cfg.model.name_or_path)
    state = load_checkpoint(checkpoint)
    model = build_model(cfg, model_dir, device=torch.device("cpu"), stored_state=state.adapter)
    check_exportable(model)
    restore_training_state(state, model)
    model.eval()
    history = [
        {k: v for k, v in r.items() if k != "layers"}
        for r in MetricsLog(run.metrics).read()
        if r.get("event") == "regroup"
    ]
    shares = json.loads(run.shares.read_text()) if run.shares.is_file() else None
    d = cfg.data
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tasks = load_tasks(d) if dense or shares is None else []
    prompts = encode_eval_prompts(tokenizer, tasks, d.prompt_format, d.max_length, cfg.eval.max_new_tokens)
    mean_weights = None
    if prompts:
        print(
            f"measuring routing on {sum(map(len, prompts.values()))} evaluation prompts ...", file=sys.stderr
        )
        measured_shares, mean_weights = measure_routing(model, prompts)
        shares = shares or measured_shares
    writer = export_adapter if adapter_only else export_model
    out = writer(model, model_dir, out_dir, dog_history=history, task_shares=shares, force=force)
    if dense:
        dense_dir = out_dir.with_name(out_dir.name + "-dense")
        assert mean_weights is not None  # dense: the loaded tasks' prompts were measured above
        export_dense(model, model_dir, dense_dir, mean_weights, force=force)
        _report_dense(model, dense_dir, tokenizer, tasks, cfg, interleaved_probe(prompts, probe_size))
    return out


def _report_dense(
    model: torch.nn.Module,
    dense_dir: Path,
    tokenizer: PreTrainedTokenizerBase,
    tasks: list[Task],
    cfg: RunConfig,
    probe: list[list[int]],
) -> None:
    """How far the folded plain model is from the routed one: mean KL on probe prompts from every task,
    and both models' Rouge-L on the run's test prompts (greedy, the run's eval settings)."""
    plain = AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.float32).eval()
    kl = mean_kl(model, plain, probe)
    print(
        f"dense export {dense_dir}: mean KL(routed || dense) = {kl:.4g} nats/token on {len(probe)} prompts "
        f"from {len(tasks)} tasks",
        file=sys.stderr,
    )
    d = cfg.data
    rouge = {
        name: evaluate_tasks(m, tokenizer, tasks, d.prompt_format, d.max_length, cfg.eval, progress=False)
        for name, m in (("routed", model), ("dense", plain))
    }
    mean = {name: sum(s.rouge_l for s in scores.values()) / len(scores) for name, scores in rouge.items()}
    print(
        f"dense export {dense_dir}: Rouge-L routed {mean['routed']:.2f} vs dense {mean['dense']:.2f} "
        f"on {sum(len(t.test) for t in tasks)} test prompts of {len(tasks)} tasks",
        file=sys.stderr,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="badit-export", description=__doc__)
    parser.add_argument("source", type=Path, help="run directory or checkpoint directory")
    parser.add_argument("out_dir", type=Path, help="export directory to create")
    parser.add_argument("--force", action="store_true", help="replace an existing OUT_DIR")
    parser.add_argument(
        "--dense",
        action="store_true",
        help="also write OUT_DIR-dense: a plain base-architecture model with every expert folded "
        "in by its mean routing weight on the evaluation sets (no plugin needed); reports its KL to the "
        "routed model on prompts from every task and both models' Rouge-L on the run's test prompts "
        "(greedy generation: slow for large models on a CPU)",
    )
    parser.add_argument(
        "--adapter-only",
        action="store_true",
        help="write only the experts, routers and routing table (+ the base's fingerprint), to serve many "
        "adapters over one base with `badit-serve BASE --adapter NAME=OUT_DIR`; init bad or lora only",
    )
    args = parser.parse_args(argv)
    if args.adapter_only and args.dense:
        parser.error("--dense and --adapter-only exclude each other")
    invalid = (ExportError, ConfigError, ModelNotFoundError, FileNotFoundError, DataError, CheckpointError)
    return run_cli("badit-export", lambda: _export(args), invalid=invalid)


def _export(args: argparse.Namespace) -> None:
    out = export_run(
        args.source, args.out_dir, force=args.force, dense=args.dense, adapter_only=args.adapter_only
    )
    print(out)


if __name__ == "__main__":
    sys.exit(main())
