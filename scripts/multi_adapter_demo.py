"""Many Badit adapters over one base model, end to end on the default model (`make multi-demo`):

    two quickstart-sized trainings on different SuperNI task sets (reused when already trained)
    -> `badit-export RUN OUT --adapter-only` for each -> ONE `badit-serve BASE --adapter A=.. --adapter B=..`
    -> the same chat prompts to each adapter and to the base (one mixed concurrent batch, OpenAI API `model`
       field) -> per-adapter expert counts (/v1/badit/experts?adapter=NAME and /metrics) checked against
       top_k x routed tokens -> unload and reload one adapter at runtime -> stop the server
    -> every greedy answer checked against the reference loader (badit_serve.core.reference, no vLLM).

    .venv/bin/python scripts/multi_adapter_demo.py [--retrain] [--port 8012] [--timeout-train 3600]

Serves in float32 with prefix caching off, so answers compare token for token with the float32 reference
and each request adds exactly top_k x (prompt + completion - 1) selections per layer to its adapter.
Exit code 0 when everything agreed, 1 when a step failed or a check disagreed (the message says which).
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx

from badit_serve.api.schemas import ExpertsResponse
from badit_serve.launch.server_process import ServerError, free_port, start_server

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
BASE_NAME = "smollm2"
API_KEY = "sk-multi-demo"
MAX_TOKENS = 32


class DemoError(RuntimeError):
    """A step of the demo failed or a check disagreed."""


@dataclass(frozen=True)
class AdapterJob:
    """One adapter of the demo: its config, run directory and adapter directory."""

    name: str
    config: Path
    run_dir: Path
    adapter_dir: Path


@dataclass(frozen=True)
class Prompt:
    task: str
    text: str
    gold: str


@dataclass
class Answer:
    model: str
    prompt: Prompt
    text: str
    prompt_ids: list[int]
    token_ids: list[int]


def banner(text: str) -> None:
    print(f"\n=== {text} ===", flush=True)


def run(args: list[str], timeout: float, capture: bool = False) -> str:
    """Run a CLI step (its output passes through unless `capture`: then its stdout is returned); a clear
    error if it fails or runs past `timeout`."""
    try:
        out = subprocess.PIPE if capture else None
        done = subprocess.run(args, cwd=ROOT, check=True, timeout=timeout, stdout=out, text=True)
    except subprocess.CalledProcessError as exc:
        raise DemoError(f"{' '.join(args[:3])} ... exited with code {exc.returncode}") from exc
    except subprocess.TimeoutExpired as exc:
        raise DemoError(f"{' '.join(args[:3])} ... did not finish in {timeout:.0f} s") from exc
    return done.stdout or ""


def trained(job: AdapterJob) -> bool:
    """A finished run of the same settings (everything but the output and data directories)."""
    from training.config import load_config
    from training.run_dir import RunDir

    run_dir = RunDir.at(ROOT / job.run_dir)
    if not (run_dir.path / RunDir.SCORES).is_file():
        return False
    ignore = {"output": True, "data": {"superni_dir"}}
    stored = load_config(run_dir.path / RunDir.CONFIG).model_dump(exclude=ignore)
    return stored == load_config(ROOT / job.config).model_dump(exclude=ignore)


def train_and_export(job: AdapterJob, retrain: bool, timeout: float) -> None:
    if retrain or not trained(job):
        t0 = time.monotonic()
        out = job.run_dir
        run([str(BIN / "badit-train"), "--config", str(job.config), "--output", str(out), "--force"], timeout)
        print(f"{job.name}: trained in {time.monotonic() - t0:.0f} s -> {job.run_dir}", flush=True)
    else:
        print(f"{job.name}: reusing the finished run {job.run_dir} (--retrain trains again)", flush=True)
    run([str(BIN / "badit-export"), str(job.run_dir), str(job.adapter_dir), "--adapter-only", "--force"], 600)
    size = sum(f.stat().st_size for f in (ROOT / job.adapter_dir).rglob("*") if f.is_file())
    print(f"{job.name}: adapter directory {job.adapter_dir}: {size / 2**20:.1f} MiB", flush=True)


def demo_prompts(jobs: list[AdapterJob]) -> list[Prompt]:
    """The first test instance of each adapter's first task, as training formats it (`chat_user_turn`)."""
    from training.config import load_config
    from training.data.prompts import chat_user_turn
    from training.data.superni import load_task, require_superni_dir

    prompts = []
    for job in jobs:
        data = load_config(ROOT / job.config).data
        task = load_task(require_superni_dir(data.superni_dir), data.tasks[0], max_train=0, max_test=1)
        instance = task.test[0]
        prompts.append(
            Prompt(task.name, chat_user_turn(task.definition, instance.input), instance.references[0])
        )
    return prompts


def server_command(base_dir: Path, jobs: list[AdapterJob], port: int) -> list[str]:
    adapters = [arg for job in jobs for arg in ("--adapter", f"{job.name}={ROOT / job.adapter_dir}")]
    return [
        str(BIN / "badit-serve"),
        str(base_dir),
        *adapters,
        "--served-model-name",
        BASE_NAME,
        "--api-key",
        API_KEY,
        "--port",
        str(port),
        "--dtype",
        "float32",  # compared token for token with the float32 reference loader
        "--no-enable-prefix-caching",  # every prompt token is routed, so the counters are exact
        "--max-model-len",
        "1024",
    ]


class Client:
    """The running server's OpenAI and Badit routes."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.http = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=600)

    def chat(self, model: str, prompt: Prompt) -> Answer:
        from openai import OpenAI

        client = OpenAI(base_url=f"{self.base}/v1", api_key=API_KEY, timeout=600)
        reply = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": prompt.text}],
            max_tokens=MAX_TOKENS,
            temperature=0,
            extra_body={"return_token_ids": True},
        )
        choice = reply.choices[0]
        ids = reply.model_extra["prompt_token_ids"]
        return Answer(model, prompt, choice.message.content or "", ids, choice.model_extra["token_ids"])

    def status(self, method: str, path: str, **kwargs: object) -> int:
        return self.http.request(method, path, **kwargs).status_code

    def experts(self, adapter: str) -> ExpertsResponse:
        response = self.http.get("/v1/badit/experts", params={"adapter": adapter})
        if response.status_code != 200:
            raise DemoError(
                f"/v1/badit/experts?adapter={adapter}: {response.status_code} {response.text[:300]}"
            )
        return ExpertsResponse.model_validate(response.json())

    def metric_tokens(self) -> dict[str, float]:
        """Per adapter: the sum of badit_expert_tokens_by_ability_total (summed over layers) over experts,
        from /metrics (the per-layer series are summed over adapters unless --adapter-layer-metrics)."""
        totals: dict[str, float] = defaultdict(float)
        for line in self.http.get("/metrics").text.splitlines():
            if line.startswith("badit_expert_tokens_by_ability_total{"):
                labels = dict(re.findall(r'(\w+)="([^"]*)"', line))
                totals[labels.get("adapter", "")] += float(line.rsplit(" ", 1)[1])
        return totals


def expert_shares(client: Client, adapter: str) -> tuple[int, str]:
    """An adapter's total selections and one line of per-expert shares summed over layers."""
    counts = client.experts(adapter)
    per_expert: dict[int, int] = defaultdict(int)
    for layer in counts.layers:
        for e in layer.experts:
            per_expert[e.expert] += e.tokens
    total = sum(per_expert.values())
    shares = " ".join(f"e{k}:{v / max(total, 1):.0%}" for k, v in sorted(per_expert.items()))
    return total, shares


def ask_all(client: Client, models: list[str], prompts: list[Prompt]) -> list[Answer]:
    """Every prompt to every model at once: one mixed concurrent load over the adapters and the base."""
    jobs = [(m, p) for p in prompts for m in models]
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        return list(pool.map(lambda job: client.chat(*job), jobs))


def show_answers(answers: list[Answer]) -> None:
    for prompt in dict.fromkeys(a.prompt for a in answers):
        print(f"\n[{prompt.task}] {prompt.text[-160:]!r}\n  gold: {prompt.gold!r}")
        for a in (a for a in answers if a.prompt == prompt):
            print(f"  {a.model:>14}: {a.text!r}  ({len(a.prompt_ids)} prompt + {len(a.token_ids)} tokens)")


def check_counters(client: Client, jobs: list[AdapterJob], answers: list[Answer], before: dict) -> None:
    """Each adapter's selections grew by top_k x layers x (prompt + completion - 1) per request of it."""
    time.sleep(2.5)  # the workers flush their counters every second
    metrics = client.metric_tokens()
    for job in jobs:
        counts = client.experts(job.name)
        routed = sum(len(a.prompt_ids) + len(a.token_ids) - 1 for a in answers if a.model == job.name)
        expected = counts.top_k * len(counts.layers) * routed
        total, shares = expert_shares(client, job.name)
        grown, grown_metric = total - before[job.name][0], metrics[job.name] - before[job.name][1]
        print(f"{job.name:>14}: {grown:,} expert selections ({shares})")
        print(
            f"{'':>14}  expected top_k {counts.top_k} x {len(counts.layers)} layers x {routed} tokens = {expected:,}"
        )
        if grown != expected or grown_metric != expected:
            raise DemoError(
                f"{job.name}: counters grew by {grown} (/metrics {grown_metric:.0f}), expected {expected}"
            )


def counter_snapshot(client: Client, jobs: list[AdapterJob]) -> dict[str, tuple[int, float]]:
    metrics = client.metric_tokens()
    return {job.name: (expert_shares(client, job.name)[0], metrics[job.name]) for job in jobs}


def unload_and_reload(client: Client, job: AdapterJob, prompt: Prompt, before: Answer) -> None:
    """DELETE the adapter (its requests then get 404), POST it back, and get the same answer again."""
    t0 = time.monotonic()
    if (code := client.status("DELETE", f"/v1/badit/adapters/{job.name}")) != 200:
        raise DemoError(f"DELETE /v1/badit/adapters/{job.name}: {code}")
    ping = {"model": job.name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    gone = client.status("POST", "/v1/chat/completions", json=ping)
    print(
        f"DELETE /v1/badit/adapters/{job.name}: 200 in {time.monotonic() - t0:.1f} s; a request for it now: {gone}"
    )
    t0 = time.monotonic()
    body = {"name": job.name, "path": str(ROOT / job.adapter_dir)}
    if (code := client.status("POST", "/v1/badit/adapters", json=body)) != 200:
        raise DemoError(f"POST /v1/badit/adapters {job.name}: {code}")
    again = client.chat(job.name, prompt)
    print(f"POST /v1/badit/adapters {job.name}: 200 in {time.monotonic() - t0:.1f} s (answer included)")
    print(
        f"  {job.name} again: {again.text!r} ({'same' if again.token_ids == before.token_ids else 'DIFFERENT'})"
    )
    if gone != 404 or again.token_ids != before.token_ids:
        raise DemoError(f"{job.name}: unload gave {gone} (expected 404) or the reloaded answer differs")


def check_reference(base_dir: Path, jobs: list[AdapterJob], answers: list[Answer]) -> None:
    """The reference loader (transformers, float32, no vLLM) greedy from the same prompt ids."""
    import torch
    from transformers import AutoModelForCausalLM

    from badit_serve.core.reference import load_reference_adapter

    loaders = {BASE_NAME: lambda: AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)}
    loaders |= {
        job.name: (lambda job=job: load_reference_adapter(base_dir, ROOT / job.adapter_dir)) for job in jobs
    }
    wrong = []
    for name, load in loaders.items():
        model = load().eval()
        for a in (a for a in answers if a.model == name):
            with torch.no_grad():
                out = model.generate(torch.tensor([a.prompt_ids]), max_new_tokens=MAX_TOKENS, do_sample=False)
            reference = out[0, len(a.prompt_ids) :].tolist()  # (new tokens,) eos included, as vLLM returns it
            same = reference == a.token_ids
            print(f"{name:>14} [{a.prompt.task}]: {'same tokens' if same else f'DIFFERS: {reference}'}")
            wrong += [] if same else [f"{name} on {a.prompt.task}"]
        del model
    if wrong:
        raise DemoError(f"served greedy answers differ from the reference loader: {', '.join(wrong)}")


def serve_and_ask(
    base_dir: Path, jobs: list[AdapterJob], prompts: list[Prompt], port: int, log_path: Path
) -> list[Answer]:
    banner("3/5 One badit-serve over the base with both adapters (float32; about a minute on 2 cores)")
    command = server_command(base_dir, jobs, port)
    print(
        " ".join(
            command[:1]
            + [str(Path(c).relative_to(ROOT)) if c.startswith(str(ROOT)) else c for c in command[1:]]
        )
    )
    print(f"server log: {log_path}", flush=True)
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    t0 = time.monotonic()
    server = start_server(command, port=port, log=log_path, cwd=ROOT, env=env)
    try:
        client = Client(server.url)
        server.wait_healthy(timeout_s=600, poll_s=2)
        print(f"healthy after {time.monotonic() - t0:.0f} s")
        models = client.http.get("/v1/models").json()["data"]
        print("/v1/models: " + ", ".join(f"{m['id']} (parent {m['parent']})" for m in models))
        banner("4/5 The same prompts to each adapter and the base in one mixed batch (greedy, OpenAI API)")
        before = counter_snapshot(client, jobs)
        t0 = time.monotonic()
        answers = ask_all(client, [BASE_NAME, *(j.name for j in jobs)], prompts)
        print(f"{len(answers)} concurrent requests answered in {time.monotonic() - t0:.1f} s")
        show_answers(answers)
        print(
            "\nper-adapter expert selections (/v1/badit/experts?adapter=NAME, summed over layers; /metrics agrees):"
        )
        check_counters(client, jobs, answers, before)
        banner(f"Runtime unload and reload of {jobs[-1].name}")
        first = next(a for a in answers if a.model == jobs[-1].name)
        unload_and_reload(client, jobs[-1], first.prompt, first)
        return answers
    finally:
        stopped = server.stop()
        print(f"server stopped (exit code {stopped.exit_code})", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--retrain", action="store_true", help="train both runs again even if finished")
    parser.add_argument("--port", type=int, default=0, help="0: a free loopback port")
    parser.add_argument("--timeout-train", type=float, default=3600, help="seconds allowed per training")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so `finally` stops the server
    jobs = [
        AdapterJob(
            "quickstart",
            Path("configs/quickstart.yaml"),
            Path("runs/quickstart"),
            Path("exports/quickstart-adapter"),
        ),
        AdapterJob(
            "quickstart_b",
            Path("configs/quickstart_b.yaml"),
            Path("runs/quickstart_b"),
            Path("exports/quickstart_b-adapter"),
        ),
    ]
    try:
        base_dir = Path(run([str(BIN / "badit-model"), "path"], 60, capture=True).strip())
        banner(f"1/5 Base model {base_dir}; SuperNI read in place from {os.environ.get('BADIT_SUPERNI_DIR')}")
        banner("2/5 Two quickstart-sized trainings on different task sets, each exported adapter-only")
        for job in jobs:
            train_and_export(job, args.retrain, args.timeout_train)
        log_path = ROOT / "runs" / "multi-demo-serve.log"
        answers = serve_and_ask(base_dir, jobs, demo_prompts(jobs), args.port or free_port(), log_path)
        banner("5/5 Every served answer against the reference loader (transformers, float32)")
        check_reference(base_dir, jobs, answers)
    except (DemoError, ServerError) as exc:
        print(f"\nmulti-adapter demo FAILED: {exc}", file=sys.stderr)
        return 1
    print("\nmulti-adapter demo: every check passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
