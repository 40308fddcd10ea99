"""Training-step time and peak memory per method on the default model (CPU fp32, or CUDA: bf16 base weights
under bf16 autocast, as the trainer runs there).

Each method runs in its own process so that peak memory (ru_maxrss / max_memory_allocated) is its own.
    .venv/bin/python benchmarks/train_step.py [--batch 4] [--length 512] [--steps 3] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import time
from pathlib import Path

METHODS = ("lora", "pissa", "loramoe", "badit")


def _measure(method: str, batch: int, length: int, steps: int, queue: mp.Queue) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from training.adapters import (
        AdapterConfig,
        accumulate_dog_signal,
        apply_adapters,
        regroup,
        trainable_parameters,
    )
    from training.loss import response_loss
    from training.model_store import resolve_model

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(resolve_model("smollm2-135m-instruct"), dtype=dtype).to(
        device
    )
    apply_adapters(model, AdapterConfig(method=method), seed=0)
    optimizer = torch.optim.AdamW(trainable_parameters(model), lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 40000, (batch, length), generator=gen).to(device)
    labels = torch.full_like(ids, -100)
    labels[:, -50:] = ids[:, -50:]  # 50 response tokens per sequence, as in SuperNI
    data = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    times = []
    model.train()
    for step in range(steps + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss, count = response_loss(model, data)
        (loss / count).backward()
        accumulate_dog_signal(model)
        optimizer.step()
        optimizer.zero_grad()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step:  # the first step is warm-up
            times.append(time.perf_counter() - start)
    start = time.perf_counter()
    regroup(model, optimizer) if method == "badit" else None
    regroup_s = time.perf_counter() - start if method == "badit" else None
    peak = (
        torch.cuda.max_memory_allocated() / 2**20
        if device.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )
    queue.put(
        {
            "method": method,
            "device": str(device),
            "step_s": sum(times) / len(times),
            "peak_mib": peak,
            "regroup_s": regroup_s,
            "trainable": sum(p.numel() for p in trainable_parameters(model)),
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "train_step.json")
    args = parser.parse_args()
    ctx = mp.get_context("spawn")
    rows = []
    for method in args.methods:
        queue = ctx.Queue()
        proc = ctx.Process(target=_measure, args=(method, args.batch, args.length, args.steps, queue))
        proc.start()
        rows.append(queue.get())
        proc.join()
    print(
        f"SmolLM2-135M-Instruct, batch {args.batch} x {args.length} tokens (50 response tokens each), gate_proj adapters"
    )
    print(f"{'method':<8} {'device':<6} {'trainable':>10} {'s/step':>8} {'peak MiB':>9} {'regroup s':>9}")
    for r in rows:
        regroup_s = f"{r['regroup_s']:.2f}" if r["regroup_s"] is not None else "-"
        print(
            f"{r['method']:<8} {r['device']:<6} {r['trainable']:>10,} {r['step_s']:>8.2f} {r['peak_mib']:>9.0f} {regroup_s:>9}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"batch": args.batch, "length": args.length, "rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
