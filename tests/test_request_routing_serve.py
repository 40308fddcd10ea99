"""Per-request routing through the OpenAI API: routed experts in vLLM's field, the `badit_abilities`
summary, steering (mask and bias), 400 on bad controls, and exact counters of what was routed.

One server (a subprocess, compiled mode, float32, --return-routed-experts) on a tiny labelled llama
export; the reference loader routes the same tokens in float32.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from torch import nn

from badit_serve.core.export_io import load_export
from badit_serve.core.reference import load_reference_model
from badit_serve.core.steering import SteeringSpec, parse_steering
from badit_serve.launch.server_process import ServerProcess
from tests.support.badit_exports import make_export
from tests.support.badit_server import (
    API_KEY,
    MODEL,
    ServeOptions,
    greedy_completion,
    launch_badit_serve,
    wait_healthy_or_fail,
)
from tests.support.routed_experts import reference_routes, same_experts, served_routes

pytestmark = [pytest.mark.slow, pytest.mark.serve]

PROMPTS = [[1, 5, 9, 200, 33], [1, 77, 78], [1, 4000, 12, 901, 17, 17, 3500, 42]]
MAX_TOKENS = 8


@dataclass
class Server:
    url: str
    process: ServerProcess
    reference: nn.Module
    num_experts: int
    top_k: int
    layers: int
    labels: dict[str, str]

    def complete(self, prompt: list[int], xargs: dict | None = None, **extra: object) -> httpx.Response:
        if xargs is not None:
            extra["vllm_xargs"] = xargs
        return greedy_completion(self.url, MODEL, prompt, MAX_TOKENS, **extra)

    def choice(self, prompt: list[int], xargs: dict | None = None) -> dict:
        response = self.complete(prompt, xargs)
        assert response.status_code == 200, response.text
        return response.json()["choices"][0]

    def expert_tokens(self) -> np.ndarray:
        """(layers, K) badit_expert_tokens since counting started, from /v1/badit/experts."""
        headers = {"Authorization": f"Bearer {API_KEY}"}
        layers = httpx.get(f"{self.url}/v1/badit/experts", headers=headers, timeout=30).json()["layers"]
        return np.array([[e["tokens"] for e in layer["experts"]] for layer in layers])


@pytest.fixture(scope="module")
def server(tiny_model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("request_routing")
    export = make_export(tiny_model_dirs["llama"], root / "export", labelled=True)
    options = ServeOptions(extra=("--dtype", "float32", "--return-routed-experts"))
    process = launch_badit_serve(export, root, options)
    try:  # the reference is loaded while the engine starts
        bundle = load_export(export)
        block = bundle.block
        reference = load_reference_model(export)
        labels = bundle.routing_table.expert_labels
        handle = Server(
            process.url,
            process,
            reference,
            block.num_experts,
            block.top_k,
            len(block.adapted_modules),
            labels,
        )
        wait_healthy_or_fail(process)
        yield handle
    finally:
        process.stop()


def _bias(server: Server, xargs: dict) -> tuple[float, ...] | None:
    return parse_steering(xargs, SteeringSpec.of(server.reference.badit_block)).bias


def _check_against_reference(server: Server, prompt: list[int], xargs: dict | None = None) -> np.ndarray:
    choice = server.choice(prompt, xargs)
    routes = served_routes(choice)
    tokens = prompt + choice["token_ids"]
    assert routes.shape == (len(tokens) - 1, server.layers, server.top_k)
    expected = reference_routes(server.reference, tokens[:-1], _bias(server, xargs or {}))
    assert same_experts(routes, expected), (prompt, xargs)
    return routes


def test_routed_experts_decode_to_vllm_shape_and_equal_the_reference(server: Server) -> None:
    for prompt in PROMPTS:
        routes = _check_against_reference(server, prompt)
        assert routes.dtype == np.uint8 and routes.max() < server.num_experts


def test_abilities_summary_adds_up_to_the_routed_experts(server: Server) -> None:
    choice = server.choice(PROMPTS[2], {"badit_abilities": True})
    routes, summary = served_routes(choice), choice["badit_abilities"]
    tokens, layers, width = routes.shape
    assert (summary["routed_tokens"], summary["layers"], summary["experts_per_token"]) == (
        tokens,
        layers,
        width,
    )
    counts = [e["tokens"] for e in summary["experts"]]
    assert counts == np.bincount(routes.reshape(-1), minlength=server.num_experts).tolist()
    assert sum(counts) == tokens * layers * width and summary["unrouted_entries"] == 0
    shares = [e["share"] for e in summary["experts"]]
    assert sum(shares) == pytest.approx(1.0)
    assert [e["label"] for e in summary["experts"]] == [
        server.labels.get(str(e)) for e in range(server.num_experts)
    ]
    assert "badit_abilities" not in server.choice(PROMPTS[2])  # only when asked for


def test_masked_and_biased_requests_equal_the_steered_reference(server: Server) -> None:
    plain = served_routes(server.choice(PROMPTS[0]))
    top = int(np.bincount(plain.reshape(-1)).argmax())
    masked = _check_against_reference(server, PROMPTS[0], {"badit_mask": [top]})
    assert top not in masked  # never selected
    bias = [0.0] * server.num_experts
    bias[top] = -2.0
    bias[(top + 1) % server.num_experts] = 3.0
    biased = _check_against_reference(server, PROMPTS[1], {"badit_bias": bias})
    assert (biased == (top + 1) % server.num_experts).any(axis=-1).mean() > 0.5


def test_mixed_batch_of_differently_steered_requests_equals_each_alone(server: Server) -> None:
    steerings: list[dict | None] = [
        None,
        {"badit_mask": [0, 1]},
        {"badit_bias": [float(e % 3) for e in range(server.num_experts)]},
        {"badit_mask": [2], "badit_bias": [-0.5] * server.num_experts},
    ]
    jobs = [(i, s) for s in range(len(steerings)) for i in range(len(PROMPTS))] * 2
    alone = {}
    for i, s in set(jobs):
        choice = server.choice(PROMPTS[i], steerings[s])
        alone[(i, s)] = (choice["token_ids"], served_routes(choice))
    with ThreadPoolExecutor(max_workers=12) as pool:
        mixed = list(pool.map(lambda job: server.choice(PROMPTS[job[0]], steerings[job[1]]), jobs))
    for (i, s), choice in zip(jobs, mixed, strict=True):
        tokens, routes = alone[(i, s)]
        assert choice["token_ids"] == tokens and (served_routes(choice) == routes).all(), (i, s)


@pytest.mark.parametrize(
    ("xargs", "field"),
    [
        ({"badit_mask": [99]}, "vllm_xargs.badit_mask"),
        ({"badit_mask": "3"}, "vllm_xargs.badit_mask"),
        ({"badit_mask": list(range(6))}, "vllm_xargs.badit_mask"),
        ({"badit_bias": [1.0, 2.0]}, "vllm_xargs.badit_bias"),
        ({"badit_bias": ["x"] * 8}, "vllm_xargs.badit_bias"),
        ({"badit_bias": [1e9] * 8}, "vllm_xargs.badit_bias"),
        ({"badit_abilities": "yes"}, "vllm_xargs.badit_abilities"),
    ],
)
def test_bad_steering_values_get_400_naming_the_field(server: Server, xargs: dict, field: str) -> None:
    response = server.complete(PROMPTS[0], xargs)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == field


def test_abilities_on_a_stream_get_400(server: Server) -> None:
    response = server.complete(PROMPTS[0], {"badit_abilities": True}, stream=True)
    assert response.status_code == 400 and "stream" in response.json()["error"]["message"]


def test_counters_count_exactly_what_was_routed_after_steering(server: Server) -> None:
    before = server.expert_tokens()
    with ThreadPoolExecutor(max_workers=6) as pool:
        choices = list(
            pool.map(
                lambda job: server.choice(PROMPTS[job % 3], {"badit_mask": [job % server.num_experts]}),
                range(6),
            )
        )
    grown = server.expert_tokens() - before  # (layers, K)
    routed = sum(
        np.stack(
            [
                np.bincount(r, minlength=server.num_experts)
                for r in served_routes(c).transpose(1, 0, 2).reshape(server.layers, -1)
            ]
        )
        for c in choices
    )
    assert (grown == routed).all()
    assert (
        grown.sum(axis=1).tolist()
        == [server.top_k * sum(len(served_routes(c)) for c in choices)] * server.layers
    )
