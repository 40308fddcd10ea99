"""Quantise a transformers base model with llm-compressor: the part of `badit-model quantize` that runs in
llm-compressor's own environment (see `training.quantize.tool_env`).

It runs as a separate process under that environment's Python, so it imports nothing of Badit: its inputs
are a model directory, a scheme name, and a JSONL file of calibration token ids prepared by the parent
(one `{"input_ids": [...]}` per line); it writes a compressed-tensors model directory (config.json with
`quantization_config`, safetensors, tokenizer) and prints one JSON line describing what it did.

GPTQ for the integer schemes and round-to-nearest for fp8; no SmoothQuant or AWQ: those fold per-channel
scales into the RMSNorm that feeds the MLP, so the hidden state the adapter's router and experts read would
no longer be the one they were trained on.

    python llmc_worker.py --model BASE --out DIR --scheme w8a8 --calibration calib.jsonl --max-seq-length 384
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

# Weight-only group size for the 4-bit scheme: divides every projection's input size of the default model
# (576 and 1536; llm-compressor refuses a group that does not divide the columns) and the tiny test models'.
W4_GROUP_SIZE = 64


def recipe(scheme: str) -> list[Any]:
    """The llm-compressor modifiers of `scheme`: every Linear of the decoder but the LM head."""
    from llmcompressor.modifiers.quantization import GPTQModifier

    if scheme == "w8a8":  # int8 per-channel weights, int8 dynamic per-token activations
        return [GPTQModifier(targets="Linear", scheme="W8A8", ignore=["lm_head"])]
    if scheme == "w4a16":  # int4 symmetric weights in groups, activations in the model dtype
        weights = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group"}
        groups = {"group_0": {"targets": ["Linear"], "weights": {**weights, "group_size": W4_GROUP_SIZE}}}
        return [GPTQModifier(config_groups=groups, ignore=["lm_head"])]
    if scheme == "fp8":  # e4m3 per-channel weights, dynamic per-token activations: no calibration used
        from llmcompressor.modifiers.quantization import QuantizationModifier

        return [QuantizationModifier(targets="Linear", scheme="FP8_DYNAMIC", ignore=["lm_head"])]
    raise SystemExit(f"unknown scheme {scheme!r} (w8a8, w4a16, fp8)")


def read_calibration(path: Path) -> list[list[int]]:
    rows = [json.loads(line)["input_ids"] for line in path.read_text().splitlines() if line.strip()]
    if not rows:
        raise SystemExit(f"{path}: no calibration samples")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--scheme", required=True)
    parser.add_argument("--calibration", type=Path, required=True)
    parser.add_argument("--max-seq-length", type=int, required=True)
    args = parser.parse_args(argv)

    import llmcompressor
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows = read_calibration(args.calibration)
    dataset = Dataset.from_list([{"input_ids": ids, "attention_mask": [1] * len(ids)} for ids in rows])
    # float32: GPTQ's Hessians and the calibration forward passes at full precision on any CPU.
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    modifiers = recipe(args.scheme)
    oneshot(
        model=model,
        dataset=dataset,
        recipe=modifiers,
        max_seq_length=args.max_seq_length,
        num_calibration_samples=len(rows),
        shuffle_calibration_samples=False,
    )
    model.save_pretrained(args.out, save_compressed=True)
    tokenizer.save_pretrained(args.out)
    done = {
        "llmcompressor": llmcompressor.__version__,
        "recipe": [type(m).__name__ for m in modifiers],
        "samples": len(rows),
        "tokens": sum(map(len, rows)),
    }
    print(json.dumps(done))
    return 0


if __name__ == "__main__":
    sys.exit(main())
