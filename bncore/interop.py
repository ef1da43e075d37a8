"""Parameters from other frameworks: batch_norm_from_keras and
batch_norm_from_onnx build a BatchNorm with their conventions (eps,
momentum, biased running variance)."""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from . import _checks as chk
from ._typing import ArrayLike
from .layers import BatchNorm

__all__ = ["batch_norm_from_keras", "batch_norm_from_onnx"]


def _layer_from(params: Mapping[str, Any], *, eps: float, momentum: float, axis: int,
                dtype: Any, training: bool = False) -> BatchNorm:
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


def batch_norm_from_keras(weights: Sequence[ArrayLike] | Mapping[str, ArrayLike], *,
                          epsilon: float = 1e-3, momentum: float = 0.99, axis: int = -1,
                          center: bool = True, scale: bool = True,
                          dtype: Any = None) -> BatchNorm:
    """A BatchNorm (eval mode) from a Keras BatchNormalization's weights.

    Keras's conventions carry over: epsilon (default 1e-3) inside the square
    root, channels last (``axis=-1``), and in training
    ``moving = moving * momentum + batch * (1 - momentum)`` with the biased
    batch variance; so the layer gets ``momentum = 1 - momentum`` and
    ``running_var_unbiased=False``. Call ``.train()`` to continue training.

    Parameters
    ----------
    weights : sequence or mapping of array_like
        The list ``layer.get_weights()`` returns (``[gamma]`` if scale,
        ``[beta]`` if center, moving_mean, moving_variance), or a mapping
        with those names.
    epsilon : float, default 1e-3
        The Keras layer's ``epsilon`` (finite, ``>= 0``).
    momentum : float, default 0.99
        The Keras layer's ``momentum``, in ``[0, 1]``.
    axis : int, default -1
        The channel axis.
    center, scale : bool, default True
        Whether the Keras layer has beta and gamma (otherwise bias 0 and
        weight 1).
    dtype : float16, float32 or float64, optional
        The layer's dtype; default the moving mean's floating dtype, else
        float32.

    Returns
    -------
    BatchNorm
        In eval mode, with the Keras layer's parameters and statistics.

    Raises
    ------
    KeyError
        If a mapping lacks one of the names.
    ValueError
        If the list has the wrong length, a shape does not match, or
        ``epsilon`` or ``momentum`` is out of range.
    TypeError
        If an array is not floating point or ``dtype`` is not supported.

    Examples
    --------
    >>> gamma, beta = np.array([1.0, 2.0]), np.array([0.0, 1.0])
    >>> mean, var = np.array([1.0, 2.0]), np.array([4.0, 16.0])
    >>> bn = bncore.batch_norm_from_keras([gamma, beta, mean, var], epsilon=0.0)
    >>> bn.training, bn.momentum, bn.axis
    (False, 0.010000000000000009, -1)
    >>> bn(np.array([[3.0, 6.0]]))
    array([[1., 3.]])
    """
    names = (["gamma"] if scale else []) + (["beta"] if center else []) + \
        ["moving_mean", "moving_variance"]
    vals = chk.named_weights(weights, names)
    momentum = chk.real(momentum, "momentum", 0.0, 1.0)
    params = {"weight": vals.get("gamma"), "bias": vals.get("beta"),
              "running_mean": vals["moving_mean"], "running_var": vals["moving_variance"]}
    return _layer_from(params, eps=chk.real(epsilon, "epsilon", 0.0), momentum=1.0 - momentum,
                       axis=axis, dtype=dtype)


def batch_norm_from_onnx(model: Any, node_name: str | None = None, *,
                         dtype: Any = None) -> BatchNorm:
    """A BatchNorm from an ONNX BatchNormalization node (needs the onnx package).

    ONNX's conventions carry over: channel axis 1, epsilon (default 1e-5),
    and in training ``running = running * momentum + batch * (1 - momentum)``
    (default 0.9) with the biased batch variance: the layer gets
    ``momentum = 1 - momentum`` and ``running_var_unbiased=False``.

    Parameters
    ----------
    model : onnx.ModelProto, onnx.GraphProto, bytes, str or os.PathLike
        The model, serialized bytes or a file path. The node's scale, B,
        input_mean and input_var must be initializers or Constant nodes.
    node_name : str, optional
        Picks the node when the graph has several.
    dtype : float16, float32 or float64, optional
        The layer's dtype; default the mean's floating dtype, else float32.

    Returns
    -------
    BatchNorm
        In training mode if the node has ``training_mode=1``, else in eval
        mode.

    Raises
    ------
    ImportError
        If the onnx package is missing.
    ValueError
        If the graph has no or several matching nodes, the node has
        ``spatial=0``, a parameter is not a constant, or a shape or
        attribute is out of range.
    TypeError
        If a parameter is not floating point or ``dtype`` is not supported.

    Examples
    --------
    >>> from onnx import helper, numpy_helper
    >>> consts = [numpy_helper.from_array(np.array(v, np.float32), name) for name, v in
    ...           [("s", [1, 2]), ("b", [0, 1]), ("m", [1, 2]), ("v", [4, 16])]]
    >>> node = helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"],
    ...                         epsilon=0.0)
    >>> graph = helper.make_graph([node], "g", [], [], initializer=consts)
    >>> bn = bncore.batch_norm_from_onnx(graph)
    >>> bn
    BatchNorm(2, eps=0.0, momentum=0.09999999999999998, affine=True, track_running_stats=True, axis=1)
    >>> bn(np.array([[3.0, 6.0]], np.float32))
    array([[1., 3.]], dtype=float32)
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
