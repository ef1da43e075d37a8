"""Layer, group and instance normalization: float64 NumPy reference, finite
differences, PyTorch (F.layer_norm / F.group_norm / F.instance_norm and the
modules) and the ONNX node test cases."""
import glob
import importlib
import os
import re

import numpy as np
import pytest

import bncore
import reference as ref
from reference import GRAD_TOL as GTOL
from reference import TOL


# ---- layer and group norm against the reference ------------------------------------------------

# name: (train, apply, backward, reference, reference backward, (scale, offset, eps) of the data)
FAMILY = {
    "layer_norm": (bncore.layer_norm_train, bncore.layer_norm, bncore.layer_norm_backward,
                   ref.layer_norm, ref.layer_norm_backward, (3, 5, 1e-4)),
    "group_norm": (bncore.group_norm_train, bncore.group_norm, bncore.group_norm_backward,
                   ref.group_norm, ref.group_norm_backward, (2, -4, 1e-3)),
}


def _dims(v):
    return "x".join(map(str, v))


# (name, x's shape, normalized_shape or num_groups, the affine parameters' shape)
CASES = [("layer_norm", s, ns, ns) for s, ns in [
    ((13, 7), (7,)), ((3, 5, 16), (16,)), ((2, 3, 4, 5), (4, 5)), ((2, 3, 4, 5), (2, 3, 4, 5)),
    ((8, 768), (768,)), ((5,), (5,)), ((3, 17000), (17000,)), ((2, 2, 9000), (2, 9000))]] + [
    ("group_norm", s, G, (s[1],)) for s, G in [
        ((4, 6, 5, 3), 3), ((2, 8, 7), 4), ((5, 4), 2), ((2, 32, 9, 9), 32), ((3, 6, 3, 3), 1),
        ((2, 4, 2, 3, 2), 2), ((2, 4, 70, 70), 2), ((2, 4, 130, 130), 1)]]
IDS = [f"{n}-{_dims(s)}-" + (f"ns{_dims(a)}" if n == "layer_norm" else f"g{a}")
       for n, s, a, _ in CASES]


@pytest.mark.parametrize("name,shape,arg,pshape", CASES, ids=IDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("affine", [True, False])
def test_matches_reference(rng, name, shape, arg, pshape, dtype, affine):
    train, apply, backward, forward_ref, backward_ref, (scale, offset, eps) = FAMILY[name]
    x = (rng.standard_normal(shape) * scale + offset).astype(dtype)
    w = rng.uniform(0.5, 1.5, pshape).astype(dtype) if affine else None
    b = rng.standard_normal(pshape).astype(dtype) if affine else None
    y, mean, invstd = train(x, arg, w, b, eps=eps)
    y_ref, m_ref, inv_ref = forward_ref(x, arg, w, b, eps=eps)
    assert y.dtype == mean.dtype == invstd.dtype == dtype
    assert mean.shape == invstd.shape == m_ref.shape
    np.testing.assert_allclose(y, y_ref, **TOL[dtype])
    np.testing.assert_allclose(mean, m_ref, **TOL[dtype])
    np.testing.assert_allclose(invstd, inv_ref, **TOL[dtype])
    np.testing.assert_array_equal(apply(x, arg, w, b, eps=eps), y)

    dy = rng.standard_normal(shape).astype(dtype)
    dx, dw, db = backward(dy, x, arg, mean, invstd, w)
    for got, want in zip((dx, dw, db), backward_ref(dy, x, arg, m_ref, inv_ref, w)):
        np.testing.assert_allclose(got, want, **GTOL[dtype])
    assert dw.shape == db.shape == tuple(pshape) and dw.dtype == dtype


@pytest.mark.parametrize("name,shape,arg,pshape", [
    ("layer_norm", (4, 3), (3,), (3,)), ("layer_norm", (2, 3, 2), (3, 2), (3, 2)),
    ("layer_norm", (3, 2, 2), (2,), (2,)), ("group_norm", (2, 4, 3), 1, (4,)),
    ("group_norm", (2, 4, 3), 2, (4,))])
def test_finite_differences(rng, name, shape, arg, pshape):
    train, apply, backward = FAMILY[name][:3]
    x = rng.standard_normal(shape)
    w, b = rng.uniform(0.5, 1.5, pshape), rng.standard_normal(pshape)
    g = rng.standard_normal(shape)
    _, mean, invstd = train(x, arg, w, b)
    grads = backward(g, x, arg, mean, invstd, w)
    ref.assert_grads(lambda: float(np.sum(apply(x, arg, w, b) * g)), zip((x, w, b), grads))


# ---- layer norm ------------------------------------------------------------------------------

def test_layer_norm_float32_accuracy_far_from_zero(rng):
    # |mean| >> std: E[x^2] - E[x]^2 would lose every digit of the variance in float32
    x = (rng.standard_normal((64, 1000)) * 0.5 + 3e3).astype(np.float32)
    y, mean, invstd = bncore.layer_norm_train(x, 1000)
    y_ref, m_ref, inv_ref = ref.layer_norm(x, (1000,))
    np.testing.assert_allclose(invstd, inv_ref, rtol=1e-6)
    np.testing.assert_allclose(mean, m_ref, rtol=1e-7)
    # the output is centered with the mean split in two floats: x - mean stays exact
    np.testing.assert_allclose(y, y_ref, atol=1e-5)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    dx, _, _ = bncore.layer_norm_backward(dy, x, 1000, mean, invstd)
    np.testing.assert_allclose(dx, ref.layer_norm_backward(dy, x, (1000,), m_ref, inv_ref)[0],
                               atol=5e-4)


def test_layer_norm_layouts_out_and_in_place(rng):
    base = rng.standard_normal((6, 10, 8)).astype(np.float32)
    w, b = rng.standard_normal(6).astype(np.float32), rng.standard_normal(6).astype(np.float32)
    for x in (base.transpose(2, 1, 0), base[::-1, :, ::-2].transpose(1, 2, 0),
              np.asfortranarray(base).transpose(1, 2, 0)):
        y_ref = ref.layer_norm(x, (x.shape[-1],), w[:x.shape[-1]], b[:x.shape[-1]])[0]
        np.testing.assert_allclose(bncore.layer_norm(x, x.shape[-1], w[:x.shape[-1]],
                                                     b[:x.shape[-1]]), y_ref, **TOL[np.float32])
    x = base.copy()
    y_ref, mean, invstd = bncore.layer_norm_train(x, 8)
    out = np.empty_like(x)
    assert bncore.layer_norm(x, 8, out=out) is out
    np.testing.assert_array_equal(out, y_ref)
    res = bncore.layer_norm(x, 8, out=x)
    assert res is x
    np.testing.assert_array_equal(x, y_ref)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    dx_ref = bncore.layer_norm_backward(dy, base, 8, mean, invstd)[0]
    assert bncore.layer_norm_backward(dy, base, 8, mean, invstd, out=dy)[0] is dy
    np.testing.assert_array_equal(dy, dx_ref)


def test_float16_input(rng):
    x = (rng.standard_normal((5, 4, 40)) + 2).astype(np.float16)
    y, mean, invstd = bncore.layer_norm_train(x, 40)
    assert y.dtype == np.float16 and mean.dtype == np.float32
    np.testing.assert_allclose(y, ref.layer_norm(x, (40,))[0], **TOL[np.float16])
    y, mean, invstd = bncore.group_norm_train(x, 2)
    assert y.dtype == np.float16 and mean.dtype == np.float32
    np.testing.assert_allclose(y, ref.group_norm(x, 2)[0], **TOL[np.float16])
    dx, dw, _ = bncore.group_norm_backward(x, x, 2, mean, invstd)
    assert dx.dtype == np.float16 and dw.dtype == np.float32
    layer = bncore.LayerNorm(40, dtype=np.float16)
    assert layer(x).dtype == np.float16 and layer.backward(x).dtype == np.float16


def test_layer_norm_empty_rows():
    y, mean, invstd = bncore.layer_norm_train(np.zeros((0, 4), np.float32), 4)
    assert y.shape == (0, 4) and mean.shape == (0, 1)
    dx, dw, db = bncore.layer_norm_backward(np.zeros((0, 4)), np.zeros((0, 4)), 4, mean, invstd)
    assert dx.shape == (0, 4)
    np.testing.assert_array_equal(dw, np.zeros(4))


# ---- group and instance norm -------------------------------------------------------------------

def test_instance_norm_reference_and_running_stats(rng):
    x = rng.standard_normal((3, 4, 5, 2)) * 2 + 1
    w, b = rng.uniform(0.5, 1.5, 4), rng.standard_normal(4)
    rm, rv = rng.standard_normal(4), rng.uniform(0.5, 2, 4)
    rm0, rv0 = rm.copy(), rv.copy()
    y, mean, invstd = bncore.instance_norm_train(x, w, b, running_mean=rm, running_var=rv,
                                                 momentum=0.25)
    y_ref, m_ref, inv_ref = ref.group_norm(x, 4, w, b)
    np.testing.assert_allclose(y, y_ref, **TOL[np.float64])
    np.testing.assert_allclose(mean, m_ref, **TOL[np.float64])
    unbiased = x.reshape(3, 4, -1).var(2, ddof=1)
    np.testing.assert_allclose(rm, 0.75 * rm0 + 0.25 * m_ref.mean(0), rtol=1e-13)
    np.testing.assert_allclose(rv, 0.75 * rv0 + 0.25 * unbiased.mean(0), rtol=1e-13)
    ye = bncore.instance_norm(x, rm, rv, w, b, use_input_stats=False)
    np.testing.assert_allclose(ye, ref.evaluate(x, rm, rv, w, b), rtol=1e-12)
    g = rng.standard_normal(x.shape)
    grads = bncore.instance_norm_backward(g, x, mean, invstd, w)
    ref.assert_grads(lambda: float(np.sum(bncore.instance_norm(x, None, None, w, b) * g)),
                     zip((w, b), grads[1:]))
    np.testing.assert_allclose(grads[0], bncore.group_norm_backward(g, x, 4, mean, invstd, w)[0],
                               rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("shape,G", [((4, 16, 40, 40), 4), ((1, 4, 150, 150), 1),
                                     ((4096, 64), 8)])
def test_group_norm_thread_invariance(rng, shape, G):
    x = (rng.standard_normal(shape) + 30).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    w = rng.standard_normal(shape[1]).astype(np.float32)
    one = bncore.group_norm_train(x, G, w, n_threads=1)
    for nt in (2, 3):
        for a, c in zip(one, bncore.group_norm_train(x, G, w, n_threads=nt)):
            np.testing.assert_array_equal(a, c)
    b1 = bncore.group_norm_backward(dy, x, G, one[1], one[2], w, n_threads=1)
    for nt in (2, 3):
        for a, c in zip(b1, bncore.group_norm_backward(dy, x, G, one[1], one[2], w, n_threads=nt)):
            np.testing.assert_array_equal(a, c)


def test_group_norm_out_and_in_place(rng):
    x = (rng.standard_normal((4, 16, 40, 40)) + 30).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    w = rng.standard_normal(16).astype(np.float32)
    one = bncore.group_norm_train(x, 4, w)
    b1 = bncore.group_norm_backward(dy, x, 4, one[1], one[2], w)
    xc = x.copy()
    assert bncore.group_norm(xc, 4, w, out=xc) is xc
    np.testing.assert_array_equal(xc, one[0])
    assert bncore.group_norm_backward(dy, x, 4, one[1], one[2], w, out=dy)[0] is dy
    np.testing.assert_array_equal(dy, b1[0])


@pytest.mark.parametrize("shape", [(128, 768), (2, 40000), (40, 20000)])
def test_layer_norm_thread_invariance(rng, shape):
    x = (rng.standard_normal(shape) + 20).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    w = rng.standard_normal(shape[-1]).astype(np.float32)
    runs = []
    for nt in (1, 2, 3):
        y, m, inv = bncore.layer_norm_train(x, shape[-1], w, w, n_threads=nt)
        runs.append((y, m, inv) + bncore.layer_norm_backward(dy, x, shape[-1], m, inv, w,
                                                             n_threads=nt))
    for other in runs[1:]:
        for a, c in zip(runs[0], other):
            np.testing.assert_array_equal(a, c)


# ---- layers ----------------------------------------------------------------------------------

def test_layers_state_and_errors(rng):
    ln = bncore.LayerNorm((3, 4), dtype=np.float64)
    assert ln.weight.shape == (3, 4) and sorted(ln.state_dict()) == ["bias", "weight"]
    assert bncore.LayerNorm(4, bias=False).state_dict().keys() == {"weight"}
    assert bncore.LayerNorm(4, elementwise_affine=False).state_dict() == {}
    gn = bncore.GroupNorm(2, 4)
    with pytest.raises(RuntimeError, match="forward"):
        gn.backward(np.zeros((2, 4), np.float32))
    with pytest.raises(ValueError, match="num_groups"):
        bncore.GroupNorm(3, 4)
    with pytest.raises(ValueError, match="channels"):
        gn(np.zeros((2, 5, 3), np.float32))
    x = rng.standard_normal((2, 4, 3)).astype(np.float32)
    with pytest.raises(ValueError, match="out"):
        gn(x, out=x)
    with pytest.raises(ValueError, match="normalized_shape"):
        ln(np.zeros((2, 4, 3)))
    inst = bncore.InstanceNorm(4, track_running_stats=True, momentum=0.5)
    inst(x)
    before = inst.state_dict()
    with pytest.raises(ValueError, match="spatial"):
        inst(np.zeros((2, 4, 1), np.float32))
    for k, v in inst.state_dict().items():
        np.testing.assert_array_equal(v, before[k])


def _3d(x):
    return np.repeat(x[..., None], 2, axis=2)


BAD = [
    (lambda x: bncore.layer_norm(x, (5,)), ValueError, "normalized_shape"),
    (lambda x: bncore.layer_norm(x, ()), ValueError, "normalized_shape"),
    (lambda x: bncore.layer_norm(x, "a"), ValueError, "normalized_shape"),
    (lambda x: bncore.layer_norm(x, 2.0), TypeError, "normalized_shape"),
    (lambda x: bncore.layer_norm(x, 4, np.ones(3)), ValueError, "weight"),
    (lambda x: bncore.layer_norm(x, 4, None, np.ones(4, np.int32)), TypeError, "bias"),
    (lambda x: bncore.layer_norm(x.astype(np.int64), 4), TypeError, "x"),
    (lambda x: bncore.layer_norm(x, 4, eps=-1.0), ValueError, "eps"),
    (lambda x: bncore.layer_norm(x, 4, n_threads=0), ValueError, "n_threads"),
    (lambda x: bncore.layer_norm(x, 4, out=np.empty((3, 4), np.float64)), TypeError, "out"),
    (lambda x: bncore.layer_norm_backward(x[:, :2], x, 4, np.zeros(3), np.ones(3)), ValueError,
     "dy"),
    (lambda x: bncore.layer_norm_backward(x, x, 4, np.zeros(2), np.ones(3)), ValueError, "mean"),
    (lambda x: bncore.layer_norm_backward(x, x, 4, np.zeros(3), np.ones(3, int)), TypeError,
     "invstd"),
    (lambda x: bncore.group_norm(x, 3), ValueError, "num_groups"),
    (lambda x: bncore.group_norm(x, 0), ValueError, "num_groups"),
    (lambda x: bncore.group_norm(x, 2, np.ones(2)), ValueError, "weight"),
    (lambda x: bncore.group_norm(x[0], 2), ValueError, "x"),
    (lambda x: bncore.group_norm_backward(x, x, 2, np.zeros((3, 3)), np.ones((3, 2))), ValueError,
     "mean"),
    (lambda x: bncore.instance_norm(x), ValueError, "spatial"),
    (lambda x: bncore.instance_norm(_3d(x), use_input_stats=False), ValueError, "running_mean"),
    (lambda x: bncore.instance_norm(_3d(x), np.zeros(4), None), ValueError, "running_var"),
    (lambda x: bncore.instance_norm(_3d(x), momentum=2.0), ValueError, "momentum"),
]


@pytest.mark.parametrize("call,exc,word", BAD, ids=[f"{i}-{b[2]}" for i, b in enumerate(BAD)])
def test_bad_arguments(call, exc, word):
    x = np.ones((3, 4), np.float32)
    with pytest.raises(exc, match=word):
        call(x)


def test_instance_norm_error_leaves_running_stats(rng):
    rm, rv = np.zeros(4), np.ones(4)
    x = rng.standard_normal((2, 4, 3))
    with pytest.raises(ValueError, match="weight"):
        bncore.instance_norm(x, rm, rv, np.ones(5))
    np.testing.assert_array_equal(rm, 0)
    np.testing.assert_array_equal(rv, 1)


# ---- PyTorch oracle ------------------------------------------------------------------------------

def _torch():
    return pytest.importorskip("torch")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,ns", [((4, 9, 768), (768,)), ((2, 3, 4, 5), (4, 5)),
                                      ((3, 20000), (20000,))])
def test_layer_norm_against_torch(rng, dtype, shape, ns):
    torch = _torch()
    x = (rng.standard_normal(shape) * 2 + 1).astype(dtype)
    w, b = rng.standard_normal(ns).astype(dtype), rng.standard_normal(ns).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    tx, tw, tb = (torch.from_numpy(a.copy()).requires_grad_(True) for a in (x, w, b))
    ty = torch.nn.functional.layer_norm(tx, ns, tw, tb, eps=1e-5)
    ty.backward(torch.from_numpy(dy))
    _, tm, tinv = torch.native_layer_norm(torch.from_numpy(x), ns, torch.from_numpy(w),
                                          torch.from_numpy(b), 1e-5)
    y, mean, invstd = bncore.layer_norm_train(x, ns, w, b)
    np.testing.assert_allclose(y, ty.detach().numpy(), **TOL[dtype])
    np.testing.assert_allclose(mean, tm.numpy(), **TOL[dtype])
    np.testing.assert_allclose(invstd, tinv.numpy(), **TOL[dtype])
    dx, dw, db = bncore.layer_norm_backward(dy, x, ns, mean, invstd, w)
    np.testing.assert_allclose(dx, tx.grad.numpy(), **GTOL[dtype])
    tol = GTOL[dtype] if dtype == np.float64 else dict(rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(dw, tw.grad.numpy(), **tol)
    np.testing.assert_allclose(db, tb.grad.numpy(), **tol)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,G", [((4, 64, 14, 14), 32), ((3, 6, 10), 3), ((4, 8), 4)])
def test_group_norm_against_torch(rng, dtype, shape, G):
    torch = _torch()
    C = shape[1]
    x = (rng.standard_normal(shape) * 2 + 1).astype(dtype)
    w, b = rng.standard_normal(C).astype(dtype), rng.standard_normal(C).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    tx, tw, tb = (torch.from_numpy(a.copy()).requires_grad_(True) for a in (x, w, b))
    ty = torch.nn.functional.group_norm(tx, G, tw, tb, eps=1e-5)
    ty.backward(torch.from_numpy(dy))
    y, mean, invstd = bncore.group_norm_train(x, G, w, b)
    np.testing.assert_allclose(y, ty.detach().numpy(), **TOL[dtype])
    dx, dw, db = bncore.group_norm_backward(dy, x, G, mean, invstd, w)
    tol = GTOL[dtype] if dtype == np.float64 else dict(rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(dx, tx.grad.numpy(), **GTOL[dtype])
    np.testing.assert_allclose(dw, tw.grad.numpy(), **tol)
    np.testing.assert_allclose(db, tb.grad.numpy(), **tol)


@pytest.mark.parametrize("use_input_stats", [True, False])
def test_instance_norm_against_torch(rng, use_input_stats):
    torch = _torch()
    x = rng.standard_normal((3, 5, 6, 4)) + 2
    w, b = rng.standard_normal(5), rng.standard_normal(5)
    rm, rv = rng.standard_normal(5), rng.uniform(0.5, 2, 5)
    trm, trv = torch.from_numpy(rm.copy()), torch.from_numpy(rv.copy())
    tx = torch.from_numpy(x).requires_grad_(True)
    ty = torch.nn.functional.instance_norm(tx, trm, trv, torch.from_numpy(w), torch.from_numpy(b),
                                           use_input_stats=use_input_stats, momentum=0.3)
    y = bncore.instance_norm(x, rm, rv, w, b, use_input_stats=use_input_stats, momentum=0.3)
    np.testing.assert_allclose(y, ty.detach().numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(rm, trm.numpy(), rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(rv, trv.numpy(), rtol=1e-13, atol=1e-14)


def test_layers_match_torch_modules(rng):
    torch = _torch()
    pairs = [
        (bncore.LayerNorm((4, 5), dtype=np.float64), torch.nn.LayerNorm((4, 5)).double(), (3, 2, 4, 5)),
        (bncore.GroupNorm(2, 6, dtype=np.float64), torch.nn.GroupNorm(2, 6).double(), (4, 6, 3, 3)),
        (bncore.InstanceNorm(3, affine=True, track_running_stats=True, momentum=0.2,
                             dtype=np.float64),
         torch.nn.InstanceNorm2d(3, affine=True, track_running_stats=True, momentum=0.2).double(),
         (4, 3, 5, 5)),
        (bncore.InstanceNorm(3, dtype=np.float64), torch.nn.InstanceNorm1d(3).double(), (4, 3, 7)),
    ]
    for layer, tmod, shape in pairs:
        with torch.no_grad():
            for p in tmod.parameters():
                p.copy_(torch.from_numpy(rng.standard_normal(tuple(p.shape))))
        layer.load_state_dict({k: v.numpy() for k, v in tmod.state_dict().items()})
        assert sorted(layer.state_dict()) == sorted(tmod.state_dict())
        for step in range(4):
            mode = step != 2
            layer.train(mode)
            tmod.train(mode)
            x = rng.standard_normal(shape) * (step + 1) + step
            tx = torch.from_numpy(x).requires_grad_(True)
            ty = tmod(tx)
            np.testing.assert_allclose(layer(x), ty.detach().numpy(), rtol=1e-10, atol=1e-10)
            dy = rng.standard_normal(shape)
            ty.backward(torch.from_numpy(dy))
            np.testing.assert_allclose(layer.backward(dy), tx.grad.numpy(), rtol=1e-9, atol=1e-10)
            if layer.weight is not None:
                np.testing.assert_allclose(layer.grad_weight, tmod.weight.grad.numpy(), rtol=1e-9,
                                           atol=1e-10)
                np.testing.assert_allclose(layer.grad_bias, tmod.bias.grad.numpy(), rtol=1e-9,
                                           atol=1e-10)
            tmod.zero_grad()
            for k, v in tmod.state_dict().items():
                np.testing.assert_allclose(layer.state_dict()[k], v.numpy(), rtol=1e-12, atol=1e-12)


# ---- ONNX node test data -----------------------------------------------------------------------

def _onnx_cases(op_type, module):
    """(name, attributes, inputs, outputs) of ONNX's node tests for op_type: the shipped
    data under onnx/backend/test/data/node when present, else the same cases built by
    the onnx package's own generators (onnx/backend/test/case/node, seeded as shipped)."""
    onnx = pytest.importorskip("onnx")
    from onnx import helper, numpy_helper

    def attrs(node):
        return {a.name: helper.get_attribute_value(a) for a in node.attribute}

    root = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "node")
    cases = []
    for d in sorted(glob.glob(os.path.join(root, "test_*"))):
        if d.endswith("_expanded") or "_expanded_" in d:
            continue
        model = onnx.load(os.path.join(d, "model.onnx"))
        if len(model.graph.node) != 1 or model.graph.node[0].op_type != op_type:
            continue
        data = os.path.join(d, "test_data_set_0")
        load = [numpy_helper.to_array(onnx.load_tensor(p))
                for p in sorted(glob.glob(os.path.join(data, "*.pb")))]
        n_in = len(glob.glob(os.path.join(data, "input_*.pb")))
        cases.append((os.path.basename(d), attrs(model.graph.node[0]), load[:n_in], load[n_in:]))
    if cases:
        return cases
    node_cases = importlib.import_module("onnx.backend.test.case.node")
    importlib.import_module(f"onnx.backend.test.case.node.{module}")
    for c in node_cases._NodeTestCases:
        node = c.model.graph.node
        if len(node) == 1 and node[0].op_type == op_type:
            inputs, outputs = c.data_sets[0]
            cases.append((c.name, attrs(node[0]), list(inputs), list(outputs)))
    if not cases:
        pytest.skip(f"no ONNX node test cases for {op_type} in this onnx version")
    return cases


def test_onnx_layer_normalization():
    cases = _onnx_cases("LayerNormalization", "layernormalization")
    for name, at, (x, scale, *bias), outs in cases:
        axis = at.get("axis", -1) % x.ndim
        ns = x.shape[axis:]
        y, mean, invstd = bncore.layer_norm_train(x, ns, scale.reshape(ns),
                                                  bias[0].reshape(ns) if bias else None,
                                                  eps=at.get("epsilon", 1e-5))
        np.testing.assert_allclose(y, outs[0], rtol=1e-4, atol=1e-5, err_msg=name)
        for got, want in zip((mean, invstd), outs[1:]):
            np.testing.assert_allclose(got.reshape(want.shape), want, rtol=1e-4, atol=1e-5,
                                       err_msg=name)
    assert len(cases) >= 4


def test_onnx_group_and_instance_normalization():
    n = 0
    for op, module in (("GroupNormalization", "groupnormalization"),
                       ("InstanceNormalization", "instance_normalization")):
        for name, at, (x, scale, bias), outs in _onnx_cases(op, module):
            eps = at.get("epsilon", 1e-5)
            if op == "GroupNormalization":
                if scale.shape != (x.shape[1],):
                    continue  # opset-18 per-group scale (deprecated by ONNX)
                y = bncore.group_norm(x, at["num_groups"], scale, bias, eps=eps)
            else:
                y = bncore.instance_norm(x, weight=scale, bias=bias, eps=eps)
            np.testing.assert_allclose(y, outs[0], rtol=1e-4, atol=1e-5, err_msg=name)
            n += 1
    assert n >= 2


def test_docs_normalization_examples_run():
    path = os.path.join(os.path.dirname(__file__), "..", "docs", "normalization.md")
    with open(path) as f:
        section = f.read()
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 8  # 5-7: test_channels_last_norms.py, test_rms_norm.py
    ns = {}
    exec(compile(blocks[0], path, "exec"), ns)  # layer norm
    np.testing.assert_allclose(ns["y"], ref.layer_norm(ns["x"], (768,))[0], atol=3e-5)
    exec(compile(blocks[1], path, "exec"), ns)  # group and instance norm
    np.testing.assert_allclose(ns["y"], ref.group_norm(ns["x"], 256)[0], atol=3e-5)
    exec(compile(blocks[2], path, "exec"), ns)  # batch renorm
    assert ns["brn"].limits() == (1.0, 0.0) and ns["r"].shape == ns["d"].shape == (64,)
    exec(compile(blocks[3], path, "exec"), ns)  # recurrent
    assert ns["dzs"].shape == ns["zs"].shape == (20, 16, 128)
    exec(compile(blocks[4], path, "exec"), ns)  # ghost
    assert ns["mean"].shape == (16, 64) and ns["dx"].shape == (512, 64)
