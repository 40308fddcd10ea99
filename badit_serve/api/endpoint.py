"""vLLM endpoint plugin (`vllm.endpoint_plugins`: badit): `GET /v1/badit/experts`, and the start of counting.

vLLM 0.32 loads endpoint plugins only when named in VLLM_PLUGINS (badit-serve adds "badit"). `attach_router`
runs in `build_app`; `init_state` runs in `init_app_state`, after the engine has started (profiling and
warm-up done) and before the server accepts requests: that is where the worker is told to zero its
routing statistics and start counting (`BaditWorkerExtension.badit_start_counting`). The route sits under
/v1, so vLLM's --api-key middleware guards it. `attach_router` also installs `RequestGate` (badit_serve/api/limits.py:
request limits, the key on non-/v1 routes, Retry-After), configured by $BADIT_REQUEST_LIMITS.
"""

from __future__ import annotations

import logging
import os
from argparse import Namespace
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, HTTPException, Request

from badit_serve.api.abilities import RequestRouting, ServedRouting
from badit_serve.api.adapter_endpoint import (
    AdapterServingState,
    OnDemandAdapters,
    attach_adapter_routes,
    init_adapter_state,
)
from badit_serve.api.engine_stop import end_requests_when_engine_stops
from badit_serve.api.limits import RequestGate, RequestLimits, api_keys
from badit_serve.api.schemas import ExpertCounts, ExpertsResponse, LayerCounts
from badit_serve.api.worker_reports import merge_expert_stats, worker_reports
from badit_serve.core.adapter import SLOTS_CONFIG_KEY
from badit_serve.core.export_io import read_block
from badit_serve.core.format import ROUTING_TABLE_FILE, BaditBlock, RoutingTable
from badit_serve.core.steering import SteeringSpec
from badit_serve.metrics.expert_metrics import layer_label

logger = logging.getLogger(__name__)
EXPERTS_PATH = "/v1/badit/experts"


@dataclass
class BaditServingState:
    engine_client: Any  # vllm.engine.protocol.EngineClient
    model_name: str
    block: BaditBlock
    routing_table: RoutingTable
    counting: bool


def build_response(state: BaditServingState, stats: dict[str, Any]) -> ExpertsResponse:
    """Merge the worker's totals (`BaditWorkerExtension.badit_expert_stats`) with the routing table."""
    block, table = state.block, state.routing_table
    per_token = block.top_k if block.router == "topk" else block.num_experts
    entries = {layer.module: {e.expert: e for e in layer.experts} for layer in table.layers}
    layers = []
    for layer in stats["layers"]:
        module = layer["module"]
        experts = [
            ExpertCounts(
                expert=e,
                label=getattr(entries.get(module, {}).get(e), "label", None)
                or table.expert_labels.get(str(e)),
                tokens=count,
                router_weight_sum=max(weight, 0.0),
            )
            for e, (count, weight) in enumerate(
                zip(layer["tokens"], layer["router_weight_sums"], strict=True)
            )
        ]
        layers.append(
            LayerCounts(
                module=module,
                layer=layer_label(module),
                tokens=sum(layer["tokens"]) // per_token,
                experts=experts,
            )
        )
    return ExpertsResponse(
        model=state.model_name,
        num_experts=block.num_experts,
        top_k=block.top_k,
        router=block.router,
        counting_since=stats.get("started_at"),
        layers=layers,
        routing_table=table,
    )


async def get_experts(request: Request, adapter: str | None = None) -> ExpertsResponse:
    """The routing table and live counts of the served export, or of one adapter (?adapter=NAME)."""
    served = getattr(request.app.state, "badit_adapters", None)
    state: BaditServingState | None = getattr(request.app.state, "badit", None)
    if served is not None:
        state = adapter_serving_state(served, adapter)
    elif adapter is not None:
        raise HTTPException(
            status_code=400, detail="?adapter= needs a multi-adapter server (badit-serve BASE --adapter ...)"
        )
    if state is None or not state.counting:
        raise HTTPException(
            status_code=503,
            detail="expert counting is not running (start the server with badit-serve, which installs the worker extension)",
        )
    stats = merge_expert_stats(await worker_reports(state.engine_client, "badit_expert_stats"))
    if stats is None:
        raise HTTPException(status_code=503, detail="no worker reported expert statistics")
    if served is not None:
        stats = {"started_at": stats["started_at"], "layers": stats["adapters"].get(state.model_name, [])}
    return build_response(state, stats)


def adapter_serving_state(served: AdapterServingState, adapter: str | None) -> BaditServingState:
    """One adapter of a multi-adapter server seen as a single served export."""
    if adapter is None or adapter not in served.adapters:
        raise HTTPException(
            status_code=404 if adapter else 400,
            detail=f"?adapter= must name a loaded adapter: {sorted(served.adapters)}",
        )
    loaded = served.adapters[adapter]
    return BaditServingState(
        served.engine_client, adapter, loaded.block, loaded.routing_table, served.counting
    )


class BaditEndpointPlugin:
    """The `EndpointPlugin` protocol of vllm/plugins/endpoint_plugins/interface.py."""

    name = "badit"
    required_tasks = ("generate",)

    def attach_router(self, app: FastAPI) -> None:
        router = APIRouter()
        router.add_api_route(EXPERTS_PATH, get_experts, methods=["GET"], response_model=ExpertsResponse)
        attach_adapter_routes(router)
        app.include_router(router)
        # Added before vLLM's own middleware (build_app), so it sits inside vLLM's key check.
        limits = RequestLimits.from_env(os.environ)
        app.add_middleware(RequestRouting)  # both inside the gate, which decodes the body once
        app.add_middleware(OnDemandAdapters)
        app.add_middleware(RequestGate, limits=limits, api_keys=api_keys(getattr(app.state, "args", None)))

    async def init_state(self, engine_client: Any, state: Any, args: Namespace) -> None:
        if engine_client is None:
            return
        if not end_requests_when_engine_stops(engine_client):
            logger.warning("Badit: no output handler to watch; in-flight streams may hang at shutdown")
        if getattr(engine_client.model_config.hf_config, SLOTS_CONFIG_KEY, None) is not None:
            await init_adapter_state(engine_client, state, args)
            await init_request_routing(engine_client, state, _adapter_labels(state))
            return
        model_dir = Path(engine_client.model_config.model)
        _, block = read_block(model_dir)
        table = RoutingTable.model_validate_json((model_dir / ROUTING_TABLE_FILE).read_text())
        names = getattr(args, "served_model_name", None) or [str(model_dir)]
        counting = True
        try:
            await engine_client.collective_rpc("badit_start_counting", kwargs={"interval": 1.0})
        except Exception as exc:  # the worker extension is not installed
            logger.warning("Badit expert counting disabled: %s", exc)
            counting = False
        state.badit = BaditServingState(engine_client, names[0], block, table, counting)
        await init_request_routing(engine_client, state, lambda _: table.expert_labels)


def _adapter_labels(state: Any) -> Callable[[str], Mapping[str, str]]:
    """Expert labels of a loaded adapter by its served name (none for the base or an unknown name)."""

    def labels(name: str) -> Mapping[str, str]:
        loaded = state.badit_adapters.adapters.get(name)
        return {} if loaded is None else loaded.routing_table.expert_labels

    return labels


async def init_request_routing(
    engine_client: Any, state: Any, labels: Callable[[str], Mapping[str, str]]
) -> None:
    """Start the worker's per-request routing (steering, routed experts) and keep what requests are checked
    against (`RequestRouting`)."""
    try:
        results = await engine_client.collective_rpc("badit_start_request_routing")
    except Exception as exc:  # the worker extension is not installed
        logger.warning("Badit per-request routing disabled: %s", exc)
        return
    info = next((r for r in results if r and r.get("report")), None)
    if info is None:
        return
    spec = SteeringSpec(info["num_experts"], info["top_k"], info["mode"])
    state.badit_routing = ServedRouting(spec, bool(info["returns_routed_experts"]), labels)
