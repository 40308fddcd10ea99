"""Per-adapter expert counters in multi-adapter mode (the worker side; see `badit_serve.metrics.expert_metrics`).

Every `BaditSlotsGateUp` accumulates (S, K) selected-token counts and routing-weight sums per adapter
slot. vLLM's LoRA manager may give a slot to another adapter between steps; the layer then calls
`on_slot_change` before its new weights are copied in, and the collector flushes what the slot counted to
the adapter that owned it. The counters carry the adapter's name (from the API server,
`BaditWorkerExtension.badit_adapter_names`). With thousands of adapters, per-layer series per adapter would
not scale (layers × K × 2 each: 480 on the default model), so by default each adapter has its K per-ability
series and the per-layer detail is kept once, summed over adapters (adapter="*"):

    badit_expert_tokens_by_ability_total{adapter, expert, label}     K per adapter
    badit_expert_tokens_total{adapter="*", layer, expert}            layers × K in all
    badit_router_weight_sum_total{adapter="*", layer, expert}        softmax weights (gate_scale folded into B)

`--adapter-layer-metrics` (layer_metrics=True) adds the per-layer series of every adapter. Each adapter's
per-layer totals are always in `GET /v1/badit/experts?adapter=NAME`. The collector also tracks where each
adapter is (`badit_serve.metrics.residency`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING

import torch

from badit_serve.metrics.expert_metrics import (
    UNLABELLED,
    ExpertCounters,
    LayerTotals,
    layer_label,
    make_counters,
)
from badit_serve.metrics.residency import RESIDENCY, residency_metrics, where

if TYPE_CHECKING:
    from badit_serve.vllm_models.adapter_slots import BaditSlotsGateUp

ENV_ADAPTER_LAYER_METRICS = "BADIT_ADAPTER_LAYER_METRICS"
"""1: per-layer counter series for every adapter (badit-serve --adapter-layer-metrics)."""
ALL_ADAPTERS = "*"
"""The `adapter` label of per-layer series summed over adapters (no adapter may take this name)."""


@lru_cache(maxsize=1)
def adapter_counters() -> ExpertCounters:
    """The counters of multi-adapter mode, labelled by adapter (never created in the same process as
    expert_counters(): the series share their names)."""
    return make_counters(("adapter",))


@dataclass
class _Layer:
    layer: BaditSlotsGateUp
    owners: list[int | None]
    last_tokens: torch.Tensor  # (S, K) int64 snapshot at the last flush
    last_sums: torch.Tensor  # (S, K) float64


@dataclass
class AdapterStatsCollector:
    layers: dict[str, BaditSlotsGateUp]
    slot_owners: Callable[[], list[int | None]]
    """vLLM's slot -> lora id list (LoRAModelManager.lora_index_to_id)."""
    names: dict[int, str] = field(default_factory=dict)
    labels: dict[str, dict[str, str]] = field(default_factory=dict)
    """adapter name -> expert -> ability label."""
    report: bool = True
    host_ids: Callable[[], set[int]] = field(default=set)
    """The lora ids in vLLM's host cache now (its worker LoRA manager's `list_adapters`)."""
    layer_metrics: bool = False
    """Per-layer counter series for every adapter (else summed over adapters: ALL_ADAPTERS)."""
    started_at: float | None = None
    totals: dict[str, dict[str, LayerTotals]] = field(default_factory=dict)
    """adapter name -> module -> totals since start."""
    _state: dict[str, _Layer] = field(default_factory=dict)
    _lock: threading.RLock = field(default_factory=threading.RLock)
    _thread: threading.Thread | None = None
    _where: dict[int, str] = field(default_factory=dict)
    """lora id -> slot / host at the last look (absent: disk)."""

    def start(self, interval: float = 1.0) -> None:
        with self._lock:
            owners = list(self.slot_owners())
            for name, layer in self.layers.items():
                layer.expert_tokens.zero_()
                layer.router_weight_sums.zero_()
                zeros = torch.zeros(layer.expert_tokens.shape, dtype=torch.int64)
                self._state[name] = _Layer(layer, owners.copy(), zeros, zeros.to(torch.float64))
                layer.slot_listener = lambda slot, name=name: self.on_slot_change(name, slot)
            self.totals.clear()
            self.started_at = time.time()
        if self._thread is None and interval > 0:
            self._thread = threading.Thread(
                target=self._run, args=(interval,), name="badit-adapter-metrics", daemon=True
            )
            self._thread.start()

    def _run(self, interval: float) -> None:
        while True:
            time.sleep(interval)
            self.flush()

    def on_slot_change(self, module: str, slot: int) -> None:
        """Before a slot of `module` takes another adapter: count what it routed so far for the old one."""
        with self._lock:
            if self.started_at is None:
                return
            self._flush_layer(module)
            self._state[module].owners[slot] = self.slot_owners()[slot]

    def flush(self) -> dict[str, dict[str, LayerTotals]]:
        with self._lock:
            if self.started_at is not None:
                for module in self._state:
                    self._flush_layer(module)
                self.track_residency()
            return self.totals

    def residency(self) -> dict[int, str]:
        """lora id -> slot / host for every adapter in the engine's slots or host cache now."""
        slots = {i for i in self.slot_owners() if i is not None}
        host = self.host_ids()
        return {i: where(i, slots, host) for i in slots | host}

    def track_residency(self) -> None:
        """Count the moves since the last look (loads into and evictions from slots and host memory) and
        set each adapter's residency gauge. Looked at every flush (one second): an adapter that came and
        went between two looks is seen as its net move."""
        now = self.residency()
        metrics = residency_metrics() if self.report else None
        for lora_id in set(now) | set(self._where):
            before, after = RESIDENCY[self._where.get(lora_id, "disk")], RESIDENCY[now.get(lora_id, "disk")]
            if before == after or metrics is None:
                continue
            name = self.names.get(lora_id, f"lora-{lora_id}")
            for level in range(min(before, after) + 1, max(before, after) + 1):  # 1 host, 2 slot
                place = "host" if level == 1 else "slot"
                if after > before:
                    metrics.loads.labels(adapter=name, into=place).inc()
                else:
                    metrics.evictions.labels(adapter=name, **{"from": place}).inc()
            metrics.residency.labels(adapter=name).set(after)
        self._where = now

    def _flush_layer(self, module: str) -> None:
        state = self._state[module]
        tokens = state.layer.expert_tokens.to("cpu", copy=True)  # (S, K) a snapshot
        sums = state.layer.router_weight_sums.to("cpu", copy=True)  # (S, K)
        new_tokens, new_sums = tokens - state.last_tokens, sums - state.last_sums  # (S, K)
        state.last_tokens, state.last_sums = tokens, sums
        for slot in torch.nonzero(new_tokens.sum(dim=1)).flatten().tolist():
            owner = state.owners[slot]
            name = self.names.get(owner, f"lora-{owner}") if owner is not None else "none"
            self._add(name, module, new_tokens[slot].tolist(), new_sums[slot].tolist())

    def _add(self, adapter: str, module: str, tokens: list[int], sums: list[float]) -> None:
        per_module = self.totals.setdefault(adapter, {})
        total = per_module.setdefault(module, LayerTotals(module, [0] * len(tokens), [0.0] * len(sums)))
        total.tokens = [a + b for a, b in zip(total.tokens, tokens, strict=True)]
        total.router_weight_sums = [a + b for a, b in zip(total.router_weight_sums, sums, strict=True)]
        if not self.report:
            return
        counters, layer = adapter_counters(), layer_label(module)
        labels = self.labels.get(adapter, {})
        series = adapter if self.layer_metrics else ALL_ADAPTERS
        for expert, (count, weight) in enumerate(zip(tokens, sums, strict=True)):
            if count > 0:
                counters.tokens.labels(adapter=series, layer=layer, expert=str(expert)).inc(count)
                label = labels.get(str(expert), UNLABELLED)
                counters.tokens_by_ability.labels(adapter=adapter, expert=str(expert), label=label).inc(count)
            if weight > 0:
                counters.router_weight_sum.labels(adapter=series, layer=layer, expert=str(expert)).inc(weight)
