"""Tiny random causal LMs (2 layers, hidden 128, 2 heads of dim 64) built offline from configs.

head_dim is 64 because vLLM's CPU attention rejects smaller heads. The tokenizer is the default model's
(prepared offline), so prompts, chat template and eos behave as in real runs.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

FAMILIES = ("llama", "qwen3", "gemma2")

_COMMON = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=64,
    max_position_embeddings=2048,
)
_FAMILY_OVERRIDES: dict[str, dict] = {
    "llama": dict(tie_word_embeddings=True, rope_theta=100000.0),
    "qwen3": dict(tie_word_embeddings=True),
    "gemma2": dict(tie_word_embeddings=True, query_pre_attn_scalar=64, sliding_window=512),
}


def tiny_config(family: str, vocab_size: int, bos: int, eos: int, pad: int):
    """A 2-layer config of `family` with the given vocabulary and special tokens."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; known: {FAMILIES}")
    kwargs = {**_COMMON, **_FAMILY_OVERRIDES[family]}
    return AutoConfig.for_model(
        family, vocab_size=vocab_size, bos_token_id=bos, eos_token_id=eos, pad_token_id=pad, **kwargs
    )


def build_tiny_model(family: str, tokenizer_dir: Path, out_dir: Path, seed: int = 0) -> Path:
    """Save a random tiny `family` model with the tokenizer of `tokenizer_dir` as an HF directory."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = tiny_config(
        family, len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Random init with std 0.02 gives near-uniform logits; a larger scale makes greedy decoding decisive,
    # so parity tests compare real token choices rather than ties.
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0.0, 0.08)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
