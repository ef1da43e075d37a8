"""Parameters out: batch_norm_to_torch, _to_keras, _to_flax, _to_onnx (and
batch_norm_from_flax), checked by round trips through the other framework
(PyTorch's BatchNorm, onnxruntime, Flax where installed) and through bncore's
own loaders, against float64 NumPy where no framework is installed."""
import numpy as np
import pytest
import reference as ref

import bncore


def _trained(rng, C, dtype=np.float32, **kwargs):
    """A BatchNorm with random affine parameters after two training steps."""
    layer = bncore.BatchNorm(C, dtype=dtype, **kwargs)
    if layer.affine:
        layer.weight[:] = rng.uniform(0.5, 2.0, C)
        layer.bias[:] = rng.standard_normal(C)
    axis = layer.axis
    for _ in range(2):
        x = rng.standard_normal((6, C, 3) if axis == 1 else (6, 3, C)) * 2 + 1.5
        layer(x.astype(dtype))
    return layer.eval()


def _layers(rng, dtype=np.float32):
    frozen = bncore.FrozenBatchNorm.from_state_dict(_trained(rng, 4, dtype).state_dict(),
                                                    eps=1e-3)
    renorm = bncore.BatchRenorm(4, dtype=dtype, warmup_steps=0, rmax_ramp_steps=0,
                                dmax_ramp_steps=0)
    renorm(rng.standard_normal((5, 4)).astype(dtype))
    return {"BatchNorm": _trained(rng, 4, dtype),
            "affine=False": _trained(rng, 4, dtype, affine=False, eps=1e-3),
            "biased": _trained(rng, 4, dtype, running_var_unbiased=False, momentum=0.3),
            "momentum=None": _trained(rng, 4, dtype, momentum=None),
            "FrozenBatchNorm": frozen, "BatchRenorm": renorm.eval()}


def _eval_onnx_eps(layer, x):
    """The layer's eval output with eps rounded to float32, as an ONNX attribute is."""
    return bncore.batch_norm_eval(x, layer.running_mean, layer.running_var, layer.weight,
                                  layer.bias, axis=layer.axis, eps=float(np.float32(layer.eps)),
                                  activation=layer.activation)


def _x(rng, shape, dtype):
    return (rng.standard_normal(shape) * 2 + 1).astype(dtype)


# ---- torch -------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["BatchNorm", "affine=False", "biased", "momentum=None",
                                  "FrozenBatchNorm", "BatchRenorm"])
@pytest.mark.parametrize("shape", [(5, 4), (5, 4, 6), (3, 4, 5, 6), (2, 4, 3, 3, 2)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_torch_loads_and_evaluates_like_the_layer(rng, kind, shape, dtype):
    torch = pytest.importorskip("torch")
    layer = _layers(rng, dtype)[kind]
    state = bncore.batch_norm_to_torch(layer)
    assert list(state) == (["weight", "bias"] if getattr(layer, "affine", True) else []) + \
        ["running_mean", "running_var", "num_batches_tracked"]
    nbt = state["num_batches_tracked"]
    assert nbt.dtype == torch.int64 and nbt.shape == ()
    assert int(nbt) == int(getattr(layer, "num_batches_tracked", 0))
    cls = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d,
           5: torch.nn.BatchNorm3d}[len(shape)]
    tdt = torch.float64 if dtype == np.float64 else torch.float32
    module = cls(4, eps=layer.eps, affine=getattr(layer, "affine", True), dtype=tdt)
    module.load_state_dict(state)  # strict
    module.eval()
    x = _x(rng, shape, dtype)
    with torch.no_grad():
        want = module(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(layer(x), want, **ref.tol(dtype, scale=10))
    for k, v in state.items():  # the values themselves, bit for bit
        if k != "num_batches_tracked":
            assert np.array_equal(v.numpy(), getattr(layer, k)), k


def test_torch_training_continues_alike(rng):
    """After the export a training step moves torch's and bncore's running
    statistics alike (both PyTorch's unbiased convention)."""
    torch = pytest.importorskip("torch")
    layer = _trained(rng, 3, np.float64)
    module = torch.nn.BatchNorm2d(3, dtype=torch.float64)
    module.load_state_dict(bncore.batch_norm_to_torch(layer))
    x = _x(rng, (4, 3, 5, 5), np.float64)
    layer.train()(x)
    module.train()(torch.from_numpy(x))
    for k in ("running_mean", "running_var", "num_batches_tracked"):
        np.testing.assert_allclose(getattr(layer, k), getattr(module, k).numpy(), rtol=1e-13)


def test_torch_export_copies(rng):
    pytest.importorskip("torch")
    layer = _trained(rng, 3)
    state = bncore.batch_norm_to_torch(layer)
    state["running_mean"][:] = 100.0
    assert not np.any(layer.running_mean == 100.0)


# ---- keras -------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["BatchNorm", "affine=False", "biased", "FrozenBatchNorm"])
def test_keras_round_trip(rng, kind):
    layer = _layers(rng, np.float32)[kind]
    weights = bncore.batch_norm_to_keras(layer)
    affine = getattr(layer, "affine", True)
    assert len(weights) == (4 if affine else 2)
    momentum = getattr(layer, "momentum", None)
    keras_momentum = 0.99 if momentum is None else 1 - momentum
    back = bncore.batch_norm_from_keras(weights, epsilon=layer.eps, momentum=keras_momentum,
                                        axis=layer.axis, center=affine, scale=affine)
    for k in ("running_mean", "running_var") + (("weight", "bias") if affine else ()):
        got = getattr(back, k)
        assert got.dtype == layer.dtype and np.array_equal(got, getattr(layer, k)), k
    assert back.eps == layer.eps and back.axis == layer.axis
    if momentum is not None:
        assert back.momentum == pytest.approx(momentum, abs=1e-15)
    # Keras's documented inference formula on the exported weights
    x = _x(rng, (7, 4, 3), np.float32)
    nhwc = np.moveaxis(x, 1, -1)
    full = weights if affine else [np.ones(4), np.zeros(4)] + weights
    want = ref.keras_batch_norm(nhwc, *full, layer.eps, keras_momentum, training=False)[0]
    np.testing.assert_allclose(np.moveaxis(layer(x), 1, -1), want, **ref.tol(np.float32, 10))


# ---- flax --------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["BatchNorm", "affine=False", "biased"])
def test_flax_round_trip(rng, kind):
    layer = _layers(rng, np.float64)[kind]
    variables = bncore.batch_norm_to_flax(layer)
    assert set(variables) == {"params", "batch_stats"}
    assert set(variables["batch_stats"]) == {"mean", "var"}
    assert set(variables["params"]) == ({"scale", "bias"} if layer.affine else set())
    back = bncore.batch_norm_from_flax(variables, epsilon=layer.eps,
                                       momentum=1 - layer.momentum, axis=layer.axis)
    assert not back.training and back.running_var_unbiased is False
    assert back.momentum == pytest.approx(layer.momentum, abs=1e-15)
    for k in ("weight", "bias", "running_mean", "running_var") if layer.affine else \
            ("running_mean", "running_var"):
        assert np.array_equal(getattr(back, k), getattr(layer, k)), k
    x = _x(rng, (5, 4, 3), np.float64)
    np.testing.assert_array_equal(back(x), layer(x))


def test_flax_channels_last_against_numpy(rng):
    """batch_norm_from_flax follows Flax's documented inference formula."""
    C = 3
    variables = {"params": {"scale": rng.uniform(0.5, 2, C), "bias": rng.standard_normal(C)},
                 "batch_stats": {"mean": rng.standard_normal(C), "var": rng.uniform(0.5, 3, C)}}
    bn = bncore.batch_norm_from_flax(variables, epsilon=1e-3)
    x = _x(rng, (4, 5, C), np.float64)
    p, s = variables["params"], variables["batch_stats"]
    want = (x - s["mean"]) / np.sqrt(s["var"] + 1e-3) * p["scale"] + p["bias"]
    np.testing.assert_allclose(bn(x), want, rtol=1e-12, atol=1e-12)
    # Flax's training update: ra = momentum * ra + (1 - momentum) * batch, biased variance
    bn.train()(x)
    flat = x.reshape(-1, C)
    np.testing.assert_allclose(bn.running_var, 0.99 * s["var"] + 0.01 * flat.var(0),
                               rtol=1e-12)


def test_flax_apply_where_installed(rng):
    pytest.importorskip("flax")
    import flax.linen as nn
    import jax.numpy as jnp
    layer = _trained(rng, 4, np.float32, axis=-1)
    x = _x(rng, (3, 5, 4), np.float32)
    module = nn.BatchNorm(use_running_average=True, epsilon=layer.eps,
                          momentum=1 - layer.momentum)
    want = module.apply(bncore.batch_norm_to_flax(layer), jnp.asarray(x))
    np.testing.assert_allclose(layer(x), np.asarray(want), **ref.tol(np.float32, 10))


def test_flax_loader_refusals():
    good = {"batch_stats": {"mean": np.zeros(2), "var": np.ones(2)}}
    assert bncore.batch_norm_from_flax(good).weight.tolist() == [1.0, 1.0]
    with pytest.raises(KeyError, match=r"variables: expected variables\['batch_stats'\]"):
        bncore.batch_norm_from_flax({"params": {}})
    with pytest.raises(KeyError, match=r"variables\['params'\]: unexpected keys \['kernel'\]"):
        bncore.batch_norm_from_flax({**good, "params": {"kernel": np.ones(2)}})
    with pytest.raises(TypeError, match="variables: expected a mapping"):
        bncore.batch_norm_from_flax([np.zeros(2)])
    with pytest.raises(ValueError, match="momentum"):
        bncore.batch_norm_from_flax(good, momentum=1.5)


# ---- onnx --------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["BatchNorm", "affine=False", "biased", "momentum=None",
                                  "FrozenBatchNorm", "BatchRenorm"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_onnxruntime_runs_the_export_like_the_layer(rng, kind, dtype):
    ort = pytest.importorskip("onnxruntime")
    layer = _layers(rng, dtype)[kind]
    for shape in [(5, 4), (3, 4, 5), (2, 4, 3, 5)]:
        model = bncore.batch_norm_to_onnx(layer, ndim=len(shape))
        sess = ort.InferenceSession(model.SerializeToString(),
                                    providers=["CPUExecutionProvider"])
        x = _x(rng, shape, dtype)
        got = sess.run(None, {"X": x})[0]
        assert got.dtype == dtype and got.shape == shape
        np.testing.assert_allclose(got, _eval_onnx_eps(layer, x), **ref.tol(dtype, scale=10))
        np.testing.assert_allclose(got, layer(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("activation", ["relu", ("leaky_relu", 0.2)])
def test_onnx_export_keeps_the_activation(rng, activation):
    ort = pytest.importorskip("onnxruntime")
    layer = _trained(rng, 3, np.float32, activation=activation)
    sess = ort.InferenceSession(bncore.batch_norm_to_onnx(layer).SerializeToString(),
                                providers=["CPUExecutionProvider"])
    x = _x(rng, (2, 3, 4, 4), np.float32)
    y = layer(x)
    assert (y < 0).any() == (activation != "relu")
    np.testing.assert_allclose(sess.run(None, {"X": x})[0], y, **ref.tol(np.float32, 10))


def test_onnx_channels_last_two_dims(rng):
    ort = pytest.importorskip("onnxruntime")
    layer = _trained(rng, 3, np.float32, axis=-1)
    sess = ort.InferenceSession(bncore.batch_norm_to_onnx(layer, ndim=2).SerializeToString(),
                                providers=["CPUExecutionProvider"])
    x = _x(rng, (6, 3), np.float32)
    np.testing.assert_allclose(sess.run(None, {"X": x})[0], layer(x), **ref.tol(np.float32, 10))


@pytest.mark.parametrize("kind", ["BatchNorm", "biased", "affine=False"])
def test_onnx_round_trip(rng, kind):
    pytest.importorskip("onnx")
    layer = _layers(rng, np.float32)[kind]
    back = bncore.batch_norm_from_onnx(bncore.batch_norm_to_onnx(layer, ndim=3))
    for k in ("running_mean", "running_var"):
        assert np.array_equal(getattr(back, k), getattr(layer, k)), k
    if layer.affine:
        assert np.array_equal(back.weight, layer.weight)
        assert np.array_equal(back.bias, layer.bias)
    # ONNX attributes are float32
    assert back.eps == pytest.approx(layer.eps, rel=1e-7)
    assert back.momentum == pytest.approx(layer.momentum, rel=1e-6)
    x = _x(rng, (4, 4, 3), np.float32)
    np.testing.assert_allclose(back(x), layer(x), **ref.tol(np.float32, 10))


# ---- refusals ----------------------------------------------------------------------------

@pytest.mark.parametrize("export", ["batch_norm_to_torch", "batch_norm_to_keras",
                                    "batch_norm_to_flax", "batch_norm_to_onnx"])
def test_export_refuses_other_layers(export):
    if export == "batch_norm_to_torch":
        pytest.importorskip("torch")
    if export == "batch_norm_to_onnx":
        pytest.importorskip("onnx")
    fn = getattr(bncore, export)
    for layer in (bncore.LayerNorm(3), bncore.RecurrentBatchNorm(3, max_steps=2),
                  bncore.GroupNorm(1, 3), "BatchNorm"):
        with pytest.raises(TypeError, match="layer: expected a BatchNorm"):
            fn(layer)
    with pytest.raises(ValueError, match="layer: expected a layer with running statistics"):
        fn(bncore.BatchNorm(3, track_running_stats=False))


def test_onnx_export_refusals():
    pytest.importorskip("onnx")
    with pytest.raises(ValueError, match="layer: ONNX BatchNormalization takes channels on "
                                         "axis 1; the layer's axis=-1"):
        bncore.batch_norm_to_onnx(bncore.BatchNorm(3, axis=-1), ndim=4)
    with pytest.raises(ValueError, match="ndim: expected an int >= 2"):
        bncore.batch_norm_to_onnx(bncore.BatchNorm(3), ndim=1)
    with pytest.raises(ValueError, match="opset: expected an int >= 15"):
        bncore.batch_norm_to_onnx(bncore.BatchNorm(3), opset=9)
