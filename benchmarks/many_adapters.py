"""Many adapters over one base: throughput and time to first token as traffic spreads over 1 to 512 of them.

    .venv/bin/python benchmarks/many_adapters.py [--adapter exports/quickstart-adapter] [--requests 64]

Setup, written once under runs/bench_many_adapters/ (reused when present):
- the quickstart adapter-only export (`badit-export runs/quickstart ... --adapter-only`, made when missing);
- `--unique` adapters with distinct experts: the quickstart adapter's tensors, each with its own small
  noise, written by Badit's own writer (manifest and checksums valid);
- `--adapters` adapter directories named a000.. under one --adapter-dir: the unique ones, then hard links to
  them (distinct adapters to vLLM, each loaded, cached and evicted on its own; the same bytes on disk).
One `badit-serve BASE --adapter-dir DIR --max-adapters --slots --max-cpu-adapters --host-cache` server
(float32 where the CPU has no native bfloat16, as badit-serve chooses). Loads, each `--requests` chat
requests (`--prompt-source chat`: short requests, decode-heavy, so the slots' cost shows; `superni`: the
quickstart tasks' test inputs), `--max-tokens` greedy tokens, ignore_eos, streaming)
from `--clients` concurrent clients, over 1, 8, 64 and 512 distinct adapters, uniform or Zipf (s = 1.1);
every adapter is requested once before the loads (its cold first load is measured then, not in the loads).
Reports tokens/s (and its ratio to one adapter), TTFT p50/p99, one adapter's first request cold and again
(the difference is its cold load), the mean validation + registration time (badit_adapter_load_seconds),
the /metrics size and series count, the adapter file size. JSON: benchmarks/results/many_adapters.json.
SuperNI prompts need BADIT_SUPERNI_DIR (the Makefile sets it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_throughput import BIN, ROOT, chat_prompts, engine_env, load_average, machine_description  # noqa: E402

from badit_serve.launch.server_process import ServerProcess, free_port, start_server  # noqa: E402


def adapter_export(path: Path) -> Path:
    """The quickstart adapter-only export (made from runs/quickstart when missing)."""
    if not path.is_dir():
        subprocess.run(
            [str(BIN / "badit-export"), "runs/quickstart", str(path), "--adapter-only"], check=True, cwd=ROOT
        )
    return path


def write_adapters(source: Path, root: Path, unique: int, total: int) -> float:
    """`total` adapter directories under root (unique distinct ones, then hard links); returns one adapter's
    size in MiB."""
    import torch

    from badit_serve.core.adapter import load_adapter, write_adapter

    first = root / "a000"
    if not (root / f"a{total - 1:03d}").is_dir():
        base = load_adapter(source)
        for i in range(unique):
            generator = torch.Generator().manual_seed(i)
            experts = {
                module: {
                    k: t + 1e-3 * t.std() * torch.randn(t.shape, generator=generator)
                    for k, t in parts.items()
                }
                for module, parts in base.experts.items()
            }
            write_adapter(
                root / f"a{i:03d}",
                info=base.info,
                experts=experts,
                routing_table=base.routing_table,
                force=True,
            )
        for i in range(unique, total):
            target = root / f"a{i:03d}"
            shutil.rmtree(target, ignore_errors=True)
            target.mkdir(parents=True)
            for file in (root / f"a{i % unique:03d}").iterdir():
                os.link(file, target / file.name)
    return sum(f.stat().st_size for f in first.iterdir()) / 2**20


def start(base: str, adapters: Path, slots: int, host: int, work: Path) -> tuple[ServerProcess, float]:
    port = free_port()
    command = [str(BIN / "badit-serve"), base, "--adapter-dir", str(adapters), "--port", str(port)]
    command += ["--max-adapters", str(slots), "--max-cpu-adapters", str(host), "--no-enable-prefix-caching"]
    began = time.perf_counter()
    server = start_server(
        command, port=port, log=work / "serve.log", cwd=work, env=engine_env(work / "cache")
    )
    server.wait_healthy(timeout_s=1200, poll_s=0.5)
    return server, time.perf_counter() - began


async def load(url: str, models: list[str], chats: list[list[dict]], clients: int, max_tokens: int) -> dict:
    """Stream one request per (model, chat) pair with `clients` at a time: tokens/s and TTFT."""
    queue: asyncio.Queue = asyncio.Queue()
    for job in zip(models, chats, strict=True):
        queue.put_nowait(job)
    ttfts: list[float] = []
    tokens = 0

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal tokens
        while not queue.empty():
            model, chat = queue.get_nowait()
            body = {"model": model, "messages": chat, "max_tokens": max_tokens, "temperature": 0.0}
            body |= {"ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
            began, first = time.perf_counter(), None
            async with http.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
                assert response.status_code == 200, (await response.aread())[:300]
                async for line in response.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    chunk = json.loads(line[6:])
                    if first is None and chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                        first = time.perf_counter()
                    if chunk.get("usage"):
                        tokens += chunk["usage"]["completion_tokens"]
            ttfts.append(((first or time.perf_counter()) - began) * 1e3)

    began = time.perf_counter()
    async with httpx.AsyncClient(timeout=3600) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    seconds = time.perf_counter() - began
    ttfts.sort()
    return {
        "tokens": tokens,
        "seconds": round(seconds, 2),
        "tok_s": round(tokens / seconds, 1),
        "ttft_ms_p50": round(statistics.median(ttfts)),
        "ttft_ms_p99": round(ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))]),
    }


def load_seconds_mean(metrics: str) -> float | None:
    """Mean of badit_adapter_load_seconds (validation + registration of each adapter) from /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    values = {
        sample.name: sample.value
        for family in text_string_to_metric_families(metrics)
        for sample in family.samples
        if sample.name in ("badit_adapter_load_seconds_sum", "badit_adapter_load_seconds_count")
    }
    count = values.get("badit_adapter_load_seconds_count")
    return round(values["badit_adapter_load_seconds_sum"] / count, 3) if count else None


def traffic(kind: str, distinct: int, count: int, rng: random.Random) -> list[str]:
    """`count` adapter names over the first `distinct` adapters, uniform (round robin, shuffled) or Zipf."""
    if kind == "uniform":
        names = [f"a{i % distinct:03d}" for i in range(count)]
        rng.shuffle(names)
        return names
    weights = [1 / (rank + 1) ** 1.1 for rank in range(distinct)]
    return [f"a{i:03d}" for i in rng.choices(range(distinct), weights=weights, k=count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--adapter", default="exports/quickstart-adapter")
    parser.add_argument("--adapters", type=int, default=512)
    parser.add_argument("--unique", type=int, default=64)
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--host-cache", type=int, default=64)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--spreads", default="1,8,64,512")
    parser.add_argument("--prompt-source", choices=("chat", "superni"), default="chat")
    parser.add_argument("--out", default="benchmarks/results/many_adapters.json")
    args = parser.parse_args()
    from training.model_store import resolve_model  # the prepared default model

    work = ROOT / "runs" / "bench_many_adapters"
    adapters = work / "adapters"
    adapters.mkdir(parents=True, exist_ok=True)
    size_mib = write_adapters(adapter_export(ROOT / args.adapter), adapters, args.unique, args.adapters)
    chats = chat_prompts(args.requests, args.prompt_source)
    result: dict = {"machine": machine_description(), "load_before": load_average(), "args": vars(args)}
    result["adapter_file_mib"] = round(size_mib, 1)
    server, result["ready_s"] = start(
        str(resolve_model("smollm2-135m-instruct")), adapters, args.slots, args.host_cache, work
    )
    rows = []
    try:
        url = server.url
        for state in ("cold", "warm"):  # the same one-token request to a000: its first, then again
            began = time.perf_counter()
            asyncio.run(load(url, ["a000"], chats[:1], 1, 1))
            result[f"{state}_first_request_s"] = round(time.perf_counter() - began, 2)
        names = [f"a{i:03d}" for i in range(args.adapters)]
        asyncio.run(load(url, names, [chats[0]] * len(names), args.clients, 1))  # every adapter known once
        rng = random.Random(0)
        for spread in map(int, args.spreads.split(",")):
            for kind in ("uniform", "zipf") if spread > 1 else ("uniform",):
                row = {"distinct": spread, "traffic": kind}
                row |= asyncio.run(
                    load(url, traffic(kind, spread, len(chats), rng), chats, args.clients, args.max_tokens)
                )
                print(row, flush=True)
                rows.append(row)
        text = httpx.get(f"{url}/metrics", timeout=60).text
        result["metrics_bytes"] = len(text.encode())
        result["metrics_badit_series"] = sum(1 for line in text.splitlines() if line.startswith("badit_"))
        result["load_seconds_mean"] = load_seconds_mean(text)
    finally:
        server.stop()
    one = rows[0]["tok_s"]
    for row in rows:
        row["ratio"] = round(row["tok_s"] / one, 3)
    result.update(rows=rows, load_after=load_average())
    print(f"{'distinct':>8} {'traffic':<8}{'tok/s':>8}{'x one':>7}{'TTFT p50':>10}{'p99':>8}")
    for row in rows:
        print(
            f"{row['distinct']:>8} {row['traffic']:<8}{row['tok_s']:>8}{row['ratio']:>7}{row['ttft_ms_p50']:>10}{row['ttft_ms_p99']:>8}"
        )
    print(
        f"adapter file {result['adapter_file_mib']} MiB; first request to a000 {result['cold_first_request_s']} s "
        f"cold, {result['warm_first_request_s']} s again; validation + registration {result['load_seconds_mean']} s "
        "on average; "
        f"/metrics {result['metrics_bytes']} bytes, {result['metrics_badit_series']} badit series"
    )
    out = ROOT / args.out
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
