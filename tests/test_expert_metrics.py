"""The expert counters' host side: the worker's collector (counts only after start, reports differences)
and the `/v1/badit/experts` response built from the counts and the routing table."""

from __future__ import annotations

import json
from types import SimpleNamespace

import torch

from badit_serve.core.format import RoutingTable
from tests.support.vllm_fakes import badit_block


def test_collector_counts_only_after_start_and_reports_differences() -> None:
    from prometheus_client import CollectorRegistry

    from badit_serve.metrics import expert_metrics

    mlp = SimpleNamespace(
        expert_tokens=torch.tensor([100, 50]),
        router_weight_sums=torch.tensor([9.0, 9.0], dtype=torch.float64),
    )
    collector = expert_metrics.ExpertStatsCollector({"model.layers.3.mlp.gate_proj": mlp}, {"0": "alpha"})  # type: ignore[dict-item]
    assert collector.flush() == []  # not started: warm-up counts are never reported
    counters = expert_metrics.expert_counters()
    registry = CollectorRegistry()
    for counter in (counters.tokens, counters.tokens_by_ability, counters.router_weight_sum):
        registry.register(counter)

    def value(name: str, **labels: str) -> float:
        return registry.get_sample_value(name, labels) or 0.0

    before = value("badit_expert_tokens_total", layer="3", expert="0")
    collector.start(interval=0)
    assert mlp.expert_tokens.tolist() == [0, 0]
    mlp.expert_tokens += torch.tensor([3, 1])
    mlp.router_weight_sums += torch.tensor([1.5, 0.5], dtype=torch.float64)
    (totals,) = collector.flush()
    assert totals.tokens == [3, 1]
    mlp.expert_tokens += torch.tensor([2, 0])
    collector.flush()
    assert value("badit_expert_tokens_total", layer="3", expert="0") - before == 5
    assert value("badit_expert_tokens_by_ability_total", expert="0", label="alpha") >= 5
    assert value("badit_expert_tokens_by_ability_total", expert="1", label=expert_metrics.UNLABELLED) >= 1


def test_experts_response_merges_counts_with_the_routing_table() -> None:
    from badit_serve.api.endpoint import BaditServingState, build_response

    block = badit_block()
    table = RoutingTable.model_validate(
        {
            "layers": [
                {
                    "module": "model.layers.0.mlp.gate_proj",
                    "experts": [{"expert": 0, "components": [], "label": "qa"}],
                }
            ],
            "expert_labels": {"1": "math"},
        }
    )
    state = BaditServingState(None, "tiny", block, table, counting=True)
    stats = {
        "started_at": 1.0,
        "layers": [
            {
                "module": "model.layers.0.mlp.gate_proj",
                "tokens": [4, 2, 2, 0],
                "router_weight_sums": [3.0, 1.0, 1.0, 0.0],
            }
        ],
    }
    response = build_response(state, stats)
    layer = response.layers[0]
    assert layer.layer == "0" and layer.tokens == 4  # 8 selections / top_k 2
    assert [e.label for e in layer.experts] == ["qa", "math", None, None]
    assert json.loads(response.model_dump_json())["object"] == "badit.experts"
