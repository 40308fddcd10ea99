"""Many adapters over one base: throughput of a mixed load with 1, 4 and 8 adapters, and adapter size.

    .venv/bin/python benchmarks/multi_adapter.py \
        [--base DIR] [--adapters 8] [--prompts 32] [--max-tokens 128] [--dtypes bfloat16,float32] [--out PATH]

Builds N adapter-only exports over the base (default: the prepared default model): one BAD initialisation
and N-1 copies with perturbed experts (synthetic: throughput does not depend on the expert values; the math
runs in full either way) and one full export of the first, then runs, in each dtype (bfloat16 is the serving
default), each in its own offline vLLM engine (one after another, same prompts, greedy, ignore_eos; a
decode-heavy load like benchmarks/serve_throughput.py; every adapter is loaded into its slot by a short
warm-up request before the clock starts, so adapter loading is not timed):

    full export                       today's single-export server (vLLM's compiled mode)
    multi, 1 slot, 1 adapter          badit-serve BASE --adapter a0 (LoRA machinery: eager on CPU)
    multi, 4 slots, 4 adapters mixed  requests spread round-robin over the adapters
    multi, 8 slots, 8 adapters mixed

Prints a table (tok/s, ratio to the 1-adapter multi engine and to the full export) and the adapter
directory's size next to the full export's; writes JSON with the machine and load average.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "multi_adapter.json"
WORKER = Path(__file__).resolve()


def _build(base: Path, root: Path, count: int) -> tuple[Path, list[Path]]:
    """(full export of adapter 0, adapter dirs) over `base`: adapter 0 from a BAD initialisation, the
    others its copies with perturbed experts (one SVD initialisation instead of `count`)."""
    import torch
    from transformers import AutoModelForCausalLM

    from badit_serve.core.adapter import load_adapter, write_adapter
    from training.adapters import AdapterConfig, apply_adapters
    from training.export import export_adapter, export_model

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    apply_adapters(model, AdapterConfig(method="badit"), seed=0)
    first = export_adapter(model.eval(), base, root / "a0")
    full = export_model(model, base, root / "full")
    loaded, generator = load_adapter(first), torch.Generator().manual_seed(0)
    adapters = [first]
    for i in range(1, count):
        experts = {
            m: {k: t + 0.01 * torch.randn(t.shape, generator=generator) for k, t in parts.items()}
            for m, parts in loaded.experts.items()
        }
        adapters.append(
            write_adapter(
                root / f"a{i}", info=loaded.info, experts=experts, routing_table=loaded.routing_table
            )
        )
    return full, adapters


def _dir_mib(path: Path) -> float:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file()) / 2**20


def _prompts(base: Path, count: int) -> list[list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    topics = ["a haiku about rivers", "why the sky is blue", "three uses of copper", "a short story opening"]
    chats = [[{"role": "user", "content": f"Write {topics[i % len(topics)]} (#{i})."}] for i in range(count)]
    texts = [tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in chats]
    return [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]


def run_engine(spec: dict) -> dict:
    """In a fresh process: one offline engine, the prompts, tokens generated per second."""
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    from badit_serve.plugin import register

    register()
    profile = spec.get("profile_dir")
    engine = dict(spec["engine"])
    if profile:  # vLLM's torch profiler in the worker: <dir>/*.profiler_out.txt (op table) and a trace
        engine["profiler_config"] = {"profiler": "torch", "torch_profiler_dir": profile}
    llm = LLM(model=spec["model"], dtype=spec["dtype"], max_model_len=1024, seed=0, **engine)
    params = SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"], ignore_eos=True)
    names = spec["adapters"]
    loras = [LoRARequest(f"a{i}", i + 1, path) for i, path in enumerate(names)]
    requests = [{"prompt_token_ids": ids} for ids in spec["prompts"]]
    lora_requests = [loras[i % len(loras)] for i in range(len(requests))] if loras else None
    warm = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
    count = max(len(loras), 2)  # every adapter once: vLLM loads an adapter into a slot on first use
    llm.generate(
        requests[:count], warm, lora_request=lora_requests[:count] if loras else None, use_tqdm=False
    )
    if profile:
        llm.start_profile()
    start = time.perf_counter()
    outputs = llm.generate(requests, params, lora_request=lora_requests, use_tqdm=False)
    seconds = time.perf_counter() - start
    if profile:
        llm.stop_profile()
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    return {"tokens": tokens, "seconds": seconds, "tok_per_s": tokens / seconds}


def _engine_spec(base: Path, adapters: list[Path], slots: int) -> dict:
    from badit_serve.core.adapter_set import AdapterSpec, validate_adapter_set
    from badit_serve.launch.vllm_options import vllm_engine_kwargs

    specs = [AdapterSpec(f"a{i}", p) for i, p in enumerate(adapters)]
    return {"model": str(base), "engine": vllm_engine_kwargs(validate_adapter_set(base, specs, slots))}


def _run(spec: dict, tmp: Path) -> dict:
    request, result = tmp / "spec.json", tmp / "result.json"
    request.write_text(json.dumps(spec))
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")}
    proc = subprocess.run(
        [sys.executable, str(WORKER), "--worker", str(request), str(result)],
        cwd=tmp,
        env=env,
        timeout=1800,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-4000:])
    return json.loads(result.read_text())


def _add_ratios(rows: list[dict]) -> None:
    """Each row's tok/s over the same dtype's 1-adapter and full-export rows; prints the table."""
    print(f"{'dtype':<9} {'case':<24} {'tok/s':>8} {'÷ 1 adapter':>12} {'÷ full export':>14}")
    for r in rows:
        same = [o for o in rows if o["dtype"] == r["dtype"]]
        r["vs_one_adapter"] = r["tok_per_s"] / next(o for o in same if o["adapters"] == 1)["tok_per_s"]
        r["vs_full_export"] = r["tok_per_s"] / next(o for o in same if o["adapters"] == 0)["tok_per_s"]
        print(
            f"{r['dtype']:<9} {r['case']:<24} {r['tok_per_s']:8.1f} {r['vs_one_adapter']:12.2f} "
            f"{r['vs_full_export']:14.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--base", type=Path, default=None, help="base model dir (default: the prepared default model)"
    )
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--dtypes", default="bfloat16,float32", help="comma-separated serving dtypes")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--profile-dir",
        type=Path,
        default=None,
        help="profile each timed run (slower; a diagnosis, not numbers)",
    )
    args = parser.parse_args()
    from training.model_store import resolve_model

    base = args.base or resolve_model("smollm2-135m-instruct")
    load_before, started = os.getloadavg(), time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="badit-multi-bench-") as tmp_name:
        tmp = Path(tmp_name)
        full, adapters = _build(base, tmp, args.adapters)
        prompts = _prompts(base, args.prompts)
        cases = [("full export", {"model": str(full), "engine": {}}, [])]
        for n in sorted({1, min(4, args.adapters), args.adapters}):
            cases.append((f"multi, {n} adapter(s)", _engine_spec(base, adapters[:n], n), adapters[:n]))
        rows = []
        for dtype in args.dtypes.split(","):
            common = {"prompts": prompts, "max_tokens": args.max_tokens, "dtype": dtype}
            for name, spec, used in cases:
                profile = {}
                if args.profile_dir:
                    profile = {"profile_dir": str((args.profile_dir / f"{dtype}-{len(used)}").resolve())}
                result = _run({**spec, **common, **profile, "adapters": [str(p) for p in used]}, tmp)
                rows.append({"case": name, "dtype": dtype, "adapters": len(used), **result})
                print(f"{dtype:<9} {name:<24} {result['tok_per_s']:8.1f} tok/s", flush=True)
        sizes = {"adapter_mib": _dir_mib(adapters[0]), "full_export_mib": _dir_mib(full)}
    _add_ratios(rows)
    print(f"adapter dir {sizes['adapter_mib']:.1f} MiB vs full export {sizes['full_export_mib']:.1f} MiB")
    machine = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
    }
    report = {
        "machine": machine,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "base": str(base),
        "prompts": args.prompts,
        "max_tokens": args.max_tokens,
        "dtypes": args.dtypes.split(","),
        "minutes": (time.perf_counter() - started) / 60,
        "rows": rows,
        "sizes": sizes,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        spec = json.loads(Path(sys.argv[2]).read_text())
        Path(sys.argv[3]).write_text(json.dumps(run_engine(spec)))
    else:
        main()
