"""The cost of vLLM's parallel modes for a Badit export on one machine: start-up, throughput, exact counts.

    .venv/bin/python benchmarks/parallel_serving.py [--export exports/quickstart] [--modes one,tp2,pp2,dp2]

One badit-serve server per mode on the same export, one after the other (prefix caching off, so every
prompt token is routed and counted): one engine; --tensor-parallel-size 2; --pipeline-parallel-size 2;
--data-parallel-size 2 (two engines, one API server). badit-serve gives each local rank its own cores.
Each mode: the time to /health, one warm-up request, then `--requests` non-streaming chat completions
(SuperNI test inputs of the quickstart tasks, `--max-tokens` greedy tokens, ignore_eos) from `--clients`
concurrent clients; tokens/s and its ratio to one engine; and whether every layer's
badit_expert_tokens_total grew by exactly top_k × routed tokens. On a 2-core machine no speed-up is
expected: the point is what the distribution costs and that the counts stay exact. Prints a table, writes
benchmarks/results/parallel_serving.json with the machine. Needs BADIT_SUPERNI_DIR (the Makefile sets it).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

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

from badit_serve.core.export_io import read_block  # noqa: E402
from badit_serve.launch.server_process import ServerError, ServerProcess, free_port, start_server  # noqa: E402

MODES = {
    "one": (),
    "tp2": ("--tensor-parallel-size", "2"),
    "pp2": ("--pipeline-parallel-size", "2"),
    "dp2": ("--data-parallel-size", "2"),
}


def start(mode: str, export: str, work: Path) -> tuple[ServerProcess, float]:
    port = free_port()
    command = [str(BIN / "badit-serve"), str(ROOT / export), "--port", str(port), "--served-model-name", "m"]
    command += ["--no-enable-prefix-caching", *MODES[mode]]
    began = time.perf_counter()
    server = start_server(
        command, port=port, log=work / f"serve-{mode}.log", cwd=work, env=engine_env(work / f"cache-{mode}")
    )
    server.wait_healthy(timeout_s=1200, poll_s=0.5)
    return server, time.perf_counter() - began


def layer_counts(url: str) -> dict[str, float]:
    """Every worker's counts flushed (GET /v1/badit/experts), then badit_expert_tokens_total per layer."""
    httpx.get(f"{url}/v1/badit/experts", timeout=120).raise_for_status()
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=60).text):
        for sample in family.samples:
            if sample.name == "badit_expert_tokens_total":
                totals[sample.labels["layer"]] = totals.get(sample.labels["layer"], 0.0) + sample.value
    return totals


def run_load(
    url: str, chats: list[list[dict]], clients: int, max_tokens: int, model: str = "m"
) -> tuple[int, int, float]:
    """(completion tokens, routed tokens, seconds) of one load on the served `model`."""

    def one(chat: list[dict]) -> tuple[int, int]:
        body = {
            "model": model,
            "messages": chat,
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "ignore_eos": True,
        }
        response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=3600)
        response.raise_for_status()
        usage = response.json()["usage"]
        return usage["completion_tokens"], usage["prompt_tokens"] + usage["completion_tokens"] - 1

    began = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        done = list(pool.map(one, chats))
    return sum(c for c, _ in done), sum(r for _, r in done), time.perf_counter() - began


def measure(mode: str, export: str, chats: list[list[dict]], args: argparse.Namespace, work: Path) -> dict:
    """One mode's row; a mode vLLM refuses for this model gives a row with its error (the log's last line
    naming it), not a crash of the whole run."""
    top_k = read_block(ROOT / export)[1].top_k
    try:
        server, ready_s = start(mode, export, work)
    except ServerError as exc:
        lines = [line.strip() for line in exc.log_tail.splitlines() if "error" in line.lower()]
        reason = next((line for line in reversed(lines) if "errors.pydantic.dev" not in line), exc.what)
        print({"mode": mode, "error": reason}, flush=True)
        return {"mode": mode, "error": reason}
    try:
        run_load(server.url, chats[:1], 1, 4)  # warm-up
        before = layer_counts(server.url)
        tokens, routed, seconds = run_load(server.url, chats, args.clients, args.max_tokens)
        after = layer_counts(server.url)
    finally:
        server.stop()
    grown = {layer: after[layer] - before.get(layer, 0.0) for layer in after}
    exact = bool(grown) and all(g == top_k * routed for g in grown.values())
    row = {"mode": mode, "ready_s": round(ready_s, 1), "tokens": tokens, "seconds": round(seconds, 2)}
    row |= {
        "tok_s": round(tokens / seconds, 1),
        "routed_tokens": routed,
        "layers": len(grown),
        "exact": exact,
    }
    print(row, flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--export", default="exports/quickstart")
    parser.add_argument("--modes", default="one,pp2,dp2,tp2")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--out", default="benchmarks/results/parallel_serving.json")
    args = parser.parse_args()
    ensure_export(ROOT / args.export)
    work = ROOT / "runs" / "bench_parallel"
    work.mkdir(parents=True, exist_ok=True)
    chats = superni_prompts(args.requests)
    result: dict = {"machine": machine_description(), "load_before": load_average(), "args": vars(args)}
    rows = [measure(mode, args.export, chats, args, work) for mode in args.modes.split(",")]
    one = next((r["tok_s"] for r in rows if r["mode"] == "one" and "error" not in r), None)
    for row in rows:
        if "error" not in row:
            row["ratio"] = round(row["tok_s"] / one, 3) if one else None
    result.update(rows=rows, load_after=load_average())
    print(f"{'mode':<6}{'ready s':>9}{'tok/s':>8}{'x one':>7}  counts")
    for row in rows:
        if "error" in row:
            print(f"{row['mode']:<6}  refused: {row['error']}")
            continue
        exact = "exact" if row["exact"] else "NOT EXACT"
        print(f"{row['mode']:<6}{row['ready_s']:>9}{row['tok_s']:>8}{row['ratio'] or '':>7}  {exact}")
    out = ROOT / args.out
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
