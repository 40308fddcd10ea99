"""`badit-train`: mixed / sequential / single multi-task training with evaluation and resumable runs."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from badit_serve.core.exit_codes import run_cli
from training.checkpoint import CheckpointError
from training.config import ConfigError, load_config
from training.data import DataError
from training.model_store import ModelNotFoundError
from training.run import RunError, run
from training.run_dir import RunDir


def _summary(scores: dict[str, Any], run_dir: Path) -> str:
    lines = [f"\nBadit run finished: {run_dir}", f"  mode        {scores['mode']}"]
    if scores.get("rouge_l") is not None:
        lines.append(f"  Rouge-L     {scores['rouge_l']:.2f}   exact match {scores['exact_match']:.2f}")
    for key, value in (scores.get("continual") or {}).items():
        lines.append(f"  {key:<11} {value:.2f}")
    for task in scores["tasks"]:
        s = scores["final"].get(task)
        if s:
            lines.append(f"    {task:<55} {s['rouge_l']:6.2f}")
    lines.append(f"  report      {RunDir.at(run_dir).report}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="badit-train", description=__doc__)
    parser.add_argument("--config", type=Path, help="YAML run config (configs/*.yaml); defaults if omitted")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="dotted override, e.g. --set train.lr=1e-4 (repeatable)",
    )
    parser.add_argument("--output", type=Path, help="run directory (overrides output.dir)")
    parser.add_argument("--resume", action="store_true", help="continue the run in the run directory")
    parser.add_argument(
        "--force", action="store_true", help="replace a run directory that already holds a run"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    return run_cli(
        "badit-train",
        lambda: _train(args),
        invalid=(ConfigError, RunError, DataError, ModelNotFoundError, CheckpointError),
    )


def _train(args: argparse.Namespace) -> None:
    overrides = list(args.overrides) + ([f"output.dir={args.output}"] if args.output else [])
    cfg = load_config(args.config, overrides)
    run_dir = Path(cfg.output.dir)
    scores = run(cfg, run_dir, resume=args.resume, force=args.force, show_progress=not args.no_progress)
    if scores:  # empty on non-main data-parallel ranks
        print(_summary(scores, run_dir))


if __name__ == "__main__":
    sys.exit(main())
