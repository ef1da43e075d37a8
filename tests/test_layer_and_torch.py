"""The BatchNorm layer, and PyTorch as an oracle where it is installed."""
import numpy as np
import pytest

import bncore
import reference as ref

torch = pytest.importorskip("torch")
F = torch.nn.functional


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("layout", ["nchw", "nhwc", "nc"])
def test_functional_against_torch(rng, dtype, layout):
    x = (rng.standard_normal((8, 6, 9, 7)) * 3 + 2).astype(dtype)
    if layout == "nc":
        x = np.ascontiguousarray(x.transpose(0, 2, 3, 1).reshape(-1, 6))
    C = 6
    w, b = rng.uniform(0.5, 1.5, C).astype(dtype), rng.standard_normal(C).astype(dtype)
    rm, rv = np.zeros(C, dtype), np.ones(C, dtype)
    trm, trv = torch.zeros(C, dtype=torch.from_numpy(x).dtype), torch.ones(C, dtype=torch.from_numpy(x).dtype)
    if layout == "nhwc":
        xn = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
        axis = -1
    else:
        xn, axis = x, 1
    tx = torch.from_numpy(x).requires_grad_(True)
    tw = torch.from_numpy(w).requires_grad_(True)
    tb = torch.from_numpy(b).requires_grad_(True)
    ty = F.batch_norm(tx, trm, trv, tw, tb, training=True, momentum=0.2, eps=1e-5)
    y, mean, invstd = bncore.batch_norm_train(xn, w, b, axis=axis, running_mean=rm,
                                              running_var=rv, momentum=0.2)
    ty_np = ty.detach().numpy()
    if layout == "nhwc":
        ty_np = ty_np.transpose(0, 2, 3, 1)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(y, ty_np, **tol)
    np.testing.assert_allclose(rm, trm.numpy(), **tol)
    np.testing.assert_allclose(rv, trv.numpy(), **tol)
    dy = rng.standard_normal(x.shape).astype(dtype)
    ty.backward(torch.from_numpy(dy))
    dyn = np.ascontiguousarray(dy.transpose(0, 2, 3, 1)) if layout == "nhwc" else dy
    dx, dw, db = bncore.batch_norm_backward(dyn, xn, mean, invstd, w, axis=axis)
    tdx = tx.grad.numpy()
    if layout == "nhwc":
        tdx = tdx.transpose(0, 2, 3, 1)
    np.testing.assert_allclose(dx, tdx, rtol=tol["rtol"] * 10, atol=tol["atol"] * 10)
    np.testing.assert_allclose(dw, tw.grad.numpy(), rtol=tol["rtol"] * 10, atol=tol["atol"] * 100)
    np.testing.assert_allclose(db, tb.grad.numpy(), rtol=tol["rtol"] * 10, atol=tol["atol"] * 100)
    # eval forward
    ye = bncore.batch_norm_eval(xn, rm, rv, w, b, axis=axis)
    tye = F.batch_norm(torch.from_numpy(x), trm, trv, torch.from_numpy(w), torch.from_numpy(b),
                       training=False, eps=1e-5).numpy()
    if layout == "nhwc":
        tye = tye.transpose(0, 2, 3, 1)
    np.testing.assert_allclose(ye, tye, **tol)


@pytest.mark.parametrize("training", [True, False])
def test_backward_against_aten(rng, training):
    x = rng.standard_normal((4, 5, 6, 3))
    dy = rng.standard_normal(x.shape)
    w = rng.uniform(0.5, 1.5, 5)
    rm, rv = rng.standard_normal(5), rng.uniform(0.5, 2, 5)
    if training:
        _, mean, invstd = bncore.batch_norm_train(x, w)
    else:
        mean, invstd = rm, 1 / np.sqrt(rv + 1e-5)
    dx, dw, db = bncore.batch_norm_backward(dy, x, mean, invstd, w, training=training)
    t = torch.from_numpy
    tdx, tdw, tdb = torch.ops.aten.native_batch_norm_backward(
        t(dy), t(x), t(w), t(rm), t(rv), t(mean) if training else None,
        t(invstd) if training else None, training, 1e-5, [True, True, True])
    np.testing.assert_allclose(dx, tdx.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dw, tdw.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(db, tdb.numpy(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("track", [True, False])
@pytest.mark.parametrize("ndim", [2, 3, 4, 5])
def test_layer_matches_torch_over_steps(rng, momentum, track, ndim):
    C = 4
    shape = (6, C) + (3,) * (ndim - 2)
    tmod = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d,
            5: torch.nn.BatchNorm3d}[ndim](C, momentum=momentum, track_running_stats=track).double()
    layer = bncore.BatchNorm(C, momentum=momentum, track_running_stats=track, dtype=np.float64)
    with torch.no_grad():
        tmod.weight.copy_(torch.from_numpy(rng.uniform(0.5, 1.5, C)))
        tmod.bias.copy_(torch.from_numpy(rng.standard_normal(C)))
    layer.load_state_dict({k: v.numpy() for k, v in tmod.state_dict().items()})
    for step in range(5):
        mode = step < 3 or step == 4
        tmod.train(mode)
        layer.train(mode)
        x = rng.standard_normal(shape) * (step + 1) + step
        tx = torch.from_numpy(x).requires_grad_(True)
        ty = tmod(tx)
        y = layer(x)
        np.testing.assert_allclose(y, ty.detach().numpy(), rtol=1e-10, atol=1e-10)
        dy = rng.standard_normal(shape)
        ty.backward(torch.from_numpy(dy))
        dx = layer.backward(dy)
        np.testing.assert_allclose(dx, tx.grad.numpy(), rtol=1e-9, atol=1e-10)
        np.testing.assert_allclose(layer.grad_weight, tmod.weight.grad.numpy(), rtol=1e-9, atol=1e-10)
        np.testing.assert_allclose(layer.grad_bias, tmod.bias.grad.numpy(), rtol=1e-9, atol=1e-10)
        tmod.zero_grad()
        sd, tsd = layer.state_dict(), tmod.state_dict()
        assert sorted(sd) == sorted(tsd)
        for k in sd:
            np.testing.assert_allclose(sd[k], tsd[k].numpy(), rtol=1e-12, atol=1e-12)


def test_layer_channels_last_and_float32(rng):
    C = 5
    layer = bncore.BatchNorm(C, axis=-1)
    tmod = torch.nn.BatchNorm2d(C)
    for _ in range(3):
        x = (rng.standard_normal((4, 6, 7, C)) + 1).astype(np.float32)
        y = layer(x)
        ty = tmod(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).detach().numpy()
        np.testing.assert_allclose(y, ty.transpose(0, 2, 3, 1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(layer.running_var, tmod.running_var.numpy(), rtol=1e-5)
    assert layer.running_mean.dtype == np.float32


def test_layer_against_numpy_reference_without_torch_semantics(rng):
    layer = bncore.BatchNorm(3, momentum=0.5, dtype=np.float64)
    x = rng.standard_normal((10, 3, 4)) + 3
    y = layer(x)
    y_ref, m, _, v = ref.train(x, layer.weight, layer.bias, 1)
    np.testing.assert_allclose(y, y_ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(layer.running_mean, 0.5 * m, rtol=1e-12)
    np.testing.assert_allclose(layer.running_var, 0.5 + 0.5 * v, rtol=1e-12)
    assert int(layer.num_batches_tracked) == 1
    layer.eval()
    x2 = rng.standard_normal((2, 3, 4))
    np.testing.assert_allclose(layer(x2), ref.evaluate(x2, layer.running_mean, layer.running_var,
                                                       layer.weight, layer.bias, 1), rtol=1e-12)
