"""`RunDir`: the one owner of a run directory's file names (no other module spells them).

<run>/config.yaml            the resolved config (what --resume reloads)
<run>/metrics.jsonl          one JSON object per step / regroup / eval event
<run>/scores.json            final scores and continual-learning metrics
<run>/expert_shares.json     per module, per task, the share of tokens selecting each expert
<run>/report.md, plots/      the human-readable report
<run>/predictions/stage-NN.jsonl
<run>/checkpoints/step-NNNNNNN/{state.json,tensors.safetensors}, checkpoints/latest
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunDir:
    """Paths inside one run directory."""

    path: Path

    CONFIG = "config.yaml"
    SCORES = "scores.json"
    METRICS = "metrics.jsonl"
    SHARES = "expert_shares.json"
    REPORT = "report.md"
    PLOTS = "plots"
    PREDICTIONS = "predictions"
    CHECKPOINTS = "checkpoints"
    STATE = "state.json"
    TENSORS = "tensors.safetensors"
    LEGACY_STATE = "state.pt"
    """The pickle state file of older checkpoints (refused when loaded)."""
    LATEST = "latest"

    @classmethod
    def at(cls, path: RunDir | str | os.PathLike[str]) -> RunDir:
        """`path` as a RunDir (a RunDir is returned as is)."""
        return path if isinstance(path, RunDir) else cls(Path(path))

    @property
    def config(self) -> Path:
        return self.path / self.CONFIG

    @property
    def scores(self) -> Path:
        return self.path / self.SCORES

    @property
    def metrics(self) -> Path:
        return self.path / self.METRICS

    @property
    def shares(self) -> Path:
        return self.path / self.SHARES

    @property
    def report(self) -> Path:
        return self.path / self.REPORT

    @property
    def plots(self) -> Path:
        return self.path / self.PLOTS

    @property
    def checkpoints(self) -> Path:
        return self.path / self.CHECKPOINTS

    @property
    def latest_pointer(self) -> Path:
        """The file naming the newest complete checkpoint directory."""
        return self.checkpoints / self.LATEST

    def predictions(self, stage: int) -> Path:
        return self.path / self.PREDICTIONS / f"stage-{stage:02d}.jsonl"

    def checkpoint(self, global_step: int) -> Path:
        return self.checkpoints / f"step-{global_step:07d}"

    @classmethod
    def state_file(cls, checkpoint: Path) -> Path:
        """The state file inside a checkpoint directory."""
        return checkpoint / cls.STATE

    @classmethod
    def tensors_file(cls, checkpoint: Path) -> Path:
        """The safetensors file inside a checkpoint directory."""
        return checkpoint / cls.TENSORS

    @classmethod
    def legacy_state_file(cls, checkpoint: Path) -> Path:
        return checkpoint / cls.LEGACY_STATE

    def is_run(self) -> bool:
        """Whether this holds a run (its config file)."""
        return self.config.is_file()

    @classmethod
    def of_checkpoint(cls, checkpoint: Path) -> RunDir | None:
        """The run directory holding `checkpoint` (a `checkpoints/step-*` directory), if it is one."""
        run = cls(checkpoint.parent.parent)
        has_state = cls.state_file(checkpoint).is_file() or cls.legacy_state_file(checkpoint).is_file()
        return run if has_state and run.is_run() else None
