"""`badit-data`: inspect the SuperNI data (counts and token lengths)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from badit_serve.core.exit_codes import run_cli
from training.config import DEFAULT_MODEL, SUPERNI_DIR_ENV, DataConfig
from training.data.superni import DataError, load_tasks
from training.model_store import ModelNotFoundError, resolve_model

_DEFAULTS = DataConfig()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="badit-data", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_stats = sub.add_parser("stats", help="per-task counts and prompt/response token-length percentiles")
    p_stats.add_argument(
        "--data", type=Path, default=None, help=f"SuperNI directory (default: ${SUPERNI_DIR_ENV})"
    )
    p_stats.add_argument("--model", default=DEFAULT_MODEL, help="alias or model directory (its tokenizer)")
    p_stats.add_argument("--format", choices=["chat", "raw"], default="chat", help="prompt format")
    p_stats.add_argument("--max-length", type=int, default=_DEFAULTS.max_length, help="for the cut column")
    p_stats.add_argument("--max-target-tokens", type=int, default=_DEFAULTS.max_target_tokens)
    p_stats.add_argument(
        "--json", type=Path, default=None, metavar="OUT", help="also write the stats as JSON"
    )
    args = parser.parse_args(argv)
    return run_cli("badit-data", lambda: _stats(args), invalid=(DataError, ModelNotFoundError))


def _stats(args: argparse.Namespace) -> None:
    from transformers import AutoTokenizer

    from training.data.stats import compute_stats, format_table

    data = DataConfig(superni_dir=args.data) if args.data is not None else DataConfig()
    tasks = load_tasks(data)
    if not tasks:
        raise DataError(f"{data.superni_dir}: no task folders (with train.json) found")
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(args.model))
    stats = compute_stats(tasks, tokenizer, args.format, args.max_length, args.max_target_tokens)
    print(format_table(stats))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(dataclasses.asdict(stats), indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
