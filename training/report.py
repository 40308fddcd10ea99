"""report.md and PNG plots of a run directory (loss, DOG gradient angles, per-task expert activation)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

from training.metrics_log import MetricsLog
from training.run_dir import RunDir

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_loss(records: list[dict[str, Any]], out: Path) -> Path | None:
    steps = [(r["step"], r["loss"]) for r in records if r.get("event") == "step"]
    if not steps:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([s for s, _ in steps], [v for _, v in steps])
    for r in records:
        if r.get("event") == "regroup":
            ax.axvline(r["step"], color="grey", linestyle=":", linewidth=0.8)
    ax.set(xlabel="optimiser step", ylabel="response loss", title="Training loss (dotted: DOG regroups)")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def plot_angles(records: list[dict[str, Any]], out: Path) -> Path | None:
    """The paper's Fig. 4: mean inter- and intra-expert gradient angles at each regroup."""
    events = [r for r in records if r.get("event") == "regroup" and r.get("layers")]
    if not events:
        return None
    steps = [e["step"] for e in events]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key, style in (
        ("inter_before", "C0--"),
        ("inter_after", "C0-"),
        ("intra_before", "C1--"),
        ("intra_after", "C1-"),
    ):
        ax.plot(steps, [e[key] for e in events], style, marker="o", label=key.replace("_", " "))
    ax.set(xlabel="optimiser step", ylabel="degrees", title="Gradient angles between / within experts")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def plot_expert_heatmap(shares: dict[str, list[float]], out: Path) -> Path | None:
    """The paper's Fig. 13: share of each task's tokens routed to each expert (mean over layers)."""
    if not shares:
        return None
    tasks = sorted(shares)
    matrix = [shares[t] for t in tasks]
    fig, ax = plt.subplots(figsize=(1 + 0.6 * len(matrix[0]), 1 + 0.35 * len(tasks)))
    image = ax.imshow(matrix, aspect="auto", cmap="viridis")
    ax.set_yticks(range(len(tasks)), [t.split("_", 1)[0] for t in tasks], fontsize=7)
    ax.set_xticks(range(len(matrix[0])))
    ax.set(xlabel="expert", title="Expert activation by task")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def write_report(
    run: RunDir, scores: dict[str, Any], expert_shares: dict[str, list[float]] | None = None
) -> Path:
    """Tables of per-task and continual metrics plus the plots; returns report.md's path."""
    records = MetricsLog(run.metrics).read()
    plots = run.plots
    plots.mkdir(exist_ok=True)
    made = [
        plot_loss(records, plots / "loss.png"),
        plot_angles(records, plots / "gradient_angles.png"),
        plot_expert_heatmap(expert_shares or {}, plots / "expert_activation.png"),
    ]
    lines = [f"# Run report: {run.path.name}", "", f"Mode: **{scores['mode']}**", ""]
    lines += ["| task | Rouge-L | exact match | n |", "|---|---:|---:|---:|"]
    for task in scores["tasks"]:
        s = scores["final"].get(task)
        if s:
            lines.append(f"| {task} | {s['rouge_l']:.2f} | {s['exact_match']:.2f} | {s['count']} |")
    if scores.get("rouge_l") is not None:
        lines.append(f"| **mean** | **{scores['rouge_l']:.2f}** | **{scores['exact_match']:.2f}** | |")
    if scores.get("continual"):
        lines += ["", "| metric | value |", "|---|---:|"]
        lines += [f"| {k} | {v:.2f} |" for k, v in scores["continual"].items()]
    regroups = [r for r in records if r.get("event") == "regroup"]
    if regroups:
        lines += [
            "",
            "| regroup at step | moved | inter before → after | intra before → after | KL drift |",
            "|---:|---:|---|---|---:|",
        ]
        for r in regroups:
            kl = f"{r['kl_drift']:.2e}" if r.get("kl_drift") is not None else "-"
            lines.append(
                f"| {r['step']} | {r['moved']} | {r['inter_before']:.1f}° → {r['inter_after']:.1f}° | "
                f"{r['intra_before']:.1f}° → {r['intra_after']:.1f}° | {kl} |"
            )
    lines += [""] + [f"![{p.stem}]({RunDir.PLOTS}/{p.name})" for p in made if p is not None]
    run.report.write_text("\n".join(lines) + "\n")
    return run.report
