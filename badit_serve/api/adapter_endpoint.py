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
from argparse import Namespace
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from pydantic import BaseModel, ConfigDict

from badit_serve.core.adapter import (
    SLOTS_CONFIG_KEY,
    LoadedAdapter,
    SlotGeometry,
    base_dir_fingerprint,
    load_adapter,
)
from badit_serve.core.adapter_set import validate_adapter
from badit_serve.core.export_io import ExportError

logger = logging.getLogger(__name__)
ADAPTERS_PATH = "/v1/badit/adapters"


class AdapterLoadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    path: str


class AdapterCard(BaseModel):
    name: str
    path: str
    lora_int_id: int
    method: str


class AdaptersResponse(BaseModel):
    object: str = "badit.adapters"
    base: str
    base_fingerprint: str
    max_adapters: int
    adapters: list[AdapterCard]


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
    cards = [
        AdapterCard(
            name=name,
            path=str(a.path),
            lora_int_id=state.models.lora_requests[name].lora_int_id,
            method=a.block.method,
        )
        for name, a in state.adapters.items()
    ]
    return AdaptersResponse(
        base=str(state.base_dir),
        base_fingerprint=state.fingerprint,
        max_adapters=state.geometry.max_adapters,
        adapters=cards,
    )


def _refuse_name(state: AdapterServingState, name: str) -> None:
    if name in state.adapters:
        raise HTTPException(status_code=409, detail=f"adapter {name!r} is already loaded (DELETE it first)")
    if state.models.is_base_model(name):
        raise HTTPException(status_code=400, detail=f"{name!r} is the base model's name")
    if len(state.adapters) >= state.geometry.max_adapters:
        raise HTTPException(
            status_code=409,
            detail=f"{len(state.adapters)} adapters loaded, the server's limit (--max-adapters {state.geometry.max_adapters})",
        )


async def load_adapter_route(body: AdapterLoadRequest, request: Request) -> AdaptersResponse:
    from vllm.entrypoints.serve.lora.protocol import LoadLoRAAdapterRequest

    state = adapter_state(request)
    async with state.lock:
        _refuse_name(state, body.name)
        try:
            adapter = await asyncio.to_thread(
                validate_adapter, Path(body.path), state.base_dir, state.fingerprint, state.geometry
            )
        except ExportError as exc:
            raise HTTPException(status_code=422, detail=f"adapter {body.name!r} refused: {exc}") from exc
        result = await state.models.load_lora_adapter(
            LoadLoRAAdapterRequest(lora_name=body.name, lora_path=str(adapter.path))
        )
        if not isinstance(result, str):  # vLLM's ErrorResponse
            raise HTTPException(status_code=result.error.code, detail=result.error.message)
        state.adapters[body.name] = adapter
        await state.tell_workers()
    logger.info("Badit adapter %r loaded from %s", body.name, adapter.path)
    return await list_adapters(request)


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
    try:
        await engine_client.collective_rpc("badit_start_counting", kwargs={"interval": 1.0})
        served.counting = True
    except Exception as exc:  # the worker extension is not installed
        logger.warning("Badit expert counting disabled: %s", exc)
    await served.tell_workers()
    state.badit_adapters = served
