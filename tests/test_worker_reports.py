"""One server's view from many workers: every engine asked, stages concatenated, engines added, the
non-reporting tensor-parallel ranks left out (`badit_serve.api.worker_reports`)."""

from __future__ import annotations

import asyncio
from typing import Any

from badit_serve.api.worker_reports import merge_expert_stats, merge_residency, worker_reports


def _layer(i: int, tokens: list[int], weights: list[float] | None = None) -> dict[str, Any]:
    return {
        "module": f"model.layers.{i}.mlp.gate_proj",
        "tokens": tokens,
        "router_weight_sums": weights or [float(t) / 2 for t in tokens],
    }


def _stats(started: float | None, *layers: dict[str, Any], report: bool = True) -> dict[str, Any]:
    return {"report": report, "started_at": started, "layers": list(layers)}


class _OneEngine:
    """vLLM's engine client without `engine_core` (e.g. a test double): its collective_rpc is every worker."""

    def __init__(self, workers: list[Any]) -> None:
        self.workers = workers

    async def collective_rpc(self, method: str, kwargs: dict[str, Any] | None = None) -> list[Any]:
        return self.workers


class _Core:
    def __init__(self, engines: list[list[Any]]) -> None:
        self.engines, self.calls = engines, []

    async def call_utility_all_async(self, method: str, *args: Any) -> list[Any]:
        self.calls.append((method, args))
        return self.engines


class _DataParallel:
    """AsyncLLM under data parallelism: collective_rpc answers with the first engine's workers only."""

    def __init__(self, engines: list[list[Any]]) -> None:
        self.engine_core = _Core(engines)

    async def collective_rpc(self, method: str, kwargs: dict[str, Any] | None = None) -> list[Any]:
        return self.engine_core.engines[0]


def test_data_parallel_engines_are_all_asked_and_their_counts_added() -> None:
    engine0 = [
        _stats(5.0, _layer(0, [3, 1]), _layer(1, [0, 4])),
        _stats(5.0, _layer(0, [3, 1]), report=False),
    ]
    engine1 = [_stats(4.0, _layer(0, [1, 1]), _layer(1, [2, 0])), _stats(4.0, report=False)]
    client = _DataParallel([engine0, engine1])
    reports = asyncio.run(worker_reports(client, "badit_expert_stats", {"x": 1}))
    assert client.engine_core.calls == [("collective_rpc", ("badit_expert_stats", None, (), {"x": 1}))]
    assert len(reports) == 2  # the TP rank 1 of each engine does not report
    merged = merge_expert_stats(reports)
    assert merged == {
        "started_at": 4.0,
        "layers": [_layer(0, [4, 2], [2.0, 1.0]), _layer(1, [2, 4], [1.0, 2.0])],
    }


def test_pipeline_stages_give_disjoint_layers_in_stage_order() -> None:
    stage0, stage1 = _stats(1.0, _layer(0, [2, 2]), _layer(1, [1, 3])), _stats(2.0, _layer(2, [4, 0]))
    reports = asyncio.run(worker_reports(_OneEngine([stage0, None, stage1]), "badit_expert_stats"))
    merged = merge_expert_stats(reports)
    assert merged is not None
    assert [layer["module"] for layer in merged["layers"]] == [
        f"model.layers.{i}.mlp.gate_proj" for i in range(3)
    ]
    assert merged["layers"][2]["tokens"] == [4, 0]


def test_per_adapter_stats_merge_by_adapter_and_layer() -> None:
    a = {"report": True, "started_at": 3.0, "adapters": {"x": [_layer(0, [1, 0])], "y": [_layer(0, [0, 2])]}}
    b = {"report": True, "started_at": 3.5, "adapters": {"x": [_layer(0, [2, 2])]}}
    merged = merge_expert_stats([a, b])
    assert merged is not None
    assert merged["adapters"]["x"] == [_layer(0, [3, 2], [1.5, 1.0])]
    assert merged["adapters"]["y"] == [_layer(0, [0, 2])]
    assert merge_expert_stats([]) is None


def test_residency_is_the_nearest_place_over_engines() -> None:
    engine0 = {"report": True, "where": {"1": "host", "2": "slot"}}
    engine1 = {"report": True, "where": {"1": "slot", "3": "host"}}
    assert merge_residency([engine0, engine1]) == {1: "slot", 2: "slot", 3: "host"}
