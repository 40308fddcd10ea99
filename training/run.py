"""A whole run: stages by mode (mixed / sequential / single), evaluation after each, scores and report."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from badit_serve.atomic import atomic_write_text
from training.adapters import apply_adapters
from training.checkpoint import latest_checkpoint, load_checkpoint, restore_training_state, save_checkpoint
from training.config import RunConfig, dump_config, load_config
from training.data import Task, encode_eval_prompts, encode_train, load_tasks
from training.distributed import barrier, init_from_env
from training.eval import continual_metrics, evaluate_tasks, mixed_forward
from training.export import measure_task_shares
from training.model_store import resolve_model
from training.report import write_report
from training.trainer import MetricsLog, StageContext, train_stage

CONFIG_FILE = "config.yaml"
SCORES_FILE = "scores.json"
METRICS_FILE = "metrics.jsonl"
SHARES_FILE = "expert_shares.json"

NAMED_ORDERS = {
    "order1": [1572, 363, 1290, 181, 2, 1510, 639, 1729, 73, 1590, 748, 511, 591, 1687, 875],
    "order2": [748, 73, 1590, 639, 1572, 1687, 591, 363, 1510, 1729, 181, 511, 2, 1290, 875],
}
"""Task orders of the SuperNI README (SAPT and GainLoRA scripts), by task number."""


class RunError(RuntimeError):
    """A run that cannot start (e.g. a run directory with results and no --force)."""


def _task_number(name: str) -> int:
    return int(name.split("_", 1)[0].removeprefix("task"))


def order_tasks(tasks: list[Task], order: list[str] | str | None, seed: int) -> list[Task]:
    """Tasks in training order: a list of names, 'order1'/'order2', or a seeded shuffle when None."""
    by_name = {t.name: t for t in tasks}
    if order is None:
        shuffled = list(tasks)
        random.Random(seed).shuffle(shuffled)
        return shuffled
    if isinstance(order, str):
        by_number = {_task_number(t.name): t for t in tasks}
        return [by_number[n] for n in NAMED_ORDERS[order] if n in by_number]
    unknown = [name for name in order if name not in by_name]
    if unknown:
        raise RunError(f"train.task_order names unknown task(s) {unknown}; loaded: {sorted(by_name)}")
    return [by_name[name] for name in order]


def build_model(cfg: RunConfig, model_dir: Path, device: torch.device) -> torch.nn.Module:
    dtype = torch.bfloat16 if cfg.model.dtype == "bfloat16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)
    return apply_adapters(model, cfg.adapter, seed=cfg.train.seed)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def prepare_run_dir(cfg: RunConfig, run_dir: Path, resume: bool, force: bool) -> dict[str, Any] | None:
    """Create (or reuse) the run directory; returns the checkpoint state to resume from, if any."""
    if resume:
        checkpoint = latest_checkpoint(run_dir)
        if checkpoint is None:
            raise RunError(f"{run_dir}: nothing to resume (no complete checkpoint)")
        return load_checkpoint(checkpoint)
    if run_dir.exists() and any(run_dir.iterdir()):
        if not force:
            raise RunError(
                f"{run_dir}: already holds a run (use --resume to continue it or --force to replace it)"
            )
        for child in run_dir.iterdir():
            if child.is_dir():
                shutil.rmtree(child)
            else:
                child.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / CONFIG_FILE).write_text(dump_config(cfg))
    return None


def run(
    cfg: RunConfig,
    run_dir: Path | None = None,
    *,
    resume: bool = False,
    force: bool = False,
    show_progress: bool = True,
    interrupt_at: int | None = None,
) -> dict[str, Any]:
    """Train and evaluate per `cfg`; returns the scores dict also written to scores.json."""
    run_dir = Path(run_dir or cfg.output.dir)
    world = init_from_env()
    single_scores = (
        _single_scores(cfg.eval.single_run) if cfg.eval.single_run else None
    )  # fail before training
    if resume and (run_dir / CONFIG_FILE).is_file():
        cfg = load_config(run_dir / CONFIG_FILE)
    if world.is_main or resume:
        state = prepare_run_dir(cfg, run_dir, resume, force)
    barrier(world)
    if not world.is_main and not resume:
        state = None
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    _seed_everything(cfg.train.seed)
    model_dir = resolve_model(cfg.model.name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tasks = load_tasks(cfg.data)
    mode = cfg.train.mode
    ordered = tasks if mode == "mixed" else order_tasks(tasks, cfg.train.task_order, cfg.train.seed)
    stages = [("mixed", ordered)] if mode == "mixed" else [(t.name, [t]) for t in ordered]
    log = MetricsLog(run_dir / METRICS_FILE)
    progress = state["progress"] if state else {"stage": 0, "stage_step": 0, "global_step": 0, "rows": []}
    rows: list[dict[str, Any]] = progress["rows"]
    model = build_model(cfg, model_dir, device)
    d = cfg.data
    for stage, (stage_name, stage_tasks) in enumerate(stages):
        if stage < progress["stage"]:
            continue
        resume_state = state if state is not None and stage == progress["stage"] else None
        if mode == "single" and resume_state is None:
            model = build_model(cfg, model_dir, device)  # each task from the same fresh adapters
        if resume_state is not None and progress["stage_step"] == 0:  # stage boundary: adapters only
            restore_training_state(resume_state, model)
            resume_state = None
        examples = [
            encode_train(
                tokenizer, task, inst, d.prompt_format, d.max_length, d.max_target_tokens, d.reference_seed
            )
            for task in stage_tasks
            for inst in task.train
        ]
        ctx = StageContext(
            cfg=cfg,
            run_dir=run_dir,
            log=log,
            stage=stage,
            stage_name=stage_name,
            pad_id=tokenizer.pad_token_id,
            global_step=progress["global_step"] - (progress["stage_step"] if resume_state else 0),
            progress_extra={"rows": rows, "order": [t.name for t in ordered]},
            resume_state=resume_state,
            show_progress=show_progress,
            interrupt_at=interrupt_at,
            world=world,
        )
        result = train_stage(model, examples, ctx)
        eval_tasks = stage_tasks if mode == "single" else ordered
        row: dict[str, Any] = {
            "stage": stage,
            "stage_name": stage_name,
            "step": result.global_step,
            "scores": {},
        }
        if cfg.eval.enabled and world.is_main:
            scores = evaluate_tasks(
                model, tokenizer, eval_tasks, d.prompt_format, d.max_length, cfg.eval, progress=show_progress
            )
            row["scores"] = {
                name: {"rouge_l": s.rouge_l, "exact_match": s.exact_match, "count": s.count}
                for name, s in scores.items()
            }
            _write_predictions(run_dir, stage, scores)
        rows.append(row)
        progress = {
            "stage": stage + 1,
            "stage_step": 0,
            "global_step": result.global_step,
            "rows": rows,
            "order": [t.name for t in ordered],
        }
        if world.is_main:
            log.write({"event": "eval", **row})
            save_checkpoint(
                run_dir,
                model=model,
                optimizer=result.optimizer,
                scheduler=result.scheduler,
                progress=progress,
            )
        barrier(world)
    if not world.is_main:
        return {}
    results = summarize_scores(mode, [t.name for t in ordered], rows, single_scores)
    _write_json(run_dir / SCORES_FILE, results)
    mean_shares = None
    if cfg.eval.enabled and mode != "single":
        prompts = encode_eval_prompts(
            tokenizer, ordered, d.prompt_format, d.max_length, cfg.eval.max_new_tokens
        )
        shares = measure_task_shares(model, prompts)
        _write_json(run_dir / SHARES_FILE, shares)
        mean_shares = mean_over_layers(shares)
    write_report(run_dir, results, mean_shares)
    return results


def mean_over_layers(shares: dict[str, dict[str, list[float]]]) -> dict[str, list[float]]:
    """task -> per-expert share averaged over adapted layers."""
    layers = list(shares.values())
    return (
        {
            task: [sum(layer[task][e] for layer in layers) / len(layers) for e in range(len(layers[0][task]))]
            for task in layers[0]
        }
        if layers
        else {}
    )


def _single_scores(single_run: Path) -> dict[str, float]:
    """Per-task Rouge-L of a `single`-mode run (the forward-transfer reference)."""
    path = Path(single_run) / SCORES_FILE
    if not path.is_file():
        raise RunError(f"{path}: eval.single_run has no scores.json")
    data = json.loads(path.read_text())
    if data.get("mode") != "single":
        raise RunError(f"{path}: eval.single_run is a {data.get('mode')!r} run, not 'single'")
    return {task: s["rouge_l"] for task, s in data["final"].items()}


def _write_predictions(run_dir: Path, stage: int, scores: dict) -> None:
    out = run_dir / "predictions"
    out.mkdir(exist_ok=True)
    with (out / f"stage-{stage:02d}.jsonl").open("w") as handle:
        for task, score in scores.items():
            for instance_id, prediction in zip(score.ids, score.predictions, strict=True):
                handle.write(json.dumps({"task": task, "id": instance_id, "prediction": prediction}) + "\n")


def _write_json(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=2))


def summarize_scores(
    mode: str, order: list[str], rows: list[dict[str, Any]], single: dict[str, float] | None = None
) -> dict[str, Any]:
    """scores.json: matrix a[j][i] (Rouge-L of task i after stage j), final per-task scores, CL metrics."""
    matrix = [[row["scores"].get(task, {}).get("rouge_l") for task in order] for row in rows]
    final: dict[str, dict[str, float]] = {}
    for row in rows:  # the last evaluation of each task
        final.update(row["scores"])
    results: dict[str, Any] = {"mode": mode, "tasks": order, "matrix": matrix, "final": final}
    rouge = [final[t]["rouge_l"] for t in order if t in final]
    results["rouge_l"] = sum(rouge) / len(rouge) if rouge else None
    em = [final[t]["exact_match"] for t in order if t in final]
    results["exact_match"] = sum(em) / len(em) if em else None
    if mode == "sequential" and len(rows) == len(order) and all(None not in r for r in matrix):
        results["continual"] = continual_metrics(matrix, [single[t] for t in order] if single else None)
    elif mode == "mixed" and single and rouge:
        results["continual"] = {
            "forward": mixed_forward([final[t]["rouge_l"] for t in order], [single[t] for t in order])
        }
    return results
