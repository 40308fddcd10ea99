"""The cost of per-request routing: routed experts returned, the `badit_abilities` summary, and steering.

    .venv/bin/python benchmarks/request_routing.py [--export exports/quickstart] [--requests 48]

Two badit-serve servers on the same export, one after the other, the same options (prefix caching off in
both: --return-routed-experts turns it off, so the baseline does too):
- off: badit-serve EXPORT;
- on:  badit-serve EXPORT --return-routed-experts (every answer carries `routed_experts`).
Loads, each `--requests` non-streaming chat completions (SuperNI test inputs of the quickstart tasks,
`--max-tokens` greedy tokens, ignore_eos) from `--clients` concurrent clients, repeated over `--rounds`
rounds in alternating order (the best round counts: the machine may be shared):
- plain: nothing asked;
- steered: every other request masks one expert (`vllm_xargs.badit_mask`);
- abilities (on only): every request asks for `badit_abilities`.
Then, on the `on` server, the docs' worked example: the demo's sst2 question with `badit_abilities`, and
again with its most used expert masked. Prints tokens/s and ratios to off/plain, writes
benchmarks/results/request_routing.json with the machine. Needs BADIT_SUPERNI_DIR (the Makefile sets it).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_throughput import (  # noqa: E402  (the sibling benchmark's inputs and machine description)
    BIN,
    ROOT,
    engine_env,
    ensure_export,
    load_average,
    machine_description,
    superni_prompts,
)

from badit_serve.launch.server_process import ServerProcess, free_port, start_server  # noqa: E402

LOADS = {"off": ("plain", "steered"), "on": ("plain", "steered", "abilities")}


@dataclass
class Row:
    server: str
    load: str
    round: int
    tokens: int
    seconds: float
    tok_s: float
    latency_ms_median: float


def start(kind: str, export: str, work: Path) -> tuple[ServerProcess, float]:
    port = free_port()
    command = [str(BIN / "badit-serve"), export, "--port", str(port), "--served-model-name", "m"]
    command += ["--no-enable-prefix-caching"] + (["--return-routed-experts"] if kind == "on" else [])
    log = work / f"serve-{kind}.log"
    began = time.perf_counter()
    server = start_server(command, port=port, log=log, cwd=work, env=engine_env(work / f"cache-{kind}"))
    server.wait_healthy(timeout_s=900, poll_s=0.5)
    return server, time.perf_counter() - began


def request_body(chat: list[dict], load: str, index: int, max_tokens: int) -> dict:
    body: dict = {
        "model": "m",
        "messages": chat,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
    }
    if load == "steered" and index % 2:
        body["vllm_xargs"] = {"badit_mask": [index % 4]}
    elif load == "abilities":
        body["vllm_xargs"] = {"badit_abilities": True}
    return body


def run_load(
    url: str, load: str, chats: list[list[dict]], clients: int, max_tokens: int
) -> tuple[int, float, list[float]]:
    def one(index: int) -> tuple[int, float]:
        began = time.perf_counter()
        body = request_body(chats[index % len(chats)], load, index, max_tokens)
        response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=3600)
        response.raise_for_status()
        answer = response.json()
        if load == "abilities":
            assert "badit_abilities" in answer["choices"][0], "no summary in the answer"
        return answer["usage"]["completion_tokens"], (time.perf_counter() - began) * 1e3

    began = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        done = list(pool.map(one, range(len(chats))))
    return sum(t for t, _ in done), time.perf_counter() - began, [ms for _, ms in done]


def worked_example(url: str) -> dict:
    """The docs' example: the demo's sst2 question, its abilities, then the answer with the most used
    expert masked."""
    from training.config import superni_dir_from_env
    from training.data.prompts import chat_user_turn
    from training.data.superni import load_task, require_superni_dir

    task = load_task(
        require_superni_dir(superni_dir_from_env()), "task363_sst2_polarity_classification", 1, 1
    )
    chat = [
        {"role": "user", "content": chat_user_turn(task.definition, "A gorgeous, witty, seductive movie.")}
    ]

    def ask(xargs: dict) -> dict:
        body = {"model": "m", "messages": chat, "max_tokens": 8, "temperature": 0.0, "vllm_xargs": xargs}
        response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=600)
        response.raise_for_status()
        choice = response.json()["choices"][0]
        ranked = sorted(choice["badit_abilities"]["experts"], key=lambda e: -e["tokens"])
        return {"answer": choice["message"]["content"], "top_abilities": ranked[:3]}

    plain = ask({"badit_abilities": True})
    top = plain["top_abilities"][0]["expert"]
    masked = ask({"badit_abilities": True, "badit_mask": [top]})
    example = {"question": chat[0]["content"], "plain": plain, "masked_expert": top, "masked": masked}
    print(json.dumps(example, indent=2), flush=True)
    return example


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--export", default="exports/quickstart")
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/request_routing.json")
    args = parser.parse_args()
    export = str(ensure_export(ROOT / args.export))
    chats = superni_prompts(args.requests)
    work = Path(ROOT / "runs" / "bench_request_routing")
    work.mkdir(parents=True, exist_ok=True)
    result: dict = {"machine": machine_description(), "load_before": load_average(), "args": vars(args)}
    rows: list[Row] = []
    ready: dict[str, float] = {}
    for kind, loads in LOADS.items():
        server, ready[kind] = start(kind, export, work)
        print(f"{kind}: ready in {ready[kind]:.0f} s", flush=True)
        try:
            run_load(server.url, "plain", chats[:8], args.clients, 8)  # warm-up
            if kind == "on":
                result["example"] = worked_example(server.url)
            for round_ in range(args.rounds):
                for load in loads if round_ % 2 == 0 else tuple(reversed(loads)):
                    tokens, seconds, latencies = run_load(
                        server.url, load, chats, args.clients, args.max_tokens
                    )
                    row = Row(
                        kind, load, round_, tokens, seconds, tokens / seconds, statistics.median(latencies)
                    )
                    print(f"  {kind:<3} {load:<9} round {round_}: {row.tok_s:7.1f} tok/s", flush=True)
                    rows.append(row)
        finally:
            server.stop()
    result.update(load_after=load_average(), ready_s=ready, rows=[asdict(r) for r in rows], table=table(rows))
    out = ROOT / args.out
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


def table(rows: list[Row]) -> list[dict]:
    """Best round per (server, load), and its ratio to off/plain."""
    best: dict[tuple[str, str], Row] = {}
    for row in rows:
        key = (row.server, row.load)
        if key not in best or row.tok_s > best[key].tok_s:
            best[key] = row
    baseline = best[("off", "plain")].tok_s
    lines = [
        {
            "server": s,
            "load": load,
            "tok_s": round(r.tok_s, 1),
            "ratio": round(r.tok_s / baseline, 3),
            "latency_ms_median": round(r.latency_ms_median),
        }
        for (s, load), r in best.items()
    ]
    print(f"{'server':<7}{'load':<11}{'tok/s':>8}{'x off':>8}{'p50 ms':>9}")
    for line in lines:
        print(
            f"{line['server']:<7}{line['load']:<11}{line['tok_s']:>8}{line['ratio']:>8}{line['latency_ms_median']:>9}"
        )
    return lines


if __name__ == "__main__":
    main()
