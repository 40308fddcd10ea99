"""Invariants of the adapter core on tiny random Llama, Qwen3 and Gemma2 models."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from tests.support.devices import PRECISIONS, Precision
from training.adapters import (
    AdapterConfig,
    DogConfig,
    accumulate_dog_signal,
    adapted_layers,
    adapter_state_dict,
    apply_adapters,
    collect_aux_loss,
    layer_spec,
    load_adapter_state_dict,
    regroup,
    trainable_parameters,
)
from training.adapters.dog import dog_grouping
from training.adapters.layer import RoutedAdapterLinear

FP32 = Precision("cpu", torch.float32, False)


def _load(model_dir: Path, precision: Precision = FP32) -> nn.Module:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=precision.base_dtype)
    return model.to(precision.device).eval()


def _tokens(seed: int = 0, batch: int = 2, length: int = 12, device: str = "cpu") -> torch.Tensor:
    ids = torch.randint(3, 1000, (batch, length), generator=torch.Generator().manual_seed(seed))
    return ids.to(device)  # (B, L)


def _randomise_routers(model: nn.Module, scale: float = 5.0) -> None:
    gen = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for layer in adapted_layers(model).values():
            if layer.router is not None:
                layer.router.weight.copy_(torch.randn(layer.router.weight.shape, generator=gen) * scale)


@pytest.mark.parametrize("method", ["badit", "badit_no_bad", "lora", "loramoe", "loramoe_dense", "pissa"])
def test_init_reproduces_base_model_whatever_the_router(tiny_model_dir: Path, method: str) -> None:
    input_ids = _tokens()
    base_logits = _load(tiny_model_dir)(input_ids).logits
    model = apply_adapters(_load(tiny_model_dir), AdapterConfig(method=method, rank=4), seed=0)
    _randomise_routers(model)
    adapted_logits = model(input_ids).logits
    assert (adapted_logits - base_logits).abs().max().item() <= 1e-5


def test_bad_residual_is_not_exact_under_top_k(tiny_model_dirs: dict[str, Path]) -> None:
    """The paper's literal residual form drops the unselected experts' share: documented, not exact."""
    input_ids = _tokens()
    base_logits = _load(tiny_model_dirs["llama"])(input_ids).logits
    model = apply_adapters(
        _load(tiny_model_dirs["llama"]), AdapterConfig(init="bad-residual", rank=4), seed=0
    )
    assert (model(input_ids).logits - base_logits).abs().max().item() > 1e-3


def test_bad_init_uses_top_singular_components_in_contiguous_blocks(tiny_model_dirs: dict[str, Path]) -> None:
    base = _load(tiny_model_dirs["llama"])
    weight = base.model.layers[0].mlp.gate_proj.weight.detach().clone()
    model = apply_adapters(base, AdapterConfig(method="badit", rank=4, alpha=8.0), seed=0)
    layer = adapted_layers(model)["model.layers.0.mlp.gate_proj"]
    s = layer.spec.scaling
    singular = torch.linalg.svdvals(weight)
    torch.testing.assert_close(layer.singular_values, singular[:32])
    assert layer.component_ids.tolist() == list(range(32))
    # s * B A equals the rank-32 truncated SVD of W, expert e holding components [4e, 4e+4).
    u, sv, vh = torch.linalg.svd(weight, full_matrices=False)
    torch.testing.assert_close(
        s * layer.lora_b @ layer.lora_a, (u[:, :32] * sv[:32]) @ vh[:32], atol=1e-5, rtol=1e-5
    )
    for e in range(8):
        block = slice(4 * e, 4 * e + 4)
        expert = s * layer.lora_b[:, block] @ layer.lora_a[block]
        torch.testing.assert_close(expert, (u[:, block] * sv[block]) @ vh[block], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.base.weight, weight)  # delta form: W stays frozen and untouched


def test_only_adapter_parameters_train(tiny_model_dirs: dict[str, Path]) -> None:
    model = apply_adapters(_load(tiny_model_dirs["qwen3"]), AdapterConfig(rank=4), seed=0)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(n.endswith(("lora_a", "lora_b", "router.weight")) for n in names)
    assert len(adapted_layers(model)) == 2
    assert sum(p.numel() for p in trainable_parameters(model)) == 2 * (32 * 128 + 256 * 32 + 8 * 128)


def _train_steps(
    model: nn.Module, steps: int, lr: float = 1e-2, precision: Precision = FP32
) -> torch.optim.Optimizer:
    optimizer = torch.optim.AdamW(trainable_parameters(model), lr=lr)
    model.train()
    for step in range(steps):
        ids = _tokens(seed=step, device=precision.device)
        with precision.context():
            loss = model(input_ids=ids, labels=ids).loss
            aux = collect_aux_loss(model)
        (loss + 0.01 * aux).backward()
        accumulate_dog_signal(model)
        optimizer.step()
        optimizer.zero_grad()
    return optimizer


def _rank_one_terms(layer: RoutedAdapterLinear) -> dict[int, torch.Tensor]:
    """Component id -> its rank-1 matrix s * b_i a_i (delta form: minus the frozen init's)."""
    a, b = layer.lora_a.detach(), layer.lora_b.detach()
    terms = {}
    for slot, cid in enumerate(layer.component_ids.tolist()):
        term = torch.outer(b[:, slot], a[slot])
        if layer.spec.is_delta:
            term = term - torch.outer(layer.lora_b0[:, slot], layer.lora_a0[slot])
        terms[cid] = term
    return terms


@pytest.mark.parametrize("precision", PRECISIONS)
def test_regroup_is_a_permutation_and_moves_optimizer_state(
    tiny_model_dirs: dict[str, Path], precision: Precision
) -> None:
    torch.manual_seed(0)
    model = _load(tiny_model_dirs["llama"], precision)
    model = apply_adapters(model, AdapterConfig(rank=4, dropout=0.0), seed=0)
    optimizer = _train_steps(model, steps=3, precision=precision)
    layers = adapted_layers(model)
    before_terms = {n: _rank_one_terms(layer) for n, layer in layers.items()}
    before_sum = {n: layer.expert_factors()[1] @ layer.expert_factors()[0] for n, layer in layers.items()}
    before_state = {
        n: {
            int(cid): optimizer.state[layer.lora_a]["exp_avg"][slot].clone()
            for slot, cid in enumerate(layer.component_ids)
        }
        for n, layer in layers.items()
    }
    report = regroup(model, optimizer, probe_batch={"input_ids": _tokens(seed=99, device=precision.device)})
    assert report.moved > 0 and len(report.layers) == 2
    assert report.kl_drift is not None and report.kl_drift >= 0
    for name, layer in layers.items():
        ids = layer.component_ids.tolist()
        assert sorted(ids) == list(range(32))  # nothing lost or duplicated
        after_terms = _rank_one_terms(layer)
        for cid, term in before_terms[name].items():
            torch.testing.assert_close(after_terms[cid], term, atol=1e-6, rtol=0)
        a, b = layer.expert_factors()
        torch.testing.assert_close(b @ a, before_sum[name], atol=1e-6, rtol=0)
        for slot, cid in enumerate(ids):
            torch.testing.assert_close(
                optimizer.state[layer.lora_a]["exp_avg"][slot], before_state[name][cid]
            )
        assert int(layer.dog_steps) == 0 and layer.dog_grad_a.abs().sum() == 0


def test_regroup_with_equal_gates_keeps_layer_output(tiny_model_dirs: dict[str, Path]) -> None:
    """Equal gates (dense router with zero weights): any regrouping leaves the function unchanged."""
    torch.manual_seed(0)
    config = AdapterConfig(method="badit", router="dense", top_k=8, rank=4, dropout=0.0)
    model = apply_adapters(_load(tiny_model_dirs["gemma2"]), config, seed=0)
    with torch.no_grad():
        for layer in adapted_layers(model).values():
            layer.router.weight.zero_()
    optimizer = torch.optim.SGD(
        [p for n, p in model.named_parameters() if p.requires_grad and "router" not in n], lr=0.05
    )
    for step in range(2):
        ids = _tokens(seed=step)
        model(input_ids=ids, labels=ids).loss.backward()
        accumulate_dog_signal(model)
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    probe = _tokens(seed=7)
    before = model(probe).logits
    report = regroup(model, None, config=DogConfig(seed=3))
    assert report.moved > 0
    torch.testing.assert_close(model(probe).logits, before, atol=1e-5, rtol=0)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_regroup_is_deterministic(tiny_model_dirs: dict[str, Path], precision: Precision) -> None:
    """Same seed, same regrouping; the grouping of a given signal is the same on every device."""
    results, signals = [], []
    for _ in range(2):
        torch.manual_seed(0)
        model = apply_adapters(
            _load(tiny_model_dirs["qwen3"], precision), AdapterConfig(rank=4, dropout=0.0), seed=0
        )
        optimizer = _train_steps(model, steps=2, precision=precision)
        signals.append({n: layer.dog_signal().clone() for n, layer in adapted_layers(model).items()})
        regroup(model, optimizer)
        results.append([layer.component_ids.clone() for layer in adapted_layers(model).values()])
        assert all(
            layer.component_ids.device.type == precision.device for layer in adapted_layers(model).values()
        )
    for first, second in zip(*results, strict=True):
        assert torch.equal(first, second)
    for signal in signals[0].values():
        on_device = dog_grouping(signal, 8, 4, seed=5, restarts=2).labels
        on_host = dog_grouping(signal.cpu().double(), 8, 4, seed=5, restarts=2).labels
        assert on_device.device.type == "cpu" and torch.equal(on_device, on_host)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_dog_signal_sums_in_float32_whatever_the_model_dtype(
    tiny_model_dirs: dict[str, Path], precision: Precision
) -> None:
    """A model cast to bfloat16 as a whole still accumulates the DOG signal in float32: many small
    gradients on top of a large one would otherwise vanish below bfloat16's 8-bit mantissa."""
    model = apply_adapters(_load(tiny_model_dirs["llama"], precision), AdapterConfig(rank=4), seed=0)
    model.to(torch.bfloat16)
    layer = next(iter(adapted_layers(model).values()))
    grads = [torch.ones_like(layer.lora_a)] + [torch.full_like(layer.lora_a, 2.0**-10)] * 64
    for grad in grads:
        layer.lora_a.grad, layer.lora_b.grad = grad, torch.zeros_like(layer.lora_b)
        accumulate_dog_signal(model)
    assert layer.dog_grad_a.dtype == torch.float32
    torch.testing.assert_close(layer.dog_grad_a, torch.full_like(layer.dog_grad_a, 1.0 + 64 * 2.0**-10))


def test_aux_loss_collected_once_and_not_doubled_by_checkpointing(tiny_model_dirs: dict[str, Path]) -> None:
    ids = _tokens()
    losses = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = apply_adapters(_load(tiny_model_dirs["llama"]), AdapterConfig(rank=4, dropout=0.0), seed=0)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        aux = collect_aux_loss(model)
        assert aux is not None and collect_aux_loss(model) is None  # cleared after collection
        losses.append(aux.item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    assert losses[0] >= 1.0 - 1e-6  # Switch loss is >= 1 with equality at perfect balance


def test_adapter_state_round_trip(tiny_model_dirs: dict[str, Path]) -> None:
    torch.manual_seed(0)
    trained = apply_adapters(_load(tiny_model_dirs["llama"]), AdapterConfig(rank=4, dropout=0.0), seed=0)
    _train_steps(trained, steps=2)
    regroup(trained)
    state = adapter_state_dict(trained)
    fresh = apply_adapters(_load(tiny_model_dirs["llama"]), AdapterConfig(rank=4, dropout=0.0), seed=1)
    load_adapter_state_dict(fresh, state)
    trained.eval()
    fresh.eval()
    ids = _tokens(seed=5)
    torch.testing.assert_close(fresh(ids).logits, trained(ids).logits, atol=0, rtol=0)
    with pytest.raises(KeyError, match="missing"):
        load_adapter_state_dict(fresh, {k: v for k, v in state.items() if "router" not in k})


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="top_k"):
        AdapterConfig(method="badit", num_experts=4, top_k=6)
    with pytest.raises(ValueError, match="pissa"):
        AdapterConfig(method="pissa", num_experts=2)
    spec = layer_spec(AdapterConfig(method="badit"))
    assert (spec.num_experts, spec.rank, spec.top_k, spec.gate_scale, spec.router, spec.init) == (
        8,
        8,
        4,
        4.0,
        "topk",
        "bad",
    )
    # loramoe = Badit's router over LoRA experts without DOG (the paper's "w/o BAD & DOG" row)
    loramoe, badit = AdapterConfig(method="loramoe"), AdapterConfig(method="badit")
    assert (layer_spec(loramoe).init, loramoe.resolved().dog) == ("lora", False)
    assert dataclasses.replace(layer_spec(loramoe), init="bad") == layer_spec(badit)
    dense = layer_spec(AdapterConfig(method="loramoe_dense"))
    assert (dense.router, dense.num_experts, dense.top_k, dense.gate_scale) == ("dense", 8, 8, 1.0)
    assert layer_spec(AdapterConfig(method="pissa")).init == "bad-residual"


def test_unsupported_target_is_rejected(tiny_model_dirs: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="no nn.Linear named"):
        apply_adapters(_load(tiny_model_dirs["llama"]), AdapterConfig(target_modules=["nope_proj"]))


@pytest.mark.slow
def test_init_reproduces_the_default_model(default_model_dir: Path) -> None:
    """The paper's setting on SmolLM2-135M-Instruct: 30 gate_proj layers, K=8, r=8, top-4."""
    input_ids = _tokens(length=16)
    base_logits = _load(default_model_dir)(input_ids).logits
    model = apply_adapters(_load(default_model_dir), AdapterConfig(method="badit"), seed=0)
    assert len(adapted_layers(model)) == 30
    _randomise_routers(model)
    assert (model(input_ids).logits - base_logits).abs().max().item() <= 1e-5
