"""The main job on the embedded default model: data report -> quickstart training -> export -> vLLM
serving -> one chat answer through the `openai` client -> per-expert activation table from /metrics.

    .venv/bin/python scripts/demo.py [--config configs/quickstart.yaml] [--port 8011]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from collections import defaultdict
from pathlib import Path

from badit_serve.server_process import free_port, start_server

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


GOLD = "POS"
"""The reference answer of the demo's sst2 question."""


def banner(text: str) -> None:
    print(f"\n=== {text} ===", flush=True)


def run(*args: str) -> None:
    subprocess.run(list(args), check=True, cwd=ROOT)


def expert_table(metrics_text: str) -> str:
    """Per expert: tokens routed (summed over layers) and its ability label, from /metrics."""
    per_expert: dict[str, float] = defaultdict(float)
    labels: dict[str, str] = {}
    for line in metrics_text.splitlines():
        if line.startswith("badit_expert_tokens_total{"):
            fields = dict(re.findall(r'(\w+)="([^"]*)"', line))
            per_expert[fields["expert"]] += float(line.rsplit(" ", 1)[1])
        elif line.startswith("badit_expert_tokens_by_ability_total{"):
            fields = dict(re.findall(r'(\w+)="([^"]*)"', line))
            labels[fields["expert"]] = fields.get("label", "")
    total = sum(per_expert.values()) or 1.0
    rows = [f"{'expert':>6} {'tokens x layers':>16} {'share':>7}  ability label (tasks routing to it most)"]
    for expert in sorted(per_expert, key=int):
        rows.append(
            f"{expert:>6} {per_expert[expert]:>16,.0f} {per_expert[expert] / total:>7.1%}  {labels.get(expert, '')}"
        )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="configs/quickstart.yaml")
    parser.add_argument("--run-dir", default="runs/quickstart")
    parser.add_argument("--export-dir", default="exports/quickstart")
    parser.add_argument("--port", type=int, default=0, help="0: a free loopback port")
    args = parser.parse_args()

    banner(f"1/5 SuperNI data report (read in place from {os.environ.get('BADIT_SUPERNI_DIR')})")
    run(str(BIN / "badit-data"), "stats")
    banner(f"2/5 Badit training: {args.config}")
    run(str(BIN / "badit-train"), "--config", args.config, "--output", args.run_dir, "--force")
    banner("3/5 Export")
    run(str(BIN / "badit-export"), args.run_dir, args.export_dir, "--force")

    banner("4/5 Serving with vLLM (engine start takes about a minute on 2 cores)")
    port = args.port or free_port()
    log_path = ROOT / args.run_dir / "serve.log"
    print(f"server log: {log_path}", flush=True)
    server = start_server(
        [
            str(BIN / "badit-serve"),
            args.export_dir,
            "--port",
            str(port),
            "--served-model-name",
            "badit-quickstart",
        ],
        port=port,
        log=log_path,
        cwd=ROOT,
    )
    try:
        server.wait_healthy(timeout_s=600, poll_s=2)
        base = server.url
        from openai import OpenAI

        client = OpenAI(base_url=f"{base}/v1", api_key="unused")
        question = (
            'In this task, you are given sentences from movie reviews. The task is to classify a sentence as "POS" '
            'if the sentiment of the sentence is positive or as "NEG" if the sentiment of the sentence is negative'
            "\n\nA gorgeous, witty, seductive movie."
        )
        reply = client.chat.completions.create(
            model="badit-quickstart",
            messages=[{"role": "user", "content": question}],
            max_tokens=32,
            temperature=0,
        )
        answer = reply.choices[0].message.content
        right = (answer or "").strip() == GOLD
        print(
            f"user:      {question}\nassistant: {answer!r}   (gold: {GOLD!r}, {'right' if right else 'WRONG'})"
        )
        if not right:
            print(
                "           the quickstart is a few minutes of CPU training and can still be wrong"
                f" (its test scores: {args.run_dir}/report.md)"
            )
        print(
            f"usage:     {reply.usage.prompt_tokens} prompt + {reply.usage.completion_tokens} completion tokens"
        )

        banner("5/5 Per-expert activation (from /metrics)")
        time.sleep(2)  # the metrics collector flushes periodically
        with urllib.request.urlopen(f"{base}/metrics", timeout=10) as response:
            print(expert_table(response.read().decode()))
        with urllib.request.urlopen(f"{base}/v1/badit/experts", timeout=10) as response:
            experts = json.loads(response.read())
        print(f"\n/v1/badit/experts: {len(experts.get('layers', []))} layers in the routing table")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
