"""Batched greedy generation (left padding, KV cache) and per-task evaluation on SuperNI test sets."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import GenerationMixin, PreTrainedTokenizerBase

from training.config import EvalConfig
from training.data.collate import collate_prompts
from training.data.prompts import PromptFormat, encode_eval_prompts
from training.data.superni import Task
from training.eval.scoring import TaskScore, score_task


def _until_eos(tokens: list[int], eos_token_id: int) -> list[int]:
    """The tokens before the first eos (generate pads finished rows, and the pad may be a normal token)."""
    return tokens[: tokens.index(eos_token_id)] if eos_token_id in tokens else tokens


def generate_predictions(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    batch_size: int,
    eos_token_id: int,
    pad_token_id: int,
    progress: bool = True,
    desc: str = "eval",
) -> list[str]:
    """Greedy continuations of token-id `prompts`, decoded without special tokens and stripped.

    Prompts are batched longest first (similar lengths share a batch, and an out-of-memory shows at once),
    left padded, and decoded with the KV cache until eos or `max_new_tokens`; the results come back in
    the order of `prompts`. The model runs in eval mode under no_grad and gets its previous mode back.
    """
    if max_new_tokens < 1 or batch_size < 1:
        raise ValueError(f"max_new_tokens and batch_size must be >= 1, got {max_new_tokens}, {batch_size}")
    empty = [k for k, p in enumerate(prompts) if len(p) == 0]
    if empty:
        raise ValueError(f"prompt #{empty[0]} is empty; generation needs at least one prompt token")
    order = sorted(range(len(prompts)), key=lambda k: -len(prompts[k]))  # stable: ties keep input order
    predictions: list[str] = [""] * len(prompts)
    assert isinstance(model, GenerationMixin)  # a transformers causal LM
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), tqdm(total=len(prompts), desc=desc, unit="prompt", disable=not progress) as bar:
            for start in range(0, len(order), batch_size):
                rows = order[start : start + batch_size]
                batch = collate_prompts([prompts[k] for k in rows], pad_token_id)
                input_ids = batch["input_ids"].to(device)  # (B, P) left padded
                # transformers types generate's self as its GenerativePreTrainedModel protocol, which a
                # PreTrainedModel with GenerationMixin does not match structurally
                output = model.generate(  # type: ignore[misc]
                    input_ids=input_ids,
                    attention_mask=batch["attention_mask"].to(device),
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    num_beams=1,
                    use_cache=True,
                    eos_token_id=eos_token_id,
                    pad_token_id=pad_token_id,
                )  # (B, P + N), N <= max_new_tokens
                new_tokens = output[:, input_ids.shape[1] :].tolist()  # (B, N)
                for k, tokens in zip(rows, new_tokens, strict=True):
                    text = tokenizer.decode(_until_eos(tokens, eos_token_id), skip_special_tokens=True)
                    assert isinstance(text, str)  # one sequence decodes to one string
                    predictions[k] = text.strip()
                bar.update(len(rows))
    finally:
        model.train(was_training)
    return predictions


def evaluate_tasks(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    tasks: Sequence[Task],
    fmt: PromptFormat,
    max_length: int,
    cfg: EvalConfig,
    progress: bool = True,
) -> dict[str, TaskScore]:
    """Generate for every test instance of `tasks` and score each task (predictions kept in the scores).

    All tasks' prompts are generated together (one length-sorted pass); the result maps task name to its
    `TaskScore`, in the order of `tasks`.
    """
    names = [task.name for task in tasks]
    if len(set(names)) != len(names):
        raise ValueError(f"task names must be unique, got {names}")
    for task in tasks:
        if not task.test:
            raise ValueError(f"task {task.name!r} has no test instances to evaluate")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("tokenizer has no eos_token_id; generation could not stop")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    by_task = encode_eval_prompts(tokenizer, tasks, fmt, max_length, cfg.max_new_tokens)
    prompts = [ids for name in names for ids in by_task[name]]
    predictions = generate_predictions(
        model, tokenizer, prompts, cfg.max_new_tokens, cfg.batch_size, int(eos), int(pad), progress=progress
    )
    scores: dict[str, TaskScore] = {}
    start = 0
    for task in tasks:
        scores[task.name] = score_task(predictions[start : start + len(task.test)], task.test)
        start += len(task.test)
    return scores
