"""Per-adapter expert counters in multi-adapter mode (the worker side; see `badit_serve.metrics.expert_metrics`).

Every `BaditSlotsGateUp` accumulates (S, K) selected-token counts and routing-weight sums per adapter
slot. vLLM's LoRA manager may give a slot to another adapter between steps; the layer then calls
`on_slot_change` before its new weights are copied in, and the collector flushes what the slot counted to
the adapter that owned it. The counters carry the adapter's name (from the API server,
`BaditWorkerExtension.badit_adapter_names`), so their series are bounded by the adapters ever loaded:

    badit_expert_tokens_total{adapter, layer, expert}
    badit_router_weight_sum_total{adapter, layer, expert}   softmax weights (gate_scale is folded into B)
    badit_expert_tokens_by_ability_total{adapter, expert, label}
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

if TYPE_CHECKING:
    from badit_serve.vllm_models.adapter_slots import BaditSlotsGateUp


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
    started_at: float | None = None
    totals: dict[str, dict[str, LayerTotals]] = field(default_factory=dict)
    """adapter name -> module -> totals since start."""
    _state: dict[str, _Layer] = field(default_factory=dict)
    _lock: threading.RLock = field(default_factory=threading.RLock)
    _thread: threading.Thread | None = None

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
            return self.totals

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
        for expert, (count, weight) in enumerate(zip(tokens, sums, strict=True)):
            if count > 0:
                counters.tokens.labels(adapter=adapter, layer=layer, expert=str(expert)).inc(count)
                label = labels.get(str(expert), UNLABELLED)
                counters.tokens_by_ability.labels(adapter=adapter, expert=str(expert), label=label).inc(count)
            if weight > 0:
                counters.router_weight_sum.labels(adapter=adapter, layer=layer, expert=str(expert)).inc(
                    weight
                )
