"""Parameters from other frameworks: batch_norm_from_keras and
batch_norm_from_onnx build a BatchNorm with their conventions (eps,
momentum, biased running variance)."""
import os

import numpy as np

from . import _checks as chk
from .layers import BatchNorm

__all__ = ["batch_norm_from_keras", "batch_norm_from_onnx"]


def _layer_from(params, *, eps, momentum, axis, dtype, training=False):
    """A BatchNorm with the biased running-variance convention of Keras and ONNX;
    params maps weight, bias, running_mean, running_var (float arrays)."""
    rm = chk.float_vector(params["running_mean"], "running_mean")
    if dtype is None:
        dtype = np.asarray(params["running_mean"]).dtype
        dtype = dtype if dtype in chk.FLOAT_DTYPES else np.float32
    layer = BatchNorm(rm.shape[0], eps=eps, momentum=momentum, axis=axis, dtype=dtype,
                      running_var_unbiased=False)
    state = dict(params, num_batches_tracked=np.array(0))
    for k in ("weight", "bias"):
        if state.get(k) is None:
            state[k] = layer.state_dict()[k]
    layer.load_state_dict(state)
    return layer.train(training)


def batch_norm_from_keras(weights, *, epsilon=1e-3, momentum=0.99, axis=-1, center=True,
                          scale=True, dtype=None):
    """A BatchNorm (eval mode) from a Keras BatchNormalization's weights.

    weights: the list layer.get_weights() returns ([gamma] if scale, [beta]
    if center, moving_mean, moving_variance), or a mapping with those names.
    Keras's conventions carry over: epsilon (default 1e-3) inside the square
    root, channels last (axis=-1), and in training
    moving = moving * momentum + batch * (1 - momentum) with the biased batch
    variance; so the layer gets momentum = 1 - momentum and
    running_var_unbiased=False. Call .train() to continue training.
    """
    names = (["gamma"] if scale else []) + (["beta"] if center else []) + \
        ["moving_mean", "moving_variance"]
    vals = chk.named_weights(weights, names)
    momentum = chk.real(momentum, "momentum", 0.0, 1.0)
    params = {"weight": vals.get("gamma"), "bias": vals.get("beta"),
              "running_mean": vals["moving_mean"], "running_var": vals["moving_variance"]}
    return _layer_from(params, eps=chk.real(epsilon, "epsilon", 0.0), momentum=1.0 - momentum,
                       axis=axis, dtype=dtype)


def batch_norm_from_onnx(model, node_name=None, *, dtype=None):
    """A BatchNorm from an ONNX BatchNormalization node (needs the onnx package).

    model: an onnx.ModelProto, GraphProto, serialized bytes or a file path;
    node_name picks the node when the graph has several. scale, B, input_mean
    and input_var must be initializers or Constant nodes. ONNX's conventions
    carry over: channel axis 1, epsilon (default 1e-5), and in training
    running = running * momentum + batch * (1 - momentum) (default 0.9) with
    the biased batch variance: the layer gets momentum = 1 - momentum and
    running_var_unbiased=False. The layer is in training mode if the node has
    training_mode=1, else in eval mode.
    """
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError as e:
        raise ImportError("batch_norm_from_onnx needs the onnx package: pip install onnx") from e
    if isinstance(model, (str, bytes, os.PathLike)):
        model = onnx.load_from_string(model) if isinstance(model, bytes) else onnx.load(model)
    graph = model.graph if isinstance(model, onnx.ModelProto) else model
    nodes = [n for n in graph.node if n.op_type == "BatchNormalization"
             and (node_name is None or n.name == node_name)]
    if len(nodes) != 1:
        which = "" if node_name is None else f" named {node_name!r}"
        raise ValueError(f"model: expected exactly one BatchNormalization node{which}, found "
                         f"{len(nodes)}" + ("; pass node_name" if len(nodes) > 1 else ""))
    node = nodes[0]
    consts = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for n in graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    consts[n.output[0]] = numpy_helper.to_array(a.t)
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if attrs.get("spatial", 1) == 0:
        raise ValueError("model: BatchNormalization with spatial=0 (per-activation statistics) "
                         "is not supported")
    args = {}
    for k, name in zip(("weight", "bias", "running_mean", "running_var"), node.input[1:5]):
        if name not in consts:
            raise ValueError(f"model: input {name!r} ({k}) of node {node.name!r} is not an "
                             f"initializer or a Constant")
        args[k] = consts[name]
    momentum = chk.real(float(attrs.get("momentum", 0.9)), "momentum", 0.0, 1.0)
    return _layer_from(args, eps=float(attrs.get("epsilon", 1e-5)), momentum=1.0 - momentum,
                       axis=1, dtype=dtype, training=bool(attrs.get("training_mode", 0)))
