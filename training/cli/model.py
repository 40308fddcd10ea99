"""`badit-model`: prepare and inspect base models (offline)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from transformers import AutoTokenizer

from badit_serve.core.exit_codes import run_cli
from badit_serve.core.export_io import ExportError
from badit_serve.core.quantized_base import SCHEMES
from training.config import superni_dir_from_env
from training.data.superni import DataError
from training.model_store import ALIASES, ModelNotFoundError, prepare, resolve_model, smoke_answer
from training.quantize.calibration import superni_calibration
from training.quantize.run import quantize_base
from training.quantize.tool_env import ToolEnvError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="badit-model", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_prepare = sub.add_parser("prepare", help="turn a bundled GGUF alias into a transformers directory")
    p_prepare.add_argument("name", nargs="?", default="smollm2-135m-instruct", choices=sorted(ALIASES))
    p_prepare.add_argument("--force", action="store_true", help="re-create the directory even if prepared")
    p_smoke = sub.add_parser("smoke", help="greedy answer to the fixed smoke question")
    p_smoke.add_argument("name", nargs="?", default="smollm2-135m-instruct", help="alias or model directory")
    _add_quantize(sub.add_parser("quantize", help=QUANTIZE_HELP, description=QUANTIZE_DESCRIPTION))
    p_path = sub.add_parser("path", help="print the directory of an alias or model directory")
    p_path.add_argument("name", nargs="?", default="smollm2-135m-instruct")
    args = parser.parse_args(argv)
    invalid = (ModelNotFoundError, ExportError, DataError, ToolEnvError)
    return run_cli("badit-model", lambda: _command(args), invalid=invalid)


QUANTIZE_HELP = "a compressed-tensors copy of a base (llm-compressor) that its Badit adapters serve over"
QUANTIZE_DESCRIPTION = (
    "Quantise BASE into OUT with llm-compressor (GPTQ; fp8: round to nearest), calibrated on SuperNI training instances; OUT "
    "records the full-precision base's fingerprint, so adapters trained on BASE serve over it (badit-serve "
    "OUT --adapter NAME=DIR). Schemes: " + "; ".join(f"{k}: {v.description}" for k, v in SCHEMES.items())
)


def _add_quantize(p: argparse.ArgumentParser) -> None:
    p.add_argument("base", help="alias or full-precision model directory")
    p.add_argument("out", type=Path, help="the quantised base directory to write")
    p.add_argument("--scheme", required=True, choices=sorted(SCHEMES))
    p.add_argument("--samples", type=int, default=256, help="calibration samples (default 256)")
    p.add_argument("--max-length", type=int, default=384, help="tokens per sample at most (default 384)")
    p.add_argument("--tasks", help="comma-separated SuperNI tasks to calibrate on (default: all)")
    p.add_argument("--data", type=Path, help="SuperNI directory (default $BADIT_SUPERNI_DIR)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")


def _command(args: argparse.Namespace) -> None:
    if args.command == "prepare":
        print(f"preparing {args.name} (dequantise GGUF, pin eos, smoke check) ...", file=sys.stderr)
        print(prepare(args.name, force=args.force))
    elif args.command == "quantize":
        _quantize(args)
    elif args.command == "smoke":
        print(smoke_answer(resolve_model(args.name)))
    else:
        print(resolve_model(args.name, prepare_if_missing=False))


def _quantize(args: argparse.Namespace) -> None:
    base = resolve_model(args.base)
    tasks = args.tasks.split(",") if args.tasks else None
    data = args.data or superni_dir_from_env()
    tokenizer = AutoTokenizer.from_pretrained(base)
    calibration = superni_calibration(tokenizer, data, args.samples, args.max_length, tasks)
    print(
        f"quantising {base} ({args.scheme}: {SCHEMES[args.scheme].description}) with llm-compressor; calibration: "
        f"{len(calibration.rows)} SuperNI training samples, {calibration.tokens} tokens, "
        f"{len(calibration.tasks)} task(s) ...",
        file=sys.stderr,
    )
    info = quantize_base(base, args.out, args.scheme, calibration, force=args.force)
    print(f"{args.out}: {info.scheme} base of {base} (fingerprint {info.source_fingerprint[:12]}...)")


if __name__ == "__main__":
    sys.exit(main())
