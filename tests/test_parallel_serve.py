"""badit-serve under vLLM's tensor, pipeline and data parallelism, served through the OpenAI API (float32).

One server per mode on the tiny labelled llama export (2 layers), or its base with one adapter:

- `--tensor-parallel-size 2`: routers and A replicated on both ranks, B and the base projections sharded
  by output rows (docs/SERVING.md "Parallel serving"); only rank 0 reports the replicated routing;
- `--pipeline-parallel-size 2`: each stage holds and reports one layer;
- `--data-parallel-size 2`: two engines behind one API server, each counting its own requests;
- the same across "machines" on loopback: a headless badit-serve's engine joining the head's over
  --data-parallel-address, its counters on its own /metrics.

Concurrent completions (so that both data-parallel engines get work) must equal the float32 reference
loader's greedy tokens, and every layer's counters must grow by exactly top_k × routed tokens, in /metrics
and in /v1/badit/experts: counted once, whatever the number of ranks, stages or engines.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from badit_serve.core.export_io import load_export
from badit_serve.core.reference import load_reference_adapter, load_reference_model
from badit_serve.launch.parallel import ENV_THREADS_BIND
from badit_serve.launch.server_process import free_port
from badit_serve.metrics.adapter_metrics import ALL_ADAPTERS
from tests.support.badit_exports import greedy_tokens, make_adapter, make_export
from tests.support.badit_server import (
    API_KEY,
    MODEL,
    ServeOptions,
    greedy_completion,
    launch_badit_serve,
    wait_healthy_or_fail,
)

pytestmark = [pytest.mark.slow, pytest.mark.serve]

PROMPTS = [[1, 5, 9, 200, 33], [1, 77, 78], [1, 4000, 12, 901, 17, 17, 3500, 42], [1, 300, 301]]
REPEATS = 2  # every prompt twice, all at once: the data-parallel balancer sends work to both engines
MAX_TOKENS = 8
LAYERS = ("0", "1")
ADAPTER = "a1"
MODES = {
    "tp2": ("--tensor-parallel-size", "2"),
    "tp2-adapter": ("--tensor-parallel-size", "2"),
    "pp2": ("--pipeline-parallel-size", "2"),
    "dp2": ("--data-parallel-size", "2"),
}
HEADERS = {"Authorization": f"Bearer {API_KEY}"}


def _metric(url: str, name: str) -> list[tuple[dict[str, str], float]]:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return [
        (sample.labels, sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    ]


def _per_layer(url: str, adapter: str | None) -> dict[str, float]:
    """badit_expert_tokens_total summed per layer: of the export, or of every adapter (the per-layer series of a
    multi-adapter server are one aggregate, adapter="*", unless --adapter-layer-metrics)."""
    totals: dict[str, float] = {}
    for labels, value in _metric(url, "badit_expert_tokens_total"):
        if adapter is None or labels.get("adapter") == ALL_ADAPTERS:
            totals[labels["layer"]] = totals.get(labels["layer"], 0.0) + value
    return totals


def _experts(url: str, adapter: str | None) -> dict:
    """/v1/badit/experts (flushes every reporting worker's counts to /metrics first)."""
    params = {} if adapter is None else {"adapter": adapter}
    response = httpx.get(f"{url}/v1/badit/experts", params=params, headers=HEADERS, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def _complete(url: str, model: str, prompt: list[int]) -> dict:
    response = greedy_completion(url, model, prompt, MAX_TOKENS)
    assert response.status_code == 200, response.text
    return response.json()


@pytest.fixture(scope="module")
def exports(tiny_model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("parallel")
    base = tiny_model_dirs["llama"]
    return {
        "base": base,
        "export": make_export(base, root / "export", labelled=True),
        "adapter": make_adapter(base, root / "adapter", steps=2, seed=7),
    }


def _reference(exports: dict[str, Path], adapter: bool) -> Callable[[list[int]], list[int]]:
    model = (
        load_reference_adapter(exports["base"], exports["adapter"])
        if adapter
        else load_reference_model(exports["export"])
    )
    return lambda prompt: greedy_tokens(model, prompt, MAX_TOKENS)


@pytest.mark.parametrize("mode", list(MODES))
def test_parallel_serving_equals_the_reference_and_counts_every_routed_token_once(
    exports: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        pytest.skip(f"{mode} needs 2 cores, this machine gives {len(cores)}")
    # badit-serve gives each rank (or data-parallel engine) its own cores where vLLM's binding would fail.
    monkeypatch.delenv(ENV_THREADS_BIND, raising=False)
    adapter = mode.endswith("-adapter")
    model, name = (exports["base"], ADAPTER) if adapter else (exports["export"], None)
    extra = ("--dtype", "float32", *MODES[mode])
    if adapter:
        extra += ("--adapter", f"{ADAPTER}={exports['adapter']}")
    server = launch_badit_serve(model, tmp_path, ServeOptions(extra=extra))
    try:
        reference = _reference(exports, adapter)  # built while the server starts
        expected = {tuple(p): reference(p) for p in PROMPTS}
        wait_healthy_or_fail(server)
        url = server.url
        _experts(url, name)
        before = _per_layer(url, name)
        with ThreadPoolExecutor(len(PROMPTS) * REPEATS) as pool:
            answers = list(pool.map(lambda p: _complete(url, name or MODEL, p), PROMPTS * REPEATS))
        for prompt, answer in zip(PROMPTS * REPEATS, answers, strict=True):
            assert answer["choices"][0]["token_ids"] == expected[tuple(prompt)], f"{mode}, prompt {prompt}"
        forwarded = sum(a["usage"]["prompt_tokens"] + a["usage"]["completion_tokens"] - 1 for a in answers)
        experts = _experts(url, name)
        after = _per_layer(url, name)
        engines = {labels.get("engine") for labels, v in _metric(url, "vllm:request_success_total") if v > 0}
    finally:
        server.stop()
    top_k = load_export(exports["export"]).block.top_k
    assert sorted(after) == list(LAYERS), after
    for layer in LAYERS:
        grown = after[layer] - before.get(layer, 0.0)
        assert grown == top_k * forwarded, f"{mode}, layer {layer}: {grown} != {top_k} x {forwarded}"
    assert [layer["layer"] for layer in experts["layers"]] == list(LAYERS)
    for layer in experts["layers"]:
        assert layer["tokens"] == forwarded, f"{mode}: /v1/badit/experts {layer['layer']}"
    if mode == "dp2":  # both engines served requests, and their counts were added
        assert len(engines) == 2, engines


def test_headless_data_parallel_engine_joins_the_head_and_every_token_is_counted_once(
    exports: dict[str, Path], tmp_path: Path
) -> None:
    """Two machines the way vLLM spans them without Ray, on loopback: the head (API server, engine 0) and a
    headless badit-serve (engine 1) joining it over --data-parallel-address. The head's /v1/badit/experts
    covers both engines; each node's /metrics has its own engine's counts and their sum is exact."""
    rpc = free_port()
    common = ("--dtype", "float32", "--data-parallel-size", "2", "--data-parallel-size-local", "1")
    common += ("--data-parallel-address", "127.0.0.1", "--data-parallel-rpc-port", str(rpc))
    head_dir, node_dir = tmp_path / "head", tmp_path / "node"
    head_dir.mkdir()
    node_dir.mkdir()
    node = launch_badit_serve(
        exports["export"],
        node_dir,
        ServeOptions(extra=(*common, "--headless", "--data-parallel-start-rank", "1")),
    )
    head = launch_badit_serve(exports["export"], head_dir, ServeOptions(extra=common))
    try:
        reference = _reference(exports, adapter=False)
        expected = {tuple(p): reference(p) for p in PROMPTS}
        wait_healthy_or_fail(head)
        _experts(head.url, None)
        before = [_per_layer(head.url, None), _per_layer(node.url, None)]
        with ThreadPoolExecutor(len(PROMPTS) * REPEATS) as pool:
            answers = list(pool.map(lambda p: _complete(head.url, MODEL, p), PROMPTS * REPEATS))
        for prompt, answer in zip(PROMPTS * REPEATS, answers, strict=True):
            assert answer["choices"][0]["token_ids"] == expected[tuple(prompt)], f"prompt {prompt}"
        forwarded = sum(a["usage"]["prompt_tokens"] + a["usage"]["completion_tokens"] - 1 for a in answers)
        experts = _experts(head.url, None)  # flushes both engines' counters
        after = [_per_layer(head.url, None), _per_layer(node.url, None)]
    finally:
        head.stop()
        node.stop()
    top_k = load_export(exports["export"]).block.top_k
    for layer in experts["layers"]:
        assert layer["tokens"] == forwarded, f"/v1/badit/experts layer {layer['layer']}"
    grown = [{k: a.get(k, 0.0) - b.get(k, 0.0) for k in LAYERS} for a, b in zip(after, before, strict=True)]
    for layer in LAYERS:
        assert grown[0][layer] + grown[1][layer] == top_k * forwarded, f"layer {layer}: {grown}"
    assert all(g[LAYERS[0]] > 0 for g in grown), f"an engine served nothing: {grown}"
