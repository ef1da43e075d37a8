"""Empty batches (N = 0, or no value per channel): an empty output of the
right shape and dtype, running statistics untouched (PyTorch counts the step
in num_batches_tracked), empty dx and zero parameter gradients."""
import warnings

import numpy as np
import pytest

import bncore

SHAPES = [((0, 3), 1), ((0, 3, 5), 1), ((0, 3, 4, 4), 1), ((4, 3, 0), 1), ((2, 3, 0, 4), 1),
          ((0, 4, 3), -1), ((0, 2, 2, 3), -1)]


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("shape,axis", SHAPES)
def test_functional_forward_and_backward(dtype, shape, axis):
    x = np.zeros(shape, dtype)
    C = shape[axis]
    rm, rv = np.full(C, 0.25), np.full(C, 2.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y, mean, invstd = bncore.batch_norm_train(x, np.ones(C), np.zeros(C), axis=axis,
                                                  running_mean=rm, running_var=rv)
        out = np.empty_like(x)
        assert bncore.batch_norm_train(x, axis=axis, out=out)[0] is out
        dx, dw, db = bncore.batch_norm_backward(x, x, mean, invstd, np.ones(C), axis=axis)
    assert y.shape == dx.shape == shape and y.dtype == dx.dtype == dtype
    sd = np.float64 if dtype == np.float64 else np.float32
    for a in (mean, invstd, dw, db):
        assert a.shape == (C,) and a.dtype == sd
        np.testing.assert_array_equal(a, 0)
    np.testing.assert_array_equal(rm, 0.25)
    np.testing.assert_array_equal(rv, 2.0)


@pytest.mark.parametrize("shape", [(0, 3, 5), (4, 3, 0)])
def test_ghost_batches_and_masks_of_an_empty_batch(shape):
    x = np.zeros(shape)
    rm, rv = np.zeros(3), np.ones(3)
    K = -(-shape[0] // 2)
    y, mean, invstd = bncore.batch_norm_train(x, virtual_batch_size=2, running_mean=rm,
                                              running_var=rv)
    assert y.shape == shape and mean.shape == invstd.shape == (K, 3)
    dx, dw, db = bncore.batch_norm_backward(x, x, mean, invstd, virtual_batch_size=2)
    assert dx.shape == shape and not dw.any() and not db.any()
    y, mean, invstd = bncore.batch_norm_train(x, mask=np.ones(shape, bool), running_mean=rm,
                                              running_var=rv)
    assert y.shape == shape and not mean.any() and not invstd.any()
    np.testing.assert_array_equal(rm, 0)
    np.testing.assert_array_equal(rv, 1)


def test_one_value_per_channel_is_still_refused():
    rm, rv = np.zeros(3), np.ones(3)
    for x in (np.zeros((1, 3)), np.zeros((1, 3, 1))):
        with pytest.raises(ValueError, match="^x: expected more than 1 value per channel"):
            bncore.batch_norm_train(x, running_mean=rm, running_var=rv)
    np.testing.assert_array_equal(rm, 0)


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("shape", [(0, 3), (0, 3, 5), (0, 3, 4, 4), (4, 3, 0), (2, 3, 0, 4)])
def test_layer_matches_torch_on_an_empty_batch(shape, momentum):
    torch = pytest.importorskip("torch")
    cls = torch.nn.BatchNorm2d if len(shape) == 4 else torch.nn.BatchNorm1d
    tm = cls(3, momentum=momentum).train()
    bn = bncore.BatchNorm(3, momentum=momentum)
    # a first non-empty step, so the running statistics are not the defaults
    x0 = np.random.default_rng(0).standard_normal((4,) + shape[1:2] + (2,) * (len(shape) - 2))
    x0 = x0.astype(np.float32)
    tm(torch.from_numpy(x0))
    bn(x0)
    x = torch.zeros(shape, requires_grad=True)
    ty = tm(x)
    ty.sum().backward()
    y = bn(np.zeros(shape, np.float32))
    dx = bn.backward(np.ones(shape, np.float32))
    assert y.shape == tuple(ty.shape) and y.dtype == np.float32 and dx.shape == shape
    np.testing.assert_allclose(bn.running_mean, tm.running_mean.numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(bn.running_var, tm.running_var.numpy(), rtol=1e-6)
    assert int(bn.num_batches_tracked) == int(tm.num_batches_tracked) == 2
    np.testing.assert_array_equal(bn.grad_weight, tm.weight.grad.numpy())
    np.testing.assert_array_equal(bn.grad_bias, tm.bias.grad.numpy())


def test_the_family_on_empty_batches():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x = np.zeros((0, 4, 5), np.float32)
        # group and instance norm: empty outputs, NaN-free statistics
        y, mean, invstd = bncore.group_norm_train(x, 2)
        assert y.shape == x.shape and mean.shape == invstd.shape == (0, 2)
        dx, dw, db = bncore.group_norm_backward(x, x, 2, mean, invstd, np.ones(4))
        assert dx.shape == x.shape and not dw.any() and not db.any()
        rm, rv = np.zeros(4), np.ones(4)
        for z in (x, np.zeros((2, 4, 0), np.float32)):
            # an instance of no value: mean 0, invstd NaN (the family's rule for
            # empty rows); the running statistics stay as they were
            y, mean, invstd = bncore.instance_norm_train(z, running_mean=rm, running_var=rv)
            assert y.shape == z.shape and mean.shape == invstd.shape == z.shape[:2]
            assert not mean.any()
            np.testing.assert_array_equal(rm, 0)
            np.testing.assert_array_equal(rv, 1)
        layer = bncore.InstanceNorm(4, track_running_stats=True)
        assert layer(x).shape == x.shape and layer.backward(x).shape == x.shape
        np.testing.assert_array_equal(layer.running_var, 1)
        assert bncore.layer_norm(np.zeros((0, 3)), 3).shape == (0, 3)
        assert bncore.LayerNorm(3)(np.zeros((0, 3), np.float32)).shape == (0, 3)
    # BatchRenorm and RecurrentBatchNorm keep refusing, by a clear rule, untouched
    for layer, call in ((bncore.BatchRenorm(3), lambda m: m(np.zeros((0, 3), np.float32))),
                        (bncore.RecurrentBatchNorm(3, max_steps=2),
                         lambda m: m(np.zeros((0, 3), np.float32), 0))):
        state = {k: v.copy() for k, v in layer.state_dict().items()}
        with pytest.raises(ValueError, match="^x: expected more than 1"):
            call(layer)
        for k, v in layer.state_dict().items():
            np.testing.assert_array_equal(v, state[k])
