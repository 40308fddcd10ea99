"""`BaditWorkerExtension`: worker-side RPC methods for the expert metrics.

badit-serve passes `--worker-extension-cls badit_serve.metrics.worker_extension.BaditWorkerExtension`; vLLM 0.32
mixes the class into its Worker (`vllm/v1/worker/worker_base.py`), so the API server can call the methods
by name with `engine_client.collective_rpc("badit_start_counting")`. RPCs run in the worker's main loop
between model steps, never during a forward pass.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

from badit_serve.core.format import ROUTING_TABLE_FILE
from badit_serve.internals import lora_slot_ids
from badit_serve.metrics.adapter_metrics import ENV_ADAPTER_LAYER_METRICS, AdapterStatsCollector
from badit_serve.metrics.expert_metrics import ExpertStatsCollector


def _expert_labels(model_dir: str) -> dict[str, str]:
    path = Path(model_dir) / ROUTING_TABLE_FILE
    if not path.is_file():
        return {}
    return dict(json.loads(path.read_text()).get("expert_labels", {}))


class BaditWorkerExtension:
    """Mixed into vLLM's Worker: `self` is the worker (model_runner, vllm_config, ...)."""

    _badit_collector: ExpertStatsCollector | None = None
    _badit_adapter_collector: AdapterStatsCollector | None = None

    def _badit_report(self) -> bool:
        """Routing is replicated across tensor-parallel ranks: only rank 0 reports, or counts multiply."""
        from vllm.distributed import get_tensor_model_parallel_rank

        return get_tensor_model_parallel_rank() == 0

    def _badit_get_collector(self) -> ExpertStatsCollector:
        if self._badit_collector is None:
            from badit_serve.vllm_models.mlp import BaditMLP

            model = self.model_runner.get_model()  # type: ignore[attr-defined]
            mlps = {
                f"{name}.gate_proj": module
                for name, module in model.named_modules()
                if isinstance(module, BaditMLP)
            }
            labels = _expert_labels(self.vllm_config.model_config.model)  # type: ignore[attr-defined]
            self._badit_collector = ExpertStatsCollector(mlps, labels, report=self._badit_report())
        return self._badit_collector

    def _badit_adapters(self) -> AdapterStatsCollector | None:
        """The per-adapter collector in multi-adapter mode (None when serving one export)."""
        model = self.model_runner.get_model()  # type: ignore[attr-defined]
        if getattr(model, "badit_slots", None) is None:
            return None
        if self._badit_adapter_collector is None:
            runner = self.model_runner  # type: ignore[attr-defined]
            self._badit_adapter_collector = AdapterStatsCollector(
                dict(model.badit_slot_layers),
                lora_slot_ids(runner),
                report=self._badit_report(),
                host_ids=lambda: set(runner.lora_manager.list_adapters()),
                layer_metrics=os.environ.get(ENV_ADAPTER_LAYER_METRICS) == "1",
            )
        return self._badit_adapter_collector

    def badit_start_counting(self, interval: float = 1.0) -> dict[str, Any]:
        """Zero the routing statistics (dropping profiling and warm-up) and start the flush thread."""
        collector = self._badit_adapters() or self._badit_get_collector()
        collector.start(interval)
        layers = collector.layers if isinstance(collector, AdapterStatsCollector) else collector.mlps
        return {"layers": len(layers), "report": collector.report, "started_at": collector.started_at}

    def badit_expert_stats(self) -> dict[str, Any]:
        """Flush to the counters now and return the totals since counting started (per adapter in
        multi-adapter mode: {"adapters": {name: [layer totals]}})."""
        adapters = self._badit_adapters()
        if adapters is not None:
            totals = adapters.flush()
            return {
                "report": adapters.report,
                "started_at": adapters.started_at,
                "adapters": {name: [asdict(t) for t in per.values()] for name, per in totals.items()},
            }
        collector = self._badit_get_collector()
        layers = collector.flush()
        return {
            "report": collector.report,
            "started_at": collector.started_at,
            "layers": [asdict(layer) for layer in layers],
        }

    def badit_start_request_routing(self) -> dict[str, Any]:
        """Per-request steering and routed-experts output (`routed_output`); called once at server start.
        Returns what the API server validates requests against."""
        from badit_serve.vllm_models.routed_output import install_request_routing

        routing = install_request_routing(self.model_runner)  # type: ignore[attr-defined]
        if routing is None:
            return {}
        spec = routing.spec
        return {
            "num_experts": spec.num_experts,
            "top_k": spec.top_k,
            "mode": spec.mode,
            "returns_routed_experts": routing.buffers.routes is not None,
            "report": self._badit_report(),
        }

    def badit_adapter_residency(self) -> dict[str, Any]:
        """lora id -> slot / host for the adapters in the engine's slots or host memory now."""
        adapters = self._badit_adapters()
        if adapters is None:
            return {}
        return {"report": adapters.report, "where": {str(k): v for k, v in adapters.residency().items()}}

    def badit_adapter_names(self, names: dict[int, str], labels: dict[str, dict[str, str]]) -> None:
        """lora id -> adapter name and adapter -> expert ability labels, from the API server (multi-adapter
        mode): the counters' `adapter` and `label` labels."""
        collector = self._badit_adapters()
        if collector is not None:
            collector.names.update({int(k): v for k, v in names.items()})
            collector.labels.update(labels)
