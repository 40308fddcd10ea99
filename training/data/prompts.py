"""Turn instances into token ids: prompts for generation, prompt + masked response for training.

Prompt formats:
  chat: the tokenizer's chat template with one user turn `definition + "\\n\\n" + input` and the generation
        prompt (SmolLM2 adds its default system turn), exactly what vLLM's OpenAI chat endpoint serves.
  raw:  `"Definition: {definition}\\n\\nNow complete the following example -\\nInput: {input}\\nOutput: "`.

Training sequence = prompt ids + response ids, response = the chosen reference's ids + [eos] (the model
learns to stop with `<|im_end|>`); labels are -100 on every prompt position. With several references one is
picked by `random.Random(f"{reference_seed}:{instance.id}")`: stable and independent of data order.

Truncation policy (to fit `max_length` tokens):
  1. the answer keeps its first `max_target_tokens - 1` tokens, then eos (so at most max_target_tokens);
  2. the definition and the prompt scaffolding (template, system turn, labels) are never cut;
  3. if prompt + response is still longer than max_length, the END of the instance input is cut at token
     granularity: the input is tokenized alone, its first n tokens are kept (as the original text up to the
     end of token n, so no decode artefacts; a character split over several byte tokens is kept or cut
     whole), the prompt is rebuilt and re-tokenized, and n is lowered until it fits (the first n is the
     direct estimate, usually exact); `truncated_input_tokens` records how many input tokens were dropped;
  4. if even an empty input does not fit, `DataError` names the task, the instance and the lengths.
Evaluation prompts follow the same rule with `max_new_tokens` reserved in place of the response.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from transformers import PreTrainedTokenizerBase

from training.config import DataConfig
from training.data.superni import DataError, Instance, Task
from training.loss import IGNORE_INDEX

PromptFormat = Literal["chat", "raw"]


@dataclass
class TrainExample:
    """One tokenized training sequence."""

    task: str
    id: str
    input_ids: list[int]
    """(T,) prompt ids then response ids, T <= max_length."""
    labels: list[int]
    """(T,) -100 on prompt positions, the token ids on response positions."""
    reference_index: int
    """Which of the instance's references was trained on."""
    truncated_input_tokens: int
    """Input tokens cut from the end of the instance input to fit max_length (0: none)."""


def chat_user_turn(definition: str, input: str) -> str:
    """The one user turn of the chat format (what a client of the served model sends for an instance)."""
    return definition + "\n\n" + input


def build_prompt(tokenizer: PreTrainedTokenizerBase, definition: str, input: str, fmt: PromptFormat) -> str:
    """The prompt text of one instance in format `fmt`."""
    if fmt == "chat":
        messages = [{"role": "user", "content": chat_user_turn(definition, input)}]
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert isinstance(prompt, str)  # tokenize=False: the rendered text
        return prompt
    if fmt == "raw":
        return f"Definition: {definition}\n\nNow complete the following example -\nInput: {input}\nOutput: "
    raise ValueError(f"unknown prompt format {fmt!r} (expected 'chat' or 'raw')")


def encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Token ids of `text` with no special tokens added (the chat template already holds them)."""
    ids: list[int] = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids


def choose_reference(instance: Instance, reference_seed: int) -> int:
    """Index of the training reference: seeded by (seed, instance id), so stable under any data order."""
    if len(instance.references) == 1:
        return 0
    return random.Random(f"{reference_seed}:{instance.id}").randrange(len(instance.references))


def encode_train(
    tokenizer: PreTrainedTokenizerBase, task: Task, instance: Instance, data: DataConfig
) -> TrainExample:
    """Prompt + response ids and labels of one instance, truncated by the module's policy; `data` gives
    the prompt format, max_length, max_target_tokens and the reference seed."""
    eos = _eos_id(tokenizer)
    index = choose_reference(instance, data.reference_seed)
    response = encode(tokenizer, instance.references[index])[: data.max_target_tokens - 1] + [eos]  # (R,)
    fmt, budget = data.prompt_format, len(response)
    prompt, cut = _fit_prompt(tokenizer, task, instance, fmt, data.max_length, budget, "response")  # (P,)
    return TrainExample(
        task=task.name,
        id=instance.id,
        input_ids=prompt + response,
        labels=[IGNORE_INDEX] * len(prompt) + response,
        reference_index=index,
        truncated_input_tokens=cut,
    )


def encode_eval_prompt(
    tokenizer: PreTrainedTokenizerBase,
    task: Task,
    instance: Instance,
    fmt: PromptFormat,
    max_length: int,
    max_new_tokens: int,
) -> list[int]:
    """Prompt ids for greedy generation, input cut so that prompt + max_new_tokens <= max_length."""
    return _fit_prompt(tokenizer, task, instance, fmt, max_length, max_new_tokens, "max_new_tokens")[0]


def encode_eval_prompts(
    tokenizer: PreTrainedTokenizerBase,
    tasks: Sequence[Task],
    fmt: PromptFormat,
    max_length: int,
    max_new_tokens: int,
) -> dict[str, list[list[int]]]:
    """Task name -> the prompt ids of each of its test instances (`encode_eval_prompt`), in task order."""
    return {
        task.name: [
            encode_eval_prompt(tokenizer, task, inst, fmt, max_length, max_new_tokens) for inst in task.test
        ]
        for task in tasks
    }


def _eos_id(tokenizer: PreTrainedTokenizerBase) -> int:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("tokenizer has no eos_token_id; a trained model could never stop")
    return int(eos)


def _fit_prompt(
    tokenizer: PreTrainedTokenizerBase,
    task: Task,
    instance: Instance,
    fmt: PromptFormat,
    max_length: int,
    reserved: int,
    reserved_for: str,
) -> tuple[list[int], int]:
    """(prompt ids with len + reserved <= max_length, input tokens cut), cutting the end of the input only."""
    budget = max_length - reserved
    ids = encode(tokenizer, build_prompt(tokenizer, task.definition, instance.input, fmt))
    if len(ids) <= budget:
        return ids, 0
    enc = tokenizer(instance.input, add_special_tokens=False, return_offsets_mapping=True)
    ends = [end for _, end in enc["offset_mapping"]]  # (N,) char end of each input token, non-decreasing
    n_input = len(ends)
    n = n_input - (len(ids) - budget)  # first guess: the prompt shrinks about one token per input token
    while True:
        n = max(n, 0)
        cut_at = ends[n - 1] if n > 0 else 0
        ids = encode(tokenizer, build_prompt(tokenizer, task.definition, instance.input[:cut_at], fmt))
        excess = len(ids) - budget
        if excess <= 0:
            # tokens whose text lies wholly in the kept prefix (a split character keeps all its pieces)
            return ids, n_input - bisect.bisect_right(ends, cut_at)
        if n == 0:
            raise DataError(
                f"task {task.name!r} instance {instance.id!r}: even with the input cut entirely the prompt is "
                f"{len(ids)} tokens + {reserved} for the {reserved_for} > max_length {max_length} "
                "(the definition and the answer are never cut)"
            )
        n -= excess
