"""`RunProgress`: where a run stands (stage, step, results so far), saved in every checkpoint."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class TaskResult:
    """One task's evaluation after a stage."""

    rouge_l: float
    exact_match: float
    count: int


@dataclass(frozen=True)
class StageRow:
    """The evaluation after one stage: one row of the accuracy matrix."""

    stage: int
    stage_name: str
    step: int
    """Global optimiser step at the end of the stage."""
    scores: dict[str, TaskResult] = field(default_factory=dict)
    """Task -> result (empty when evaluation is off)."""

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> StageRow:
        scores = {task: TaskResult(**s) for task, s in raw.get("scores", {}).items()}
        return cls(raw["stage"], raw["stage_name"], raw["step"], scores)


@dataclass(frozen=True)
class RunProgress:
    """Stages done, steps done in the current stage, results so far and the task order."""

    stage: int = 0
    """Index of the stage to run (or continue) next."""
    stage_step: int = 0
    """Optimiser steps already done in that stage (0: it starts from its beginning)."""
    global_step: int = 0
    """Optimiser steps done over the whole run."""
    rows: tuple[StageRow, ...] = ()
    order: tuple[str, ...] = ()
    """Task names in training order."""

    def to_dict(self) -> dict[str, Any]:
        """Plain data for the checkpoint file."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> RunProgress:
        return cls(
            stage=raw["stage"],
            stage_step=raw["stage_step"],
            global_step=raw["global_step"],
            rows=tuple(StageRow.from_dict(r) for r in raw.get("rows", ())),
            order=tuple(raw.get("order", ())),
        )

    def at_step(self, stage: int, stage_step: int, global_step: int) -> RunProgress:
        """This progress, mid-stage."""
        return dataclasses.replace(self, stage=stage, stage_step=stage_step, global_step=global_step)

    def after_stage(self, row: StageRow) -> RunProgress:
        """This progress once `row`'s stage has finished and been evaluated."""
        return dataclasses.replace(
            self, stage=row.stage + 1, stage_step=0, global_step=row.step, rows=(*self.rows, row)
        )
