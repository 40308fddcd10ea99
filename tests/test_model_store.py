"""The prepared default model: loads in transformers, pins eos <|im_end|>, answers the smoke question."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer, GenerationConfig

from training.model_store import ModelNotFoundError, resolve_model, smoke_answer


def test_default_model_pins_end_of_turn_as_eos(default_model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == 2
    assert GenerationConfig.from_pretrained(default_model_dir).eos_token_id == 2
    config = json.loads((default_model_dir / "config.json").read_text())
    assert config["eos_token_id"] == 2 and "quantization_config" not in config
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], tokenize=False
    )
    assert chat.rstrip().endswith("yo<|im_end|>")


@pytest.mark.slow
def test_default_model_passes_smoke_check(default_model_dir: Path) -> None:
    assert "paris" in smoke_answer(default_model_dir).lower()


def test_model_names_resolve_or_fail_clearly(default_model_dir: Path, tmp_path: Path) -> None:
    assert resolve_model("smollm2-135m-instruct") == default_model_dir
    assert resolve_model(default_model_dir) == default_model_dir
    with pytest.raises(ModelNotFoundError, match="neither a local model directory nor a known alias"):
        resolve_model("no-such-model")
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        resolve_model(tmp_path)
