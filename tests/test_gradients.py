"""Gradients against central finite differences in float64."""
import numpy as np
import pytest

import bncore
import reference as ref


@pytest.mark.parametrize("shape,axis", [((5, 3), 1), ((3, 2, 4), 1), ((2, 3, 2, 3), -1),
                                        ((3, 4, 2), 0)])
@pytest.mark.parametrize("training", [True, False])
def test_finite_differences(rng, shape, axis, training):
    x = rng.standard_normal(shape)
    C = shape[axis]
    w, b = rng.uniform(0.5, 1.5, C), rng.standard_normal(C)
    rm, rv = rng.standard_normal(C), rng.uniform(0.5, 2, C)
    g = rng.standard_normal(shape)  # loss = sum(y * g), so dL/dy = g
    if training:
        _, mean, invstd = bncore.batch_norm_train(x, w, b, axis=axis)
    else:
        mean, invstd = rm, 1 / np.sqrt(rv + 1e-5)

    def loss():
        if training:
            y, _, _ = bncore.batch_norm_train(x, w, b, axis=axis)
        else:
            y = bncore.batch_norm_eval(x, rm, rv, w, b, axis=axis)
        return float(np.sum(y * g))

    grads = bncore.batch_norm_backward(g, x, mean, invstd, w, axis=axis, training=training)
    ref.assert_grads(loss, zip((x, w, b), grads))


@pytest.mark.parametrize("activation", ["relu", ("leaky_relu", 0.2)])
def test_finite_differences_fused_activation(rng, activation):
    x = rng.standard_normal((6, 3, 2))
    w, b = rng.uniform(0.5, 1.5, 3), rng.standard_normal(3) * 0.3
    g = rng.standard_normal(x.shape)

    def loss():
        return float(np.sum(bncore.batch_norm_train(x, w, b, activation=activation)[0] * g))

    y, mean, invstd = bncore.batch_norm_train(x, w, b, activation=activation)
    grads = bncore.batch_norm_backward(g, x, mean, invstd, w, activation=activation, y=y)
    ref.assert_grads(loss, zip((x, w, b), grads), h=1e-7, rtol=1e-4, atol=1e-6)
