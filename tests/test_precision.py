"""Training under bfloat16 autocast computes the router logits and the expert path in float32."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from training.adapters.layer import LayerSpec, RoutedAdapterLinear

AUTOCAST = dict(device_type="cpu", dtype=torch.bfloat16)


def _layer(init: str = "bad", router: str = "topk", seed: int = 0) -> RoutedAdapterLinear:
    gen = torch.Generator().manual_seed(seed)
    base = nn.Linear(96, 64, bias=False)
    with torch.no_grad():
        base.weight.copy_(torch.randn(64, 96, generator=gen))
    spec = LayerSpec(
        num_experts=8, rank=2, top_k=4, scaling=2.0, gate_scale=4.0, router=router, init=init, dropout=0.0
    )
    layer = RoutedAdapterLinear(base, spec, generator=gen).eval()
    with torch.no_grad():
        layer.router.weight.normal_(0.0, 1.0, generator=gen)
    return layer


def _tokens(seed: int = 1, count: int = 64) -> torch.Tensor:
    return torch.randn(count, 96, generator=torch.Generator().manual_seed(seed))  # (T, d_in)


@pytest.mark.parametrize("router", ["topk", "dense"])
def test_router_logits_are_float32_under_autocast(router: str) -> None:
    layer, x = _layer(router=router), _tokens()
    logits, weights, selected = layer.route(x)  # (T, K) each
    with torch.autocast(**AUTOCAST):
        ac_logits, ac_weights, ac_selected = layer.route(x)
    assert ac_logits.dtype == torch.float32 and ac_weights.dtype == torch.float32
    assert torch.equal(ac_logits, logits)  # bitwise: the same near-ties break the same way as in serving
    assert torch.equal(ac_weights, weights) and torch.equal(ac_selected, selected)


def test_bad_delta_under_autocast_matches_float32_far_below_bf16_noise() -> None:
    """After a small move of A, the learned delta B A x - B0 A0 x is ~1e-3 of s B0 A0 x. Computed as two
    bfloat16 products it would carry noise of about 2^-9 |s B0 A0 x|; computed in float32 it does not.
    The base is zeroed after init so the layer's output is the delta alone (its own bf16 rounding is
    relative to the small delta)."""
    layer, x = _layer(), _tokens()
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        layer.lora_a.add_(1e-3 * layer.lora_a.abs().mean() * torch.randn(layer.lora_a.shape, generator=gen))
        layer.base.weight.zero_()
    _, weights, _ = layer.route(x)
    big = (
        layer.spec.scaling * (x.double() @ layer.lora_a0.double().t()) @ layer.lora_b0.double().t()
    )  # (T, d_out)
    noise = 2.0**-9 * big.abs().mean()  # what two bf16-rounded products of the SVD part would add
    with torch.no_grad():
        want = layer(x).double()  # (T, d_out) float32 path
        with torch.autocast(**AUTOCAST):
            got = layer(x).double()  # (T, d_out) bf16 output of the zero base + delta
    assert float((want - got).abs().max()) < 0.05 * float(noise)
    # the threshold can fail: the same delta as two bf16 products misses it by far
    with torch.no_grad(), torch.autocast(**AUTOCAST):
        a, b, a0, b0 = layer.lora_a, layer.lora_b, layer.lora_a0, layer.lora_b0
        w = weights.repeat_interleave(2, dim=1)  # (T, K*r): expert e's weight on its r = 2 slots
        naive = layer.spec.scaling * ((((x @ a.t()) * w) @ b.t()) - (((x @ a0.t()) * w) @ b0.t()))
    assert float((want - naive.double()).abs().max()) > 0.05 * float(noise)


def test_bad_init_is_exact_under_autocast() -> None:
    layer, x = _layer(), _tokens()
    with torch.no_grad(), torch.autocast(**AUTOCAST):
        assert torch.equal(layer(x), layer.base(x))


def test_autocast_gradients_match_float32() -> None:
    """The gradient reaching A flows through the float32 expert path, so it matches the float32 one
    to float32 accuracy (the zeroed base keeps bf16 rounding of the frozen part out of the loss)."""
    grads = []
    for autocast in (False, True):
        layer, x = _layer(), _tokens()
        with torch.no_grad():
            layer.lora_a.mul_(1.001)
            layer.base.weight.zero_()
        with torch.autocast(**AUTOCAST, enabled=autocast):
            out = layer(x)
        (out.float() ** 2).sum().backward()
        grads.append(layer.lora_a.grad.clone())
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-2, atol=1e-2 * float(grads[0].abs().mean()))
