"""The main job on the embedded default model: data report -> quickstart training -> export -> vLLM
serving -> one chat answer through the `openai` client, backed by the served adapter's answers to the first
100 held-out sst2 test sentences -> per-expert activation table from /metrics.

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
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from badit_serve.launch.server_process import free_port, start_server

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


TASK = "task363_sst2_polarity_classification"
"""The task of the demo's question and of its held-out check."""
REVIEW, GOLD = "A gorgeous, witty, seductive movie.", "POS"
"""The demo's question (a review in neither the task's train nor its test file) and its reference answer."""
MODEL = "badit-quickstart"
"""The served model name."""
HELD_OUT = 100
"""Test sentences of TASK asked after the question (the first N of test.json: fixed, never chosen by result)."""


@dataclass(frozen=True)
class HeldOutScore:
    """The served adapter's answers to held-out test instances against their references."""

    right: int
    total: int
    answers: Counter[str]
    """How often each answer was given."""
    majority: int
    """Right answers of the best constant answer (the most common reference): what no skill gets."""

    def line(self, what: str) -> str:
        given = ", ".join(f"{answer!r} {n}" for answer, n in self.answers.most_common(4))
        verdict = (
            "one answer to every sentence: no skill shown"
            if len(self.answers) == 1
            else f"a constant answer gets at most {self.majority}"
        )
        return f"held-out:  {self.right} of {self.total} {what} right (answers: {given}; {verdict})"


def score_held_out(answers: list[str], references: list[str]) -> HeldOutScore:
    """Exact (stripped) matches of `answers` against the aligned `references`."""
    if len(answers) != len(references) or not answers:
        raise ValueError(f"{len(answers)} answers for {len(references)} references")
    stripped = [a.strip() for a in answers]
    return HeldOutScore(
        right=sum(a == r for a, r in zip(stripped, references, strict=True)),
        total=len(answers),
        answers=Counter(stripped),
        majority=Counter(references).most_common(1)[0][1],
    )


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


def demo_task(config: str):
    """TASK with its first HELD_OUT test instances, read from the config's SuperNI directory."""
    from training.config import load_config
    from training.data.superni import load_task, require_superni_dir

    data = load_config(ROOT / config).data
    return load_task(require_superni_dir(data.superni_dir), TASK, max_train=0, max_test=HELD_OUT)


def ask(client, content: str):
    """One greedy chat turn to the served adapter."""
    return client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": content}], max_tokens=32, temperature=0
    )


def ask_held_out(client, definition: str, instances) -> HeldOutScore:
    """Every instance as training formats it (`chat_user_turn`), 8 requests in flight, scored."""
    from training.data.prompts import chat_user_turn

    with ThreadPoolExecutor(max_workers=8) as pool:
        replies = list(pool.map(lambda inst: ask(client, chat_user_turn(definition, inst.input)), instances))
    answers = [reply.choices[0].message.content or "" for reply in replies]
    return score_held_out(answers, [inst.references[0] for inst in instances])


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
            MODEL,
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
        from training.data.prompts import chat_user_turn

        task = demo_task(args.config)
        question = chat_user_turn(task.definition, REVIEW)
        reply = ask(client, question)
        answer = reply.choices[0].message.content or ""
        right = answer.strip() == GOLD
        print(
            f"user:      {question}\nassistant: {answer!r}   (gold: {GOLD!r}, {'right' if right else 'WRONG'})"
        )
        print(
            f"usage:     {reply.usage.prompt_tokens} prompt + {reply.usage.completion_tokens} completion tokens"
        )
        held_out = ask_held_out(client, task.definition, task.test)
        print(held_out.line(f"{TASK} test sentences (the first {len(task.test)} of its test.json)"))

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
