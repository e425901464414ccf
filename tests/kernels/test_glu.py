"""SwiGLU / GeGLU kernels vs silu(g) * u and gelu_tanh(g) * u."""

from __future__ import annotations

import pytest
import torch
from visionft.kernels.glu import geglu, geglu_reference, swiglu, swiglu_reference

from tests.kernels.helpers import DTYPE_PARAMS, assert_rel_close, rand


@pytest.mark.parametrize("shape", [(2, 8, 64), (3, 37, 123), (1, 2049)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize(
    ("fn", "ref_fn"), [(swiglu, swiglu_reference), (geglu, geglu_reference)], ids=["swiglu", "geglu"]
)
def test_glu_matches_reference(shape, dtype, fn, ref_fn):
    torch.manual_seed(0)
    g = rand(*shape, dtype=dtype, scale=3.0, requires_grad=True)
    u = rand(*shape, dtype=dtype, requires_grad=True)
    dh = rand(*shape, dtype=dtype)
    h = fn(g, u)
    h.backward(dh)
    gr, ur = (t.detach().float().requires_grad_(True) for t in (g, u))
    hr = ref_fn(gr, ur)
    hr.backward(dh.float())
    assert h.dtype == dtype
    assert_rel_close(h, hr, dtype, name="h")
    assert_rel_close(g.grad, gr.grad, dtype, name="dg")
    assert_rel_close(u.grad, ur.grad, dtype, name="du")


def test_glu_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="must match"):
        swiglu(rand(2, 3), rand(2, 4))
