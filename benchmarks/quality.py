"""The paper's quality comparison as one command: methods x modes x seeds of a suite, resumable.

    .venv/bin/python benchmarks/quality.py --suite cpu-small [--methods lora badit] [--runs-dir runs/quality]

Each run is a `badit-train` process (its own peak memory). A run counts as complete when the suite's
results JSON already holds it with the same resolved config, or its run directory holds scores.json;
complete runs are skipped, interrupted ones resumed from their last checkpoint. The table (Rouge-L mixed,
sequential Rouge-L, Forward, Backward, Forget, mean +- std over seeds, s/step, peak memory) is written as
benchmarks/results/quality-<suite>.{json,md,png} and printed. With every run complete, a second call
only reprints the table.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

from training.eval import DEFAULT_CONVENTION, continual_metrics, mixed_forward

ROOT = Path(__file__).resolve().parent.parent
SUITES = Path(__file__).resolve().parent / "suites"
CONFIGS = ROOT / "configs"
RESULTS = Path(__file__).resolve().parent / "results"

Mode = Literal["mixed", "sequential"]


class Suite(BaseModel):
    """One comparison: a base run config, the methods (config overrides) and what to run of each."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    description: str
    """One line shown above the table."""
    config: str | None = None
    """A file in configs/ every run starts from (its `base:` chain included), e.g. superni15_mixed.yaml."""
    base: dict[str, Any] = Field(default_factory=dict)
    """A run-config tree (configs/*.yaml layout) laid over `config`, shared by every run."""
    methods: dict[str, dict[str, Any]] = Field(min_length=1)
    """Method label -> run-config tree merged over `base` (usually just `adapter`)."""
    modes: list[Mode] = Field(default_factory=lambda: ["mixed", "sequential"], min_length=1)
    """Training modes to run for every method."""
    task_order: list[str] | Literal["order1", "order2"] = "order1"
    """Sequential task order (train.task_order)."""
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    """train.seed values; the table gives mean +- std over them."""
    forward: bool = True
    """Also train each task alone (`single` mode) per seed, for the Forward metric."""
    forward_reference: str | None = None
    """Method whose single-task runs are every method's Forward baseline (None: each method its own)."""


@dataclass(frozen=True)
class RunSpec:
    """One badit-train run of a suite."""

    method: str
    mode: Literal["mixed", "sequential", "single"]
    seed: int

    @property
    def key(self) -> str:
        return f"{self.method}-{self.mode}-s{self.seed}"


def load_suite(name: str) -> Suite:
    path = Path(name) if name.endswith(".yaml") else SUITES / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in SUITES.glob("*.yaml"))
        raise SystemExit(f"quality: suite {name!r} not found ({path}); known: {known}")
    return Suite.model_validate(yaml.safe_load(path.read_text()))


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; `over` wins."""
    out = dict(base)
    for key, value in over.items():
        out[key] = (
            merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
        )
    return out


def plan(suite: Suite, methods: list[str] | None) -> list[RunSpec]:
    """Runs in execution order: single runs first (mixed/sequential runs read them for Forward)."""
    chosen = methods or list(suite.methods)
    unknown = [m for m in chosen if m not in suite.methods]
    if unknown:
        raise SystemExit(f"quality: unknown method(s) {unknown}; suite has {list(suite.methods)}")
    specs = []
    for seed in suite.seeds:
        for method in chosen:
            reference = suite.forward_reference or method
            if suite.forward and RunSpec(reference, "single", seed) not in specs:
                specs.append(RunSpec(reference, "single", seed))
            specs += [RunSpec(method, mode, seed) for mode in suite.modes]
    return specs


def run_tree(suite: Suite, spec: RunSpec, run_dir: Path, runs_root: Path) -> dict[str, Any]:
    """The run-config tree of one run (before badit-train's own validation)."""
    tree = merge(suite.base, suite.methods[spec.method])
    if suite.config is not None:
        tree = {"base": str(CONFIGS / suite.config), **tree}
    train: dict[str, Any] = {"mode": spec.mode, "seed": spec.seed}
    if spec.mode == "sequential":
        train["task_order"] = suite.task_order
    tree = merge(tree, {"train": train, "output": {"dir": str(run_dir)}})
    if suite.forward and spec.mode != "single":
        single_dir = runs_root / single_spec(suite, spec).key
        tree = merge(tree, {"eval": {"single_run": str(single_dir)}})
    return tree


def single_spec(suite: Suite, spec: RunSpec) -> RunSpec:
    """The single-task run that is `spec`'s Forward baseline."""
    return RunSpec(suite.forward_reference or spec.method, "single", spec.seed)


def config_hash(tree: dict[str, Any]) -> str:
    """Identity of a run's settings (output paths excluded, so a moved runs dir still matches)."""
    clean = merge(tree, {"output": {"dir": None}, "eval": {"single_run": None}})
    if "base" in clean:
        clean["base"] = Path(clean["base"]).name
    return hashlib.sha256(json.dumps(clean, sort_keys=True).encode()).hexdigest()[:16]


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def step_seconds(metrics_file: Path) -> float | None:
    """Mean time between consecutive logged optimiser steps within a stage (needs log_every: 1)."""
    gaps: list[float] = []
    last: tuple[int, int, float] | None = None  # (stage, step, time)
    for line in metrics_file.read_text().splitlines():
        rec = json.loads(line)
        if rec.get("event") != "step" or "time" not in rec:
            continue
        if last is not None and last[0] == rec["stage"] and rec["step"] == last[1] + 1:
            gaps.append(rec["time"] - last[2])
        last = (rec["stage"], rec["step"], rec["time"])
    return statistics.fmean(gaps) if gaps else None


def execute(spec: RunSpec, tree: dict[str, Any], run_dir: Path, threads: int | None = None) -> dict[str, Any]:
    """Run badit-train in a child process (resuming when a checkpoint exists); return its record.
    `threads` caps the child's intra-op threads (OMP/MKL): on a shared, oversubscribed CPU one thread per
    process avoids the spin-waiting that makes two-thread steps many times slower."""
    resume = (run_dir / "checkpoints" / "latest").is_file()
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as handle:
        yaml.safe_dump(tree, handle)
    cmd = [sys.executable, "-m", "training.cli.train", "--config", handle.name, "--no-progress"]
    cmd.append("--resume" if resume else "--force")
    load_before, start = load_average(), time.time()
    print(f"quality: {spec.key}: {'resuming' if resume else 'starting'} in {run_dir}", flush=True)
    env = dict(os.environ)
    env.setdefault("BADIT_SUPERNI_DIR", str(ROOT.parent / "shared" / "superni"))  # as make and CI set it
    if threads is not None:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    Path(handle.name).unlink()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(
            f"quality: {spec.key} failed (exit {os.waitstatus_to_exitcode(status)}); see {run_dir}"
        )
    scores = json.loads((run_dir / "scores.json").read_text())
    return {
        **asdict(spec),
        "config_hash": config_hash(tree),
        "rouge_l": scores.get("rouge_l"),
        "tasks": scores["tasks"],
        "matrix": scores["matrix"],
        "final": {task: s["rouge_l"] for task, s in scores["final"].items()},
        "step_s": step_seconds(run_dir / "metrics.jsonl"),
        "peak_rss_mib": usage.ru_maxrss / 1024,  # Linux: KiB; this child only (wait4)
        "wall_s": round(time.time() - start, 1),
        "load_before": load_before,
        "load_after": load_average(),
        "resumed": resume,
        "threads": threads,
    }


def is_complete(records: dict[str, dict], spec: RunSpec, tree: dict[str, Any]) -> bool:
    """Whether `spec` is already recorded with the same settings (a changed suite entry re-runs)."""
    rec = records.get(spec.key)
    return rec is not None and rec["config_hash"] == config_hash(tree)


def mean_std(values: list[float | None]) -> tuple[float | None, float | None]:
    vals = [v for v in values if v is not None]
    if not vals:
        return None, None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else None)


def run_metrics(suite: Suite, rec: dict[str, Any], records: dict[str, dict]) -> dict[str, float]:
    """Forward / Forget / Backward of one run from its score matrix, with this checkout's definitions
    (training.eval, default convention), so that every row of a table is scored the same way."""
    single_rec = records.get(single_spec(suite, RunSpec(rec["method"], rec["mode"], rec["seed"])).key)
    single = [single_rec["final"][t] for t in rec["tasks"]] if single_rec else None
    if rec["mode"] == "sequential" and len(rec["matrix"]) == len(rec["tasks"]) > 1:
        return continual_metrics(rec["matrix"], single)
    if rec["mode"] == "mixed" and single:
        return {"forward": mixed_forward([rec["final"][t] for t in rec["tasks"]], single)}
    return {}


def summarize(suite: Suite, records: dict[str, dict]) -> list[dict[str, Any]]:
    """One row per method: metric -> (mean, std) over seeds, plus s/step and peak memory."""
    rows = []
    for method in suite.methods:
        runs = [r for r in records.values() if r["method"] == method and r["mode"] != "single"]
        if not runs:
            continue
        mixed = [(r, run_metrics(suite, r, records)) for r in runs if r["mode"] == "mixed"]
        seq = [(r, run_metrics(suite, r, records)) for r in runs if r["mode"] == "sequential"]
        steps = [r["step_s"] for r in runs if r["step_s"] is not None]
        rows.append(
            {
                "method": method,
                "rouge_mixed": mean_std([r["rouge_l"] for r, _ in mixed]),
                "forward_mixed": mean_std([m.get("forward") for _, m in mixed]),
                "rouge_seq": mean_std([r["rouge_l"] for r, _ in seq]),
                "forward_seq": mean_std([m.get("forward") for _, m in seq]),
                "backward": mean_std([m.get("backward") for _, m in seq]),
                "forget": mean_std([m.get("forget_rate") for _, m in seq]),
                "step_s": statistics.fmean(steps) if steps else None,
                "peak_rss_mib": max(r["peak_rss_mib"] for r in runs),
                "seeds": sorted({r["seed"] for r in runs}),
            }
        )
    return rows


COLUMNS = [
    ("rouge_mixed", "Rouge-L (mixed)"),
    ("forward_mixed", "Forward (mixed)"),
    ("rouge_seq", "Rouge-L (seq)"),
    ("forward_seq", "Forward (seq)"),
    ("backward", "Backward"),
    ("forget", "Forget"),
]


def _cell(pair: tuple[float | None, float | None]) -> str:
    mean, std = pair
    if mean is None:
        return "-"
    return f"{mean:.2f}" if std is None else f"{mean:.2f} ± {std:.2f}"


def markdown_table(suite_name: str, suite: Suite, rows: list[dict[str, Any]], machine: dict) -> str:
    head = ["method", *(title for _, title in COLUMNS), "s/step", "peak RSS MiB", "seeds"]
    lines = [
        f"**{suite_name}**: {suite.description}. Sequential order: {suite.task_order}. "
        f"Machine: {machine['description']}.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for row in rows:
        cells = [row["method"], *(_cell(tuple(row[key])) for key, _ in COLUMNS)]
        cells += [f"{row['step_s']:.2f}" if row["step_s"] else "-", f"{row['peak_rss_mib']:.0f}"]
        cells.append(",".join(str(s) for s in row["seeds"]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], title: str, path: Path) -> None:
    """Grouped bars: mixed and sequential Rouge-L per method, std as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.6 * len(rows) + 2, 3.5))
    width = 0.38
    for offset, key, label in ((-width / 2, "rouge_mixed", "mixed"), (width / 2, "rouge_seq", "sequential")):
        means = [r[key][0] or 0.0 for r in rows]
        stds = [r[key][1] or 0.0 for r in rows]
        ax.bar([i + offset for i in range(len(rows))], means, width, yerr=stds, label=label, capsize=3)
    ax.set_xticks(range(len(rows)), [r["method"] for r in rows])
    ax.set_ylabel("Rouge-L")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def machine_description() -> dict[str, Any]:
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU, {os.cpu_count()} cores"
    return {"description": f"{device}, {platform.machine()}, torch {torch.__version__}"}


def write_outputs(suite_name: str, suite: Suite, records: dict[str, dict], out_dir: Path) -> str:
    rows = summarize(suite, records)
    machine = machine_description()
    table = markdown_table(suite_name, suite, rows, machine)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"quality-{suite_name}"
    payload = {
        "suite": suite_name,
        "suite_config": suite.model_dump(),
        "machine": machine,
        "metrics_convention": DEFAULT_CONVENTION,
        "rows": rows,
    }
    payload["runs"] = records
    tmp = stem.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    tmp.replace(stem.with_suffix(".json"))
    stem.with_suffix(".md").write_text(table)
    if rows:
        plot(rows, f"{suite_name}: {suite.description}", stem.with_suffix(".png"))
    return table


def _recorded_machine(results_file: Path) -> dict[str, Any]:
    return (
        json.loads(results_file.read_text())["machine"] if results_file.is_file() else machine_description()
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--suite", required=True, help="suite name (benchmarks/suites/NAME.yaml) or a path")
    parser.add_argument("--methods", nargs="+", help="only these methods of the suite")
    parser.add_argument("--runs-dir", type=Path, default=ROOT / "runs" / "quality", help="run directories")
    parser.add_argument("--out-dir", type=Path, default=RESULTS, help="where the table files go")
    parser.add_argument("--threads", type=int, help="intra-op threads per run (default: torch's choice)")
    args = parser.parse_args(argv)
    suite_name = Path(args.suite).stem
    suite = load_suite(args.suite)
    runs_root = args.runs_dir / suite_name
    results_file = args.out_dir / f"quality-{suite_name}.json"
    records: dict[str, dict] = json.loads(results_file.read_text())["runs"] if results_file.is_file() else {}
    ran = False
    for spec in plan(suite, args.methods):
        run_dir = runs_root / spec.key
        tree = run_tree(suite, spec, run_dir, runs_root)
        if is_complete(records, spec, tree):
            continue
        records[spec.key] = execute(spec, tree, run_dir, args.threads)
        ran = True
        write_outputs(suite_name, suite, records, args.out_dir)  # after every run: progress survives a kill
    if ran or not results_file.is_file():
        write_outputs(suite_name, suite, records, args.out_dir)
    print(markdown_table(suite_name, suite, summarize(suite, records), _recorded_machine(results_file)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
