"""badit-serve BASE --adapter-dir DIR: many more adapters than slots and host memory, loaded on demand.

One server (a subprocess, float32) on a tiny llama base with 32 adapters under DIR, 2 slots and a host
cache of 4: a mixed concurrent load over all of them gives each adapter's own greedy answer (served alone
and the reference loader's) through constant eviction; per-adapter counters stay exactly top_k per routed
token; the residency view shows where each one is; an adapter added to DIR while serving answers on its
first request, and a corrupted one gets 422 naming the file while the others keep answering.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from badit_serve.core.adapter import ADAPTER_WEIGHTS_FILE
from badit_serve.core.reference import load_reference_adapter
from badit_serve.launch.server_process import ServerProcess
from tests.support.badit_exports import greedy_tokens, make_adapter
from tests.support.badit_server import (
    ServeOptions,
    greedy_completion,
    launch_badit_serve,
    wait_healthy_or_fail,
)

pytestmark = [pytest.mark.slow, pytest.mark.serve]

API_KEY = "sk-badit-dir"
BASE = "tiny-base"
ADAPTERS = 32
SLOTS, HOST = 2, 4
PROMPTS = [[1, 5, 9, 200, 33], [1, 77, 78, 4000, 12]]
MAX_TOKENS = 6
TOP_K, LAYERS = 4, 2


@dataclass
class DirServer:
    url: str
    process: ServerProcess
    root: Path
    adapter_dir: Path
    expected: dict[tuple[str, int], list[int]] = field(default_factory=dict)

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {API_KEY}"}

    def complete(self, model: str, prompt: list[int]) -> httpx.Response:
        return greedy_completion(self.url, model, prompt, MAX_TOKENS, API_KEY)

    def tokens(self, model: str, prompt: int) -> list[int]:
        response = self.complete(model, PROMPTS[prompt])
        assert response.status_code == 200, response.text
        return response.json()["choices"][0]["token_ids"]

    def adapters(self) -> dict:
        response = httpx.get(f"{self.url}/v1/badit/adapters", headers=self.headers(), timeout=30)
        assert response.status_code == 200, response.text
        return response.json()

    def adapter_tokens(self, name: str) -> int:
        response = httpx.get(
            f"{self.url}/v1/badit/experts", params={"adapter": name}, headers=self.headers(), timeout=30
        )
        assert response.status_code == 200, response.text
        return sum(e["tokens"] for layer in response.json()["layers"] for e in layer["experts"])


@pytest.fixture(scope="module")
def server(tiny_model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[DirServer]:
    root = tmp_path_factory.mktemp("adapter_dir")
    base = tiny_model_dirs["llama"]
    adapter_dir = root / "adapters"
    for i in range(ADAPTERS):
        make_adapter(base, adapter_dir / f"t{i:02d}", steps=1, seed=100 + i)
    extra = ("--adapter-dir", str(adapter_dir), "--max-adapters", str(SLOTS), "--max-cpu-adapters", str(HOST))
    process = launch_badit_serve(
        base, root, ServeOptions(API_KEY, BASE, extra=(*extra, "--dtype", "float32"))
    )
    handle = DirServer(process.url, process, root, adapter_dir)
    try:  # the references are computed while the engine starts
        for i in range(ADAPTERS):
            reference = load_reference_adapter(base, adapter_dir / f"t{i:02d}")
            for p, prompt in enumerate(PROMPTS):
                handle.expected[(f"t{i:02d}", p)] = greedy_tokens(reference, prompt, MAX_TOKENS)
        wait_healthy_or_fail(process)
        yield handle
    finally:
        process.stop()


def test_every_adapter_under_the_directory_is_known_before_its_first_request(server: DirServer) -> None:
    listing = server.adapters()
    assert listing["max_adapters"] == SLOTS
    cards = {card["name"]: card for card in listing["adapters"]}
    assert len(cards) == ADAPTERS and all(card["where"] == "disk" for card in cards.values())


def test_mixed_load_over_32_adapters_through_2_slots_equals_each_alone_and_the_reference(
    server: DirServer,
) -> None:
    names = [f"t{i:02d}" for i in range(ADAPTERS)]
    alone = {(n, p): server.tokens(n, p) for n in names for p in range(len(PROMPTS))}
    assert alone == server.expected
    assert len({tuple(v) for v in alone.values()}) > ADAPTERS // 2  # the adapters differ
    before = {n: server.adapter_tokens(n) for n in names}
    jobs = [(n, p) for p in range(len(PROMPTS)) for n in names] * 2
    with ThreadPoolExecutor(max_workers=16) as pool:
        mixed = list(pool.map(lambda job: server.tokens(*job), jobs))
    for job, tokens in zip(jobs, mixed, strict=True):
        assert tokens == alone[job], job
    time.sleep(2.5)  # the worker flushes its counters every second
    for n in names:  # exact through evictions: nothing lost, nothing booked to another adapter
        routed = 2 * sum(len(p) + MAX_TOKENS - 1 for p in PROMPTS)
        assert server.adapter_tokens(n) - before[n] == TOP_K * LAYERS * routed, n
    listing = {card["name"]: card["where"] for card in server.adapters()["adapters"]}
    places = list(listing.values())
    assert places.count("slot") <= SLOTS and places.count("slot") + places.count("host") <= HOST
    assert places.count("disk") >= ADAPTERS - HOST


def test_metrics_stay_bounded_and_count_loads_evictions_and_requests(server: DirServer) -> None:
    text = httpx.get(f"{server.url}/metrics", timeout=30).text
    samples = [
        s for f in text_string_to_metric_families(text) for s in f.samples if s.name.startswith("badit_")
    ]
    per_layer = {s.labels.get("adapter") for s in samples if s.name == "badit_expert_tokens_total"}
    assert per_layer == {"*"}  # per-layer detail summed over adapters
    requests = {s.labels["adapter"]: s.value for s in samples if s.name == "badit_adapter_requests_total"}
    assert len(requests) == ADAPTERS and min(requests.values()) >= 2 * len(PROMPTS)
    evictions = sum(s.value for s in samples if s.name == "badit_adapter_evictions_total")
    loads = sum(s.value for s in samples if s.name == "badit_adapter_loads_total")
    assert evictions > 0 and loads > evictions
    assert any(s.name == "badit_adapter_load_seconds_count" and s.value >= ADAPTERS for s in samples)
    by_adapter = {s.labels["adapter"] for s in samples if s.name == "badit_expert_tokens_by_ability_total"}
    assert len(by_adapter) == ADAPTERS


def test_an_adapter_added_while_serving_answers_and_a_corrupted_one_gets_422_naming_the_file(
    server: DirServer, tiny_model_dirs: dict[str, Path]
) -> None:
    new = make_adapter(tiny_model_dirs["llama"], server.root / "staging" / "late", steps=1, seed=7)
    shutil.copytree(new, server.adapter_dir / "late")
    reference = load_reference_adapter(tiny_model_dirs["llama"], server.adapter_dir / "late")
    assert server.tokens("late", 0) == greedy_tokens(reference, PROMPTS[0], MAX_TOKENS)
    broken = Path(shutil.copytree(server.adapter_dir / "t03", server.adapter_dir / "broken"))
    raw = bytearray((broken / ADAPTER_WEIGHTS_FILE).read_bytes())
    raw[-1] ^= 0xFF
    (broken / ADAPTER_WEIGHTS_FILE).write_bytes(bytes(raw))
    for _ in range(2):  # refused again (from the validation cache) while the directory is unchanged
        response = server.complete("broken", PROMPTS[0])
        assert response.status_code == 422 and ADAPTER_WEIGHTS_FILE in response.text, response.text
    assert server.tokens("t05", 1) == server.expected[("t05", 1)]
    assert server.complete("nowhere", PROMPTS[0]).status_code == 404
