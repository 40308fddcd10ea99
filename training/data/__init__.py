"""SuperNI data: loading, prompt building and tokenization, batching, statistics."""

from training.data.collate import collate_prompts, collate_train
from training.data.prompts import (
    PromptFormat,
    TrainExample,
    build_prompt,
    choose_reference,
    encode,
    encode_eval_prompt,
    encode_eval_prompts,
    encode_train,
)
from training.data.superni import (
    DataError,
    Instance,
    Task,
    list_tasks,
    load_raw_task,
    load_task,
    load_tasks,
)
from training.loss import IGNORE_INDEX

__all__ = [
    "IGNORE_INDEX",
    "DataError",
    "Instance",
    "PromptFormat",
    "Task",
    "TrainExample",
    "build_prompt",
    "choose_reference",
    "collate_prompts",
    "collate_train",
    "encode",
    "encode_eval_prompt",
    "encode_eval_prompts",
    "encode_train",
    "list_tasks",
    "load_raw_task",
    "load_task",
    "load_tasks",
]
