"""`badit-export`: a training run (or one of its checkpoints) as a self-contained Badit model directory."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from badit_serve.export_io import ExportError
from training.checkpoint import latest_checkpoint, load_checkpoint, restore_training_state
from training.config import ConfigError, load_config
from training.export import export_model
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
    if (path / "state.pt").is_file() and (path.parent.parent / CONFIG_FILE).is_file():
        return path.parent.parent, path
    raise ExportError(f"{path}: neither a run directory (with {CONFIG_FILE}) nor a checkpoint directory (with state.pt)")


def export_run(source: Path, out_dir: Path, force: bool = False) -> Path:
    run_dir, checkpoint = _locate(source)
    cfg = load_config(run_dir / CONFIG_FILE)
    model_dir = resolve_model(cfg.model.name_or_path)
    model = build_model(cfg, model_dir, device=torch.device("cpu"))
    restore_training_state(load_checkpoint(checkpoint), model)
    history = [
        {k: v for k, v in r.items() if k != "layers"} for r in read_metrics(run_dir) if r.get("event") == "regroup"
    ]
    shares_path = run_dir / SHARES_FILE
    shares = json.loads(shares_path.read_text()) if shares_path.is_file() else None
    return export_model(model.eval(), model_dir, out_dir, dog_history=history, task_shares=shares, force=force)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="badit-export", description=__doc__)
    parser.add_argument("source", type=Path, help="run directory or checkpoint directory")
    parser.add_argument("out_dir", type=Path, help="export directory to create")
    parser.add_argument("--force", action="store_true", help="replace an existing OUT_DIR")
    args = parser.parse_args(argv)
    try:
        out = export_run(args.source, args.out_dir, force=args.force)
    except (ExportError, ConfigError, ModelNotFoundError, FileNotFoundError) as exc:
        print(f"badit-export: error: {exc}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
