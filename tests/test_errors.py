"""Bad input: a clear exception naming the argument, and nothing changed."""
import numpy as np
import pytest

import bncore


@pytest.fixture
def state():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 3, 5)).astype(np.float32)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    return x, rm, rv


BAD_TRAIN = [
    (dict(x=np.zeros((4, 3), np.int32)), TypeError, "x"),
    (dict(x=np.zeros(5, np.float32)), ValueError, "x"),
    (dict(x=np.zeros((1, 3, 1), np.float32)), ValueError, "more than 1 value"),
    (dict(axis=3), ValueError, "axis"),
    (dict(axis=1.5), TypeError, "axis"),
    (dict(weight=np.ones(4)), ValueError, "weight"),
    (dict(weight=np.ones(3, np.int64)), TypeError, "weight"),
    (dict(bias=np.ones((3, 1))), ValueError, "bias"),
    (dict(eps=-1.0), ValueError, "eps"),
    (dict(eps=float("nan")), ValueError, "eps"),
    (dict(momentum=1.5), ValueError, "momentum"),
    (dict(out=np.empty((4, 3, 6), np.float32)), ValueError, "out"),
    (dict(out=np.empty((4, 3, 5), np.float64)), TypeError, "out"),
    (dict(out="ro"), ValueError, "out"),
    (dict(n_threads=0), ValueError, "n_threads"),
    (dict(n_threads=-2), ValueError, "n_threads"),
    (dict(n_threads=2.0), ValueError, "n_threads"),
    (dict(activation="gelu"), ValueError, "activation"),
    (dict(activation=("leaky_relu", -0.1)), ValueError, "activation"),
    (dict(running_mean="short"), ValueError, "running_mean"),
    (dict(running_var="ro"), ValueError, "running_var"),
    (dict(running_var=None), ValueError, "running_"),
    (dict(running_mean="int"), TypeError, "running_mean"),
]


@pytest.mark.parametrize("bad,exc,word", BAD_TRAIN, ids=[f"{i}-{b[2]}" for i, b in enumerate(BAD_TRAIN)])
def test_train_rejects_and_changes_nothing(state, bad, exc, word):
    x, rm, rv = state
    kw = dict(x=x, axis=1, running_mean=rm, running_var=rv)
    kw.update(bad)
    if isinstance(kw.get("out"), str):
        kw["out"] = np.empty_like(x)
        kw["out"].flags.writeable = False
    for name in ("running_mean", "running_var"):
        if isinstance(kw.get(name), str):
            v = {"short": np.zeros(2, np.float32), "int": np.zeros(3, np.int64),
                 "ro": np.ones(3, np.float32)}[kw[name]]
            if kw[name] == "ro":
                v.flags.writeable = False
            kw[name] = v
    before = [a.copy() for a in (x, rm, rv)]
    xx = kw.pop("x")
    with pytest.raises(exc, match=word):
        bncore.batch_norm_train(xx, **kw)
    for a, b in zip((x, rm, rv), before):
        np.testing.assert_array_equal(a, b)


def test_eval_and_backward_reject_bad_arguments(state):
    x, rm, rv = state
    with pytest.raises(ValueError, match="running_var"):
        bncore.batch_norm_eval(x, rm, np.ones(2))
    with pytest.raises(TypeError, match="running_mean"):
        bncore.batch_norm_eval(x, None, rv)
    with pytest.raises(ValueError, match="dy"):
        bncore.batch_norm_backward(x[:2], x, rm, rv)
    with pytest.raises(TypeError, match="dy"):
        bncore.batch_norm_backward(x.astype(np.float64), x, rm, rv)
    with pytest.raises(ValueError, match="save_invstd"):
        bncore.batch_norm_backward(x, x, rm, rv[:2])
    with pytest.raises(ValueError, match="y"):
        bncore.batch_norm_backward(x, x, rm, rv, activation="relu")
    with pytest.raises(TypeError, match="x"):
        bncore.batch_norm_eval(x.astype(np.complex64), rm, rv)


def test_layer_errors_leave_state_alone():
    layer = bncore.BatchNorm(3)
    x = np.random.default_rng(0).standard_normal((4, 3, 2)).astype(np.float32)
    layer(x)
    sd = layer.state_dict()
    with pytest.raises(ValueError, match="channels"):
        layer(np.zeros((4, 5, 2), np.float32))
    with pytest.raises(ValueError, match="more than 1 value"):
        layer(np.zeros((1, 3), np.float32))
    with pytest.raises(ValueError, match="running_var"):
        layer.load_state_dict({**sd, "running_mean": np.ones(3), "running_var": np.ones(4)})
    with pytest.raises(KeyError, match="missing"):
        layer.load_state_dict({"weight": np.ones(3)})
    for k, v in layer.state_dict().items():
        np.testing.assert_array_equal(v, sd[k])
    with pytest.raises(RuntimeError, match="forward"):
        bncore.BatchNorm(3).backward(x)
    with pytest.raises(ValueError, match="num_features"):
        bncore.BatchNorm(0)
    with pytest.raises(ValueError, match="out"):
        layer(x, out=x)
