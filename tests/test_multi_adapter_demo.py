"""scripts/multi_adapter_demo.py's serving path on tiny models: one badit-serve over a tiny base with two
tiny adapters, the same chat prompts to each adapter and the base in one concurrent batch through the
OpenAI client, counters checked against top_k x routed tokens, one adapter unloaded and reloaded, the
server stopped with nothing left behind, every answer equal to the reference loader.

What it adds to tests/test_multi_adapter_serve.py: the chat route (the chat template applied by vLLM,
`return_token_ids`) rather than token-id completions, and the demo script's own parsing of the responses,
/v1/badit/experts and /metrics, so `make multi-demo` cannot rot unnoticed between default-model runs.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from badit_serve.launch.server_process import group_members
from tests.support.badit_exports import make_adapter
from tests.support.script_modules import load_script

pytestmark = [pytest.mark.slow, pytest.mark.serve]


def test_demo_serving_path_on_tiny_adapters(
    tiny_model_dirs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    demo = load_script("multi_adapter_demo.py", "multi_adapter_demo")
    base = tiny_model_dirs["llama"]
    jobs = [
        demo.AdapterJob(
            name, Path("unused.yaml"), Path("unused"), make_adapter(base, tmp_path / name, seed=seed)
        )
        for name, seed in (("first", 1), ("second", 2))
    ]
    prompts = [
        demo.Prompt("task_a", "Classify the sentiment: a gorgeous, witty movie.", "POS"),
        demo.Prompt("task_b", "Which emotion? i feel so alone tonight", "sadness"),
    ]
    real_start, started = demo.start_server, []

    def recording_start(*args: object, **kwargs: object):
        started.append(real_start(*args, **kwargs))
        return started[-1]

    monkeypatch.setattr(demo, "start_server", recording_start)
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    answers = demo.serve_and_ask(base, jobs, prompts, demo.free_port(), tmp_path / "serve.log")
    assert {a.model for a in answers} == {demo.BASE_NAME, "first", "second"} and len(answers) == 6
    assert not group_members(started[0].pid)  # the server and its engine are gone
    assert started[0].proc.returncode == 0  # badit-serve ended its engine and exited on SIGTERM
    by_model = {
        m: [a.token_ids for a in answers if a.model == m] for m in ("first", "second", demo.BASE_NAME)
    }
    assert by_model["first"] != by_model["second"] != by_model[demo.BASE_NAME]
    demo.check_reference(base, jobs, answers)  # raises DemoError on any difference
