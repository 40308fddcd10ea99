"""What the workers report, gathered over every engine and pipeline stage and merged into one server's view.

Each worker answers the extension's RPCs (`BaditWorkerExtension`) for the layers it holds, with `report`
set on one tensor-parallel rank (routing is replicated across TP ranks, so the others would count every
token again). The reporting workers are then:

- one per engine with TP alone: the whole model;
- one per pipeline stage with PP: disjoint layers, in stage order;
- one per (engine, stage) with data parallelism: each engine its own tokens over the same layers.

So the server's count of a layer is the sum of what every reporting worker says of it: concatenation for
stages, addition for engines. `every_worker_rpc` asks every engine (vLLM's `collective_rpc` answers with
the first engine's workers only under data parallelism).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from badit_serve.internals import every_worker_rpc

Report = dict[str, Any]
"""One worker's answer to a `badit_*` RPC (a dict with "report")."""


async def worker_reports(
    engine_client: Any, method: str, kwargs: dict[str, Any] | None = None
) -> list[Report]:
    """The answers of the reporting workers of every engine, engine after engine, stage after stage."""
    results = await every_worker_rpc(engine_client, method, kwargs)
    return [r for r in results if r and r.get("report")]


LAYER_SUMS = ("tokens", "router_weight_sums")
"""The per-expert lists of a layer's totals (`LayerTotals`), added across workers."""


def merge_layers(per_worker: Iterable[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Layer totals (`LayerTotals` as dicts: module, tokens, router_weight_sums) of several workers summed by
    module, in the order modules first appear (stage 0's layers, then stage 1's)."""
    merged: dict[str, dict[str, Any]] = {}
    for layers in per_worker:
        for layer in layers:
            seen = merged.setdefault(layer["module"], {"module": layer["module"]})
            for key in LAYER_SUMS:
                before = seen.get(key, [0] * len(layer[key]))
                seen[key] = [a + b for a, b in zip(before, layer[key], strict=True)]
    return list(merged.values())


def merge_expert_stats(reports: list[Report]) -> Report | None:
    """`badit_expert_stats` of every reporting worker as one server's: {"started_at", "layers"} for one export,
    {"started_at", "adapters": {name: layers}} with adapters; None when no worker reported."""
    if not reports:
        return None
    started = min((r["started_at"] for r in reports if r.get("started_at") is not None), default=None)
    if "adapters" not in reports[0]:
        return {"started_at": started, "layers": merge_layers(r["layers"] for r in reports)}
    names = dict.fromkeys(name for r in reports for name in r["adapters"])
    adapters = {name: merge_layers(r["adapters"].get(name, []) for r in reports) for name in names}
    return {"started_at": started, "adapters": adapters}


PLACES = ("slot", "host")
"""Where an adapter can be in an engine, nearest first."""


def merge_residency(reports: list[Report]) -> dict[int, str]:
    """lora id -> the nearest place any engine holds it (each data-parallel engine has its own slots and host
    cache; a stage or TP rank of one engine holds what its engine holds)."""
    where: dict[int, str] = {}
    for report in reports:
        for key, place in report.get("where", {}).items():
            lora_id = int(key)
            if lora_id not in where or PLACES.index(place) < PLACES.index(where[lora_id]):
                where[lora_id] = place
    return where
