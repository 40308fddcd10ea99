"""A whole run: stages by mode (mixed / sequential / single), evaluation after each, scores and report."""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from badit_serve.core.atomic import atomic_write_text
from training.adapters import apply_adapters
from training.checkpoint import (
    TrainingState,
    latest_checkpoint,
    load_checkpoint,
    restore_training_state,
    save_checkpoint,
)
from training.config import RunConfig, dump_config, load_config
from training.data import Task, encode_eval_prompts, encode_train, load_tasks
from training.distributed import barrier, init_from_env
from training.eval import DEFAULT_CONVENTION, TaskScore, continual_metrics, evaluate_tasks, mixed_forward
from training.export import measure_task_shares
from training.hooks import TrainerHook, config_hooks
from training.metrics_log import MetricsLog
from training.model_store import resolve_model
from training.progress import RunProgress, StageRow, TaskResult
from training.report import write_report
from training.run_dir import RunDir
from training.trainer import Stage, StageTrainer, train_stage

NAMED_ORDERS = {
    "order1": [1572, 363, 1290, 181, 2, 1510, 639, 1729, 73, 1590, 748, 511, 591, 1687, 875],
    "order2": [748, 73, 1590, 639, 1572, 1687, 591, 363, 1510, 1729, 181, 511, 2, 1290, 875],
}
"""Task orders of the SuperNI README (SAPT and GainLoRA scripts), by task number."""


def _check_branches(cfg: RunConfig, num_stages: int) -> None:
    """Per-task-branch methods (o-lora, gainlora) need a branch for every sequential stage."""
    needed = num_stages if cfg.train.mode == "sequential" else 1
    if cfg.adapter.resolved().branching is not None and cfg.adapter.branches.count < needed:
        raise RunError(
            f"adapter.method={cfg.adapter.method!r} trains one branch per task: adapter.branches.count="
            f"{cfg.adapter.branches.count} is less than the {needed} sequential stages"
        )


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


def build_model(
    cfg: RunConfig,
    model_dir: Path,
    device: torch.device,
    stored_state: Mapping[str, torch.Tensor] | None = None,
) -> torch.nn.Module:
    """The base model with the run's adapters; `stored_state` (a checkpoint's adapter state) spares the
    SVD of every delta-form layer (see `apply_adapters`)."""
    dtype = torch.bfloat16 if cfg.model.dtype == "bfloat16" else torch.float32
    # transformers' @wraps(nn.Module.to) on PreTrainedModel.to hides the bound self from mypy
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)  # type: ignore[arg-type]
    return apply_adapters(model, cfg.adapter, seed=cfg.train.seed, stored_state=stored_state)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def prepare_run_dir(cfg: RunConfig, run: RunDir, resume: bool, force: bool) -> TrainingState | None:
    """Create (or reuse) the run directory; returns the checkpoint state to resume from, if any."""
    if resume:
        checkpoint = latest_checkpoint(run)
        if checkpoint is None:
            raise RunError(f"{run.path}: nothing to resume (no complete checkpoint)")
        return load_checkpoint(checkpoint)
    if run.path.exists() and any(run.path.iterdir()):
        if not force:
            raise RunError(
                f"{run.path}: already holds a run (use --resume to continue it or --force to replace it)"
            )
        for child in run.path.iterdir():
            if child.is_dir():
                shutil.rmtree(child)
            else:
                child.unlink()
    run.path.mkdir(parents=True, exist_ok=True)
    run.config.write_text(dump_config(cfg))
    return None


@dataclass(frozen=True)
class PlannedStage:
    """One stage of the run: its name and the tasks it trains on."""

    name: str
    tasks: list[Task]


class RunRecipe:
    """A whole run: `setup` (run directory, model, data, stages), `train` (each stage, evaluated and
    checkpointed), `cleanup` (scores, expert shares, report). `run()` calls the three."""

    def __init__(
        self, cfg: RunConfig, run: RunDir, *, hooks: Sequence[TrainerHook] = (), show_progress: bool = True
    ):
        self.cfg, self.run, self.extra_hooks, self.show_progress = cfg, run, list(hooks), show_progress
        self.world = init_from_env()

    def setup(self, resume: bool, force: bool) -> None:
        cfg, world = self.cfg, self.world
        single_run = cfg.eval.single_run
        self.single_scores = _single_scores(single_run) if single_run else None  # fail before training
        if resume and self.run.is_run():
            cfg = self.cfg = load_config(self.run.config)
        state = prepare_run_dir(cfg, self.run, resume, force) if world.is_main or resume else None
        barrier(world)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        _seed_everything(cfg.train.seed)
        self.model_dir = resolve_model(cfg.model.name_or_path)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        tasks = load_tasks(cfg.data)
        mode = cfg.train.mode
        self.ordered = tasks if mode == "mixed" else order_tasks(tasks, cfg.train.task_order, cfg.train.seed)
        self.stages = (
            [PlannedStage("mixed", self.ordered)]
            if mode == "mixed"
            else [PlannedStage(t.name, [t]) for t in self.ordered]
        )
        _check_branches(cfg, len(self.stages))
        self.resume_state = state
        progress = state.progress if state else RunProgress()
        self.progress = dataclasses.replace(progress, order=tuple(t.name for t in self.ordered))
        self.log = MetricsLog(self.run.metrics)
        self.hooks = config_hooks(cfg.adapter) + self.extra_hooks  # one set for the whole run
        self.model = build_model(cfg, self.model_dir, self.device)

    def _stage_start(self, index: int) -> Stage:
        """The model ready for stage `index` and where the stage starts (a checkpoint is used once)."""
        resume_state, self.resume_state = self.resume_state, None
        if self.cfg.train.mode == "single" and resume_state is None:
            self.model = build_model(self.cfg, self.model_dir, self.device)  # each task from fresh adapters
        if resume_state is not None and self.progress.stage_step == 0:  # stage boundary: adapters only
            restore_training_state(resume_state, self.model)
            resume_state = None
        return Stage(index, self.stages[index].name, self.progress, resume_state)

    def train(self) -> None:
        d = self.cfg.data
        for index, planned in enumerate(self.stages):
            if index < self.progress.stage:
                continue
            stage = self._stage_start(index)
            examples = [
                encode_train(self.tokenizer, task, inst, d) for task in planned.tasks for inst in task.train
            ]
            trainer = StageTrainer(
                self.model,
                examples,
                run=self.run,
                world=self.world,
                pad_id=self.tokenizer.pad_token_id,
                hooks=self.hooks,
                aux_loss_coef=self.cfg.adapter.aux_loss_coef,
                show_progress=self.show_progress,
            )
            result = train_stage(trainer, stage, self.cfg.train, self.cfg.output)
            row = self.evaluate(stage, planned, result.global_step)
            self.progress = self.progress.after_stage(row)
            if self.world.is_main:
                self.log.write({"event": "eval", **dataclasses.asdict(row)})
                save_checkpoint(
                    self.run,
                    model=self.model,
                    optimizer=result.optimizer,
                    scheduler=result.scheduler,
                    progress=self.progress,
                )
            barrier(self.world)

    def evaluate(self, stage: Stage, planned: PlannedStage, global_step: int) -> StageRow:
        """Greedy evaluation (rank 0) of the stage's tasks (single mode) or of every task."""
        if not (self.cfg.eval.enabled and self.world.is_main):
            return StageRow(stage.index, stage.name, global_step)
        eval_tasks = planned.tasks if self.cfg.train.mode == "single" else self.ordered
        d = self.cfg.data
        scores = evaluate_tasks(
            self.model,
            self.tokenizer,
            eval_tasks,
            d.prompt_format,
            d.max_length,
            self.cfg.eval,
            progress=self.show_progress,
        )
        _write_predictions(self.run, stage.index, scores)
        results = {name: TaskResult(s.rouge_l, s.exact_match, s.count) for name, s in scores.items()}
        return StageRow(stage.index, stage.name, global_step, results)

    def cleanup(self) -> dict[str, Any]:
        """scores.json, expert_shares.json and report.md (rank 0); returns the scores."""
        if not self.world.is_main:
            return {}
        cfg, order = self.cfg, [t.name for t in self.ordered]
        results = summarize_scores(cfg.train.mode, order, list(self.progress.rows), self.single_scores)
        _write_json(self.run.scores, results)
        mean_shares = None
        if cfg.eval.enabled and cfg.train.mode != "single":
            d = cfg.data
            prompts = encode_eval_prompts(
                self.tokenizer, self.ordered, d.prompt_format, d.max_length, cfg.eval.max_new_tokens
            )
            shares = measure_task_shares(self.model, prompts)
            _write_json(self.run.shares, shares)
            mean_shares = mean_over_layers(shares)
        write_report(self.run, results, mean_shares)
        return results


def run(
    cfg: RunConfig,
    run_dir: Path | None = None,
    *,
    resume: bool = False,
    force: bool = False,
    show_progress: bool = True,
    hooks: Sequence[TrainerHook] = (),
) -> dict[str, Any]:
    """Train and evaluate per `cfg`; returns the scores dict also written to scores.json. `hooks` are
    added to those the config installs (e.g. tests interrupt a run with one)."""
    recipe = RunRecipe(cfg, RunDir.at(run_dir or cfg.output.dir), hooks=hooks, show_progress=show_progress)
    recipe.setup(resume, force)
    recipe.train()
    return recipe.cleanup()


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
    path = RunDir.at(single_run).scores
    if not path.is_file():
        raise RunError(f"{path}: eval.single_run has no scores.json")
    data = json.loads(path.read_text())
    if data.get("mode") != "single":
        raise RunError(f"{path}: eval.single_run is a {data.get('mode')!r} run, not 'single'")
    return {task: s["rouge_l"] for task, s in data["final"].items()}


def _write_predictions(run: RunDir, stage: int, scores: dict[str, TaskScore]) -> None:
    path = run.predictions(stage)
    path.parent.mkdir(exist_ok=True)
    with path.open("w") as handle:
        for task, score in scores.items():
            for instance_id, prediction in zip(score.ids, score.predictions, strict=True):
                handle.write(json.dumps({"task": task, "id": instance_id, "prediction": prediction}) + "\n")


def _write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(data, indent=2))


def summarize_scores(
    mode: str, order: list[str], rows: list[StageRow], single: dict[str, float] | None = None
) -> dict[str, Any]:
    """scores.json: matrix a[j][i] (Rouge-L of task i after stage j), final per-task scores, CL metrics."""
    matrix = [[row.scores[t].rouge_l if t in row.scores else None for t in order] for row in rows]
    final: dict[str, dict[str, float]] = {}
    for row in rows:  # the last evaluation of each task
        final.update({task: dataclasses.asdict(result) for task, result in row.scores.items()})
    results: dict[str, Any] = {"mode": mode, "tasks": order, "matrix": matrix, "final": final}
    rouge = [final[t]["rouge_l"] for t in order if t in final]
    results["rouge_l"] = sum(rouge) / len(rouge) if rouge else None
    em = [final[t]["exact_match"] for t in order if t in final]
    results["exact_match"] = sum(em) / len(em) if em else None
    if mode == "sequential" and len(rows) == len(order) and all(None not in r for r in matrix):
        complete = [
            [v for v in r if v is not None] for r in matrix
        ]  # the same matrix: no None (checked above)
        results["continual"] = continual_metrics(complete, [single[t] for t in order] if single else None)
        results["metric_convention"] = DEFAULT_CONVENTION
    elif mode == "mixed" and single and rouge:
        results["continual"] = {
            "forward": mixed_forward([final[t]["rouge_l"] for t in order], [single[t] for t in order])
        }
    return results
