"""bfloat16 products for float32 training linears (sparsefit.kernels.bf16_linear) against the
float64 reference: odd row counts, widths that are not powers of two, rectangular weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sparsefit.kernels import bf16_linear as bl

SHAPES = [  # (leading dims, in, out)
    ((1,), 45, 77),
    ((17,), 300, 130),
    ((301,), 64, 200),
    ((2, 17), 96, 40),
    ((3, 100), 384, 153),  # 300 rows: blocks of ROWS, the last one padded
]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize(("lead", "k", "n"), SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_matches_the_float64_reference(lead, k, n, bias):
    torch.manual_seed(0)
    x = torch.randn(*lead, k, requires_grad=True)
    w = torch.randn(n, k, requires_grad=True)
    b = torch.randn(n, requires_grad=True) if bias else None
    gy = torch.randn(*lead, n)
    y = bl.linear_bf16(x, w, b)
    assert y.shape == (*lead, n) and y.dtype == torch.float32
    grads = torch.autograd.grad(y, [x, w] + ([b] if bias else []), gy)
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    b64 = b.detach().double().requires_grad_() if bias else None
    y64 = bl.linear_reference(x64, w64, b64)
    want = torch.autograd.grad(y64, [x64, w64] + ([b64] if bias else []), gy.double())
    # bfloat16 operands (8 significant bits) with float32 accumulation: about 3e-3 relative
    assert rel(y, y64) < 1e-2
    if bl.amx_bf16():  # where the bfloat16 kernels exist, the products really ran in bfloat16
        assert rel(y, bl.linear_reference(x, w, b)) > 1e-5
    for g, r in zip(grads, want, strict=True):
        assert g.dtype == torch.float32 and g.shape == r.shape
        assert rel(g, r) < 1e-2
    if bias:
        torch.testing.assert_close(grads[2].double(), want[2], rtol=1e-5, atol=1e-4)  # a float32 sum


def test_same_bytes_on_repeat_and_zero_rows():
    torch.manual_seed(1)
    x, w = torch.randn(257, 384), torch.randn(600, 384, requires_grad=True)
    a = bl.linear_bf16(x, w)
    (ga,) = torch.autograd.grad(a.sum(), w)
    b = bl.linear_bf16(x, w)
    (gb,) = torch.autograd.grad(b.sum(), w)
    assert torch.equal(a, b) and torch.equal(ga, gb)
    assert bl.linear_bf16(x[:0], w).shape == (0, 600)


def test_rejects_what_it_cannot_run():
    with pytest.raises(TypeError):
        bl.linear_bf16(torch.randn(3, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64))
    with pytest.raises(ValueError):
        bl.linear_bf16(torch.randn(3, 4), torch.randn(5, 6))


def test_the_mode_routes_only_large_training_linears(monkeypatch):
    calls = []
    real = bl.linear_bf16

    def spy(x, w, b=None):
        calls.append(tuple(w.shape))
        return real(x, w, b)

    monkeypatch.setattr(bl, "linear_bf16", spy)
    torch.manual_seed(2)
    big, small = nn.Linear(384, 512), nn.Linear(384, 64)
    x = torch.randn(17, 384)
    with bl.bf16_linears():
        y = big(x)
        small(x)
        with torch.no_grad():  # evaluation: exactly the float32 product
            z = big(x)
        big.double()(x.double())  # other dtypes pass through
    assert calls == [(512, 384)]
    big.float()
    torch.testing.assert_close(z, nn.functional.linear(x, big.weight, big.bias), rtol=0, atol=0)
    assert rel(y, nn.functional.linear(x, big.weight, big.bias)) < 1e-2
    y.sum().backward()
    assert big.weight.grad is not None and big.weight.grad.shape == (512, 384)
    with bl.bf16_linears(min_weight_elements=1):
        small(x)
    assert calls[-1] == (64, 384)
