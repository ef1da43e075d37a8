"""Recurrent batch normalization (Cooijmans et al. 2016) against a float64
NumPy reference, finite differences, and the LSTM example of the docs."""
import os
import re

import numpy as np
import pytest

import bncore
import reference as ref
from reference import TOL


def test_init_follows_the_paper():
    bn = bncore.RecurrentBatchNorm(6, 4)
    np.testing.assert_array_equal(bn.weight, np.float32(0.1))
    np.testing.assert_array_equal(bn.bias, 0)
    assert bn.running_mean.shape == bn.running_var.shape == (4, 6)
    assert sorted(bn.state_dict()) == ["bias", "running_mean", "running_var", "trained_steps",
                                      "weight"]
    assert bncore.RecurrentBatchNorm(3, 2, gamma_init=1.0).weight[0] == 1.0


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_training_per_step_statistics_and_slots(rng, dtype):
    T, N, C, S = 7, 5, 3, 4
    bn = bncore.RecurrentBatchNorm(C, S, momentum=0.3, dtype=dtype)
    bn.weight[:] = rng.uniform(0.5, 1.5, C)
    bn.bias[:] = rng.standard_normal(C)
    xs = (rng.standard_normal((T, N, C)) * np.arange(1, T + 1)[:, None, None]
          + np.arange(T)[:, None, None]).astype(dtype)
    rm, rv = np.zeros((S, C)), np.ones((S, C))
    tol = TOL[dtype]
    for t in range(T):
        y = bn(xs[t], t)
        y_ref, m, _, var_unbiased = ref.train(xs[t], bn.weight, bn.bias)
        np.testing.assert_allclose(y, y_ref, **tol)
        s = min(t, S - 1)  # steps past max_steps share the last slot, updated in order
        rm[s] = 0.7 * rm[s] + 0.3 * m
        rv[s] = 0.7 * rv[s] + 0.3 * var_unbiased
    np.testing.assert_allclose(bn.running_mean, rm, **tol)
    np.testing.assert_allclose(bn.running_var, rv, **tol)
    # the whole sequence in one call: the same numbers, bit for bit
    seq = bncore.RecurrentBatchNorm(C, S, momentum=0.3, dtype=dtype)
    seq.load_state_dict({**bn.state_dict(), "running_mean": np.zeros((S, C)),
                         "running_var": np.ones((S, C))})
    ys = seq(xs)
    np.testing.assert_array_equal(ys, np.stack([bncore.batch_norm_train(xs[t], bn.weight,
                                                                        bn.bias)[0]
                                                for t in range(T)]))
    np.testing.assert_array_equal(seq.running_mean, bn.running_mean)
    np.testing.assert_array_equal(seq.running_var, bn.running_var)
    # eval: each step's slot of running statistics, any batch size
    bn.eval()
    for t in (0, 2, 3, 9):
        x1 = rng.standard_normal((1, C)).astype(dtype)
        s = min(t, S - 1)
        np.testing.assert_allclose(bn(x1, t), ref.evaluate(x1, bn.running_mean[s],
                                                           bn.running_var[s], bn.weight,
                                                           bn.bias), **tol)


def test_backward_finite_differences_through_a_sequence(rng):
    T, N, C = 3, 4, 2
    bn = bncore.RecurrentBatchNorm(C, 2, dtype=np.float64)
    bn.weight[:] = rng.uniform(0.5, 1.5, C)
    bn.bias[:] = rng.standard_normal(C)
    xs = rng.standard_normal((T, N, C))
    g = rng.standard_normal((T, N, C))

    def loss():
        return float(np.sum(bn(xs) * g))

    loss()
    dx = bn.backward(g)
    dw, db = bn.grad_weight.copy(), bn.grad_bias.copy()
    ref.assert_grads(loss, ((xs, dx), (bn.weight, dw), (bn.bias, db)))


def test_step_backward_accumulates_like_the_sequence(rng):
    T, N, C = 5, 6, 3
    xs = rng.standard_normal((T, N, C)).astype(np.float32)
    dys = rng.standard_normal((T, N, C)).astype(np.float32)
    a, b = bncore.RecurrentBatchNorm(C, 3), bncore.RecurrentBatchNorm(C, 3)
    a(xs)
    dx_seq = a.backward(dys)
    for t in range(T):
        b(xs[t], t)
    dx_steps = [b.backward(dys[t], t) for t in reversed(range(T))][::-1]
    np.testing.assert_array_equal(dx_seq, np.stack(dx_steps))
    np.testing.assert_allclose(a.grad_weight, b.grad_weight, rtol=1e-6)
    np.testing.assert_allclose(a.grad_bias, b.grad_bias, rtol=1e-6)
    # each step's gradient is batch norm's for that step
    _, m, inv = bncore.batch_norm_train(xs[2], a.weight, a.bias)
    np.testing.assert_array_equal(dx_steps[2], bncore.batch_norm_backward(dys[2], xs[2], m, inv,
                                                                          a.weight)[0])
    # a forward at step 0 starts a new sequence: gradients zeroed, saved steps forgotten
    b(xs[0], 0)
    np.testing.assert_array_equal(b.grad_weight, 0)
    with pytest.raises(RuntimeError, match="step"):
        b.backward(dys[1], 1)
    b.backward(dys[0], 0)
    b.zero_grad()
    np.testing.assert_array_equal(b.grad_bias, 0)


def test_eval_backward(rng):
    bn = bncore.RecurrentBatchNorm(3, 2, dtype=np.float64)
    bn(rng.standard_normal((4, 3)), 0)
    bn.eval()
    x, dy = rng.standard_normal((4, 3)), rng.standard_normal((4, 3))
    bn(x, 0)
    np.testing.assert_allclose(bn.backward(dy, 0), ref.eval_backward(dy, bn.running_var[0],
                                                                     bn.weight), rtol=1e-12)


def test_errors_change_nothing(rng):
    bn = bncore.RecurrentBatchNorm(3, 2)
    x = rng.standard_normal((4, 3)).astype(np.float32)
    bn(x, 0)
    before = bn.state_dict()
    for call, exc, word in [
        (lambda: bn(x), ValueError, "t"),
        (lambda: bn(x, -1), ValueError, "t"),
        (lambda: bn(x, 1.5), ValueError, "t"),
        (lambda: bn(np.zeros((4, 5), np.float32), 1), ValueError, "x"),
        (lambda: bn(np.zeros((2, 4, 3, 1), np.float32)), ValueError, "x"),
        (lambda: bn(np.zeros((3, 1, 3), np.float32)), ValueError, "more than 1"),
        (lambda: bn(x, 1, out=x), ValueError, "out"),
        (lambda: bn(x, 1, n_threads=0), ValueError, "n_threads"),
        (lambda: bn.backward(np.zeros((3, 3), np.float32), 0), ValueError, "dy"),
        (lambda: bn.backward(np.zeros((2, 4, 3), np.float32)), RuntimeError, "step"),
        (lambda: bncore.RecurrentBatchNorm(3, 0), ValueError, "max_steps"),
        (lambda: bncore.RecurrentBatchNorm(3, 2, momentum=None), ValueError, "momentum"),
    ]:
        with pytest.raises(exc, match=word):
            call()
    for k, v in bn.state_dict().items():
        np.testing.assert_array_equal(v, before[k])


def test_lstm_example_in_the_docs(rng):
    path = os.path.join(os.path.dirname(__file__), "..", "docs", "LSTM_EXAMPLE.md")
    with open(path) as f:
        code = re.findall(r"```python\n(.*?)```", f.read(), re.S)
    assert len(code) == 1
    ns = {}
    exec(compile(code[0], path, "exec"), ns)
    # the same LSTM with the float64 reference batch norm (gamma 0.1, beta 0 / b)
    Wx, Wh, b, xs = ns["Wx"], ns["Wh"], ns["b"], ns["xs"].astype(np.float64)
    T, N, H = xs.shape[0], xs.shape[1], Wh.shape[0]

    def bn(v):
        return ref.train(v, np.full(v.shape[1], 0.1))[0]

    def sig(z):
        return 1 / (1 + np.exp(-z))

    h = c = np.zeros((N, H))
    for t in range(T):
        z = bn(xs[t] @ Wx) + bn(h @ Wh) + b
        f, i, o, g = np.split(z, 4, axis=1)
        c = sig(f) * c + sig(i) * np.tanh(g)
        h = sig(o) * np.tanh(bn(c))
    np.testing.assert_allclose(ns["h"], h, atol=2e-4)
    assert ns["h1"].shape == (1, H) and np.all(np.isfinite(ns["h1"]))
    assert np.all(ns["bn_c"].running_var[-1] != 1)  # steps past T_max updated the last slot
