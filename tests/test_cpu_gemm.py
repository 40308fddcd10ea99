"""vLLM's prepacked oneDNN GEMM as the experts' Gemm on CPU: same numbers as the plain matmul, and packed again
whenever a slot changes (a stale packed copy would serve the previous adapter)."""

from __future__ import annotations

import pytest
import torch

from badit_serve.core.cpu_features import ENV_NATIVE_BF16, hardware_native_bf16, native_bf16
from badit_serve.vllm_models.cpu_gemm import OneDnnGemm, onednn_gemm, prepacked_gemm_factory
from badit_serve.vllm_models.served_experts import (
    RoutingSpec,
    ServedExperts,
    SlotIndex,
    SlotShape,
    TorchGemm,
    add_served_delta,
    served_routing,
)

pytestmark = pytest.mark.skipif(
    prepacked_gemm_factory(torch.device("cpu")) is TorchGemm, reason="this vLLM build has no oneDNN GEMM"
)


def _expected_kernel(dtype: torch.dtype) -> bool | None:
    """Whether `onednn_gemm` must give vLLM's oneDNN kernel: always for float32 (oneDNN has it on every CPU
    vLLM runs on); for bfloat16 only where the probe says native and the CPU has it, never where the probe
    says no (the plain matmul, by design); None (no claim) where the probe is forced on a CPU without it,
    as oneDNN then decides whether it has a kernel."""
    if dtype == torch.float32:
        return True
    if not native_bf16():
        return False
    return True if hardware_native_bf16() else None


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("tokens", [1, 7, 64])
def test_onednn_gemm_matches_the_plain_matmul(dtype: torch.dtype, tol: float, tokens: int) -> None:
    gen = torch.Generator().manual_seed(tokens)
    weight = torch.randn(136, 96, generator=gen).to(dtype)  # (n, k)
    x = torch.randn(tokens, 96, generator=gen).to(dtype)  # (T, k)
    gemm = onednn_gemm(weight)
    expected = _expected_kernel(dtype)
    if expected is not None:
        assert isinstance(gemm, OneDnnGemm) == expected, (
            f"probe {native_bf16()}, hardware {hardware_native_bf16()}"
        )
    got = gemm(x)  # (T, n)
    assert got.dtype == dtype and got.shape == (tokens, 136)
    torch.testing.assert_close(got.float(), (x.float() @ weight.float().t()), rtol=tol, atol=tol * 10)


def _adapter(seed: int, k: int, rank: int, d_in: int, d_out: int) -> ServedExperts:
    gen = torch.Generator().manual_seed(seed)
    router = torch.randn(k, d_in, generator=gen)
    a, b = torch.randn(k * rank, d_in, generator=gen), torch.randn(d_out, k * rank, generator=gen)
    return ServedExperts.build(router, a, b, 0.5, k, torch.float32)


def _delta(experts: ServedExperts, x: torch.Tensor, slots: SlotIndex | None, d_out: int) -> torch.Tensor:
    spec = RoutingSpec(num_experts=4, top_k=2, mode="topk", gate_scale=1.0)
    weighted = served_routing(x, experts, spec, slots)[2]  # (T, K*R)
    return add_served_delta(torch.zeros(x.shape[0], d_out), weighted, experts, slots)  # (T, d_out)


def test_prepacked_slots_follow_set_and_reset() -> None:
    k, rank, d_in, d_out = 4, 4, 32, 48
    first, second = _adapter(1, k, rank, d_in, d_out), _adapter(2, k, rank, d_in, d_out)
    stacked = ServedExperts.empty_slots(2, SlotShape(k, k * rank, d_in, d_out), torch.float32, "cpu")
    stacked.use_gemm(onednn_gemm)
    x = torch.randn(6, d_in)
    slots = SlotIndex.of(torch.tensor([0, 1, 0, 1, -1, 0]), 2, grouped=False)
    assert _delta(stacked, x, slots, d_out).abs().sum() == 0  # empty slots add nothing
    stacked.set_slot(0, first)
    stacked.set_slot(1, second)
    got = _delta(stacked, x, slots, d_out)
    rows0, rows1 = [0, 2, 5], [1, 3]
    torch.testing.assert_close(got[rows0], _delta(first, x, None, d_out)[rows0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[rows1], _delta(second, x, None, d_out)[rows1], rtol=1e-5, atol=1e-5)
    assert got[4].abs().sum() == 0
    stacked.set_slot(0, second)  # a new adapter in a used slot: served from the new values
    again = _delta(stacked, x, slots, d_out)
    torch.testing.assert_close(again[rows0], _delta(second, x, None, d_out)[rows0], rtol=1e-5, atol=1e-5)
    stacked.reset_slot(1)
    assert _delta(stacked, x, slots, d_out)[rows1].abs().sum() == 0


def test_slot_changes_between_uses_pack_once() -> None:
    """Activating m adapters before a step packs the slots once at the step, not m times (each pack copies
    every slot: 186 ms of a cold load on the default model, benchmarks/slot_activation.py); the plain matmul
    reads the weights at call time and is never repacked."""
    k, rank, d_in, d_out = 4, 4, 32, 48
    adapters = [_adapter(seed, k, rank, d_in, d_out) for seed in range(3)]
    stacked = ServedExperts.empty_slots(3, SlotShape(k, k * rank, d_in, d_out), torch.float32, "cpu")
    stacked.use_gemm(onednn_gemm)
    before = stacked.packs
    for slot, adapter in enumerate(adapters):
        stacked.set_slot(slot, adapter)
    stacked.reset_slot(2)
    assert stacked.packs == before  # nothing packed until the next use
    x = torch.randn(6, d_in)
    slots = SlotIndex.of(torch.tensor([0, 1, 2, 0, 1, 2]), 3, grouped=False)
    got = _delta(stacked, x, slots, d_out)
    assert stacked.packs == before + 1
    for row, slot in enumerate([0, 1, 2, 0, 1, 2]):
        want = torch.zeros(d_out) if slot == 2 else _delta(adapters[slot], x[row : row + 1], None, d_out)[0]
        torch.testing.assert_close(got[row], want, rtol=1e-5, atol=1e-5)
    _delta(stacked, x, slots, d_out)
    assert stacked.packs == before + 1  # unchanged slots: the packed copies are reused
    plain = ServedExperts.empty_slots(3, SlotShape(k, k * rank, d_in, d_out), torch.float32, "cpu")
    plain.set_slot(0, adapters[0])
    _delta(plain, x, slots, d_out)
    assert plain.packs == 1  # the constructor's only


def test_moving_the_experts_makes_the_gemms_again() -> None:
    experts = _adapter(3, 4, 4, 32, 48)
    experts.use_gemm(TorchGemm)
    experts.to(torch.float64)
    assert experts.a_gemm.weight.dtype == torch.float64 and experts.b_gemm.weight is experts.lora_b


@pytest.mark.parametrize("forced", ["0", "1"])
def test_the_probe_decides_the_bfloat16_kernel(monkeypatch: pytest.MonkeyPatch, forced: str) -> None:
    """Both branches on any machine: forced off, bfloat16 takes the plain matmul even where oneDNN has a
    kernel; forced on, oneDNN is asked (and used where the CPU has native bfloat16). float32 never asks the
    probe. The numbers are the plain matmul's either way."""
    monkeypatch.setenv(ENV_NATIVE_BF16, forced)
    weight = torch.randn(64, 32).to(torch.bfloat16)  # (n, k)
    gemm = onednn_gemm(weight)
    if forced == "0":
        assert isinstance(gemm, TorchGemm)
    elif hardware_native_bf16():
        assert isinstance(gemm, OneDnnGemm)
    assert isinstance(onednn_gemm(weight.float()), OneDnnGemm)
    x = torch.randn(5, 32).to(torch.bfloat16)  # (T, k)
    torch.testing.assert_close(gemm(x).float(), x.float() @ weight.float().t(), rtol=1e-2, atol=1e-1)
