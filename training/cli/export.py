"""`badit-export`: a training run (or one of its checkpoints) as a self-contained Badit model directory."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from badit_serve.exit_codes import run_cli
from badit_serve.export_io import ExportError
from training.checkpoint import STATE_FILE, latest_checkpoint, load_checkpoint, restore_training_state
from training.config import ConfigError, load_config
from training.data import DataError, encode_eval_prompts, load_tasks
from training.export import export_dense, export_model, mean_kl, measure_routing
from training.model_store import ModelNotFoundError, resolve_model
from training.report import read_metrics
from training.run import CONFIG_FILE, SHARES_FILE, build_model


def _locate(path: Path) -> tuple[Path, Path]:
    """(run_dir, checkpoint_dir) from a run directory or a checkpoint directory."""
    if (path / CONFIG_FILE).is_file():
        checkpoint = latest_checkpoint(path)
        if checkpoint is None:
            raise ExportError(f"{path}: run has no complete checkpoint to export")
        return path, checkpoint
    if (path / STATE_FILE).is_file() and (path.parent.parent / CONFIG_FILE).is_file():
        return path.parent.parent, path
    raise ExportError(
        f"{path}: neither a run directory (with {CONFIG_FILE}) nor a checkpoint directory (with {STATE_FILE})"
    )


def export_run(
    source: Path, out_dir: Path, force: bool = False, dense: bool = False, probe_size: int = 32
) -> Path:
    """Export a run's checkpoint; with `dense`, also `<out_dir>-dense` and its KL to the routed model."""
    run_dir, checkpoint = _locate(source)
    cfg = load_config(run_dir / CONFIG_FILE)
    model_dir = resolve_model(cfg.model.name_or_path)
    model = build_model(cfg, model_dir, device=torch.device("cpu"))
    restore_training_state(load_checkpoint(checkpoint), model)
    model.eval()
    history = [
        {k: v for k, v in r.items() if k != "layers"}
        for r in read_metrics(run_dir)
        if r.get("event") == "regroup"
    ]
    shares_path = run_dir / SHARES_FILE
    shares = json.loads(shares_path.read_text()) if shares_path.is_file() else None
    d = cfg.data
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    needed = dense or shares is None
    prompts = (
        encode_eval_prompts(tokenizer, load_tasks(d), d.prompt_format, d.max_length, cfg.eval.max_new_tokens)
        if needed
        else {}
    )
    mean_weights = None
    if prompts:
        print(
            f"measuring routing on {sum(map(len, prompts.values()))} evaluation prompts ...", file=sys.stderr
        )
        measured_shares, mean_weights = measure_routing(model, prompts)
        shares = shares or measured_shares
    out = export_model(model, model_dir, out_dir, dog_history=history, task_shares=shares, force=force)
    if dense:
        dense_dir = export_dense(
            model, model_dir, out_dir.with_name(out_dir.name + "-dense"), mean_weights, force=force
        )
        plain = AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.float32).eval()
        probe = [ids for seqs in prompts.values() for ids in seqs][:probe_size]
        kl = mean_kl(model, plain, probe)
        print(
            f"dense export {dense_dir}: mean KL(routed || dense) = {kl:.4g} nats/token on {len(probe)} prompts",
            file=sys.stderr,
        )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="badit-export", description=__doc__)
    parser.add_argument("source", type=Path, help="run directory or checkpoint directory")
    parser.add_argument("out_dir", type=Path, help="export directory to create")
    parser.add_argument("--force", action="store_true", help="replace an existing OUT_DIR")
    parser.add_argument(
        "--dense",
        action="store_true",
        help="also write OUT_DIR-dense: a plain base-architecture model with every expert folded "
        "in by its mean routing weight on the evaluation sets (no plugin needed)",
    )
    args = parser.parse_args(argv)
    invalid = (ExportError, ConfigError, ModelNotFoundError, FileNotFoundError, DataError)
    return run_cli("badit-export", lambda: _export(args), invalid=invalid)


def _export(args: argparse.Namespace) -> None:
    print(export_run(args.source, args.out_dir, force=args.force, dense=args.dense))


if __name__ == "__main__":
    sys.exit(main())
