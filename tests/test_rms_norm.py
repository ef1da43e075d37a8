"""RMS normalization (rms_norm, rms_norm_train, rms_norm_backward, RMSNorm):
float64 NumPy reference, finite differences, PyTorch (F.rms_norm and
nn.RMSNorm) where installed, out= and in place, thread counts, refusals."""
import os
import re

import numpy as np
import pytest

import bncore
import reference as ref
from reference import GRAD_TOL as GTOL
from reference import TOL

# (x's shape, normalized_shape): short rows, several trailing dims, and rows
# over 16384 values (split in chunks across threads)
CASES = [((13, 7), (7,)), ((3, 5, 16), (16,)), ((2, 3, 4, 5), (4, 5)), ((5,), (5,)),
         ((8, 768), (768,)), ((3, 17000), (17000,)), ((2, 2, 9000), (2, 9000))]
IDS = ["x".join(map(str, s)) + "-ns" + "x".join(map(str, n)) for s, n in CASES]


@pytest.mark.parametrize("shape,ns", CASES, ids=IDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("eps", [None, 1e-3])
def test_matches_reference(rng, shape, ns, dtype, affine, eps):
    x = (rng.standard_normal(shape) * 2 + 0.5).astype(dtype)
    w = rng.uniform(0.5, 1.5, ns).astype(dtype) if affine else None
    y, invrms = bncore.rms_norm_train(x, ns, w, eps=eps)
    y_ref, r_ref = ref.rms_norm(x, ns, w, eps=eps)
    assert y.dtype == invrms.dtype == dtype and invrms.shape == r_ref.shape
    np.testing.assert_allclose(y, y_ref, **TOL[dtype])
    np.testing.assert_allclose(invrms, r_ref, **TOL[dtype])
    np.testing.assert_array_equal(bncore.rms_norm(x, ns, w, eps=eps), y)
    dy = rng.standard_normal(shape).astype(dtype)
    dx, dw = bncore.rms_norm_backward(dy, x, ns, invrms, w)
    dx_ref, dw_ref = ref.rms_norm_backward(dy, x, ns, r_ref, w)
    assert dx.dtype == dw.dtype == dtype and dw.shape == ns
    np.testing.assert_allclose(dx, dx_ref, **GTOL[dtype])
    ref.assert_close(dw, dw_ref, GTOL[dtype]["rtol"], "dweight")


@pytest.mark.parametrize("shape,ns", [((4, 3), (3,)), ((2, 3, 2), (3, 2)), ((3, 2, 2), (2,))])
def test_finite_differences(rng, shape, ns):
    x = rng.standard_normal(shape)
    w, g = rng.uniform(0.5, 1.5, ns), rng.standard_normal(shape)
    _, invrms = bncore.rms_norm_train(x, ns, w, eps=1e-3)
    grads = bncore.rms_norm_backward(g, x, ns, invrms, w)
    ref.assert_grads(lambda: float(np.sum(bncore.rms_norm(x, ns, w, eps=1e-3) * g)),
                     zip((x, w), grads))


def test_float32_large_values_and_float16(rng):
    # squares summed in double: x**2 ~ 1e40 would overflow float32
    x = (rng.standard_normal((4, 300)) * 1e20).astype(np.float32)
    y, r = bncore.rms_norm_train(x, 300)
    np.testing.assert_allclose(y, ref.rms_norm(x, (300,))[0], **TOL[np.float32])
    h = rng.standard_normal((3, 40)).astype(np.float16)
    yh, rh = bncore.rms_norm_train(h, 40)
    assert yh.dtype == np.float16 and rh.dtype == np.float32
    np.testing.assert_allclose(yh, ref.rms_norm(h, (40,))[0], **TOL[np.float16])


def test_zero_rows_follow_the_invstd_rule(rng):
    # eps = 0 and an all-zero row: invrms 0 (as invstd), so y = 0, not NaN
    x = np.zeros((2, 5))
    x[1] = rng.standard_normal(5)
    y, r = bncore.rms_norm_train(x, 5, eps=0.0)
    assert r[0, 0] == 0 and np.all(y[0] == 0)
    np.testing.assert_allclose(y[1], ref.rms_norm(x[1:], (5,), eps=0.0)[0][0],
                               **TOL[np.float64])
    y0, r0 = bncore.rms_norm_train(np.zeros((3, 0)), 0)
    assert y0.shape == (3, 0) and np.isnan(r0).all()


def test_out_in_place_and_strided(rng):
    base = rng.standard_normal((6, 10, 8)).astype(np.float32)
    x = base.transpose(1, 0, 2)  # not contiguous
    w = rng.uniform(0.5, 1.5, 8).astype(np.float32)
    y = bncore.rms_norm(x, 8, w)
    np.testing.assert_allclose(y, ref.rms_norm(x, (8,), w)[0], **TOL[np.float32])
    out = np.empty_like(x)
    assert bncore.rms_norm(x, 8, w, out=out) is out
    np.testing.assert_array_equal(out, y)
    xc = np.ascontiguousarray(x)
    bncore.rms_norm(xc, 8, w, out=xc)
    np.testing.assert_array_equal(xc, y)
    x = np.ascontiguousarray(x)
    _, r = bncore.rms_norm_train(x, 8, w)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    dx, dw = bncore.rms_norm_backward(dy, x, 8, r, w)
    dx2, dw2 = bncore.rms_norm_backward(dy, x, 8, r, w, out=dy)
    assert dx2 is dy
    np.testing.assert_array_equal(dy, dx)
    np.testing.assert_array_equal(dw2, dw)


@pytest.mark.parametrize("shape,ns", [((300, 700), (700,)), ((3, 40000), (40000,)),
                                      ((2, 3, 20000), (3, 20000))])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_thread_count_bit_identity(rng, shape, ns, dtype):
    x = rng.standard_normal(shape).astype(dtype)
    w = rng.uniform(0.5, 1.5, ns)
    dy = rng.standard_normal(shape).astype(dtype)
    y1, r1 = bncore.rms_norm_train(x, ns, w, n_threads=1)
    b1 = bncore.rms_norm_backward(dy, x, ns, r1, w, n_threads=1)
    for nt in (2, 3, 5):
        y, r = bncore.rms_norm_train(x, ns, w, n_threads=nt)
        np.testing.assert_array_equal(y, y1)
        np.testing.assert_array_equal(r, r1)
        for a, c in zip(b1, bncore.rms_norm_backward(dy, x, ns, r1, w, n_threads=nt)):
            np.testing.assert_array_equal(a, c)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,ns", [((4, 7, 33), (33,)), ((2, 3, 5), (3, 5)),
                                      ((2, 20000), (20000,))])
def test_against_torch(rng, dtype, shape, ns):
    torch = pytest.importorskip("torch")
    x = rng.standard_normal(shape).astype(dtype)
    w = rng.uniform(0.5, 1.5, ns).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    xt, wt = torch.tensor(x, requires_grad=True), torch.tensor(w, requires_grad=True)
    yt = torch.nn.functional.rms_norm(xt, ns, wt)  # eps None: finfo(dtype).eps, as here
    yt.backward(torch.tensor(dy))
    y, r = bncore.rms_norm_train(x, ns, w)
    np.testing.assert_allclose(y, yt.detach().numpy(), **TOL[dtype])
    dx, dw = bncore.rms_norm_backward(dy, x, ns, r, w)
    np.testing.assert_allclose(dx, xt.grad.numpy(), **GTOL[dtype])
    ref.assert_close(dw, wt.grad.numpy(), GTOL[dtype]["rtol"], "dweight")


def test_layer_against_torch_module(rng):
    torch = pytest.importorskip("torch")
    x = rng.standard_normal((3, 4, 6))
    dy = rng.standard_normal(x.shape)
    tm = torch.nn.RMSNorm((4, 6), dtype=torch.float64)
    with torch.no_grad():
        tm.weight.copy_(torch.tensor(rng.uniform(0.5, 1.5, (4, 6))))
    layer = bncore.RMSNorm((4, 6), dtype=np.float64)
    layer.load_state_dict({k: v.detach().numpy() for k, v in tm.state_dict().items()})
    xt = torch.tensor(x, requires_grad=True)
    yt = tm(xt)
    yt.backward(torch.tensor(dy))
    np.testing.assert_allclose(layer(x), yt.detach().numpy(), **TOL[np.float64])
    np.testing.assert_allclose(layer.backward(dy), xt.grad.numpy(), **GTOL[np.float64])
    np.testing.assert_allclose(layer.grad_weight, tm.weight.grad.numpy(), **GTOL[np.float64])


def test_layer_state_and_modes(rng):
    layer = bncore.RMSNorm(5, eps=1e-4, dtype=np.float32)
    assert sorted(layer.state_dict()) == ["weight"] and layer.bias is None
    assert repr(layer) == "RMSNorm((5,), eps=0.0001, elementwise_affine=True)"
    x = rng.standard_normal((3, 5)).astype(np.float32)
    np.testing.assert_allclose(layer(x), ref.rms_norm(x, (5,), eps=1e-4)[0], **TOL[np.float32])
    np.testing.assert_array_equal(layer.eval()(x), layer.train()(x))
    dx = layer.backward(np.ones_like(x))
    assert layer.grad_weight.shape == (5,) and layer.grad_bias is None and dx.shape == x.shape
    plain = bncore.RMSNorm(5, elementwise_affine=False)
    assert plain.weight is None and plain.state_dict() == {} and plain.eps is None
    np.testing.assert_allclose(plain(x), ref.rms_norm(x, (5,))[0], **TOL[np.float32])
    with pytest.raises(ValueError, match="^eps: expected"):
        bncore.RMSNorm(5, eps=-1.0)
    with pytest.raises(ValueError, match="^normalized_shape: expected the trailing"):
        layer(np.ones((3, 4), np.float32))
    with pytest.raises(ValueError, match="^out: expected an array separate from x"):
        layer(x, out=x)
    np.testing.assert_array_equal(layer.backward(np.ones_like(x)), dx)  # the record stayed


@pytest.mark.parametrize("call,exc,msg", [
    (lambda x, r: bncore.rms_norm(x, 5), ValueError, "^normalized_shape: expected the trailing"),
    (lambda x, r: bncore.rms_norm(x, 4.0), TypeError, "^normalized_shape: expected an int"),
    (lambda x, r: bncore.rms_norm(x, 4, np.ones(3)), ValueError, "^weight: expected shape"),
    (lambda x, r: bncore.rms_norm(x, 4, np.ones(4, int)), TypeError, "^weight: expected a float"),
    (lambda x, r: bncore.rms_norm(x, 4, eps=-1e-3), ValueError, "^eps: expected"),
    (lambda x, r: bncore.rms_norm(x, 4, eps=np.nan), ValueError, "^eps: expected"),
    (lambda x, r: bncore.rms_norm(x, 4, n_threads=0), ValueError, "^n_threads"),
    (lambda x, r: bncore.rms_norm(x.astype(int), 4), TypeError, "^x: expected dtype"),
    (lambda x, r: bncore.rms_norm(x, 4, out=np.empty((3, 4))), TypeError, "^out: expected dtype"),
    (lambda x, r: bncore.rms_norm_backward(x, x, 4, r[:2]), ValueError, "^invrms: expected 3"),
    (lambda x, r: bncore.rms_norm_backward(x.astype(np.float64), x, 4, r), TypeError,
     "^dy: expected dtype"),
    (lambda x, r: bncore.rms_norm_backward(x, x, 4, r, np.ones(5)), ValueError,
     "^weight: expected shape")])
def test_refusals_change_nothing(rng, call, exc, msg):
    x = rng.standard_normal((3, 4)).astype(np.float32)
    _, r = bncore.rms_norm_train(x, 4)
    x0, r0 = x.copy(), r.copy()
    with pytest.raises(exc, match=msg):
        call(x, r)
    np.testing.assert_array_equal(x, x0)
    np.testing.assert_array_equal(r, r0)
    out = np.full_like(x, 3.0)
    with pytest.raises(ValueError, match="^eps"):
        bncore.rms_norm(x, 4, eps=-1.0, out=out)
    np.testing.assert_array_equal(out, 3.0)


def test_docs_example_runs():
    path = os.path.join(os.path.dirname(__file__), "..", "docs", "normalization.md")
    with open(path) as f:
        blocks = re.findall(r"```python\n(.*?)```", f.read(), re.S)
    ns = {"np": np, "bncore": bncore}  # the page's first block imports them
    exec(compile(blocks[7], path, "exec"), ns)
    np.testing.assert_allclose(ns["y"], ref.rms_norm(ns["x"], (512,))[0], **TOL[np.float32])
    assert ns["invrms"].shape == (8, 128, 1) and ns["rms"].grad_weight.shape == (512,)


def test_float32_subnormal_rows(rng):
    # eps = 0 and a row of subnormals: invrms ~ 1e41 leaves float32's range, so
    # that row is evaluated in double and rounded once
    tiny = 2.0 ** -149
    x = np.empty((3, 50), np.float32)
    x[0] = rng.integers(-20000, 20000, 50) * tiny
    x[1] = rng.standard_normal(50)
    x[2] = rng.integers(1, 5, 50) * tiny
    # dy on the scale of 1 / invrms, so that dx stays within float32's range
    dy = (rng.standard_normal(x.shape) * np.array([[1e-40], [1.0], [1e-44]])).astype(np.float32)
    w = rng.uniform(0.5, 1.5, 50)
    y, r = bncore.rms_norm_train(x, 50, w, eps=0.0)
    x64 = x.astype(np.float64)
    r_ref = 1 / np.sqrt((x64 ** 2).mean(1, keepdims=True))
    assert np.isfinite(y).all()
    np.testing.assert_allclose(y, x64 * r_ref * w, rtol=2e-6, atol=2e-6)
    dx, dw = bncore.rms_norm_backward(dy, x, 50, r_ref, w)
    dx_ref, dw_ref = ref.rms_norm_backward(dy, x, (50,), r_ref, w)
    assert np.isfinite(dx).all()
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-5, atol=1e-5 * np.abs(dx_ref).max())
    np.testing.assert_allclose(dw, dw_ref, rtol=1e-5, atol=1e-5)
