"""Adapter residency metrics in multi-adapter mode: where each adapter is, how often it moves, and what
loading costs. Bounded by the adapters known (a fixed number of series each; docs/SERVING.md states it).

API server (one process):
    badit_adapter_requests_total{adapter}        inference requests naming the adapter
    badit_adapter_load_seconds                   validation + registration with vLLM of one adapter
                                                 (histogram, no adapter label)
Worker (rank 0; exact, from the slot layers' change notices and vLLM's host cache):
    badit_adapter_residency{adapter}             2 in a slot, 1 in host memory, 0 on disk only
    badit_adapter_loads_total{adapter, into}     into = slot | host
    badit_adapter_evictions_total{adapter, from} from = slot | host
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from prometheus_client import Counter, Gauge, Histogram

RESIDENCY = {"slot": 2, "host": 1, "disk": 0}


@dataclass(frozen=True)
class ResidencyMetrics:
    requests: Counter
    load_seconds: Histogram
    residency: Gauge
    loads: Counter
    evictions: Counter


@lru_cache(maxsize=1)
def residency_metrics() -> ResidencyMetrics:
    """The series above, outside the default registry (in multiprocess mode vLLM's /metrics collects them
    from PROMETHEUS_MULTIPROC_DIR); created once per process."""
    from prometheus_client import Counter, Gauge, Histogram

    return ResidencyMetrics(
        requests=Counter(
            "badit_adapter_requests", "Inference requests naming each adapter.", ["adapter"], registry=None
        ),
        load_seconds=Histogram(
            "badit_adapter_load_seconds",
            "Seconds to validate an adapter and register it with vLLM (its first load, or a reload).",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
            registry=None,
        ),
        residency=Gauge(
            "badit_adapter_residency",
            "Where each adapter is: 2 in an engine slot, 1 in host memory, 0 on disk only.",
            ["adapter"],
            registry=None,
            multiprocess_mode="mostrecent",
        ),
        loads=Counter(
            "badit_adapter_loads",
            "Adapter loads into an engine slot or host memory.",
            ["adapter", "into"],
            registry=None,
        ),
        evictions=Counter(
            "badit_adapter_evictions",
            "Adapter evictions from an engine slot or host memory.",
            ["adapter", "from"],
            registry=None,
        ),
    )


def where(lora_id: int, slots: set[int], host: set[int]) -> str:
    """slot, host or disk."""
    return "slot" if lora_id in slots else "host" if lora_id in host else "disk"
