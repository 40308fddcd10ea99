"""The routed MLP shared by every Badit vLLM model class, and the glue to install and load it.

`BaditMLP` keeps vLLM's fused `gate_up_proj` (MergedColumnParallelLinear, the frozen residual gate and the
up projection) and adds the routed expert delta to the gate half before the activation:

    projected = gate_up_proj(x)                      # (T, 2 * I_local + K*R): [gate | up | A' x]
    weighted, tokens, sums = route_and_count(x, A' x, router, ...)   # (T, K*R), (K,), (K,)
    delta = weighted @ experts.lora_b.T              # (T, I_local)
    activated = act(gate + delta, up)                # (T, I_local): act_fn on the two halves (`gated_act`)
    out = down_proj(activated)                       # (T, d_model)

all of it one nested compile region (`routed_mlp`) that torch.compile traces and compiles once and every
layer calls; the layer then adds the counts into its buffers (`BaditMLP.forward`, through the op
`torch.ops.badit.add_routing_stats`, see `routing_stats`).

with `badit_serve.core.routing`'s serving form of the shared math (`ServedExperts`): the router in float32
(top-k on float32 logits like the reference), A' and s * B' in the model dtype, the experts refactorised
into balanced factors once after loading, so bfloat16 serving never subtracts two large BAD terms.

A' rides along in the base projection: after the checkpoint is loaded (`BaditMLP.prepare_served`, before
vLLM post-processes the linear layers) its K*R rows are appended to gate_up_proj's weight, so vLLM's own
GEMM (prepacked oneDNN on CPU, cuBLAS on GPU) computes them in the same call as the gate and up halves:
one GEMM call fewer per layer. That needs an unquantized gate_up_proj in the serving dtype; otherwise A'
runs on its own (`ServedExperts.a_gemm`). s * B' runs through vLLM's prepacked oneDNN GEMM on CPU
(`cpu_gemm`). The routing statistics are counted in the same graph (`routing_stats`).

Tensor parallelism: `lora_a` and `router` are replicated (so the appended A' rows are the same on every
rank); `lora_b` is sharded along d_out exactly like the gate half (rows [rank * I_local, ...)); the
refactorisation of a shard's rows keeps B'_e A'_e equal to that shard's rows of B_e A_e.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

import torch
from torch import nn

from badit_serve.core.format import EXPERT_MARK, BaditBlock, expert_prefix
from badit_serve.core.servable import check_block_servable
from badit_serve.vllm_models.cpu_gemm import prepacked_gemm_factory
from badit_serve.vllm_models.gated_act import gated_activation
from badit_serve.vllm_models.request_routing import capture_routes, layer_steering
from badit_serve.vllm_models.routing_stats import new_real_row_count, routing_increments
from badit_serve.vllm_models.served_experts import (
    RoutingSpec,
    ServedExperts,
    served_delta,
    served_router_logits,
    steered_choice,
    weigh_experts,
)

if TYPE_CHECKING:
    from vllm.model_executor.layers.linear import LinearBase


def read_badit_block(hf_config: object) -> BaditBlock:
    """The validated `badit` block of the served config; only gate_proj experts can be served."""
    raw = getattr(hf_config, "badit", None)
    if not isinstance(raw, dict):
        raise ValueError(
            "this model's config.json has no 'badit' block: Badit*ForCausalLM classes serve Badit exports only"
        )
    block = BaditBlock.model_validate(raw)
    check_block_servable(block)
    return block


class GateExpertWeights(nn.Module):
    """The routed experts of one gate_proj as loaded: `lora_a` (K*R, d_in) and `router` (K, d_in)
    replicated, `lora_b` (I_local, K*R) this rank's rows of the (d_out, K*R) tensor. All float32 (the trained
    values, which the float64 refactorisation of `to_served` starts from)."""

    def __init__(self, block: BaditBlock, d_in: int, d_out_local: int, tp_rank: int) -> None:
        super().__init__()
        n = block.num_experts * block.rank
        self.tp_rank = tp_rank
        self.lora_a = nn.Parameter(torch.empty(n, d_in, dtype=torch.float32), requires_grad=False)
        self.lora_b = nn.Parameter(torch.empty(d_out_local, n, dtype=torch.float32), requires_grad=False)
        self.lora_b.weight_loader = self._load_lora_b  # type: ignore[attr-defined]
        self.router: nn.Parameter | None = None
        if block.router != "none":
            self.router = nn.Parameter(
                torch.empty(block.num_experts, d_in, dtype=torch.float32), requires_grad=False
            )

    def _load_lora_b(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        """Narrow the full (d_out, K*R) tensor to this rank's rows (the identity with TP=1)."""
        rows = param.shape[0]
        shard = loaded.narrow(0, self.tp_rank * rows, rows)  # (I_local, K*R)
        _copy_checked(param, shard)

    def to_served(self, block: BaditBlock, dtype: torch.dtype) -> ServedExperts:
        """The serving form of the loaded tensors (float64 refactorisation, once)."""
        router = None if self.router is None else self.router.data
        return ServedExperts.build(
            router, self.lora_a.data, self.lora_b.data, block.scaling, block.num_experts, dtype
        )


def _copy_checked(param: torch.Tensor, loaded: torch.Tensor) -> None:
    if tuple(param.shape) != tuple(loaded.shape):
        raise ValueError(
            f"expert tensor of shape {tuple(loaded.shape)} does not fit parameter {tuple(param.shape)}"
        )
    param.data.copy_(loaded.to(param.dtype))


class BaditMLP(nn.Module):
    """gate_up_proj (+ routed delta on the gate half) -> act_fn -> down_proj."""

    num_real: torch.Tensor
    gate_scale: torch.Tensor
    expert_tokens: torch.Tensor
    router_weight_sums: torch.Tensor
    steer_bias: torch.Tensor | None
    routes: torch.Tensor | None

    def __init__(
        self,
        block: BaditBlock,
        gate_up_proj: LinearBase,
        down_proj: nn.Module,
        act_fn: Callable[[torch.Tensor], torch.Tensor],
        tp_rank: int,
        num_real: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.block = block
        self.gate_up_proj = gate_up_proj
        self.down_proj = down_proj
        self.act_fn = act_fn
        self.gated_act = gated_activation(act_fn)
        """act_fn on the gate and up halves apart (`gated_act`), or None: act_fn on their concatenation."""
        # vLLM's LinearBase infers output_partition_sizes from an untyped attribute (Tensor | Module).
        self.intermediate_local = int(gate_up_proj.output_partition_sizes[0])  # type: ignore[index]
        self.badit_gate = GateExpertWeights(
            block, int(gate_up_proj.input_size), self.intermediate_local, tp_rank
        )
        self.spec = RoutingSpec(block.num_experts, block.top_k, block.router, block.gate_scale)
        self.served: ServedExperts | None = None  # set by prepare_served
        self.fused_rows = 0
        """K*R when A' rides in gate_up_proj's weight (`prepare_served`), else 0."""
        # Routing statistics of the real tokens (see routing_stats); not parameters, not in checkpoints.
        # `num_real` is the model's shared real-row count (one tensor for all layers).
        self.register_buffer(
            "num_real", new_real_row_count() if num_real is None else num_real, persistent=False
        )
        # A tensor, not a float, in the compiled region (`routed_mlp`): nothing to specialise on.
        self.register_buffer(
            "gate_scale", torch.tensor(block.gate_scale, dtype=torch.float32), persistent=False
        )
        self.register_buffer(
            "expert_tokens", torch.zeros(block.num_experts, dtype=torch.int64), persistent=False
        )
        self.register_buffer(
            "router_weight_sums", torch.zeros(block.num_experts, dtype=torch.float64), persistent=False
        )
        self.record_stats = True
        # The model's steering bias (N, K) and routes capture (N, L, W), set by `attach_request_routing`.
        self.register_buffer("steer_bias", None, persistent=False)
        self.register_buffer("routes", None, persistent=False)
        self.layer_index = 0
        """This layer's column in the captured routes: its place in `badit.adapted_modules`."""

    def prepare_served(self, dtype: torch.dtype) -> None:
        """Build the serving form of the experts and append A' to gate_up_proj's weight where it can ride
        there (after the checkpoint is loaded, before vLLM post-processes the linear layers). A reload of the
        weights (GPU: the weight stays) rewrites the appended rows in place; on CPU vLLM releases every
        linear layer's unpacked weight after prepacking, so there it cannot reload the base either."""
        self.served = self.badit_gate.to_served(self.block, dtype)
        weight = getattr(self.gate_up_proj, "weight", None)
        if not isinstance(weight, torch.Tensor) or not _can_fuse(
            self.gate_up_proj, weight, self.served.lora_a
        ):
            self.fused_rows = 0
            return
        base_rows, extra = 2 * self.intermediate_local, self.served.lora_a  # extra: (K*R, d_in)
        if weight.shape[0] == base_rows:
            weight.data = torch.cat([weight.data, extra.to(weight.device)])  # (2 * I_local + K*R, d_in)
        else:
            weight.data[base_rows:].copy_(extra)  # a reload: the rows are already there
        self.fused_rows = extra.shape[0]

    def finish_served(self) -> None:
        """After vLLM's post-processing: the experts' Gemms on their final device (prepacked on CPU)."""
        if self.served is None:
            raise RuntimeError("BaditMLP.finish_served before prepare_served")
        self.served.use_gemm(prepacked_gemm_factory(self.served.lora_a.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.served is None:
            raise RuntimeError("BaditMLP used before its experts were built (prepare_served)")
        out: torch.Tensor  # routed_mlp is untyped: torch's nested_compile_region has no return annotation
        bias, width = layer_steering(self.steer_bias, self.routes, x.reshape(-1, x.shape[-1]).shape[0])
        out, tokens, sums, experts = routed_mlp(self, x, bias, width)  # (T, d_model), (K,), (K,), (T, W)
        if self.record_stats:  # in place, where this layer runs (routing_stats: not in the last kernel)
            torch.ops.badit.add_routing_stats(self.expert_tokens, self.router_weight_sums, tokens, sums)
        capture_routes(self.routes, self.layer_index, experts)
        return out


@torch.compiler.nested_compile_region
def routed_mlp(
    mlp: BaditMLP, x: torch.Tensor, bias: torch.Tensor | None, width: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One routed MLP without its side effects: the output (T, d_model), the layer's routing statistics
    of this pass, the selected-token count (K,) int64 and the routing-weight sum (K,) float64 of the real
    rows, and the top `width` experts per token (T, width) int64 (which `BaditMLP.forward` adds into its
    buffers: a nested region may not mutate them). bias: (T, K) float32 per-token steering of the router
    logits (`request_routing`), or None.

    A nested compile region over the whole MLP: the layers differ only in their tensors (weights, packed
    GEMM handles, experts), so torch.compile traces and compiles the region once and every layer calls it.
    Inductor's work for the MLPs then does not grow with the number of layers, and nothing is lost to the
    boundary (the MLP starts and ends with a GEMM, which inductor never fuses). Without torch.compile it is
    a plain call.
    """
    served = mlp.served
    assert served is not None
    projected, _ = mlp.gate_up_proj(x)  # (T, 2 * I_local [+ K*R])
    flat = x.reshape(-1, x.shape[-1])  # (T, d_in)
    if mlp.fused_rows:
        projected, hidden = projected.split([2 * mlp.intermediate_local, mlp.fused_rows], dim=-1)
        hidden = hidden.reshape(flat.shape[0], mlp.fused_rows)  # (T, K*R) = A' x
    else:
        hidden = served.a_gemm(flat.to(served.lora_a.dtype))  # (T, K*R)
    spec = mlp.spec
    weighted, tokens, sums, experts = route_and_count(
        flat, hidden, served.router, mlp.num_real, spec, mlp.gate_scale, bias, width
    )  # (T, K*R), (K,), (K,), (T, W)
    delta = served_delta(weighted, served)  # (T, I_local)
    gate, up = projected.split(mlp.intermediate_local, dim=-1)  # (..., I_local) x2
    gate = gate + delta.view_as(gate)  # (..., I_local), out of place: fused into the activation's kernel
    if mlp.gated_act is not None:
        activated = mlp.gated_act(gate, up)  # (..., I_local)
    else:
        activated = mlp.act_fn(torch.cat([gate, up], dim=-1))  # (..., I_local)
    out, _ = mlp.down_proj(activated)  # (T, d_model)
    return out, tokens, sums, experts


def route_and_count(
    x: torch.Tensor,
    hidden: torch.Tensor,
    router: torch.Tensor,
    num_real: torch.Tensor,
    spec: RoutingSpec,
    gate_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    width: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One routed layer's routing (`badit_serve.core.routing`: float32 router logits, steered by `bias`,
    weights, the weighted expert activations), its routing statistics over the real rows (`routing_stats`)
    and the top `width` experts per token.

    x: (T, d_in); hidden: (T, K*R) = A' x in the model dtype; router: (K, d_in) float32, no rows in mode
    'none'; num_real: 0-dim int64; gate_scale: 0-dim float32 (used instead of spec.gate_scale: a tensor is
    nothing to specialise on); bias: (T, K) float32 or None. Returns weighted (T, K*R) in hidden's dtype,
    the selected-token count (K,) int64 and the routing-weight sum (K,) float64 of the real rows, and the
    experts (T, width) int64.
    """
    logits = served_router_logits(x, router)  # (T, K) float32
    weights, selected, experts = steered_choice(
        logits, spec.top_k, spec.mode, gate_scale, bias, width
    )  # (T, K) x2, (T, W)
    tokens, sums = routing_increments(selected, weights, num_real)  # (K,), (K,)
    return weigh_experts(hidden, weights, hidden.dtype), tokens, sums, experts


def _can_fuse(layer: nn.Module, weight: torch.Tensor | None, lora_a: torch.Tensor) -> bool:
    """Whether A' can ride in this gate_up_proj's weight: an unquantized 2-D weight (vLLM's
    UnquantizedLinearMethod) in A's dtype, on a real device, without a bias."""
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod

    return (
        isinstance(getattr(layer, "quant_method", None), UnquantizedLinearMethod)
        and isinstance(weight, torch.Tensor)
        and weight.ndim == 2
        and not weight.is_meta
        and weight.dtype == lora_a.dtype
        and weight.shape[1] == lora_a.shape[1]
        and getattr(layer, "bias", None) is None
    )


def install_badit_mlps(model: nn.Module, block: BaditBlock, num_real: torch.Tensor) -> dict[str, BaditMLP]:
    """Replace the MLP of every decoder layer whose gate_proj is adapted with a `BaditMLP` that reuses its
    gate_up_proj, down_proj and act_fn and reads the model's shared real-row count `num_real`. `model` is
    the *ForCausalLM (module names relative to it, as in the checkpoint). Returns gate module name ->
    BaditMLP."""
    from vllm.distributed import get_tensor_model_parallel_rank

    tp_rank = get_tensor_model_parallel_rank()
    adapted = set(block.adapted_modules)
    installed: dict[str, BaditMLP] = {}
    for name, module in list(model.named_modules()):
        mlp = getattr(module, "mlp", None)
        gate_name = f"{name}.mlp.gate_proj" if name else "mlp.gate_proj"
        if mlp is None or gate_name not in adapted:
            continue
        for attr in ("gate_up_proj", "down_proj", "act_fn"):
            if not hasattr(mlp, attr):
                raise ValueError(
                    f"{name}.mlp ({type(mlp).__name__}) has no {attr}: not a gated MLP Badit can serve"
                )
        routed = BaditMLP(block, mlp.gate_up_proj, mlp.down_proj, mlp.act_fn, tp_rank, num_real)
        module.mlp = routed
        installed[gate_name] = routed
    return installed


def check_coverage(
    installed: dict[str, BaditMLP], block: BaditBlock, is_missing: Callable[[str], bool]
) -> None:
    """Every adapted module of the export must be a routed MLP here (or live on another PP rank)."""
    absent = [m for m in block.adapted_modules if m not in installed and not is_missing(m)]
    if absent:
        raise ValueError(
            f"badit.adapted_modules {absent[:3]} do not match any decoder-layer MLP of this model"
        )


def split_expert_weights(
    weights: Iterable[tuple[str, torch.Tensor]],
    params: dict[str, nn.Parameter],
    is_missing: Callable[[str], bool],
    loaded: set[str],
) -> Iterator[tuple[str, torch.Tensor]]:
    """Load every `*.badit_*` tensor into `params` (adding its name to `loaded`) and yield the rest."""
    for name, tensor in weights:
        if EXPERT_MARK not in name:
            yield name, tensor
            continue
        if name not in params:
            if is_missing(name):  # a layer of another pipeline stage
                continue
            raise ValueError(f"expert tensor {name!r} has no parameter in this model")
        param = params[name]
        loader = getattr(param, "weight_loader", _copy_checked)
        loader(param, tensor)
        loaded.add(name)


def expected_expert_names(block: BaditBlock) -> list[str]:
    """The checkpoint names of all expert tensors of the export."""
    suffixes = ["lora_a", "lora_b"] + ([] if block.router == "none" else ["router"])
    return [f"{expert_prefix(m)}.{s}" for m in block.adapted_modules for s in suffixes]
