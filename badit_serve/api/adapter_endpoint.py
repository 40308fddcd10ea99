"""Multi-adapter routes (`badit-serve BASE --adapter NAME=DIR ...`), under /v1 so --api-key guards them.

    GET    /v1/badit/adapters          the loaded adapters (name, path, lora id) and the base fingerprint
    POST   /v1/badit/adapters          {"name", "path"}: validate, then load at runtime
    DELETE /v1/badit/adapters/{name}   unload: new requests for NAME get 404 from vLLM; requests already
                                       running keep their LoRARequest and finish with NAME's experts
    GET    /v1/badit/experts?adapter=NAME   per-adapter expert counts (see badit_serve.api.endpoint)

A refused adapter (wrong base fingerprint, other expert shapes, bad checksum, missing file) gets a 4xx
naming the reason and changes nothing; the other adapters keep serving. Loading goes through vLLM's own
`OpenAIServingModels.load_lora_adapter`, so /v1/models lists the adapter with the base as its parent.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from argparse import Namespace
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from pydantic import BaseModel, ConfigDict
from starlette.types import ASGIApp, Receive, Scope, Send

from badit_serve.api.limits import INFERENCE_PATHS, Violation, error_response, request_json
from badit_serve.api.worker_reports import merge_residency, worker_reports
from badit_serve.core.adapter import (
    SLOTS_CONFIG_KEY,
    LoadedAdapter,
    SlotGeometry,
    base_dir_fingerprint,
    load_adapter,
)
from badit_serve.core.adapter_set import ENV_ADAPTER_DIR, AdapterDirectory, validate_adapter
from badit_serve.core.export_io import ExportError
from badit_serve.metrics.adapter_metrics import ALL_ADAPTERS
from badit_serve.metrics.residency import residency_metrics

logger = logging.getLogger(__name__)
ADAPTERS_PATH = "/v1/badit/adapters"


class AdapterLoadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    path: str


class AdapterCard(BaseModel):
    name: str
    path: str
    lora_int_id: int | None
    """vLLM's id of the registered adapter; None for one under --adapter-dir not loaded yet."""
    method: str | None
    where: str
    """slot (in an engine slot now), host (in host memory), or disk (read again on its next request)."""


class AdaptersResponse(BaseModel):
    object: str = "badit.adapters"
    base: str
    base_fingerprint: str
    max_adapters: int
    """Slots: adapters active in one forward pass."""
    adapter_dir: str | None = None
    adapters: list[AdapterCard]
    """Every known adapter: the registered ones, then those under --adapter-dir not loaded yet."""


@dataclass
class AdapterServingState:
    engine_client: Any  # vllm.engine.protocol.EngineClient
    models: Any  # vllm OpenAIServingModels
    base_dir: Path
    fingerprint: str
    geometry: SlotGeometry
    adapters: dict[str, LoadedAdapter]
    counting: bool = False
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    directory: AdapterDirectory | None = None
    """--adapter-dir: adapters loaded on their first request."""

    def lora_ids(self) -> dict[int, str]:
        return {req.lora_int_id: name for name, req in self.models.lora_requests.items()}

    async def tell_workers(self) -> None:
        """Give the workers the lora id -> adapter name map (the `adapter` label of the counters)."""
        if self.counting:
            labels = {name: a.routing_table.expert_labels for name, a in self.adapters.items()}
            await self.engine_client.collective_rpc(
                "badit_adapter_names", kwargs={"names": self.lora_ids(), "labels": labels}
            )


def adapter_state(request: Request) -> AdapterServingState:
    state: AdapterServingState | None = getattr(request.app.state, "badit_adapters", None)
    if state is None:
        raise HTTPException(
            status_code=404,
            detail="this server runs one export, not adapters (badit-serve BASE --adapter NAME=DIR)",
        )
    return state


async def list_adapters(request: Request) -> AdaptersResponse:
    state = adapter_state(request)
    where = await residency(state)
    cards = [
        AdapterCard(
            name=name,
            path=str(a.path),
            lora_int_id=state.models.lora_requests[name].lora_int_id,
            method=a.block.method,
            where=where.get(state.models.lora_requests[name].lora_int_id, "disk"),
        )
        for name, a in state.adapters.items()
    ]
    if state.directory is not None:
        unloaded = [n for n in state.directory.names() if n not in state.adapters]
        cards += [
            AdapterCard(
                name=n, path=str(state.directory.root / n), lora_int_id=None, method=None, where="disk"
            )
            for n in unloaded
        ]
    return AdaptersResponse(
        base=str(state.base_dir),
        base_fingerprint=state.fingerprint,
        max_adapters=state.geometry.max_adapters,
        adapter_dir=None if state.directory is None else str(state.directory.root),
        adapters=cards,
    )


async def residency(state: AdapterServingState) -> dict[int, str]:
    """lora id -> slot / host now, the nearest over every engine (`badit_adapter_residency`)."""
    return merge_residency(await worker_reports(state.engine_client, "badit_adapter_residency"))


def _refuse_name(state: AdapterServingState, name: str) -> None:
    if name in state.adapters:
        raise HTTPException(status_code=409, detail=f"adapter {name!r} is already loaded (DELETE it first)")
    if state.models.is_base_model(name):
        raise HTTPException(status_code=400, detail=f"{name!r} is the base model's name")
    if name == ALL_ADAPTERS:
        raise HTTPException(
            status_code=400, detail=f"{name!r} is reserved (the per-layer series of all adapters)"
        )


async def load_adapter_route(body: AdapterLoadRequest, request: Request) -> AdaptersResponse:
    state = adapter_state(request)
    async with state.lock:
        _refuse_name(state, body.name)
        began = time.perf_counter()
        try:
            adapter = await asyncio.to_thread(
                validate_adapter, Path(body.path), state.base_dir, state.fingerprint, state.geometry
            )
        except ExportError as exc:
            raise HTTPException(status_code=422, detail=f"adapter {body.name!r} refused: {exc}") from exc
        await _register(state, body.name, adapter, began)
    return await list_adapters(request)


async def _register(state: AdapterServingState, name: str, adapter: LoadedAdapter, began: float) -> None:
    """Hand a validated adapter to vLLM (`OpenAIServingModels.load_lora_adapter`: a LoRARequest, read into
    the workers' host cache) and name it to the workers. Called with `state.lock` held."""
    from vllm.entrypoints.serve.lora.protocol import LoadLoRAAdapterRequest

    result = await state.models.load_lora_adapter(
        LoadLoRAAdapterRequest(lora_name=name, lora_path=str(adapter.path))
    )
    if not isinstance(result, str):  # vLLM's ErrorResponse
        raise HTTPException(status_code=result.error.code, detail=result.error.message)
    state.adapters[name] = adapter
    await state.tell_workers()
    residency_metrics().load_seconds.observe(time.perf_counter() - began)
    logger.info("Badit adapter %r loaded from %s", name, adapter.path)


async def load_on_demand(state: AdapterServingState, name: str) -> None:
    """Make `name` servable if it is an adapter under --adapter-dir not loaded yet: validate (cached per
    directory version) and register it. HTTPException 422 naming the reason for a bad directory; nothing
    for names the directory does not hold (vLLM answers those 404)."""
    directory = state.directory
    if directory is None or directory.path(name) is None:
        return
    if name in state.adapters:
        if state.adapters[name].path == directory.root / name and directory.changed(name):
            raise HTTPException(
                status_code=409,
                detail=f"adapter {name!r} changed on disk after it was loaded; DELETE /v1/badit/adapters/"
                f"{name} and ask again to load the new version",
            )
        return
    async with state.lock:
        if name in state.adapters:  # loaded while this request waited
            return
        began = time.perf_counter()
        try:
            adapter = await asyncio.to_thread(directory.validate, name)
        except ExportError as exc:
            raise HTTPException(status_code=422, detail=f"adapter {name!r} refused: {exc}") from exc
        await _register(state, name, adapter, began)


async def unload_adapter_route(name: str, request: Request) -> AdaptersResponse:
    from vllm.entrypoints.serve.lora.protocol import UnloadLoRAAdapterRequest

    state = adapter_state(request)
    async with state.lock:
        if name not in state.adapters:
            raise HTTPException(status_code=404, detail=f"adapter {name!r} is not loaded")
        result = await state.models.unload_lora_adapter(UnloadLoRAAdapterRequest(lora_name=name))
        if not isinstance(result, str):
            raise HTTPException(status_code=result.error.code, detail=result.error.message)
        del state.adapters[name]
    logger.info("Badit adapter %r unloaded", name)
    return await list_adapters(request)


def attach_adapter_routes(router: APIRouter) -> None:
    router.add_api_route(ADAPTERS_PATH, list_adapters, methods=["GET"], response_model=AdaptersResponse)
    router.add_api_route(ADAPTERS_PATH, load_adapter_route, methods=["POST"], response_model=AdaptersResponse)
    router.add_api_route(
        f"{ADAPTERS_PATH}/{{name}}", unload_adapter_route, methods=["DELETE"], response_model=AdaptersResponse
    )


async def init_adapter_state(engine_client: Any, state: Any, args: Namespace) -> None:
    """After vLLM loaded the --lora-modules: record them, start counting, name them to the workers."""
    geometry = SlotGeometry.model_validate(getattr(engine_client.model_config.hf_config, SLOTS_CONFIG_KEY))
    base_dir = Path(engine_client.model_config.model)
    models = state.openai_serving_models
    served = AdapterServingState(
        engine_client=engine_client,
        models=models,
        base_dir=base_dir,
        fingerprint=base_dir_fingerprint(base_dir, geometry.adapted_modules),
        geometry=geometry,
        adapters={
            name: load_adapter(req.lora_path, verify_checksums=False)
            for name, req in models.lora_requests.items()
        },
    )
    directory = os.environ.get(ENV_ADAPTER_DIR)
    if directory:
        served.directory = AdapterDirectory(Path(directory), base_dir, served.fingerprint, geometry)
    try:
        await engine_client.collective_rpc("badit_start_counting", kwargs={"interval": 1.0})
        served.counting = True
    except Exception as exc:  # the worker extension is not installed
        logger.warning("Badit expert counting disabled: %s", exc)
    await served.tell_workers()
    state.badit_adapters = served


class OnDemandAdapters:
    """Pure ASGI middleware (inside the gate): before an inference request whose `model` names an adapter
    under --adapter-dir that is not loaded yet, validate and register it (`load_on_demand`), answering 422
    naming the reason for a bad one; count every request naming a registered adapter
    (`badit_adapter_requests_total`). Slots and host memory never refuse a known adapter: vLLM schedules a
    request when a slot is free and reads an evicted adapter from disk again."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        state: AdapterServingState | None = (
            getattr(scope["app"].state, "badit_adapters", None) if scope["type"] == "http" else None
        )
        path = scope.get("path", "").removeprefix(scope.get("root_path", ""))
        if state is None or scope.get("method") != "POST" or path not in INFERENCE_PATHS:
            return await self.app(scope, receive, send)
        decoded = request_json(scope)
        name = decoded.get("model") if isinstance(decoded, dict) else None
        if isinstance(name, str):
            try:
                await load_on_demand(state, name)
            except HTTPException as exc:
                violation = Violation(HTTPStatus(exc.status_code), "model", str(exc.detail))
                return await error_response(violation)(scope, receive, send)
            if name in state.adapters:
                residency_metrics().requests.labels(adapter=name).inc()
        await self.app(scope, receive, send)
