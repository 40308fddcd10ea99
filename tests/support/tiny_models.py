"""Tiny random causal LMs (2 layers, hidden 128, 2 heads of dim 64) built offline from configs.

head_dim is 64 because vLLM's CPU attention rejects smaller heads. The tokenizer is a tiny byte-level BPE
built here in well under a second (`build_tiny_tokenizer`): the default model's special tokens at the same
ids (<|endoftext|> 0, <|im_start|> 1, <|im_end|> 2 = eos = pad) and its ChatML chat template, so prompts
and eos behave as in real runs without preparing the default model.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedTokenizerFast,
)

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


TINY_VOCAB = 8192
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _corpus() -> list[str]:
    """Deterministic English training text for the BPE, offline: the standard library's help topics."""
    from pydoc_data.topics import topics

    return [topics[key] for key in sorted(topics)]


def build_tiny_tokenizer(out_dir: Path) -> Path:
    """Save a byte-level BPE tokenizer of exactly TINY_VOCAB tokens (tests use ids up to 4003) with
    ChatML special tokens; on English it needs about 1.35x the default tokenizer's tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    missing = TINY_VOCAB - tok.get_vocab_size()
    if missing > 0:  # a fixed vocabulary size whatever the merges found
        tok.add_tokens([f"<|pad_{i}|>" for i in range(missing)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


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
