"""Load SuperNI tasks (natural-instructions format) into plain, validated dataclasses.

A task folder holds `train.json` and `test.json`, each a natural-instructions task file: `Definition` (a list
of strings, joined by newlines), `Positive Examples`, ..., and `Instances: [{id, input, output}]` where
`output` is a list of reference strings or a single string. All strings are stripped of surrounding
whitespace. A malformed file raises `DataError`, whose message names the file (and the instance id or
field). Instances whose output is blank (`""`, `[]`, only blank strings) carry nothing to learn or score:
by default they are dropped and their ids recorded in `Task.skipped_train` / `Task.skipped_test`
(the shared set has six, all in task511's train.json); `on_empty="error"` raises instead.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from training.config import SUPERNI_DIR_ENV, DataConfig

OnEmpty = Literal["skip", "error"]


class DataError(ValueError):
    """Missing or malformed task data; the message names the file (and instance id or field)."""


@dataclass(frozen=True)
class Instance:
    """One example of a task: an input and one or more acceptable references."""

    task: str
    id: str
    input: str
    references: tuple[str, ...]
    """Non-blank reference answers, in file order (at least one)."""


@dataclass(frozen=True)
class Task:
    """A task's instruction and its train/test instances."""

    name: str
    definition: str
    train: list[Instance]
    test: list[Instance]
    source: Path
    """The task folder (or the raw natural-instructions file for `load_raw_task`)."""
    skipped_train: tuple[str, ...] = field(default=())
    """Ids of training instances dropped for a blank output (within the kept first N)."""
    skipped_test: tuple[str, ...] = field(default=())
    """Ids of test instances dropped for a blank output (within the kept first N)."""


def require_superni_dir(superni_dir: Path | None) -> Path:
    """The SuperNI directory, or a `DataError` naming both ways to set it (config field, environment)."""
    where = f"set data.superni_dir in the config (badit-data: --data) or ${SUPERNI_DIR_ENV}"
    if superni_dir is None:
        raise DataError(f"no SuperNI directory given: {where}")
    superni_dir = Path(superni_dir)
    if not superni_dir.is_dir():
        raise DataError(f"{superni_dir}: SuperNI directory not found ({where})")
    return superni_dir


def list_tasks(superni_dir: Path | None) -> list[str]:
    """Sorted names of the folders in `superni_dir` that hold a train.json."""
    superni_dir = require_superni_dir(superni_dir)
    return sorted(p.name for p in superni_dir.iterdir() if (p / "train.json").is_file())


def load_task(
    superni_dir: Path,
    name: str,
    max_train: int | None = None,
    max_test: int | None = None,
    on_empty: OnEmpty = "skip",
) -> Task:
    """Load `<superni_dir>/<name>/{train,test}.json`, keeping the first `max_train` / `max_test` instances.

    Every instance of both files is validated; the first N are kept in file order and the blank-output ones
    among them dropped (recorded in `skipped_*`), so a split may hold fewer than N.
    """
    folder = Path(superni_dir) / name
    if not (folder / "train.json").is_file():
        available = list_tasks(Path(superni_dir))
        raise DataError(
            f"{superni_dir}: task {name!r} not found (no {name}/train.json); "
            f"available: {', '.join(available) or 'none'}"
        )
    train_path, test_path = folder / "train.json", folder / "test.json"
    if not test_path.is_file():
        raise DataError(f"{test_path}: test file missing for task {name!r}")
    train_raw, test_raw = _read_json(train_path), _read_json(test_path)
    definition = _definition(train_path, train_raw)
    if _definition(test_path, test_raw) != definition:
        raise DataError(f"{test_path}: Definition differs from the one in {train_path}")
    train_items = _instances(train_path, train_raw, name, on_empty)
    test_items = _instances(test_path, test_raw, name, on_empty)
    _check_disjoint(test_path, train_items, test_items)
    train, skipped_train = _keep_first(train_items, max_train)
    test, skipped_test = _keep_first(test_items, max_test)
    return Task(name, definition, train, test, folder, skipped_train, skipped_test)


def load_raw_task(
    path: Path, max_train: int | None = 1000, max_test: int | None = 100, on_empty: OnEmpty = "skip"
) -> Task:
    """Load a raw natural-instructions `tasks/<task>.json` (one `Instances` list) and split it.

    The split is deterministic and disjoint: test = the first `max_test` instances in file order,
    train = the next `max_train` instances (None: all the rest); instances beyond are unused. Blank-output
    instances are then dropped from each split as in `load_task`. The task name is the file stem.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: raw task file not found")
    raw = _read_json(path)
    items = _instances(path, raw, path.stem, on_empty)
    n_test = len(items) if max_test is None else max_test
    test, skipped_test = _keep_first(items[:n_test], None)
    train, skipped_train = _keep_first(items[n_test:], max_train)
    return Task(path.stem, _definition(path, raw), train, test, path, skipped_train, skipped_test)


def load_tasks(cfg: DataConfig) -> list[Task]:
    """All tasks of `cfg.superni_dir` (sorted), or `cfg.tasks` in the given order, truncated per task."""
    root = require_superni_dir(cfg.superni_dir)
    available = list_tasks(root)
    names = cfg.tasks if cfg.tasks is not None else available
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise DataError(f"data.tasks lists {', '.join(duplicates)} more than once")
    by_task = _caps_of_run(root, cfg.max_train_by_task or {}, names, available)
    return [load_task(root, n, by_task.get(n, cfg.max_train_per_task), cfg.max_test_per_task) for n in names]


def _caps_of_run(
    root: Path, by_task: dict[str, int], names: list[str], available: list[str]
) -> dict[str, int]:
    """The `data.max_train_by_task` entries of the tasks that run.

    `data.tasks` owns what runs: a cap for a task of the directory that the run leaves out (set, say, by a
    base config or beside the task list a `--set data.tasks=...` replaced) is unused, so it is dropped with
    a warning. A key that is no task of the directory at all is a typo, and an error naming it."""
    unused = sorted(set(by_task) - set(names))
    unknown = [name for name in unused if name not in available]
    if unknown:
        raise DataError(
            f"data.max_train_by_task names {', '.join(unknown)}: no such task in {root}; "
            f"available: {', '.join(available) or 'none'}"
        )
    if unused:
        warnings.warn(
            f"ignoring data.max_train_by_task for {', '.join(unused)}, not in data.tasks {names}",
            UserWarning,
            stacklevel=3,
        )
    return {name: cap for name, cap in by_task.items() if name in names}


# ---------------------------------------------------------------------------------------------- parsing


def _read_json(path: Path) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from exc
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text: {exc}") from exc
    if not isinstance(raw, dict):
        raise DataError(f"{path}: top level must be a JSON object, got {type(raw).__name__}")
    return raw


def _definition(path: Path, raw: dict[str, Any]) -> str:
    value = raw.get("Definition")
    parts = [value] if isinstance(value, str) else value
    if not isinstance(parts, list) or not all(isinstance(p, str) for p in parts):
        raise DataError(f"{path}: field 'Definition' must be a list of strings (got {type(value).__name__})")
    text = "\n".join(p.strip() for p in parts if p.strip())
    if not text:
        raise DataError(f"{path}: field 'Definition' is missing or empty")
    return text


def _instances(
    path: Path, raw: dict[str, Any], task: str, on_empty: OnEmpty
) -> list[tuple[str, Instance | None]]:
    """(id, instance) per entry of `Instances` in file order; instance None for a blank output."""
    entries = raw.get("Instances")
    if not isinstance(entries, list):
        raise DataError(f"{path}: field 'Instances' must be a list (got {type(entries).__name__})")
    items: list[tuple[str, Instance | None]] = []
    seen: set[str] = set()
    for index, entry in enumerate(entries):
        where = f"{path}: instance #{index}"
        if not isinstance(entry, dict):
            raise DataError(f"{where} must be an object, got {type(entry).__name__}")
        uid = entry.get("id")
        if not isinstance(uid, str) or not uid:
            raise DataError(f"{where} has no string 'id'")
        where = f"{path}: instance {uid!r}"
        if uid in seen:
            raise DataError(f"{where} appears more than once")
        seen.add(uid)
        text = entry.get("input")
        if not isinstance(text, str):
            raise DataError(f"{where} has no string 'input'")
        if "output" not in entry:
            raise DataError(f"{where} has no 'output'")
        output = entry["output"]
        refs = [output] if isinstance(output, str) else output
        if not isinstance(refs, list):
            raise DataError(
                f"{where}: 'output' must be a string or a list of strings, got {type(output).__name__}"
            )
        for k, ref in enumerate(refs):
            if not isinstance(ref, str):
                raise DataError(f"{where}: reference #{k} of 'output' is {type(ref).__name__}, not a string")
        kept = tuple(r.strip() for r in refs if r.strip())
        if not kept and on_empty == "error":
            raise DataError(f"{where} has an empty 'output' ({output!r})")
        items.append((uid, Instance(task, uid, text.strip(), kept) if kept else None))
    return items


def _check_disjoint(
    test_path: Path, train: list[tuple[str, Instance | None]], test: list[tuple[str, Instance | None]]
) -> None:
    shared = {uid for uid, _ in train} & {uid for uid, _ in test}
    if shared:
        raise DataError(f"{test_path}: {len(shared)} instance id(s) also in train.json, e.g. {min(shared)!r}")


def _keep_first(
    items: list[tuple[str, Instance | None]], limit: int | None
) -> tuple[list[Instance], tuple[str, ...]]:
    """The first `limit` entries, split into usable instances and ids of blank-output ones."""
    head = items if limit is None else items[:limit]
    return [inst for _, inst in head if inst is not None], tuple(uid for uid, inst in head if inst is None)
