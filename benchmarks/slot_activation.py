"""Where an adapter's activation in a slot spends its time, outside any engine.

    .venv/bin/python benchmarks/slot_activation.py [--adapter exports/quickstart-adapter] [--slots 8]

vLLM's LoRA manager calls `set_lora` on every adapted layer when an adapter takes a slot. This replays
that work for one adapter-only export in one thread, per stage: reading the adapter with its checksums
(`load_adapter`, what validation costs), the float64 refactorisation into balanced factors
(`ServedExperts.build`, once per adapter while vLLM's host cache holds it: `BuiltAdapters`), and the copy
into the slot buffers with the oneDNN repack of all slots (`ServedExperts.set_slot`, at every activation).
Prints a table, writes benchmarks/results/slot_activation.json with the machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_throughput import ROOT, machine_description  # noqa: E402

from badit_serve.core.adapter import load_adapter  # noqa: E402
from badit_serve.vllm_models.cpu_gemm import prepacked_gemm_factory  # noqa: E402
from badit_serve.vllm_models.served_experts import ServedExperts, SlotShape  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--adapter", default="exports/quickstart-adapter")
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/slot_activation.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    stages = {"load with checksums": [], "refactorisation": [], "slot copy + repack": []}
    for _ in range(args.repeats):
        began = time.perf_counter()
        adapter = load_adapter(ROOT / args.adapter, verify_checksums=True)
        stages["load with checksums"].append(time.perf_counter() - began)
        build = pack = 0.0
        k = adapter.block.num_experts
        for parts in adapter.experts.values():
            a, b, router = parts["lora_a"], parts["lora_b"], parts.get("router")
            slots = ServedExperts.empty_slots(
                args.slots, SlotShape(k, a.shape[0], a.shape[1], b.shape[0]), a.dtype, "cpu"
            )
            slots.use_gemm(prepacked_gemm_factory(torch.device("cpu")))
            began = time.perf_counter()
            one = ServedExperts.build(router, a, b, 1.0, k, a.dtype)
            middle = time.perf_counter()
            slots.set_slot(args.slots // 2, one)
            _ = (slots.a_gemm, slots.b_gemm)  # the repack, made at the next use (once per step)
            build, pack = build + middle - began, pack + time.perf_counter() - middle
        stages["refactorisation"].append(build)
        stages["slot copy + repack"].append(pack)
    best = {stage: round(min(times) * 1e3, 1) for stage, times in stages.items()}
    layers = len(adapter.experts)
    print(f"{'stage (one adapter, ' + str(layers) + ' layers)':<40}{'ms':>8}")
    for stage, ms in best.items():
        print(f"{stage:<40}{ms:>8}")
    result = {"machine": machine_description(), "args": vars(args), "layers": layers, "best_ms": best}
    out = ROOT / args.out
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
