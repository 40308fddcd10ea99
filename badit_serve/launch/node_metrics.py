"""/metrics of a headless node: the Badit counters of the engines this badit-serve started, where vLLM runs
no API server.

With data parallelism across machines, `badit-serve EXPORT --headless --data-parallel-address HEAD ...`
runs engines only; their workers write the expert counters into this process's PROMETHEUS_MULTIPROC_DIR,
which the head's API server cannot read. badit-serve then serves that directory itself, on --host/--port
(which the headless node does not otherwise use): Prometheus scrapes the head and every headless node,
and a sum over instances counts every routed token once. The head's `/v1/badit/experts` asks every engine
over vLLM's own RPC and needs none of this.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol


class Stoppable(Protocol):
    def shutdown(self) -> None: ...


def serve_node_metrics(host: str, port: int, metrics_dir: Path) -> Stoppable:
    """An HTTP server (a daemon thread) answering GET /metrics with the counters under `metrics_dir`."""
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(metrics_dir))  # type: ignore[no-untyped-call]
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server
