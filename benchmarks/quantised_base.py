"""One Badit adapter over the full-precision base and over quantised copies of it, side by side, one run.

    .venv/bin/python benchmarks/quantised_base.py [--adapter exports/quickstart-adapter] [--schemes w8a8,w4a16]

For each scheme whose vLLM CPU kernel exists in this machine's vLLM build (a scheme without one gets a row
saying which op is missing), `badit-model quantize` makes the quantised base (llm-compressor GPTQ,
`--samples` SuperNI training samples), timed. Then one `badit-serve BASE --adapter quick=ADAPTER` per base
(full precision first), each measured alike:
- base memory: the checkpoint's bytes on disk, and the engine worker's resident memory after the loads;
- throughput: `--requests` chat completions (the quickstart tasks' test inputs, `--max-tokens` greedy
  tokens, ignore_eos, `--clients` concurrent) on the base alone and on the adapter; ratios to full precision;
- quality, the adapter's: the demo's 100 held-out sst2 sentences (exact answers, as `make demo` counts
  them) and Rouge-L of `--rouge-prompts` test prompts of a generation task (greedy, 50 tokens).
Prints a table and writes benchmarks/results/quantised_base.json with the machine. Needs BADIT_SUPERNI_DIR.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from demo import HELD_OUT, TASK, score_held_out  # noqa: E402  (the demo's held-out sst2 check)
from parallel_serving import run_load  # noqa: E402
from serve_throughput import BIN, ROOT, engine_env, load_average, machine_description, superni_prompts  # noqa: E402

from badit_serve.core.quantized_base import SCHEMES, read_quantized_base  # noqa: E402
from badit_serve.internals import cpu_kernel_gaps  # noqa: E402
from badit_serve.launch.server_process import ServerProcess, free_port, start_server  # noqa: E402
from training.config import superni_dir_from_env  # noqa: E402
from training.data.prompts import chat_user_turn  # noqa: E402
from training.data.superni import Task, load_task, require_superni_dir  # noqa: E402
from training.eval.scoring import rouge_l  # noqa: E402
from training.model_store import resolve_model  # noqa: E402

FULL = "full precision"
ROUGE_TOKENS = 50


def quantize(base: Path, scheme: str, args: argparse.Namespace, work: Path) -> tuple[Path, float | None]:
    """The quantised base of `scheme` (made now, timed; or reused from an earlier run with the same samples)."""
    out, timing = work / scheme, work / f"{scheme}.quantize.json"
    info = read_quantized_base(out) if out.is_dir() else None
    if info is not None and info.calibration.samples == args.samples and info.source_model == str(base):
        return out, json.loads(timing.read_text())["seconds"] if timing.is_file() else None
    command = [str(BIN / "badit-model"), "quantize", str(base), str(out), "--scheme", scheme, "--force"]
    command += ["--samples", str(args.samples), "--max-length", str(args.max_length)]
    began = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT)
    seconds = round(time.perf_counter() - began, 1)
    timing.write_text(json.dumps({"seconds": seconds}))
    return out, seconds


def start(base: Path, adapter: Path, label: str, work: Path) -> tuple[ServerProcess, float]:
    port = free_port()
    command = [str(BIN / "badit-serve"), str(base), "--port", str(port), "--served-model-name", "base"]
    command += ["--adapter", f"quick={adapter}", "--no-enable-prefix-caching"]
    slug = label.replace(" ", "-")
    began = time.perf_counter()
    server = start_server(
        command, port=port, log=work / f"serve-{slug}.log", cwd=work, env=engine_env(work / f"cache-{slug}")
    )
    server.wait_healthy(timeout_s=1200, poll_s=0.5)
    return server, time.perf_counter() - began


def worker_rss_mib(server: ServerProcess) -> float:
    """The largest resident set among the server's processes: the engine worker holding the weights."""
    procs = [psutil.Process(server.pid), *psutil.Process(server.pid).children(recursive=True)]
    return round(max(p.memory_info().rss for p in procs) / 2**20, 1)


def checkpoint_mib(base: Path) -> float:
    return round(sum(p.stat().st_size for p in base.glob("*.safetensors")) / 2**20, 1)


def chat(url: str, content: str, max_tokens: int) -> str:
    body = {
        "model": "quick",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0.0,
    }
    response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=600)
    response.raise_for_status()
    return response.json()["choices"][0]["message"]["content"] or ""


def answers(url: str, task: Task, max_tokens: int) -> list[str]:
    with ThreadPoolExecutor(max_workers=8) as pool:
        return list(
            pool.map(lambda i: chat(url, chat_user_turn(task.definition, i.input), max_tokens), task.test)
        )


def measure(label: str, base: Path, args: argparse.Namespace, tasks: dict[str, Task], work: Path) -> dict:
    chats = superni_prompts(args.requests)
    server, ready_s = start(base, ROOT / args.adapter, label, work)
    try:
        row: dict = {"base": label, "ready_s": round(ready_s, 1), "checkpoint_mib": checkpoint_mib(base)}
        for model in ("base", "quick"):
            run_load(server.url, chats[:1], 1, 4, model)  # warm-up (and the adapter's first load)
            tokens, _, seconds = run_load(server.url, chats, args.clients, args.max_tokens, model)
            row[f"{model}_tok_s"] = round(tokens / seconds, 1)
        row["worker_rss_mib"] = worker_rss_mib(server)
        sst2 = tasks[TASK]
        held = score_held_out(answers(server.url, sst2, 32), [i.references[0] for i in sst2.test])
        row["sst2_right"] = held.right
        gen = tasks[args.rouge_task]
        scores = [
            rouge_l(p, i.references)
            for p, i in zip(answers(server.url, gen, ROUGE_TOKENS), gen.test, strict=True)
        ]
        row["rouge_l"] = round(sum(scores) / len(scores), 2)  # rouge_l is in percent
    finally:
        server.stop()
    print(row, flush=True)
    return row


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--base", default="smollm2-135m-instruct", help="alias or full-precision base directory"
    )
    parser.add_argument("--adapter", default="exports/quickstart-adapter")
    parser.add_argument("--schemes", default="w8a8,w4a16")
    parser.add_argument("--samples", type=int, default=256, help="calibration samples")
    parser.add_argument("--max-length", type=int, default=384, help="tokens per calibration sample")
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rouge-task", default="task1290_xsum_summarization")
    parser.add_argument("--rouge-prompts", type=int, default=50)
    parser.add_argument("--work", default="runs/bench_quantised_base")
    parser.add_argument("--out", default="benchmarks/results/quantised_base.json")
    return parser.parse_args()


def print_table(rows: list[dict]) -> None:
    print(
        f"\n{'base':<16} {'ckpt MiB':>9} {'RSS MiB':>8} {'base tok/s':>11} {'Badit tok/s':>12} {'ratio':>6} {'sst2':>5} {'Rouge-L':>8}"
    )
    for r in rows:
        if "error" in r or "not_run" in r:
            print(f"{r['base']:<16} {r.get('not_run') or r.get('error')}")
            continue
        ratio = r.get("quick_tok_s_vs_full", 1.0)
        print(
            f"{r['base']:<16} {r['checkpoint_mib']:>9} {r['worker_rss_mib']:>8} {r['base_tok_s']:>11} "
            f"{r['quick_tok_s']:>12} {ratio:>6} {r['sst2_right']:>5} {r['rouge_l']:>8}"
        )


def main() -> None:
    args = parse_args()
    work = ROOT / args.work
    work.mkdir(parents=True, exist_ok=True)
    base = resolve_model(args.base)
    superni = require_superni_dir(superni_dir_from_env())
    tasks = {
        TASK: load_task(superni, TASK, max_train=0, max_test=HELD_OUT),
        args.rouge_task: load_task(superni, args.rouge_task, max_train=0, max_test=args.rouge_prompts),
    }
    began = time.time()
    bases: list[tuple[str, Path]] = [(FULL, base)]
    rows: list[dict] = []
    for scheme in args.schemes.split(","):
        missing = cpu_kernel_gaps(SCHEMES[scheme])
        if missing:
            rows.append(
                {
                    "base": scheme,
                    "not_run": f"no kernel in this CPU's vLLM build (torch.ops._C.{', '.join(missing)})",
                }
            )
            continue
        out, seconds = quantize(base, scheme, args, work)
        bases.append((scheme, out))
        rows.append({"base": scheme, "quantize_s": seconds})
    measured = {label: measure(label, path, args, tasks, work) for label, path in bases}
    full = measured[FULL]
    for row in rows:
        if row["base"] in measured:
            quantize_s = row["quantize_s"]
            row |= measured[row["base"]] | {"quantize_s": quantize_s}
            for key in ("base_tok_s", "quick_tok_s"):
                row[f"{key}_vs_full"] = round(row[key] / full[key], 3)
            row["sst2_vs_full"] = row["sst2_right"] - full["sst2_right"]
            row["rouge_l_vs_full"] = round(row["rouge_l"] - full["rouge_l"], 2)
    table = [full, *rows]
    print_table(table)
    result = {
        "machine": machine_description(),
        "load_average_end": load_average(),
        "wall_s": round(time.time() - began, 1),
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "work")} | {"base": str(base)},
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
        ).stdout.strip(),
        "rows": table,
    }
    out = ROOT / args.out
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
