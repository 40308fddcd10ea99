"""metrics.jsonl: one JSON object per event (step, regroup, eval), appended and flushed at once."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any


class MetricsLog:
    """Appends one JSON object per line (flushed at once, so a killed run keeps what it logged). Every
    record gets its wall-clock `time` (Unix seconds), from which benchmarks derive s/step."""

    def __init__(self, path: Path):
        self.path = path

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as handle:
            handle.write(json.dumps({**record, "time": round(time.time(), 3)}) + "\n")

    def read(self) -> list[dict[str, Any]]:
        """Every record so far (none when the file does not exist)."""
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
