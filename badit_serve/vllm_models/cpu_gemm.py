"""vLLM's prepacked oneDNN GEMM for the routed experts on CPU: the kernel vLLM's own linear layers use there.

`vllm.model_executor.layers.utils.dispatch_cpu_unquantized_gemm` prepacks every dense projection of the
base model with `create_onednn_mm` (a oneDNN matmul primitive over a reordered copy of the weight) and
calls `onednn_mm` at run time. The experts' A' (K*R, d_in) and s * B' (d_out, K*R) get the same treatment
(`prepacked_gemm_factory`, given to `ServedExperts.use_gemm`). In a scratch one-layer microbenchmark at the
default model's shapes (bfloat16, 32 decode tokens, inductor) the routed layer's overhead over the base MLP
fell by about a third against float32 router+A and `addmm_` of B into the gate half (docs/SERVING.md,
"Serving speed").

The packed copy is made from the weight's values at the time: `ServedExperts` makes it again after every
slot change (multi-adapter serving on CPU runs eager, as vLLM turns compilation off with LoRA there).
Elsewhere (CUDA, or a vLLM build without oneDNN) the factory is `TorchGemm`, the plain matmul.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from badit_serve.core.cpu_features import native_bf16
from badit_serve.internals import onednn_available, onednn_matmul, onednn_pack
from badit_serve.vllm_models.served_experts import Gemm, GemmFactory, TorchGemm

if TYPE_CHECKING:
    from badit_serve.internals import OneDnnHandler

PRIMITIVE_CACHE_SIZE = 32
"""oneDNN primitives cached per handler, keyed by the number of tokens (vLLM's own linear layers: 32)."""


@dataclass(frozen=True)
class OneDnnGemm:
    """x (T, k) @ W.T through a prepacked oneDNN primitive; the output has x's dtype (= W's)."""

    handler: OneDnnHandler
    """vLLM's `CPUDNNLGEMMHandler` (the packed weight lives behind its `handler_tensor`)."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return onednn_matmul(self.handler, x)  # (T, n)


def onednn_gemm(weight: torch.Tensor) -> Gemm:
    """The prepacked Gemm of weight (n, k); the plain matmul for bfloat16 where the CPU feature probe says
    this CPU has no native bfloat16 (`badit_serve.core.cpu_features`), and wherever oneDNN refuses the weight
    (as vLLM falls back)."""
    if weight.dtype == torch.bfloat16 and not native_bf16():
        return TorchGemm(weight)
    try:
        return OneDnnGemm(onednn_pack(weight.t(), PRIMITIVE_CACHE_SIZE))  # packs W.T (k, n)
    except RuntimeError:
        return TorchGemm(weight)


def prepacked_gemm_factory(device: torch.device) -> GemmFactory:
    """`onednn_gemm` on a CPU build of vLLM with oneDNN (not on POWER, as vLLM), `TorchGemm` elsewhere."""
    if device.type != "cpu" or not onednn_available():
        return TorchGemm
    return onednn_gemm
