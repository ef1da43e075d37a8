"""Folding, FrozenBatchNorm, fused activations, in-place ABN and the Keras/ONNX
loaders, each against an independent reference: float64 NumPy written here,
PyTorch, onnxruntime and ONNX's reference evaluator where importable."""
import tracemalloc

import numpy as np
import pytest

import bncore
import reference as ref

ACTS = [None, "relu", ("leaky_relu", 0.2)]
# (shape, axis): NCHW, channels-last, (N, C) and a 3-D volume
LAYOUTS = [((4, 6, 9, 7), 1), ((4, 9, 7, 6), -1), ((40, 6), 1), ((2, 6, 3, 4, 5), 1)]


def _params(rng, C, dtype=np.float32, signed=False):
    w = rng.uniform(0.5, 1.5, C) * (rng.choice([-1, 1], C) if signed else 1)
    return (w.astype(dtype), rng.standard_normal(C).astype(dtype),
            rng.standard_normal(C).astype(dtype), rng.uniform(0.3, 2.0, C).astype(dtype))


# ---- folding ---------------------------------------------------------------------------

def test_fold_batch_norm_is_the_eval_map(rng):
    w, b, rm, rv = _params(rng, 7, np.float64, signed=True)
    x = rng.standard_normal((5, 7, 4))
    scale, shift = bncore.fold_batch_norm(rm, rv, w, b, eps=1e-3)
    assert scale.dtype == shift.dtype == np.float64
    got = x * scale[:, None] + shift[:, None]
    np.testing.assert_allclose(got, ref.evaluate(x, rm, rv, w, b, eps=1e-3), rtol=1e-13, atol=1e-13)
    scale, shift = bncore.fold_batch_norm(rm, rv)  # weight/bias default to 1/0
    np.testing.assert_allclose(x * scale[:, None] + shift[:, None], ref.evaluate(x, rm, rv),
                               rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("with_bias", [True, False])
def test_fold_into_linear(rng, dtype, with_bias):
    out_f, in_f = 5, 8
    W = rng.standard_normal((out_f, in_f)).astype(dtype)
    bias = rng.standard_normal(out_f).astype(dtype) if with_bias else None
    b64 = np.zeros(out_f) if bias is None else bias.astype(np.float64)
    x = rng.standard_normal((16, in_f)).astype(dtype)
    x64, W64 = x.astype(np.float64), W.astype(np.float64)
    # batch norm after the layer: BN(x W^T + b)
    w, b, rm, rv = _params(rng, out_f, signed=True)
    Wf, bf = bncore.fold_into_linear(W, bias, *bncore.fold_batch_norm(rm, rv, w, b))
    assert Wf.dtype == bf.dtype == dtype
    want = ref.evaluate(x64 @ W64.T + b64, rm, rv, w, b)
    np.testing.assert_allclose(x64 @ Wf.astype(np.float64).T + bf, want, **ref.tol(dtype, 10))
    # batch norm before the layer: BN(x) W^T + b
    w, b, rm, rv = _params(rng, in_f, signed=True)
    Wf, bf = bncore.fold_into_linear(W, bias, *bncore.fold_batch_norm(rm, rv, w, b),
                                     order="bn_layer")
    want = ref.evaluate(x64, rm, rv, w, b) @ W64.T + b64
    np.testing.assert_allclose(x64 @ Wf.astype(np.float64).T + bf, want, **ref.tol(dtype, 10))


@pytest.mark.parametrize("kernel,groups", [((3,), 1), ((3, 2), 1), ((3, 3), 2), ((2, 2, 2), 1),
                                           ((1, 1), 4)])
@pytest.mark.parametrize("order", ["layer_bn", "bn_layer"])
def test_fold_into_conv_direct(rng, kernel, groups, order):
    cin, cout = 4, 6 if groups != 4 else 8
    W = rng.standard_normal((cout, cin // groups) + kernel)
    bias = rng.standard_normal(cout)
    x = rng.standard_normal((2, cin) + (6,) * len(kernel))
    w, b, rm, rv = _params(rng, cout if order == "layer_bn" else cin, np.float64, signed=True)
    Wf, bf = bncore.fold_into_conv(W, bias, *bncore.fold_batch_norm(rm, rv, w, b), groups=groups,
                                   order=order)
    if order == "layer_bn":
        want = ref.evaluate(ref.convolution(x, W, bias, groups), rm, rv, w, b)
    else:
        want = ref.convolution(ref.evaluate(x, rm, rv, w, b), W, bias, groups)
    np.testing.assert_allclose(ref.convolution(x, Wf, bf, groups), want, rtol=1e-12, atol=1e-12)


def test_fold_into_conv_matches_torch_with_stride_and_padding(rng):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    W = rng.standard_normal((8, 3, 3, 3)).astype(np.float32)
    bias = rng.standard_normal(8).astype(np.float32)
    x = rng.standard_normal((2, 6, 11, 9)).astype(np.float32)
    w, b, rm, rv = _params(rng, 8, signed=True)
    Wf, bf = bncore.fold_into_conv(W, bias, *bncore.fold_batch_norm(rm, rv, w, b, eps=1e-5),
                                   groups=2)
    t = torch.from_numpy
    conv = lambda W_, b_: F.conv2d(t(x), t(W_), t(b_), stride=2, padding=1, groups=2)
    want = F.batch_norm(conv(W, bias), t(rm), t(rv), t(w), t(b), training=False, eps=1e-5)
    np.testing.assert_allclose(conv(Wf, bf).numpy(), want.numpy(), rtol=1e-4, atol=1e-4)


def test_fold_errors(rng):
    W = np.ones((4, 3, 3, 3))
    s, t = np.ones(4), np.zeros(4)
    with pytest.raises(ValueError, match="order"):
        bncore.fold_into_conv(W, None, s, t, order="after")
    with pytest.raises(ValueError, match="groups"):
        bncore.fold_into_conv(W, None, s, t, groups=3)
    with pytest.raises(ValueError, match="scale"):
        bncore.fold_into_conv(W, None, np.ones(3), t)
    with pytest.raises(ValueError, match="scale"):  # before the conv: in_channels = 3
        bncore.fold_into_conv(W, None, s, t, order="bn_layer")
    with pytest.raises(ValueError, match="weight"):
        bncore.fold_into_linear(np.ones((2, 3, 4)), None, s, t)
    with pytest.raises(TypeError, match="weight"):
        bncore.fold_into_linear(np.ones((4, 3), int), None, s, t)
    with pytest.raises(ValueError, match="bias"):
        bncore.fold_into_linear(np.ones((4, 3)), np.ones(3), s, t)
    with pytest.raises(ValueError, match="running_var"):
        bncore.fold_batch_norm(np.zeros(2), np.array([1.0, -1.0]), eps=0.0)


# ---- frozen batch norm -----------------------------------------------------------------

def _torchvision_frozen(x, w, b, rm, rv, eps, torch):
    """torchvision.ops.FrozenBatchNorm2d.forward, written out (torchvision is not
    installed here): scale = w * (rv + eps).rsqrt(); x * scale + (b - rm * scale)."""
    t = lambda a: torch.from_numpy(np.asarray(a)).reshape(1, -1, 1, 1)
    scale = t(w) * (t(rv) + eps).rsqrt()
    return x * scale + (t(b) - t(rm) * scale)


@pytest.mark.parametrize("eps", [1e-5, 0.0])
def test_frozen_matches_torchvision_formula(rng, eps):
    torch = pytest.importorskip("torch")
    w, b, rm, rv = _params(rng, 6)
    state = {"weight": torch.from_numpy(w), "bias": torch.from_numpy(b),
             "running_mean": torch.from_numpy(rm), "running_var": torch.from_numpy(rv),
             "num_batches_tracked": torch.tensor(3)}
    frozen = bncore.FrozenBatchNorm.from_state_dict(state, eps=eps)
    x = rng.standard_normal((3, 6, 5, 7)).astype(np.float32)
    want = _torchvision_frozen(torch.from_numpy(x), w, b, rm, rv, eps, torch).numpy()
    y = frozen(x)
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(y, ref.evaluate(x, rm, rv, w, b, eps=eps), **ref.tol(np.float32))
    # the same computation as batch_norm_eval: bitwise equal
    np.testing.assert_array_equal(y, bncore.batch_norm_eval(x, rm, rv, w, b, eps=eps))
    # backward: dx = dy * scale, as autograd through torchvision's formula
    xt = torch.from_numpy(x).requires_grad_()
    dy = rng.standard_normal(x.shape).astype(np.float32)
    _torchvision_frozen(xt, w, b, rm, rv, eps, torch).backward(torch.from_numpy(dy))
    np.testing.assert_allclose(frozen.backward(dy), xt.grad.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape,axis", LAYOUTS)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_frozen_forward_backward(rng, shape, axis, act, dtype):
    C = shape[axis]
    w, b, rm, rv = _params(rng, C, dtype, signed=True)
    bn = bncore.BatchNorm(C, axis=axis, dtype=dtype, activation=act, eps=1e-3)
    bn.load_state_dict({"weight": w, "bias": b, "running_mean": rm, "running_var": rv,
                        "num_batches_tracked": np.array(1)})
    frozen = bn.freeze()
    assert frozen.activation == act and frozen.eps == 1e-3
    x = (rng.standard_normal(shape) * 2).astype(dtype)
    y = frozen(x)
    want = ref.activate(ref.evaluate(x, rm, rv, w, b, axis, eps=1e-3), act)
    np.testing.assert_allclose(y, want, **ref.tol(dtype))
    np.testing.assert_array_equal(y, bn.eval()(x))
    dy = rng.standard_normal(shape).astype(dtype)
    np.testing.assert_allclose(frozen.backward(dy, y=y),
                               ref.eval_backward(ref.activation_grad(dy, y, act), rv, w, axis,
                                                 eps=1e-3), **ref.tol(dtype))
    # the folded form gives the same map
    np.testing.assert_allclose(
        ref.activate(x * frozen.scale.reshape(ref.axes(x, axis)[1])
                     + frozen.shift.reshape(ref.axes(x, axis)[1]), act), want, **ref.tol(dtype, 10))


def test_frozen_float32_accurate_with_large_mean(rng):
    C = 4
    rm = np.full(C, 1e4, np.float32)
    rv = np.full(C, 0.25, np.float32)
    x = (rm[None, :, None] + rng.standard_normal((8, C, 500)).astype(np.float32) * 0.5)
    frozen = bncore.FrozenBatchNorm.from_state_dict({"running_mean": rm, "running_var": rv})
    err = np.abs(frozen(x) - ref.evaluate(x, rm, rv)).max()
    assert err < 1e-5, err  # the folded x*scale + shift would lose ~1e-3 here


def test_frozen_state_and_errors(rng):
    frozen = bncore.FrozenBatchNorm(3, activation="relu", dtype=np.float64)
    np.testing.assert_array_equal(frozen(np.full((2, 3), -1.0)), 0.0)  # fresh: identity map
    with pytest.raises(ValueError):
        frozen.weight[0] = 2.0  # read-only: the coefficients cannot go stale
    w, b, rm, rv = _params(rng, 3, np.float64)
    frozen.load_state_dict({"weight": w, "bias": b, "running_mean": rm, "running_var": rv})
    x = rng.standard_normal((4, 3))
    np.testing.assert_allclose(frozen(x), ref.activate(ref.evaluate(x, rm, rv, w, b), "relu"),
                               rtol=1e-12, atol=1e-12)
    before = frozen.state_dict()
    with pytest.raises(ValueError, match="running_var"):
        frozen.load_state_dict({"running_var": np.array([1.0, -1.0, 1.0])}, strict=False)
    with pytest.raises(ValueError, match="bias"):
        frozen.load_state_dict({"weight": w, "bias": np.ones(2), "running_mean": rm,
                                "running_var": rv})
    with pytest.raises(KeyError, match="unexpected"):
        frozen.load_state_dict({"gamma": w}, strict=False)
    for k, v in frozen.state_dict().items():  # nothing changed
        np.testing.assert_array_equal(v, before[k])
    # the second call of a shape takes the fast path: same result, and reloaded
    # parameters are used at once
    x = rng.standard_normal((4, 3, 5))
    first = frozen(x)
    np.testing.assert_array_equal(frozen(x), first)
    frozen.load_state_dict({"bias": b + 1.0}, strict=False)
    np.testing.assert_allclose(frozen(x), np.maximum(ref.evaluate(x, rm, rv, w, b + 1.0), 0),
                               rtol=1e-12, atol=1e-12)
    frozen.load_state_dict({"bias": b}, strict=False)
    with pytest.raises(ValueError, match="channels"):
        frozen(np.ones((2, 4)))
    with pytest.raises(ValueError, match="n_threads"):
        frozen(x, n_threads=0)
    with pytest.raises(ValueError, match="y"):
        frozen.backward(np.ones((2, 3)))
    with pytest.raises(ValueError, match="track_running_stats"):
        bncore.BatchNorm(3, track_running_stats=False).freeze()
    with pytest.raises(ValueError, match="num_features"):
        bncore.FrozenBatchNorm(0)


# ---- fused activations (the foundation's kernels, against PyTorch) -----------------------

def _torch_layout(a, axis, torch):
    t = torch.from_numpy(a)
    if axis % a.ndim != 1:
        t = t.movedim(-1, 1)
    return t


def _torch_act(v, act, torch):
    F = torch.nn.functional
    if act is None:
        return v
    return F.relu(v) if act == "relu" else F.leaky_relu(v, act[1])


@pytest.mark.parametrize("shape,axis", LAYOUTS)
@pytest.mark.parametrize("act", ["relu", ("leaky_relu", 0.2), ("leaky_relu", 0.0)])
def test_fused_train_and_backward_match_torch(rng, shape, axis, act):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    C = shape[axis]
    w, b, _, _ = _params(rng, C, np.float64, signed=True)
    x = rng.standard_normal(shape) * 2 + 1
    dy = rng.standard_normal(shape)
    rm, rv = np.zeros(C), np.ones(C)
    y, mean, invstd = bncore.batch_norm_train(x, w, b, axis=axis, running_mean=rm,
                                              running_var=rv, activation=act)
    dx, dw, db = bncore.batch_norm_backward(dy, x, mean, invstd, w, axis=axis, activation=act, y=y)
    xt = _torch_layout(x, axis, torch).requires_grad_()
    wt, bt = torch.from_numpy(w).requires_grad_(), torch.from_numpy(b).requires_grad_()
    trm, trv = torch.zeros(C, dtype=torch.float64), torch.ones(C, dtype=torch.float64)
    yt = _torch_act(F.batch_norm(xt, trm, trv, wt, bt, training=True), act, torch)
    yt.backward(_torch_layout(dy, axis, torch))
    back = lambda t: (t.movedim(1, -1) if axis % x.ndim != 1 else t).detach().numpy()
    tol = dict(rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(y, back(yt), **tol)
    np.testing.assert_allclose(dx, back(xt.grad), **tol)
    np.testing.assert_allclose(dw, wt.grad.numpy(), **tol)
    np.testing.assert_allclose(db, bt.grad.numpy(), **tol)
    np.testing.assert_allclose(rm, trm.numpy(), **tol)
    np.testing.assert_allclose(rv, trv.numpy(), **tol)


@pytest.mark.parametrize("act", ACTS)
def test_fused_eval_and_layer_match_torch(rng, act):
    torch = pytest.importorskip("torch")
    C = 5
    x = (rng.standard_normal((6, C, 8, 8)) * 3).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    tbn = torch.nn.BatchNorm2d(C)
    tact = {None: torch.nn.Identity(), "relu": torch.nn.ReLU()}.get(
        act if not isinstance(act, tuple) else "leaky", torch.nn.LeakyReLU(0.2))
    model = torch.nn.Sequential(tbn, tact)
    with torch.no_grad():
        tbn.weight.copy_(torch.from_numpy(rng.uniform(-1.5, 1.5, C).astype(np.float32)))
        tbn.bias.copy_(torch.from_numpy(rng.standard_normal(C).astype(np.float32)))
    bn = bncore.BatchNorm(C, activation=act)
    bn.load_state_dict({k: v.numpy() for k, v in tbn.state_dict().items()})
    for training in (True, False):
        model.train(training)
        bn.train(training)
        xt = torch.from_numpy(x).requires_grad_()
        yt = model(xt)
        yt.backward(torch.from_numpy(dy))
        y = bn(x)
        np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(bn.backward(dy), xt.grad.numpy(), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(bn.grad_weight, tbn.weight.grad.numpy(), rtol=1e-4, atol=1e-3)
        np.testing.assert_allclose(bn.grad_bias, tbn.bias.grad.numpy(), rtol=1e-4, atol=1e-3)
        np.testing.assert_allclose(bn.running_var, tbn.running_var.numpy(), rtol=1e-5)
        tbn.weight.grad = tbn.bias.grad = None


def test_fused_activation_in_place_allocates_no_full_buffer(rng):
    x = rng.standard_normal((8, 16, 64, 64)).astype(np.float32)  # 2 MiB
    w, b, _, _ = _params(rng, 16)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        y, _, _ = bncore.batch_norm_train(x, w, b, out=x, activation="relu")
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert y is x and peak < x.nbytes / 8, peak


# ---- in-place ABN ----------------------------------------------------------------------

@pytest.mark.parametrize("shape,axis", LAYOUTS)
@pytest.mark.parametrize("act", [None, ("leaky_relu", 0.01), ("leaky_relu", 0.3)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("training", [True, False])
def test_backward_from_output_matches_reference(rng, shape, axis, act, dtype, training):
    C = shape[axis]
    w, b, rm, rv = _params(rng, C, dtype, signed=True)
    x = (rng.standard_normal(shape) * 2 - 1).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    if training:
        y, mean, invstd = bncore.batch_norm_train(x, w, b, axis=axis, activation=act)
    else:
        mean, invstd = rm, 1.0 / np.sqrt(rv.astype(np.float64) + 1e-5)
        y = bncore.batch_norm_eval(x, rm, rv, w, b, axis=axis, activation=act)
    g = ref.activation_grad(dy, y, act)
    dx_ref, dw_ref, db_ref = ref.backward(g, x, mean, invstd, w, axis, training)
    y_saved = y.copy()
    dx, dw, db = bncore.batch_norm_backward_from_output(dy, y, invstd, w, b, axis=axis,
                                                        training=training, activation=act)
    np.testing.assert_array_equal(y, y_saved)  # inputs untouched
    # rebuilding xhat from y costs ~ulp(y)/|w|: a few float32 ulps
    t = ref.tol(dtype)
    np.testing.assert_allclose(dx, dx_ref, rtol=4 * t["rtol"], atol=4 * t["atol"] * np.abs(dx_ref).max())
    np.testing.assert_allclose(dw, dw_ref, rtol=40 * t["rtol"], atol=4 * t["atol"] * np.abs(dw_ref).max())
    np.testing.assert_allclose(db, db_ref, rtol=40 * t["rtol"], atol=4 * t["atol"] * np.abs(db_ref).max())


def test_backward_from_output_defaults_and_aliasing(rng):
    x = rng.standard_normal((6, 4, 30))
    dy = rng.standard_normal(x.shape)
    y, mean, invstd = bncore.batch_norm_train(x)  # weight None, bias None
    want = bncore.batch_norm_backward(dy, x, mean, invstd)
    got = bncore.batch_norm_backward_from_output(dy, y.copy(), invstd)
    for a, b_ in zip(got, want):
        np.testing.assert_allclose(a, b_, rtol=1e-11, atol=1e-11)
    for target in ("dy", "y"):  # dx written over dy or over the saved output
        d, yy = dy.copy(), y.copy()
        out = d if target == "dy" else yy
        dx, _, _ = bncore.batch_norm_backward_from_output(d, yy, invstd, out=out)
        assert dx is out
        np.testing.assert_allclose(dx, want[0], rtol=1e-11, atol=1e-11)


def test_inplace_abn_layer_matches_batchnorm(rng):
    C, act = 8, ("leaky_relu", 0.05)
    w, b, _, _ = _params(rng, C, signed=True)
    kw = dict(momentum=0.2)
    ref_bn = bncore.BatchNorm(C, activation=act, **kw)
    abn = bncore.InPlaceABN(C, activation=act, **kw)
    for layer in (ref_bn, abn):
        layer.weight[...], layer.bias[...] = w, b
    for training in (True, False):
        ref_bn.train(training)
        abn.train(training)
        x = (rng.standard_normal((4, C, 12, 12)) * 2 + 0.5).astype(np.float32)
        dy = rng.standard_normal(x.shape).astype(np.float32)
        y_ref = ref_bn(x)
        dx_ref = ref_bn.backward(dy)
        buf = x.copy()
        y = abn(buf)
        assert y is buf  # the input now holds the output
        np.testing.assert_array_equal(y, y_ref)
        np.testing.assert_allclose(abn.backward(dy), dx_ref, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(abn.grad_weight, ref_bn.grad_weight, rtol=1e-4, atol=1e-3)
        np.testing.assert_allclose(abn.grad_bias, ref_bn.grad_bias, rtol=1e-4, atol=1e-3)
        np.testing.assert_array_equal(abn.running_mean, ref_bn.running_mean)
        np.testing.assert_array_equal(abn.running_var, ref_bn.running_var)


def test_inplace_abn_errors(rng):
    with pytest.raises(ValueError, match="invertible"):
        bncore.InPlaceABN(4, activation="relu")
    with pytest.raises(ValueError, match="virtual_batch_size"):
        bncore.InPlaceABN(4, virtual_batch_size=8)
    with pytest.raises(ValueError, match="invertible"):
        bncore.batch_norm_backward_from_output(np.ones((3, 4)), np.ones((3, 4)), np.ones(4),
                                               activation=("leaky_relu", 0.0))
    abn = bncore.InPlaceABN(4)
    x = rng.standard_normal((5, 4)).astype(np.float32)
    x.flags.writeable = False
    with pytest.raises(ValueError, match="writable"):
        abn(x)
    with pytest.raises(ValueError, match="writable"):
        abn([[1.0] * 4] * 3)
    abn.weight[2] = 1e-6
    x = rng.standard_normal((5, 4)).astype(np.float32)
    abn(x)
    with pytest.raises(ValueError, match=r"\|weight\| must be >= .*channels \[2\]"):
        abn.backward(np.ones_like(x))
    assert abn.grad_weight is None
    y = x.copy()
    with pytest.raises(ValueError, match="weight"):
        bncore.batch_norm_backward_from_output(np.ones_like(y), y, np.ones(4),
                                               np.array([1.0, 0.0, 1.0, 1.0]))
    # a smaller threshold is the caller's choice
    dx, _, _ = bncore.batch_norm_backward_from_output(np.ones_like(y), y, np.ones(4),
                                                      np.array([1.0, 1e-6, 1.0, 1.0]),
                                                      min_abs_weight=1e-7)
    assert np.all(np.isfinite(dx))


def _training_step_peak(layer_cls, S, rng, **kw):
    """tracemalloc peak of K chained (dense -> BN + leaky ReLU) blocks, forward and
    backward, keeping what each layer's backward needs (as autograd would)."""
    K, N, D = 4, S // 64, 64
    Ws = [rng.standard_normal((D, D)).astype(np.float32) / 8 for _ in range(K)]
    x0 = rng.standard_normal((N, D)).astype(np.float32)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        layers, h = [], x0
        for W in Ws:
            z = h @ W  # the dense layer keeps its input h; BN keeps z (and y)
            bn = layer_cls(D, activation=("leaky_relu", 0.01), **kw)
            h = bn(z)
            layers.append((W, bn))
        g = np.ones_like(h)
        for W, bn in reversed(layers):
            g = bn.backward(g, out=g) @ W.T
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    return peak, x0.nbytes


def test_inplace_abn_saves_an_activation_buffer_per_layer(rng):
    peak_std, S = _training_step_peak(bncore.BatchNorm, 1 << 14, rng)
    peak_inp, _ = _training_step_peak(bncore.InPlaceABN, 1 << 14, rng)
    # 4 blocks: standard keeps z and y per block, in place one buffer
    assert peak_std - peak_inp >= 3.5 * S, (peak_std / S, peak_inp / S)


# ---- loaders ---------------------------------------------------------------------------

@pytest.mark.parametrize("as_dict", [False, True])
def test_keras_loader_against_keras_formulas(rng, as_dict):
    C = 6
    gamma, beta, mm, mv = _params(rng, C, np.float32, signed=True)
    names = ["gamma", "beta", "moving_mean", "moving_variance"]
    weights = dict(zip(names, (gamma, beta, mm, mv))) if as_dict else [gamma, beta, mm, mv]
    bn = bncore.batch_norm_from_keras(weights, momentum=0.9)
    assert not bn.training and bn.eps == 1e-3 and bn.dtype == np.float32
    x = rng.standard_normal((4, 5, 5, C)).astype(np.float32) * 2 + 1
    g64, b64, mm64, mv64 = (a.astype(np.float64) for a in (gamma, beta, mm, mv))
    want, _, _ = ref.keras_batch_norm(x, g64, b64, mm64, mv64, 1e-3, 0.9, False)
    np.testing.assert_allclose(bn(x), want, **ref.tol(np.float32))
    bn.train()
    for _ in range(2):
        want, mm64, mv64 = ref.keras_batch_norm(x, g64, b64, mm64, mv64, 1e-3, 0.9, True)
        np.testing.assert_allclose(bn(x), want, **ref.tol(np.float32))
        np.testing.assert_allclose(bn.running_mean, mm64, **ref.tol(np.float32))
        np.testing.assert_allclose(bn.running_var, mv64, **ref.tol(np.float32))
        x = x * 0.5 + 0.3


def test_keras_loader_without_scale_or_center(rng):
    _, _, mm, mv = _params(rng, 3, np.float64)
    bn = bncore.batch_norm_from_keras([mm, mv], center=False, scale=False, epsilon=1e-2, axis=1)
    x = rng.standard_normal((7, 3))
    np.testing.assert_allclose(bn(x), ref.evaluate(x, mm, mv, eps=1e-2), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="expected 4 arrays"):
        bncore.batch_norm_from_keras([mm, mv])
    with pytest.raises(KeyError, match="gamma"):
        bncore.batch_norm_from_keras({"moving_mean": mm, "moving_variance": mv})


def _onnx_model(w, b, rm, rv, x_shape, *, epsilon=1e-5, momentum=None, training=False,
                const_scale=False, opset=15):
    pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper
    elem = TensorProto.FLOAT if w.dtype == np.float32 else TensorProto.DOUBLE
    inits = [numpy_helper.from_array(a, n) for a, n in ((b, "B"), (rm, "mean"), (rv, "var"))]
    nodes = []
    if const_scale:
        nodes.append(helper.make_node("Constant", [], ["scale"],
                                      value=numpy_helper.from_array(w, "scale_value")))
    else:
        inits.append(numpy_helper.from_array(w, "scale"))
    attrs = {"epsilon": epsilon}
    if momentum is not None:
        attrs["momentum"] = momentum
    outs = ["y"] + (["running_mean", "running_var"] if training else [])
    nodes.append(helper.make_node("BatchNormalization", ["x", "scale", "B", "mean", "var"], outs,
                                  name="bn1", training_mode=int(training), **attrs))
    out_info = [helper.make_tensor_value_info("y", elem, x_shape)] + [
        helper.make_tensor_value_info(n, elem, [w.shape[0]]) for n in outs[1:]]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", elem, x_shape)],
                              out_info, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_onnx_loader_eval_against_onnxruntime(rng, dtype, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    w, b, rm, rv = _params(rng, 5, dtype, signed=True)
    x = rng.standard_normal((3, 5, 6, 7)).astype(dtype)
    model = _onnx_model(w, b, rm, rv, x.shape, epsilon=1e-3, const_scale=dtype == np.float64)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    want = sess.run(None, {"x": x})[0]
    path = tmp_path / "bn.onnx"
    path.write_bytes(model.SerializeToString())
    for source in (model, str(path), model.SerializeToString()):
        bn = bncore.batch_norm_from_onnx(source)
        assert not bn.training and bn.eps == pytest.approx(1e-3) and bn.dtype == dtype
        np.testing.assert_allclose(bn(x), want, **ref.tol(dtype, 10))


def test_onnx_loader_training_against_reference_evaluator(rng):
    pytest.importorskip("onnx")
    from onnx.reference import ReferenceEvaluator
    w, b, rm, rv = _params(rng, 4, np.float64, signed=True)
    x = rng.standard_normal((6, 4, 5)) * 3 + 2
    model = _onnx_model(w, b, rm, rv, x.shape, momentum=0.8, training=True)
    y_ref, rm_ref, rv_ref = ReferenceEvaluator(model).run(None, {"x": x})
    bn = bncore.batch_norm_from_onnx(model, "bn1")
    assert bn.training and bn.momentum == pytest.approx(0.2)
    np.testing.assert_allclose(bn(x), y_ref, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(bn.running_mean, rm_ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(bn.running_var, rv_ref, rtol=1e-12, atol=1e-12)


def test_onnx_loader_errors(rng):
    onnx = pytest.importorskip("onnx")
    w, b, rm, rv = _params(rng, 4, np.float32)
    model = _onnx_model(w, b, rm, rv, (2, 4))
    with pytest.raises(ValueError, match="named 'other'"):
        bncore.batch_norm_from_onnx(model, "other")
    model.graph.node[0].input[3] = "computed"
    with pytest.raises(ValueError, match="'computed'"):
        bncore.batch_norm_from_onnx(model)
    double = onnx.helper.make_graph(list(model.graph.node) * 2, "g2", [], [])
    with pytest.raises(ValueError, match="found 2; pass node_name"):
        bncore.batch_norm_from_onnx(double)


def test_torch_state_dict_into_frozen_and_layer(rng):
    torch = pytest.importorskip("torch")
    tbn = torch.nn.BatchNorm1d(7).double()
    x = rng.standard_normal((32, 7, 5)) * 2 + 1
    tbn(torch.from_numpy(x))  # moves the running statistics
    with torch.no_grad():
        tbn.weight.uniform_(-2, 2)
        tbn.bias.normal_()
    tbn.eval()
    want = tbn(torch.from_numpy(x)).detach().numpy()
    frozen = bncore.FrozenBatchNorm.from_state_dict(tbn.state_dict())
    assert frozen.dtype == np.float64
    np.testing.assert_allclose(frozen(x), want, rtol=1e-12, atol=1e-12)
    bn = bncore.BatchNorm(7, dtype=np.float64)
    bn.load_state_dict(tbn.state_dict())
    np.testing.assert_allclose(bn.eval()(x), want, rtol=1e-12, atol=1e-12)
