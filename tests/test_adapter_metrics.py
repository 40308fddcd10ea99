"""Per-adapter expert counts: a slot's counts go to the adapter that owned the slot when they were routed."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from badit_serve.metrics.adapter_metrics import AdapterStatsCollector


def test_counts_follow_the_slot_owner_across_a_slot_change() -> None:
    layer = SimpleNamespace(
        expert_tokens=torch.zeros(2, 3, dtype=torch.int64),
        router_weight_sums=torch.zeros(2, 3, dtype=torch.float64),
        slot_listener=None,
    )
    owners: list[int | None] = [None, None]
    collector = AdapterStatsCollector({"model.layers.0.mlp.gate_proj": layer}, lambda: owners, report=False)
    collector.names.update({1: "a1", 2: "a2"})
    collector.start(interval=0)
    owners[0] = 1
    layer.slot_listener(0)  # vLLM gives slot 0 to adapter 1
    layer.expert_tokens[0] += torch.tensor([2, 0, 1])
    owners[0] = 2
    layer.slot_listener(0)  # ... then to adapter 2, before the next flush
    layer.expert_tokens[0] += torch.tensor([0, 5, 0])
    totals = collector.flush()
    assert totals["a1"]["model.layers.0.mlp.gate_proj"].tokens == [2, 0, 1]
    assert totals["a2"]["model.layers.0.mlp.gate_proj"].tokens == [0, 5, 0]
    assert collector.flush()["a2"]["model.layers.0.mlp.gate_proj"].tokens == [0, 5, 0]  # no double count
