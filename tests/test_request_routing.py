"""Per-request routing without an engine: the steering controls, the steered routing of the served layers
against the reference loader, the routes capture op under torch.compile, and the worker's bookkeeping of
routed experts through chunked prefill, decoding, recomputation and the prefix cache."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from badit_serve.core.routing import routing_weights, steer_logits, top_experts
from badit_serve.core.steering import Steering, SteeringError, SteeringSpec, parse_steering
from badit_serve.vllm_models.request_routing import RequestRoutingBuffers, capture_routes, record_routes
from badit_serve.vllm_models.routed_output import RequestRouting, StepBatch, output_dtype
from badit_serve.vllm_models.served_experts import (
    NO_EXPERT,
    RoutingSpec,
    ServedExperts,
    SlotIndex,
    served_routing,
)

SPEC = SteeringSpec(num_experts=8, top_k=4, mode="topk")


def test_steering_parses_mask_and_bias_into_one_row() -> None:
    steering = parse_steering({"badit_mask": [1, 6], "badit_bias": [0.5] * 8, "other": 1}, SPEC)
    assert steering.bias is not None and steering.bias[0] == 0.5
    assert steering.bias[1] == -math.inf and steering.bias[6] == -math.inf
    assert parse_steering({"badit_abilities": True}, SPEC) == Steering(abilities=True)
    assert parse_steering(None, SPEC) == Steering() == parse_steering({"n": 3}, SPEC)


@pytest.mark.parametrize(
    ("extra", "field", "words"),
    [
        ({"badit_mask": [8]}, "x.badit_mask", "out of range"),
        ({"badit_mask": [-1]}, "x.badit_mask", "out of range"),
        ({"badit_mask": [True]}, "x.badit_mask", "integers"),
        ({"badit_mask": [0, 1, 2, 3, 4]}, "x.badit_mask", "at least 4"),
        ({"badit_bias": [0.0] * 7}, "x.badit_bias", "8 experts"),
        ({"badit_bias": [float("nan")] * 8}, "x.badit_bias", "finite"),
        ({"badit_bias": "1,2"}, "x.badit_bias", "list of 8"),
        ({"badit_abilities": 2}, "x.badit_abilities", "true or false"),
    ],
)
def test_bad_controls_name_their_field(extra: dict, field: str, words: str) -> None:
    with pytest.raises(SteeringError, match=words) as caught:
        parse_steering(extra, SPEC, "x")
    assert caught.value.field == field


def test_a_model_without_router_cannot_be_steered() -> None:
    with pytest.raises(SteeringError, match="no router"):
        parse_steering({"badit_mask": [0]}, SteeringSpec(1, 1, "none"))


def _experts(num_slots: int, gen: torch.Generator) -> ServedExperts:
    return ServedExperts.build(
        torch.randn(8, 16, generator=gen),
        torch.randn(16, 16, generator=gen),
        torch.randn(12, 16, generator=gen),
        0.5,
        8,
        torch.float32,
    )


def test_served_routing_with_bias_equals_the_reference_math_and_zero_bias_changes_nothing() -> None:
    gen = torch.Generator().manual_seed(0)
    experts = _experts(1, gen)
    spec = RoutingSpec(8, 4, "topk", 1.0)
    x = torch.randn(6, 16, generator=gen)
    steering = parse_steering({"badit_mask": [2, 5], "badit_bias": [0.0, 1.0] * 4}, SPEC)
    bias = torch.tensor([steering.bias] * 6, dtype=torch.float32)  # (T, K)
    routed = served_routing(x, experts, spec, bias=bias, width=4)
    logits = steer_logits(x @ experts.router.t(), bias)  # (T, K)
    weights, selected = routing_weights(logits, 4, "topk", 1.0)
    torch.testing.assert_close(routed.weights, weights)
    assert routed.experts.tolist() == top_experts(logits, 4).tolist()
    assert not selected[:, [2, 5]].any() and not (routed.experts == 2).any()
    plain, zero = (
        served_routing(x, experts, spec, width=4),
        served_routing(x, experts, spec, bias=torch.zeros_like(bias), width=4),
    )
    assert torch.equal(plain.weighted, zero.weighted) and torch.equal(plain.experts, zero.experts)


def test_tokens_without_an_adapter_report_no_expert() -> None:
    gen = torch.Generator().manual_seed(1)
    experts = _experts(1, gen)
    slots = SlotIndex.of(torch.tensor([0, -1, 0]), 1)
    routed = served_routing(
        torch.randn(3, 16, generator=gen), experts, RoutingSpec(8, 4, "topk", 1.0), slots, width=4
    )
    assert (routed.experts[1] == NO_EXPERT).all() and (routed.experts[[0, 2]] >= 0).all()


def test_routes_capture_op_writes_its_layer_column_under_compile() -> None:
    routes = torch.full((10, 3, 2), NO_EXPERT, dtype=torch.int32)

    def layer(x: torch.Tensor, column: int) -> torch.Tensor:
        experts = top_experts(x, 2)  # (T, 2)
        capture_routes(routes, column, experts)
        return x * 2

    compiled = torch.compile(layer, fullgraph=True, dynamic=True, backend="aot_eager")
    x = torch.randn(4, 8)
    compiled(x, 1)
    assert routes[:4, 1].tolist() == top_experts(x, 2).tolist()
    assert (routes[4:] == NO_EXPERT).all() and (routes[:, [0, 2]] == NO_EXPERT).all()
    record_routes(routes, 0, top_experts(x[:2], 2))
    assert routes[:2, 0].tolist() == top_experts(x[:2], 2).tolist()


def _routing(capture: bool = True) -> RequestRouting:
    return RequestRouting(RequestRoutingBuffers.allocate(SPEC, 32, 2, capture, "cpu"))


def _step(routing: RequestRouting, batch: StepBatch, fill: dict[str, int]) -> None:
    """A forward pass: each request's rows of the capture get the value fill[req] + its position."""
    routing.before_forward(batch)
    routes = routing.buffers.routes
    assert routes is not None
    offset = 0
    for req, position, count in zip(batch.req_ids, batch.positions, batch.counts, strict=True):
        values = (
            torch.arange(position, position + count, dtype=torch.int32) % 8 if fill[req] >= 0 else NO_EXPERT
        )
        routes[offset : offset + count] = torch.as_tensor(values).view(-1, 1, 1)
        offset += count
    routing.after_step()


def _batch(*rows: tuple[str, int, int], extra: dict | None = None, first: int = 0) -> StepBatch:
    return StepBatch(
        [r for r, _, _ in rows],
        [p for _, p, _ in rows],
        [c for _, _, c in rows],
        [(extra or {}).get(r) for r, _, _ in rows],
        [first] * len(rows),
    )


def test_rows_wait_through_a_prefill_chunk_and_go_out_once_with_the_first_token() -> None:
    routing = _routing()
    _step(routing, _batch(("a", 0, 5)), {"a": 0})
    start, rows = routing.take("a", sampled=False)  # a chunk: nothing sampled, offered but kept
    assert start == 0 and len(rows) == 5
    _step(routing, _batch(("a", 5, 3)), {"a": 0})
    start, rows = routing.take("a", sampled=True)
    assert start == 0 and rows[:, 0, 0].tolist() == [p % 8 for p in range(8)]
    assert rows.dtype == np.uint8
    _step(routing, _batch(("a", 8, 1)), {"a": 0})
    start, rows = routing.take("a", sampled=True)
    assert start == 8 and rows[:, 0, 0].tolist() == [0]
    routing.finish({"a"})
    assert routing.take("a", sampled=True) is None


def test_recomputed_positions_are_not_returned_twice_and_cached_ones_are_no_expert() -> None:
    routing = _routing()
    _step(routing, _batch(("a", 0, 4)), {"a": 0})
    assert routing.take("a", sampled=True)[0] == 0
    _step(routing, _batch(("a", 0, 5)), {"a": 0})  # preempted: the prompt and first token again
    start, rows = routing.take("a", sampled=True)
    assert (start, len(rows)) == (4, 1)
    _step(routing, _batch(("b", 3, 2)), {"b": 0})  # positions 0..2 came from the prefix cache
    start, rows = routing.take("b", sampled=True)
    assert start == 0 and rows[:3].tolist() == np.full((3, 2, 4), 255).tolist()


def test_steering_rows_follow_the_batch_layout_and_are_zeroed_after() -> None:
    routing = _routing(capture=False)
    extra = {"b": {"badit_mask": [3]}, "c": {"badit_bias": [1.0] * 8}}
    routing.before_forward(_batch(("a", 0, 2), ("b", 0, 3), ("c", 7, 1), extra=extra))
    bias = routing.buffers.bias
    assert (bias[:2] == 0).all() and (bias[2:5, 3] == -math.inf).all() and (bias[2:5, 0] == 0).all()
    assert (bias[5] == 1.0).all() and (bias[6:] == 0).all()
    routing.before_forward(_batch(("a", 2, 1)))
    assert (bias == 0).all()


def test_malformed_controls_reaching_the_worker_run_unsteered() -> None:
    routing = _routing(capture=False)
    routing.before_forward(_batch(("a", 0, 2), extra={"a": {"badit_mask": [99]}}))
    assert (routing.buffers.bias == 0).all()


def test_output_dtype_is_vllms() -> None:
    assert output_dtype(8) == np.uint8 and output_dtype(300) == np.uint16


def test_cli_return_routed_experts_passes_vllms_flag_and_turns_prefix_caching_off() -> None:
    from badit_serve.launch.cli import build_parser, routed_experts_args

    opts, rest = build_parser({}).parse_known_args(["/m", "--return-routed-experts"])
    assert routed_experts_args(opts, rest) == ["--enable-return-routed-experts", "--no-enable-prefix-caching"]
    opts, rest = build_parser({}).parse_known_args(
        ["/m", "--enable-return-routed-experts", "--enable-prefix-caching"]
    )
    assert routed_experts_args(opts, rest) == ["--enable-return-routed-experts"]
    assert routed_experts_args(build_parser({}).parse_known_args(["/m"])[0], []) == []


def test_the_plugin_lets_vllms_routed_experts_flag_through_for_badit_models_only() -> None:
    from types import SimpleNamespace

    from vllm.config import VllmConfig

    from badit_serve.plugin import is_badit_config, register

    register()

    def config(hf: object) -> SimpleNamespace:
        aux = SimpleNamespace(enabled=True)
        model = SimpleNamespace(hf_config=hf, runner_type="generate", is_moe=False)
        return SimpleNamespace(aux_output_config=aux, model_config=model, use_v2_model_runner=False)

    VllmConfig._verify_aux_output_compatibility(config(SimpleNamespace(badit={"num_experts": 8})))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="Model Runner V2"):
        VllmConfig._verify_aux_output_compatibility(config(SimpleNamespace()))  # type: ignore[arg-type]
    assert not is_badit_config(SimpleNamespace(badit=None))


def _app(routing: object) -> object:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from badit_serve.api.abilities import RequestRouting
    from badit_serve.api.limits import RequestGate, RequestLimits

    routes = np.array([[[0, 1]], [[1, 255]]], dtype=np.uint8)  # (2 tokens, 1 layer, 2 experts per token)

    async def completions(request: Request) -> JSONResponse:
        import base64
        import io

        buffer = io.BytesIO()
        np.save(buffer, routes)
        body = await request.json()
        encoded = base64.b64encode(buffer.getvalue()).decode()
        return JSONResponse({"model": body["model"], "choices": [{"text": "x", "routed_experts": encoded}]})

    app = Starlette(routes=[Route("/v1/completions", completions, methods=["POST"])])
    app.add_middleware(RequestRouting)
    app.add_middleware(RequestGate, limits=RequestLimits(), api_keys=[])  # decodes the body for it
    app.state.badit_routing = routing
    return app


def test_the_api_checks_controls_and_adds_a_summary_that_adds_up() -> None:
    from starlette.testclient import TestClient

    from badit_serve.api.abilities import ServedRouting

    routing = ServedRouting(SteeringSpec(4, 2, "topk"), True, lambda model: {"0": f"{model}-zero"})
    with TestClient(_app(routing)) as client:  # type: ignore[arg-type]
        bad = client.post("/v1/completions", json={"model": "m", "vllm_xargs": {"badit_mask": [4]}})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "vllm_xargs.badit_mask"
        streamed = client.post(
            "/v1/completions", json={"model": "m", "stream": True, "vllm_xargs": {"badit_abilities": 1}}
        )
        assert streamed.status_code == 400
        plain = client.post("/v1/completions", json={"model": "m", "vllm_xargs": {"badit_mask": [3]}})
        assert plain.status_code == 200 and "badit_abilities" not in plain.json()["choices"][0]
        asked = client.post("/v1/completions", json={"model": "m", "vllm_xargs": {"badit_abilities": True}})
    summary = asked.json()["choices"][0]["badit_abilities"]
    assert [e["tokens"] for e in summary["experts"]] == [1, 2, 0, 0] and summary["unrouted_entries"] == 1
    assert summary["experts"][0]["label"] == "m-zero" and summary["experts"][1]["share"] == 0.5
    assert int(asked.headers["content-length"]) == len(asked.content)
    no_routes = ServedRouting(SteeringSpec(4, 2, "topk"), False, lambda model: {})
    with TestClient(_app(no_routes)) as client:  # type: ignore[arg-type]
        refused = client.post("/v1/completions", json={"model": "m", "vllm_xargs": {"badit_abilities": True}})
    assert refused.status_code == 400 and "--return-routed-experts" in refused.json()["error"]["message"]
