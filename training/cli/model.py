"""`badit-model`: prepare and inspect base models (offline)."""

from __future__ import annotations

import argparse
import sys

from badit_serve.core.exit_codes import run_cli
from training.model_store import ALIASES, ModelNotFoundError, prepare, resolve_model, smoke_answer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="badit-model", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_prepare = sub.add_parser("prepare", help="turn a bundled GGUF alias into a transformers directory")
    p_prepare.add_argument("name", nargs="?", default="smollm2-135m-instruct", choices=sorted(ALIASES))
    p_prepare.add_argument("--force", action="store_true", help="re-create the directory even if prepared")
    p_smoke = sub.add_parser("smoke", help="greedy answer to the fixed smoke question")
    p_smoke.add_argument("name", nargs="?", default="smollm2-135m-instruct", help="alias or model directory")
    p_path = sub.add_parser("path", help="print the directory of an alias or model directory")
    p_path.add_argument("name", nargs="?", default="smollm2-135m-instruct")
    args = parser.parse_args(argv)
    return run_cli("badit-model", lambda: _command(args), invalid=(ModelNotFoundError,))


def _command(args: argparse.Namespace) -> None:
    if args.command == "prepare":
        print(f"preparing {args.name} (dequantise GGUF, pin eos, smoke check) ...", file=sys.stderr)
        print(prepare(args.name, force=args.force))
    elif args.command == "smoke":
        print(smoke_answer(resolve_model(args.name)))
    else:
        print(resolve_model(args.name, prepare_if_missing=False))


if __name__ == "__main__":
    sys.exit(main())
