"""Small trained Badit exports of the tiny models, for the vLLM parity and serving tests."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from training.adapters import (
    AdapterConfig,
    accumulate_dog_signal,
    apply_adapters,
    regroup,
    trainable_parameters,
)
from training.export import export_adapter, export_model, measure_task_shares

LABEL_TASKS = {
    "task001_alpha": [[5, 6, 7, 8, 9, 10]],
    "task002_beta": [[300, 301, 302], [4000, 4001, 4002, 4003]],
}


def trained_model(model_dir: Path, method: str = "badit", steps: int = 3, seed: int = 0) -> torch.nn.Module:
    """Adapt the tiny model at `model_dir`, train a few steps (so experts and routers are non-trivial) and
    regroup once; returned in eval mode. `seed` also picks the training data."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    apply_adapters(model, AdapterConfig(method=method, rank=4, dropout=0.0), seed=seed)
    optimizer = torch.optim.AdamW(trainable_parameters(model), lr=1e-2)
    model.train()
    for step in range(steps):
        ids = torch.randint(3, 1000, (2, 12), generator=torch.Generator().manual_seed(step + 1000 * seed))
        model(input_ids=ids, labels=ids).loss.backward()
        accumulate_dog_signal(model)
        optimizer.step()
        optimizer.zero_grad()
    regroup(model, optimizer)
    return model.eval()


def make_export(
    model_dir: Path,
    out_dir: Path,
    method: str = "badit",
    steps: int = 3,
    seed: int = 0,
    labelled: bool = False,
) -> Path:
    """`trained_model` exported to `out_dir` (with ability labels measured on two toy tasks if `labelled`)."""
    model = trained_model(model_dir, method, steps, seed)
    shares = measure_task_shares(model, LABEL_TASKS) if labelled else None
    return export_model(model, model_dir, out_dir, task_shares=shares)


def make_adapter(
    model_dir: Path, out_dir: Path, method: str = "badit", steps: int = 3, seed: int = 0
) -> Path:
    """`trained_model` written as an adapter-only directory over the base `model_dir`."""
    return export_adapter(trained_model(model_dir, method, steps, seed), model_dir, out_dir)


@torch.no_grad()
def reference_scores(
    model: torch.nn.Module, prompt: list[int], tokens: list[int]
) -> tuple[list[float], list[float]]:
    """Teacher-forced on `tokens`: the best logprob at each step and the logprob of the given token."""
    ids = torch.tensor([prompt + tokens])  # (1, P + N)
    logprobs = torch.log_softmax(model(ids).logits[0, len(prompt) - 1 : -1].float(), dim=-1)  # (N, V)
    chosen = logprobs.gather(-1, torch.tensor(tokens)[:, None])[:, 0]  # (N,)
    return logprobs.max(dim=-1).values.tolist(), chosen.tolist()


@torch.no_grad()
def greedy_tokens(model: torch.nn.Module, prompt: list[int], max_tokens: int) -> list[int]:
    """The reference's greedy continuation of `prompt`: exactly `max_tokens` tokens (no stop at eos)."""
    out = model.generate(
        torch.tensor([prompt]), max_new_tokens=max_tokens, do_sample=False, eos_token_id=None
    )
    return out[0, len(prompt) :].tolist()
