"""badit-serve BASE --adapter NAME=DIR ...: many adapters over one tiny llama base in one server.

One server (a subprocess) with two adapters trained on different data, three slots. Greedy outputs of a
mixed concurrent load equal each adapter served one request at a time and the reference loader (float32);
adapters load, unload and reload at runtime under load with no failed request for the others; bad
adapters are refused with a 4xx naming the reason; per-adapter counters grow by exactly top_k per routed
token.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM

from badit_serve.core.adapter import ADAPTER_WEIGHTS_FILE
from badit_serve.core.reference import load_reference_adapter
from badit_serve.core.steering import SteeringSpec, parse_steering
from badit_serve.launch.server_process import ServerProcess
from tests.support.badit_exports import make_adapter, reference_scores
from tests.support.badit_server import (
    ServeOptions,
    greedy_completion,
    launch_badit_serve,
    wait_healthy_or_fail,
)
from tests.support.routed_experts import NO_EXPERT_U8, reference_routes, same_experts, served_routes
from tests.support.tiny_models import TINY_VOCAB, build_tiny_model

pytestmark = [pytest.mark.slow, pytest.mark.serve]

API_KEY = "sk-badit-multi"
BASE = "tiny-base"
# Token ids inside the tiny tokenizer's vocabulary (the last id included).
PROMPTS = [[1, 5, 9, 200, 33], [1, 77, 78], [1, 4000, 12, 901, 17, 17, 3500, 42], [1, TINY_VOCAB - 1, 7]]
MAX_TOKENS = 8
TOP_K = 4


@dataclass
class MultiServer:
    url: str
    log: Path
    dirs: dict[str, Path]
    """adapter name -> directory (a1, a2 served from the start; a3 loaded at runtime; bad_* refused)."""
    expected: dict[str, list[list[int]]] = field(default_factory=dict)
    """model name -> reference greedy tokens of each prompt."""

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {API_KEY}"}

    def complete(
        self, model: str, prompt: list[int], max_tokens: int = MAX_TOKENS, **extra: object
    ) -> httpx.Response:
        return greedy_completion(self.url, model, prompt, max_tokens, API_KEY, **extra)

    def tokens_and_logprobs(self, model: str, prompt: list[int]) -> tuple[list[int], list[float]]:
        response = self.complete(model, prompt, logprobs=0)
        assert response.status_code == 200, response.text
        choice = response.json()["choices"][0]
        return choice["token_ids"], choice["logprobs"]["token_logprobs"]

    def tokens(self, model: str, prompt: list[int]) -> list[int]:
        response = self.complete(model, prompt)
        assert response.status_code == 200, response.text
        return response.json()["choices"][0]["token_ids"]


@torch.no_grad()
def _greedy(model: torch.nn.Module, prompt: list[int]) -> list[int]:
    out = model.generate(
        torch.tensor([prompt]), max_new_tokens=MAX_TOKENS, do_sample=False, eos_token_id=None
    )
    return out[0, len(prompt) :].tolist()


def _adapters(base: Path, root: Path, default_model_dir: Path) -> dict[str, Path]:
    dirs = {f"a{i}": make_adapter(base, root / f"a{i}", seed=i) for i in (1, 2, 3)}
    other_base = build_tiny_model("llama", default_model_dir, root / "other_base", seed=5)
    dirs["bad_base"] = make_adapter(other_base, root / "bad_base", seed=1)
    dirs["bad_shapes"] = make_adapter(base, root / "bad_shapes", method="loramoe", seed=1)
    corrupted = Path(shutil.copytree(dirs["a3"], root / "bad_checksum"))
    raw = bytearray((corrupted / ADAPTER_WEIGHTS_FILE).read_bytes())
    raw[-1] ^= 0xFF
    (corrupted / ADAPTER_WEIGHTS_FILE).write_bytes(bytes(raw))
    dirs["bad_checksum"] = corrupted
    return dirs


def _launch(
    root: Path, base: Path, adapters: dict[str, Path], slots: int, dtype: str, routes: bool = False
) -> ServerProcess:
    """badit-serve BASE --adapter NAME=DIR ... on a free port, log in root / "server.log"; not waited for.
    routes: --return-routed-experts."""
    extra = [arg for name, path in adapters.items() for arg in ("--adapter", f"{name}={path}")]
    extra += ["--max-adapters", str(slots), "--dtype", dtype]
    extra += ["--return-routed-experts"] if routes else []
    return launch_badit_serve(base, root, ServeOptions(API_KEY, BASE, extra=tuple(extra)))


@pytest.fixture(scope="module")
def server(
    tiny_model_dirs: dict[str, Path], default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[MultiServer]:
    """float32: greedy tokens are compared with the float32 reference; it returns routed experts."""
    root = tmp_path_factory.mktemp("multi")
    base = tiny_model_dirs["llama"]
    dirs = _adapters(base, root, default_model_dir)
    process = _launch(root, base, {"a1": dirs["a1"], "a2": dirs["a2"]}, 3, "float32", routes=True)
    handle = MultiServer(process.url, process.log, dirs)
    try:  # the references are computed while the engine starts
        plain = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
        handle.expected[BASE] = [_greedy(plain, p) for p in PROMPTS]
        for name in ("a1", "a2", "a3"):
            reference = load_reference_adapter(base, dirs[name])
            handle.expected[name] = [_greedy(reference, p) for p in PROMPTS]
        wait_healthy_or_fail(process)
        yield handle
    finally:
        process.stop()


def test_models_lists_adapters_with_the_base_as_parent(server: MultiServer) -> None:
    data = httpx.get(f"{server.url}/v1/models", headers=server.headers(), timeout=10).json()["data"]
    parents = {card["id"]: card["parent"] for card in data}
    assert parents == {BASE: None, "a1": BASE, "a2": BASE}


def test_adapters_differ_from_each_other_and_from_the_base(server: MultiServer) -> None:
    assert server.expected["a1"] != server.expected["a2"] != server.expected[BASE]


def test_mixed_concurrent_load_matches_alone_and_reference(server: MultiServer) -> None:
    jobs = [(model, i) for _ in range(2) for model in ("a1", "a2", BASE) for i in range(len(PROMPTS))]
    alone = {(model, i): server.tokens(model, PROMPTS[i]) for model, i in set(jobs)}
    with ThreadPoolExecutor(max_workers=12) as pool:
        mixed = list(pool.map(lambda job: server.tokens(job[0], PROMPTS[job[1]]), jobs))
    for (model, i), tokens in zip(jobs, mixed, strict=True):
        assert tokens == alone[(model, i)] == server.expected[model][i], (model, i)


def _adapter_tokens(server: MultiServer, adapter: str) -> int:
    """Sum over layers and experts of the adapter's expert selections since counting started."""
    response = httpx.get(
        f"{server.url}/v1/badit/experts", params={"adapter": adapter}, headers=server.headers(), timeout=30
    )
    assert response.status_code == 200, response.text
    return sum(e["tokens"] for layer in response.json()["layers"] for e in layer["experts"])


def _metric_tokens(server: MultiServer, adapter: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "badit_expert_tokens_by_ability_total" and s.labels.get("adapter") == adapter
    )


def test_per_adapter_counters_grow_by_top_k_per_routed_token(server: MultiServer) -> None:
    layers = 2
    before = {a: (_adapter_tokens(server, a), _metric_tokens(server, a)) for a in ("a1", "a2")}
    jobs = [("a1", 0), ("a2", 2), ("a1", 1), (BASE, 3), ("a2", 1)]
    with ThreadPoolExecutor(max_workers=5) as pool:
        list(pool.map(lambda job: server.tokens(job[0], PROMPTS[job[1]]), jobs))
    time.sleep(2.5)  # the worker flushes its counters every second
    for adapter in ("a1", "a2"):
        routed = sum(
            len(PROMPTS[i]) + MAX_TOKENS - 1 for a, i in jobs if a == adapter
        )  # last token never fed
        expected = TOP_K * routed * layers
        assert _adapter_tokens(server, adapter) - before[adapter][0] == expected, adapter
        assert _metric_tokens(server, adapter) - before[adapter][1] == expected, adapter


def test_routed_experts_are_each_requests_own_adapters_and_steering_stays_per_request(
    server: MultiServer, tiny_model_dirs: dict[str, Path]
) -> None:
    """A mixed concurrent load over a1, a2 and the base, some requests steered: each answer (tokens and
    routed experts) equals the same request alone; an adapter's routed experts equal its own reference
    loader's with the same steering; the base's tokens went through no expert."""
    references = {n: load_reference_adapter(tiny_model_dirs["llama"], server.dirs[n]) for n in ("a1", "a2")}
    spec = SteeringSpec.of(references["a1"].badit_block)
    steerings: list[dict | None] = [
        None,
        {"badit_mask": [0, 3]},
        {"badit_bias": [float(e % 2) for e in range(spec.num_experts)]},
    ]
    jobs = [(model, i, s) for model in ("a1", "a2", BASE) for i in (0, 2) for s in range(len(steerings))]

    def ask(job: tuple[str, int, int]) -> dict:
        model, i, s = job
        extra = {} if steerings[s] is None else {"vllm_xargs": steerings[s]}
        response = server.complete(model, PROMPTS[i], **extra)
        assert response.status_code == 200, response.text
        return response.json()["choices"][0]

    alone = {job: ask(job) for job in jobs}
    with ThreadPoolExecutor(max_workers=12) as pool:
        mixed = list(pool.map(ask, jobs * 2))
    for job, choice in zip(jobs * 2, mixed, strict=True):
        assert choice["token_ids"] == alone[job]["token_ids"], job
        assert (served_routes(choice) == served_routes(alone[job])).all(), job
    for (model, i, s), choice in alone.items():
        routes, tokens = served_routes(choice), PROMPTS[i] + choice["token_ids"]
        assert routes.shape == (len(tokens) - 1, 2, TOP_K), (model, i, s)
        if model == BASE:
            assert (routes == NO_EXPERT_U8).all()
            continue
        bias = parse_steering(steerings[s], spec).bias
        assert same_experts(routes, reference_routes(references[model], tokens[:-1], bias)), (model, i, s)


def _post(server: MultiServer, name: str, path: Path) -> httpx.Response:
    body = {"name": name, "path": str(path)}
    return httpx.post(f"{server.url}/v1/badit/adapters", json=body, headers=server.headers(), timeout=120)


class _Load:
    """Requests for a1 and a2 in a loop on two threads; every answer checked against the reference."""

    def __init__(self, server: MultiServer) -> None:
        self.server, self.stop, self.failures, self.done = server, threading.Event(), [], 0
        self.threads = [threading.Thread(target=self._run, args=(a,)) for a in ("a1", "a2")]

    def _run(self, adapter: str) -> None:
        i = 0
        while not self.stop.is_set():
            prompt = i % len(PROMPTS)
            response = self.server.complete(adapter, PROMPTS[prompt])
            if (
                response.status_code != 200
                or response.json()["choices"][0]["token_ids"] != self.server.expected[adapter][prompt]
            ):
                self.failures.append((adapter, response.status_code, response.text[:300]))
            self.done += 1
            i += 1

    def __enter__(self) -> _Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=120)


def test_hot_load_unload_reload_and_refusals_under_load(server: MultiServer) -> None:
    with _Load(server) as load:
        for bad, reason in (
            ("bad_base", "trained on a different base model"),
            ("bad_checksum", "sha256 mismatch"),
            ("bad_shapes", "does not match the served adapters"),
        ):
            response = _post(server, bad, server.dirs[bad])
            assert response.status_code == 422 and reason in response.text, response.text
        assert _post(server, "a1", server.dirs["a3"]).status_code == 409  # the name is taken
        for _ in range(2):  # load, use, unload, then again
            assert _post(server, "a3", server.dirs["a3"]).status_code == 200
            assert [server.tokens("a3", p) for p in PROMPTS] == server.expected["a3"]
            response = httpx.delete(
                f"{server.url}/v1/badit/adapters/a3", headers=server.headers(), timeout=60
            )
            assert response.status_code == 200, response.text
            assert server.complete("a3", PROMPTS[0]).status_code == 404
        time.sleep(1)
    assert load.done > 0 and load.failures == []
    assert httpx.get(f"{server.url}/health", timeout=5).status_code == 200
    names = [
        a["name"]
        for a in httpx.get(f"{server.url}/v1/badit/adapters", headers=server.headers()).json()["adapters"]
    ]
    assert names == ["a1", "a2"]


def test_unload_lets_running_requests_finish_with_their_adapter(server: MultiServer) -> None:
    assert _post(server, "a3", server.dirs["a3"]).status_code == 200
    with ThreadPoolExecutor(max_workers=2) as pool:
        running = pool.submit(server.complete, "a3", PROMPTS[0], 400)
        time.sleep(1.0)  # the request is decoding
        response = httpx.delete(f"{server.url}/v1/badit/adapters/a3", headers=server.headers(), timeout=60)
        assert response.status_code == 200, response.text
        finished = running.result(timeout=300)
    assert finished.status_code == 200, finished.text
    tokens = finished.json()["choices"][0]["token_ids"]
    assert len(tokens) == 400 and tokens[:MAX_TOKENS] == server.expected["a3"][0]  # greedy: same prefix
    assert server.complete("a3", PROMPTS[0]).status_code == 404


def test_adapter_routes_need_the_api_key(server: MultiServer) -> None:
    assert (
        httpx.post(f"{server.url}/v1/badit/adapters", json={"name": "x", "path": "/nope"}).status_code == 401
    )
    assert httpx.delete(f"{server.url}/v1/badit/adapters/a1").status_code == 401


BF16_LOGPROB_ATOL = 0.1
"""bfloat16 serving against the float32 reference, per generated token (as tests/test_vllm_parity.py)."""


@pytest.fixture(scope="module")
def bf16_server(tiny_model_dirs: dict[str, Path], server: MultiServer) -> Iterator[MultiServer]:
    """The serving default, bfloat16, with the float32 server's adapters a1 and a2 in three slots."""
    root = server.log.parent / "bf16"
    root.mkdir()
    process = _launch(
        root, tiny_model_dirs["llama"], {n: server.dirs[n] for n in ("a1", "a2")}, 3, "bfloat16"
    )
    handle = MultiServer(process.url, process.log, server.dirs)
    try:
        wait_healthy_or_fail(process)
        yield handle
    finally:
        process.stop()


def test_bfloat16_mixed_load_stays_close_to_each_adapters_float32_reference(
    bf16_server: MultiServer, tiny_model_dirs: dict[str, Path]
) -> None:
    """Each request of a mixed bfloat16 load, teacher-forced through its own adapter's float32 reference:
    every greedy token is the reference's choice up to a near-tie and its logprob within BF16_LOGPROB_ATOL
    (router logits and A' float32, balanced factors: the same contract as a single bfloat16 export). The
    bound has teeth: the other adapter's reference scores the same tokens further off."""
    base = tiny_model_dirs["llama"]
    references = {n: load_reference_adapter(base, bf16_server.dirs[n]) for n in ("a1", "a2")}
    jobs = [(model, i) for model in ("a1", "a2") for i in range(len(PROMPTS))]
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        served = list(pool.map(lambda job: bf16_server.tokens_and_logprobs(job[0], PROMPTS[job[1]]), jobs))
    worst_lp, worst_tie, worst_other = 0.0, 0.0, 0.0
    for (model, i), (tokens, logprobs) in zip(jobs, served, strict=True):
        best, chosen = reference_scores(references[model], PROMPTS[i], tokens)  # (N,), (N,)
        worst_lp = max(worst_lp, *(abs(a - b) for a, b in zip(chosen, logprobs, strict=True)))
        worst_tie = max(worst_tie, *(b - c for b, c in zip(best, chosen, strict=True)))
        other = references["a2" if model == "a1" else "a1"]
        _, other_chosen = reference_scores(other, PROMPTS[i], tokens)
        worst_other = max(worst_other, *(abs(a - b) for a, b in zip(other_chosen, logprobs, strict=True)))
    print(f"bfloat16 multi-adapter: max |logprob diff| {worst_lp:.3f}, max tie gap {worst_tie:.3f}")
    assert worst_lp < BF16_LOGPROB_ATOL and worst_tie < BF16_LOGPROB_ATOL
    assert worst_other > 2 * BF16_LOGPROB_ATOL
