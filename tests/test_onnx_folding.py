"""fold_onnx_model on small ONNX models built here: the folded model, run by
onnxruntime (graph optimizations off, so the original's batch norms really
run), gives the original's outputs with fewer BatchNormalization nodes; what
cannot be folded (or not exactly) is reported and left alone; a model
exported from PyTorch."""
import numpy as np
import pytest

import bncore

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

F32 = TensorProto.FLOAT


def _f32(a):
    return np.asarray(a, np.float32)


def _bn(rng, name, x, y, C, shift=True):
    """A BatchNormalization node and its parameters (weights of both signs)."""
    vals = {"s": rng.uniform(0.5, 1.5, C) * rng.choice([-1, 1], C),
            "b": rng.standard_normal(C) if shift else np.zeros(C),
            "m": rng.standard_normal(C) if shift else np.zeros(C),
            "v": rng.uniform(0.3, 2.0, C)}
    inits = [numpy_helper.from_array(_f32(v), f"{name}_{k}") for k, v in vals.items()]
    node = helper.make_node("BatchNormalization", [x] + [f"{name}_{k}" for k in vals], [y],
                            name=name, epsilon=1e-3)
    return node, inits


def _w(rng, name, shape):
    return numpy_helper.from_array(_f32(rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))),
                                   name)


def _model(nodes, inits, inputs, outputs, opset=17):
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, F32, s) for n, s in inputs],
                          [helper.make_tensor_value_info(n, F32, None) for n in outputs],
                          initializer=inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    return onnx.shape_inference.infer_shapes(m)  # output shapes, for the checker


def _run(model, feeds):
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # no own fusion
    sess = ort.InferenceSession(model.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def _count(model, op):
    return sum(n.op_type == op for n in model.graph.node)


def _check_same(model, folded, rng, shapes, rtol=1e-4, atol=1e-4):
    feeds = {n: _f32(rng.standard_normal(s)) for n, s in shapes}
    for a, b in zip(_run(model, feeds), _run(folded, feeds)):
        np.testing.assert_allclose(b, a, rtol=rtol, atol=atol)
    onnx.checker.check_model(folded)


# ---- folds -------------------------------------------------------------------------------

@pytest.mark.parametrize("ct_out,groups", [(4, 1), (6, 2), (4, 4)])  # in == out: (4, 1), (4, 4)
def test_conv_bn_relu_convtranspose_bn(rng, ct_out, groups):
    bn1, i1 = _bn(rng, "bn1", "c1", "b1", 4)
    bn2, i2 = _bn(rng, "bn2", "t1", "y", ct_out)
    nodes = [helper.make_node("Conv", ["x", "W1", "B1"], ["c1"], name="conv", pads=[1, 1, 1, 1]),
             bn1, helper.make_node("Relu", ["b1"], ["r1"], name="relu"),
             helper.make_node("ConvTranspose", ["r1", "W2"], ["t1"], name="deconv", group=groups,
                              strides=[2, 2], pads=[1, 1, 1, 1], output_padding=[1, 1]), bn2]
    inits = [_w(rng, "W1", (4, 3, 3, 3)), numpy_helper.from_array(_f32(rng.standard_normal(4)), "B1"),
             _w(rng, "W2", (4, ct_out // groups, 3, 3))] + i1 + i2
    model = _model(nodes, inits, [("x", [2, 3, 8, 8])], ["y"])
    folded, report = bncore.fold_onnx_model(model)
    assert _count(model, "BatchNormalization") == 2 and _count(folded, "BatchNormalization") == 0
    assert [(r.bn, r.layer, r.kind, r.order, r.folded, r.exact) for r in report] == [
        ("bn1", "conv", "Conv", "layer_bn", True, True),
        ("bn2", "deconv", "ConvTranspose", "layer_bn", True, True)]
    assert all(r.max_abs_error < 1e-4 for r in report)
    _check_same(model, folded, rng, [("x", (2, 3, 8, 8))])
    assert "2 of 2 BatchNormalization nodes folded" in str(report)
    # the BN parameters and the replaced weights are gone; the input model is unchanged
    names = {t.name for t in folded.graph.initializer}
    assert not names & {"W1", "B1", "W2", "bn1_s", "bn2_v"}, names
    assert _count(model, "BatchNormalization") == 2


@pytest.mark.parametrize("groups", [1, 2])
def test_bn_before_unpadded_conv(rng, groups):
    bn, i = _bn(rng, "bn", "x", "b", 4)
    nodes = [bn, helper.make_node("Conv", ["b", "W"], ["y"], name="conv", group=groups,
                                  strides=[2, 1])]
    model = _model(nodes, [_w(rng, "W", (6, 4 // groups, 3, 2))] + i, [("x", [2, 4, 9, 7])], ["y"])
    folded, report = bncore.fold_onnx_model(model)
    assert _count(folded, "BatchNormalization") == 0
    (r,) = report
    assert (r.layer, r.order, r.folded, r.exact) == ("conv", "bn_layer", True, True)
    _check_same(model, folded, rng, [("x", (2, 4, 9, 7))])


def test_bn_before_padded_conv_is_reported_not_folded(rng):
    bn, i = _bn(rng, "bn", "x", "b", 3)
    nodes = [bn, helper.make_node("Conv", ["b", "W"], ["y"], name="conv", pads=[1, 1, 1, 1])]
    model = _model(nodes, [_w(rng, "W", (5, 3, 3, 3))] + i, [("x", [2, 3, 8, 8])], ["y"])
    folded, report = bncore.fold_onnx_model(model)
    (r,) = report
    assert not r.folded and r.exact is False and "zero-padded" in r.reason
    assert "allow_inexact" in str(report)
    assert _count(folded, "BatchNormalization") == 1
    _check_same(model, folded, rng, [("x", (2, 3, 8, 8))])
    # allowed: folded; the border (where the padding zeros are) differs, the interior does not
    folded, report = bncore.fold_onnx_model(model, allow_inexact=True)
    (r,) = report
    assert r.folded and r.exact is False and r.max_abs_error > 1e-3
    x = _f32(rng.standard_normal((2, 3, 8, 8)))
    (want,), (got,) = _run(model, {"x": x}), _run(folded, {"x": x})
    assert np.abs(got - want).max() > 1e-3
    np.testing.assert_allclose(got[..., 1:-1, 1:-1], want[..., 1:-1, 1:-1], rtol=1e-4, atol=1e-4)
    # a batch norm without shift is exact before a padded convolution too
    bn, i = _bn(rng, "bn", "x", "b", 3, shift=False)
    model = _model([bn, nodes[1]], [_w(rng, "W", (5, 3, 3, 3))] + i, [("x", [2, 3, 8, 8])], ["y"])
    folded, (r,) = bncore.fold_onnx_model(model)
    assert r.folded and r.exact
    _check_same(model, folded, rng, [("x", (2, 3, 8, 8))])


@pytest.mark.parametrize("pads,strides,exact", [([2, 2, 2, 2], [1, 1], True),
                                                ([1, 1, 1, 1], [1, 1], False),
                                                ([2, 2, 2, 2], [2, 2], False)])
def test_bn_before_conv_transpose(rng, pads, strides, exact):
    """Exact with stride 1 and a crop of kernel - 1 on both sides (in == out)."""
    bn, i = _bn(rng, "bn", "x", "b", 4)
    nodes = [bn, helper.make_node("ConvTranspose", ["b", "W"], ["y"], name="deconv", pads=pads,
                                  strides=strides)]
    model = _model(nodes, [_w(rng, "W", (4, 4, 3, 3))] + i, [("x", [2, 4, 7, 7])], ["y"])
    folded, (r,) = bncore.fold_onnx_model(model)
    assert (r.folded, r.exact, r.order) == (exact, exact, "bn_layer")
    assert _count(folded, "BatchNormalization") == (0 if exact else 1)
    _check_same(model, folded, rng, [("x", (2, 4, 7, 7))])


@pytest.mark.parametrize("trans_b,with_c", [(0, True), (1, True), (1, False)])
def test_gemm_bn_and_bn_gemm(rng, trans_b, with_c):
    for order in ["layer_bn", "bn_layer"]:
        C = 5 if order == "layer_bn" else 6
        bn, i = _bn(rng, "bn", "g" if order == "layer_bn" else "x", "b" if order == "bn_layer"
                    else "y", C)
        ins = ["x" if order == "layer_bn" else "b", "W"] + (["C"] if with_c else [])
        gemm = helper.make_node("Gemm", ins, ["g" if order == "layer_bn" else "y"], name="gemm",
                                alpha=0.5, beta=2.0, transB=trans_b)
        inits = [_w(rng, "W", (5, 6) if trans_b else (6, 5))] + i + (
            [numpy_helper.from_array(_f32(rng.standard_normal(5)), "C")] if with_c else [])
        nodes = [gemm, bn] if order == "layer_bn" else [bn, gemm]
        model = _model(nodes, inits, [("x", [3, 6])], ["y"])
        folded, (r,) = bncore.fold_onnx_model(model)
        assert (r.kind, r.order, r.folded, r.exact) == ("Gemm", order, True, True)
        assert _count(folded, "BatchNormalization") == 0
        _check_same(model, folded, rng, [("x", (3, 6))])


@pytest.mark.parametrize("with_add", [False, True])
def test_matmul_bn_and_bn_matmul(rng, with_add):
    bn, i = _bn(rng, "bn", "a" if with_add else "m", "y", 5)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["m"], name="mm")]
    inits = [_w(rng, "W", (6, 5))] + i
    if with_add:
        nodes.append(helper.make_node("Add", ["cb", "m"], ["a"], name="add"))
        inits.append(numpy_helper.from_array(_f32(rng.standard_normal(5)), "cb"))
    model = _model(nodes + [bn], inits, [("x", [4, 6])], ["y"])
    folded, (r,) = bncore.fold_onnx_model(model)
    assert (r.kind, r.order, r.folded, r.exact) == ("MatMul", "layer_bn", True, True)
    assert [n.op_type for n in folded.graph.node] == ["MatMul", "Add"]
    _check_same(model, folded, rng, [("x", (4, 6))])
    # the batch norm before the MatMul
    bn, i = _bn(rng, "bn", "x", "b", 6)
    model = _model([bn, helper.make_node("MatMul", ["b", "W"], ["y"], name="mm")],
                   [_w(rng, "W", (6, 5))] + i, [("x", [4, 6])], ["y"])
    folded, (r,) = bncore.fold_onnx_model(model)
    assert (r.order, r.folded) == ("bn_layer", True)
    assert [n.op_type for n in folded.graph.node] == ["MatMul", "Add"]
    _check_same(model, folded, rng, [("x", (4, 6))])


def test_matmul_of_3d_input_is_not_folded(rng):
    """BN normalizes axis 1, which for a (B, T, K) MatMul is not the features."""
    bn, i = _bn(rng, "bn", "m", "y", 3)
    model = _model([helper.make_node("MatMul", ["x", "W"], ["m"], name="mm"), bn],
                   [_w(rng, "W", (6, 5))] + i, [("x", [2, 3, 6])], ["y"])
    folded, (r,) = bncore.fold_onnx_model(model)
    assert not r.folded and "2-D" in r.reason
    _check_same(model, folded, rng, [("x", (2, 3, 6))])


# ---- what is not folded ------------------------------------------------------------------

def test_shared_tensors_are_not_folded(rng):
    # the BN output feeds two convolutions; the first conv's output is also a graph output
    bn, i = _bn(rng, "bn", "c", "b", 4)
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="conv"), bn,
             helper.make_node("Conv", ["b", "W2"], ["y1"], name="conv_a"),
             helper.make_node("Conv", ["b", "W2"], ["y2"], name="conv_b")]
    model = _model(nodes, [_w(rng, "W", (4, 3, 1, 1)), _w(rng, "W2", (2, 4, 1, 1))] + i,
                   [("x", [2, 3, 5, 5])], ["y1", "y2", "c"])
    folded, (r,) = bncore.fold_onnx_model(model)
    assert not r.folded and "graph output" in r.reason and "2 consumers" in r.reason
    assert _count(folded, "BatchNormalization") == 1
    _check_same(model, folded, rng, [("x", (2, 3, 5, 5))])


def test_shared_initializer_is_copied_not_changed(rng):
    """Two convolutions share one weight, each followed by its own batch norm."""
    bn1, i1 = _bn(rng, "bn1", "c1", "y1", 4)
    bn2, i2 = _bn(rng, "bn2", "c2", "y2", 4)
    nodes = [helper.make_node("Conv", ["x", "W"], ["c1"], name="conv1"), bn1,
             helper.make_node("Conv", ["y1", "W"], ["c2"], name="conv2"), bn2,
             helper.make_node("Conv", ["x", "W"], ["y3"], name="conv3")]  # W unfolded here
    model = _model(nodes, [_w(rng, "W", (4, 4, 1, 1))] + i1 + i2, [("x", [2, 4, 5, 5])],
                   ["y2", "y3"])
    W_before = numpy_helper.to_array(model.graph.initializer[0]).copy()
    folded, report = bncore.fold_onnx_model(model)
    assert [r.folded for r in report] == [True, True]
    weights = {n.name: n.input[1] for n in folded.graph.node}
    assert len({weights["conv1"], weights["conv2"], weights["conv3"]}) == 3
    assert weights["conv3"] == "W"
    W_after = {t.name: numpy_helper.to_array(t) for t in folded.graph.initializer}["W"]
    np.testing.assert_array_equal(W_after, W_before)
    _check_same(model, folded, rng, [("x", (2, 4, 5, 5))])


def test_non_constant_parameters_are_not_foldable(rng):
    bn, i = _bn(rng, "bn", "c", "y", 4)
    bn.input[1] = "gamma"  # a graph input, not a constant
    model = _model([helper.make_node("Conv", ["x", "W"], ["c"], name="conv"), bn],
                   [_w(rng, "W", (4, 3, 1, 1))] + i[1:], [("x", [2, 3, 5, 5]), ("gamma", [4])],
                   ["y"])
    folded, (r,) = bncore.fold_onnx_model(model)
    assert not r.folded and "not constants" in r.reason and "gamma" in r.reason
    _check_same(model, folded, rng, [("x", (2, 3, 5, 5)), ("gamma", (4,))])


def test_constant_nodes_as_parameters(rng):
    """BN parameters and the weight from Constant nodes: folded, the Constants dropped."""
    bn, i = _bn(rng, "bn", "c", "y", 4)
    consts = [helper.make_node("Constant", [], [t.name], name=f"k_{t.name}", value=t)
              for t in i + [_w(rng, "W", (4, 3, 3, 3))]]
    model = _model(consts + [helper.make_node("Conv", ["x", "W"], ["c"], name="conv"), bn], [],
                   [("x", [2, 3, 6, 6])], ["y"])
    folded, (r,) = bncore.fold_onnx_model(model)
    assert r.folded
    assert [n.op_type for n in folded.graph.node] == ["Conv"]
    _check_same(model, folded, rng, [("x", (2, 3, 6, 6))])


# ---- verification, arguments, files ------------------------------------------------------

def _conv_bn(rng):
    bn, i = _bn(rng, "bn", "c", "y", 4)
    return _model([helper.make_node("Conv", ["x", "W"], ["c"], name="conv", pads=[1, 1, 1, 1]),
                   bn], [_w(rng, "W", (4, 3, 3, 3))] + i, [("x", [2, 3, 6, 6])], ["y"])


def test_verification_without_onnxruntime(rng, monkeypatch):
    """onnx's NumPy reference evaluator runs the nodes when onnxruntime is missing."""
    pytest.importorskip("onnx.reference")
    model = _conv_bn(rng)
    monkeypatch.setitem(__import__("sys").modules, "onnxruntime", None)
    folded, (r,) = bncore.fold_onnx_model(model, seed=3)
    assert r.folded and 0 <= r.max_abs_error < 1e-4
    monkeypatch.undo()
    _check_same(model, folded, rng, [("x", (2, 3, 6, 6))])


def test_verification_catches_a_wrong_fold(rng, monkeypatch):
    """A ConvTranspose folded with the Conv layout (the in == out trap) fails
    verification and is left alone; without verification the outputs differ."""
    from bncore import onnx_folding
    wrong = lambda W, B, s, t, groups=1, order="layer_bn": bncore.fold_into_conv(
        W, B, s, t, groups=groups, order=order)
    monkeypatch.setattr(onnx_folding, "fold_into_conv_transpose", wrong)
    bn, i = _bn(rng, "bn", "t", "y", 4)
    model = _model([helper.make_node("ConvTranspose", ["x", "W"], ["t"], name="deconv"), bn],
                   [_w(rng, "W", (4, 4, 3, 3))] + i, [("x", [2, 4, 5, 5])], ["y"])
    folded, (r,) = bncore.fold_onnx_model(model)
    assert not r.folded and "verification failed" in r.reason and r.max_abs_error > 1e-2
    _check_same(model, folded, rng, [("x", (2, 4, 5, 5))])
    folded, (r,) = bncore.fold_onnx_model(model, verify=False)
    assert r.folded
    x = _f32(rng.standard_normal((2, 4, 5, 5)))
    assert np.abs(_run(folded, {"x": x})[0] - _run(model, {"x": x})[0]).max() > 1e-2


def test_no_verification_and_files(rng, tmp_path):
    model = _conv_bn(rng)
    path = tmp_path / "model.onnx"
    onnx.save(model, str(path))
    out = tmp_path / "folded.onnx"
    folded, (r,) = bncore.fold_onnx_model(path, verify=False, save_to=out)
    assert r.folded and r.max_abs_error is None
    again = onnx.load(str(out))
    assert again.SerializeToString() == folded.SerializeToString()
    folded2, _ = bncore.fold_onnx_model(model.SerializeToString())
    _check_same(model, again, rng, [("x", (2, 3, 6, 6))])
    _check_same(model, folded2, rng, [("x", (2, 3, 6, 6))])


def test_refusals(rng, tmp_path):
    model = _conv_bn(rng)
    before = model.SerializeToString()
    with pytest.raises(TypeError, match="model: expected an onnx.ModelProto"):
        bncore.fold_onnx_model(3)
    with pytest.raises(TypeError, match="verify"):
        bncore.fold_onnx_model(model, verify="yes")
    with pytest.raises(TypeError, match="allow_inexact"):
        bncore.fold_onnx_model(model, allow_inexact=1)
    with pytest.raises(ValueError, match="rtol"):
        bncore.fold_onnx_model(model, rtol=-1.0)
    with pytest.raises(ValueError, match="atol"):
        bncore.fold_onnx_model(model, atol=float("nan"))
    with pytest.raises(ValueError, match="seed"):
        bncore.fold_onnx_model(model, seed=-1)
    with pytest.raises(TypeError, match="save_to"):
        bncore.fold_onnx_model(model, save_to=5)
    bad = onnx.ModelProto()
    bad.CopyFrom(model)
    bad.graph.node[0].input[1] = "missing"
    with pytest.raises(ValueError, match="model: expected a valid ONNX model"):
        bncore.fold_onnx_model(bad)
    assert model.SerializeToString() == before
    assert not list(tmp_path.iterdir())


# ---- a model exported from PyTorch -------------------------------------------------------

@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the TorchScript-based exporter
def test_torch_exported_model(rng, tmp_path):
    torch = pytest.importorskip("torch")
    nn = torch.nn
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.ConvTranspose2d(8, 8, 3, stride=2, padding=1, output_padding=1),
                        nn.BatchNorm2d(8))
    with torch.no_grad():  # statistics away from the defaults, so the folds matter
        for bn in (net[1], net[4]):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            bn.weight.uniform_(-1.5, 1.5)
            bn.bias.uniform_(-1, 1)
    net.eval()
    path = tmp_path / "net.onnx"
    x = torch.randn(2, 3, 8, 8)
    try:
        torch.onnx.export(net, (x,), str(path), opset_version=17, dynamo=False,
                          do_constant_folding=False)
    except (ImportError, ModuleNotFoundError) as e:
        pytest.skip(f"torch.onnx.export needs a missing package: {e}")
    model = onnx.load(str(path))
    if _count(model, "BatchNormalization") != 2:
        pytest.skip("the exporter already folded the batch norms")
    folded, report = bncore.fold_onnx_model(path)
    assert [(r.kind, r.folded, r.exact) for r in report] == [("Conv", True, True),
                                                             ("ConvTranspose", True, True)]
    assert _count(folded, "BatchNormalization") == 0
    feeds = {model.graph.input[0].name: x.numpy()}
    (got,) = _run(folded, feeds)
    with torch.no_grad():
        want = net(x).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype,elem,tol", [(np.float64, TensorProto.DOUBLE, 1e-10),
                                            (np.float16, TensorProto.FLOAT16, 2e-2)])
def test_other_dtypes(rng, dtype, elem, tol):
    """float64 and float16 models: the folded weights keep the model's dtype."""
    def params(prefix, C):
        vals = [rng.uniform(0.5, 1.5, C), rng.standard_normal(C), rng.standard_normal(C),
                rng.uniform(0.3, 2.0, C)]
        return [numpy_helper.from_array(np.asarray(v, dtype), f"{prefix}{k}")
                for k, v in zip("sbmv", vals)]
    inits = (params("p", 4) + params("q", 3)
             + [numpy_helper.from_array((rng.standard_normal((4, 3, 3, 3)) / 5).astype(dtype), "W"),
                numpy_helper.from_array(rng.standard_normal((3, 2, 1, 1)).astype(dtype), "W2")])
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "ps", "pb", "pm", "pv"], ["y"], name="bn"),
             helper.make_node("BatchNormalization", ["x", "qs", "qb", "qm", "qv"], ["u"], name="bn2"),
             helper.make_node("ConvTranspose", ["u", "W2"], ["z"], name="ct")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", elem, [2, 3, 6, 6])],
                          [helper.make_tensor_value_info("y", elem, [2, 4, 6, 6]),
                           helper.make_tensor_value_info("z", elem, [2, 2, 6, 6])],
                          initializer=inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    folded, report = bncore.fold_onnx_model(model)
    assert [(r.order, r.folded, r.exact) for r in report] == [("layer_bn", True, True),
                                                              ("bn_layer", True, True)]
    assert {numpy_helper.to_array(t).dtype for t in folded.graph.initializer} == {np.dtype(dtype)}
    onnx.checker.check_model(folded)
    from onnx.reference import ReferenceEvaluator  # onnxruntime lacks some float64 kernels
    x = rng.standard_normal((2, 3, 6, 6)).astype(dtype)
    for a, b in zip(ReferenceEvaluator(model).run(None, {"x": x}),
                    ReferenceEvaluator(folded).run(None, {"x": x})):
        np.testing.assert_allclose(b.astype(np.float64), a.astype(np.float64), rtol=tol,
                                   atol=tol)


def test_batch_norms_on_both_sides_of_one_conv(rng):
    """BN -> Conv (unpadded) -> BN: both fold into the one convolution; the
    intermediate weights of the first fold are dropped."""
    bn1, i1 = _bn(rng, "bn1", "x", "b", 3)
    bn2, i2 = _bn(rng, "bn2", "c", "y", 5)
    nodes = [bn1, helper.make_node("Conv", ["b", "W", "B"], ["c"], name="conv"), bn2]
    inits = [_w(rng, "W", (5, 3, 3, 3)),
             numpy_helper.from_array(_f32(rng.standard_normal(5)), "B")] + i1 + i2
    model = _model(nodes, inits, [("x", [2, 3, 7, 7])], ["y"])
    folded, report = bncore.fold_onnx_model(model)
    assert [(r.order, r.folded) for r in report] == [("bn_layer", True), ("layer_bn", True)]
    assert [n.op_type for n in folded.graph.node] == ["Conv"]
    assert len(folded.graph.initializer) == 2  # the final weight and bias only
    _check_same(model, folded, rng, [("x", (2, 3, 7, 7))])
