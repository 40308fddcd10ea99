"""Cost of the routed gate_proj against the plain one, at the default model's shapes (CPU or CUDA).

Prints a table and writes JSON (default benchmarks/results/routed_layer.json):
    .venv/bin/python benchmarks/routed_layer.py [--tokens 64 512 2048] [--repeats 20] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from torch import nn

from training.adapters import AdapterConfig, layer_spec
from training.adapters.layer import RoutedAdapterLinear


def _time(fn, repeats: int, device: torch.device) -> float:
    fn()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats * 1e3  # ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, nargs="+", default=[64, 512, 2048])
    parser.add_argument("--d-in", type=int, default=576)
    parser.add_argument("--d-out", type=int, default=1536)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "routed_layer.json")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    base = nn.Linear(args.d_in, args.d_out, bias=False).to(device)
    rows = []
    for method in ("lora", "loramoe", "badit"):
        layer = RoutedAdapterLinear(base, layer_spec(AdapterConfig(method=method, dropout=0.0))).to(device)
        for tokens in args.tokens:
            x = torch.randn(tokens, args.d_in, device=device)
            with torch.no_grad():
                plain_ms = _time(lambda x=x: base(x), args.repeats, device)
                routed_ms = _time(lambda x=x, layer=layer: layer(x), args.repeats, device)
            train_ms = _time(lambda x=x, layer=layer: layer(x).sum().backward(), args.repeats, device)
            rows.append(
                {
                    "method": method,
                    "tokens": tokens,
                    "plain_fwd_ms": plain_ms,
                    "routed_fwd_ms": routed_ms,
                    "overhead": routed_ms / plain_ms,
                    "routed_fwd_bwd_ms": train_ms,
                }
            )
    print(
        f"device: {device} ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads), "
        f"gate_proj {args.d_in}->{args.d_out}, K=8 r=8 top-4"
    )
    print(
        f"{'method':<8} {'tokens':>6} {'plain fwd ms':>12} {'routed fwd ms':>13} {'x plain':>7} {'fwd+bwd ms':>10}"
    )
    for r in rows:
        print(
            f"{r['method']:<8} {r['tokens']:>6} {r['plain_fwd_ms']:>12.3f} {r['routed_fwd_ms']:>13.3f} "
            f"{r['overhead']:>7.2f} {r['routed_fwd_bwd_ms']:>10.3f}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"device": str(device), "threads": torch.get_num_threads(), "rows": rows}, indent=2)
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
