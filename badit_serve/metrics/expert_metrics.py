"""Host-side collector of the per-expert routing statistics, in the vLLM worker process.

Every `BaditMLP` accumulates, on the device, the selected-token count (K,) and the routing-weight sum (K,)
of the real tokens it routes (`badit_serve.vllm_models.routing_stats`). The collector turns those buffers
into prometheus-client counters:

    badit_expert_tokens_total{layer, expert}            tokens that selected the expert in that layer
    badit_expert_tokens_by_ability_total{expert, label} the same summed over layers, by ability label
    badit_router_weight_sum_total{layer, expert}        sum of the expert's routing weights

It snapshots copies of the buffers (`.to("cpu", copy=True)`: on CPU a plain `.to("cpu")` would return the
live buffer itself) and adds the difference to the previous snapshot, from a background thread every
`interval` seconds and on demand (`flush`). `start()` zeroes the buffers first, so vLLM's profiling and
warm-up runs, which route thousands of dummy tokens, are never counted. With PROMETHEUS_MULTIPROC_DIR set
(badit-serve sets a fresh one), the worker's counters are written to that directory and appear on the API
server's `/metrics`.
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from prometheus_client import Counter

    from badit_serve.vllm_models.mlp import BaditMLP

UNLABELLED = "unlabelled"


@dataclass(frozen=True)
class ExpertCounters:
    tokens: Counter
    tokens_by_ability: Counter
    router_weight_sum: Counter


def make_counters(scope: tuple[str, ...] = ()) -> ExpertCounters:
    """The three counters with the extra leading labels `scope` (("adapter",) in multi-adapter mode), not in
    the default registry: in multiprocess mode the API server's collector reads them from
    PROMETHEUS_MULTIPROC_DIR."""
    from prometheus_client import Counter

    def counter(name: str, doc: str, labels: list[str]) -> Counter:
        return Counter(name, doc, [*scope, *labels], registry=None)

    return ExpertCounters(
        tokens=counter(
            "badit_expert_tokens", "Tokens routed to each expert of each Badit layer.", ["layer", "expert"]
        ),
        tokens_by_ability=counter(
            "badit_expert_tokens_by_ability",
            "Tokens routed to each expert, summed over layers, labelled by the expert's ability.",
            ["expert", "label"],
        ),
        router_weight_sum=counter(
            "badit_router_weight_sum",
            "Sum of each expert's routing weights per Badit layer.",
            ["layer", "expert"],
        ),
    )


@lru_cache(maxsize=1)
def expert_counters() -> ExpertCounters:
    """The three counters of single-export mode, created once per process."""
    return make_counters()


def layer_label(module_name: str) -> str:
    """`model.layers.3.mlp.gate_proj` -> "3" (the full name when there is no layer index)."""
    match = re.search(r"layers\.(\d+)\.", module_name)
    return match.group(1) if match else module_name


@dataclass
class LayerTotals:
    """Counts since `start()` of one routed layer."""

    module: str
    tokens: list[int]
    router_weight_sums: list[float]


class ExpertStatsCollector:
    """Flushes the BaditMLP buffers into prometheus counters (see the module docstring)."""

    def __init__(self, mlps: dict[str, BaditMLP], expert_labels: dict[str, str], report: bool = True) -> None:
        self.mlps = mlps
        self.expert_labels = expert_labels
        self.report = report
        self.started_at: float | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_tokens: dict[str, torch.Tensor] = {}
        self._last_sums: dict[str, torch.Tensor] = {}

    def start(self, interval: float = 1.0) -> None:
        """Zero the device buffers, start counting from now, and (once) start the flush thread."""
        with self._lock:
            for name, mlp in self.mlps.items():
                mlp.expert_tokens.zero_()
                mlp.router_weight_sums.zero_()
                self._last_tokens[name] = torch.zeros(mlp.expert_tokens.shape, dtype=torch.int64)
                self._last_sums[name] = torch.zeros(mlp.router_weight_sums.shape, dtype=torch.float64)
            self.started_at = time.time()
            if self.report:  # every series exists (at 0) from the start
                counters = expert_counters()
                for name, mlp in self.mlps.items():
                    for expert in range(mlp.expert_tokens.shape[0]):
                        counters.tokens.labels(layer=layer_label(name), expert=str(expert))
                        counters.router_weight_sum.labels(layer=layer_label(name), expert=str(expert))
                        label = self.expert_labels.get(str(expert), UNLABELLED)
                        counters.tokens_by_ability.labels(expert=str(expert), label=label)
        if self._thread is None and interval > 0:
            self._thread = threading.Thread(
                target=self._run, args=(interval,), name="badit-expert-metrics", daemon=True
            )
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.flush()

    def _run(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self.flush()

    def flush(self) -> list[LayerTotals]:
        """Add what was routed since the last flush to the counters; return the totals since start."""
        with self._lock:
            if self.started_at is None:
                return []
            totals = []
            by_ability: dict[tuple[str, str], int] = {}
            counters = expert_counters() if self.report else None
            for name, mlp in self.mlps.items():
                tokens = mlp.expert_tokens.to("cpu", copy=True)  # (K,) int64, a snapshot
                sums = mlp.router_weight_sums.to("cpu", copy=True)  # (K,) float64
                new_tokens = (tokens - self._last_tokens[name]).tolist()
                new_sums = (sums - self._last_sums[name]).tolist()
                self._last_tokens[name], self._last_sums[name] = tokens, sums
                totals.append(LayerTotals(name, tokens.tolist(), sums.tolist()))
                if counters is None:
                    continue
                layer = layer_label(name)
                for expert, (count, weight) in enumerate(zip(new_tokens, new_sums, strict=True)):
                    if count > 0:
                        counters.tokens.labels(layer=layer, expert=str(expert)).inc(count)
                        key = (str(expert), self.expert_labels.get(str(expert), UNLABELLED))
                        by_ability[key] = by_ability.get(key, 0) + count
                    if weight > 0:
                        counters.router_weight_sum.labels(layer=layer, expert=str(expert)).inc(weight)
            if counters is not None:
                for (expert_name, label), count in by_ability.items():
                    counters.tokens_by_ability.labels(expert=expert_name, label=label).inc(count)
            return totals
