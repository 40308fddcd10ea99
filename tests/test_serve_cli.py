"""The `badit-serve` command line without an engine: vLLM arguments and defaults, the serving dtype and its
fallback, environment, request limits, exit code 2 on bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


def test_cli_builds_vllm_arguments_with_defaults() -> None:
    from badit_serve.launch.cli import WORKER_EXTENSION, build_parser, vllm_argv

    opts, rest = build_parser().parse_known_args(
        ["/x", "--port", "9", "--api-key", "k", "--max_model_len=64", "--enforce-eager"]
    )
    argv = vllm_argv(opts, rest)
    assert argv[:5] == ["/x", "--host", "127.0.0.1", "--port", "9"]
    assert ["--worker-extension-cls", WORKER_EXTENSION] == argv[5:7]
    assert "--max-model-len" not in argv and argv[-2:] == ["--max_model_len=64", "--enforce-eager"]
    assert argv[argv.index("--dtype") + 1] == "bfloat16" and argv[argv.index("--api-key") + 1] == "k"
    assert "--dtype" not in vllm_argv(opts, ["--dtype", "float32"])[:-2]
    in_float32 = vllm_argv(opts, [], dtype="float32")
    assert in_float32[in_float32.index("--dtype") + 1] == "float32"


def test_cli_serves_bfloat16_by_default_with_a_fallback_without_it() -> None:
    from badit_serve.launch.cli import default_dtype

    every = ["bfloat16", "float16", "float32"]
    assert default_dtype(True, every, cpu_has_bf16=True)[0] == "bfloat16"
    assert default_dtype(False, every, cpu_has_bf16=False)[0] == "bfloat16"  # GPU: the platform decides
    dtype, why = default_dtype(True, every, cpu_has_bf16=False)
    assert dtype == "float32" and "no native bfloat16" in why
    assert default_dtype(False, ["float16", "float32"], cpu_has_bf16=False)[0] == "float16"
    assert default_dtype(True, ["float16", "float32"], cpu_has_bf16=True)[0] == "float32"


def test_cli_prepares_a_fresh_metrics_dir_and_the_plugin_allowlist(tmp_path: Path) -> None:
    from badit_serve.launch.cli import prepare_environment

    env = {"VLLM_PLUGINS": "other", "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    first = prepare_environment(env)
    assert env["VLLM_PLUGINS"] == "other,badit" and first.parent == tmp_path and first.is_dir()
    assert prepare_environment(env) != first and env["VLLM_PLUGINS"] == "other,badit"
    fresh: dict[str, str] = {}
    made = prepare_environment(fresh)
    made.rmdir()
    assert fresh["VLLM_PLUGINS"] == "badit"


def test_cli_cpu_defaults_turn_off_the_aot_cache_vllm_cpu_cannot_load_but_keep_user_values() -> None:
    from badit_serve.launch.cli import apply_cpu_defaults

    env: dict[str, str] = {}
    apply_cpu_defaults(env)
    assert env == {"VLLM_CPU_KVCACHE_SPACE": "4", "VLLM_USE_AOT_COMPILE": "0"}
    mine = {"VLLM_USE_AOT_COMPILE": "1", "VLLM_CPU_KVCACHE_SPACE": "8"}
    apply_cpu_defaults(mine)
    assert mine == {"VLLM_USE_AOT_COMPILE": "1", "VLLM_CPU_KVCACHE_SPACE": "8"}


def test_cli_rejects_an_invalid_export_with_exit_code_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from badit_serve.launch.cli import main

    assert main([str(tmp_path / "missing")]) == 2
    assert "invalid export" in capsys.readouterr().err
    assert main([str(tmp_path), "--worker-extension-cls", "x.Y"]) == 2


def test_cli_reads_the_api_key_and_extra_options_from_the_environment() -> None:
    from badit_serve.launch.cli import build_parser, command_line, vllm_argv

    env = {
        "BADIT_API_KEY": "secret",
        "BADIT_SERVE_ARGS": "--enforce-eager --served-model-name 'my model' --port 9",
    }
    argv = command_line(["/model", "--host", "0.0.0.0", "--port", "8000"], env)
    assert argv[-5:] == ["--enforce-eager", "--served-model-name", "my model", "--port", "9"]
    opts, rest = build_parser(env).parse_known_args(argv)
    assert (opts.api_key, opts.served_model_name, opts.port, rest) == (
        "secret",
        "my model",
        9,
        ["--enforce-eager"],
    )
    vllm = vllm_argv(opts, rest)
    assert vllm[vllm.index("--api-key") + 1] == "secret"
    assert build_parser(env).parse_known_args(["/m", "--api-key", "cli"])[0].api_key == "cli"  # the flag wins
    assert build_parser({"BADIT_API_KEY": ""}).parse_known_args(["/m"])[0].api_key is None
    assert command_line(["/m"], {}) == ["/m"]


def test_cli_turns_request_limits_into_vllm_options_and_the_plugins_environment(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from badit_serve.api.limits import ENV_LIMITS, RequestLimits
    from badit_serve.launch.cli import build_parser, export_limits, main, request_limits, vllm_argv

    opts, rest = build_parser({}).parse_known_args(["/x", "--max-n", "3", "--max-tokens", "77"])
    argv = vllm_argv(opts, rest)
    assert argv[argv.index("--max-num-queued-reqs") + 1] == "192"  # 64 in flight x 3
    assert json.loads(argv[argv.index("--override-generation-config") + 1]) == {"max_new_tokens": 77}
    given = vllm_argv(opts, ["--max-num-queued-reqs=5", "--override-generation-config", "{}"])
    assert given.count("--override-generation-config") == 1 and "--max-num-queued-reqs" not in given
    env: dict[str, str] = {}
    export_limits(env, request_limits(opts))
    assert env["VLLM_MAX_N_SEQUENCES"] == "3"
    assert RequestLimits.from_env(env) == RequestLimits(max_sequences=3, max_tokens=77)
    assert ENV_LIMITS in env
    assert main(["/x", "--max-n", "0"]) == 2 and "max_sequences" in capsys.readouterr().err


def test_the_server_process_stops_at_once_when_the_endpoint_plugin_cannot_be_imported(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """vLLM only logs a failed endpoint plugin and serves without Badit's routes and on-demand adapters; the
    server process must fail instead, before it starts anything."""
    import sys

    from badit_serve.launch import cli

    monkeypatch.setitem(sys.modules, "badit_serve.api.endpoint", None)  # importing it raises ImportError
    started: list[str] = []
    monkeypatch.setattr(cli, "watch_lifeline", lambda: started.append("lifeline"))
    monkeypatch.setattr(cli, "apply_cpu_defaults", lambda env: started.append("cpu defaults"))
    with pytest.raises(ImportError, match="badit_serve.api.endpoint"):
        cli.run_vllm_server(["/nonexistent/model"])
    assert started == []
