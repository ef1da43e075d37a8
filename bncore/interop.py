"""Parameters from and to other frameworks.

batch_norm_from_keras, batch_norm_from_flax and batch_norm_from_onnx build a
BatchNorm with their conventions (eps, momentum, biased running variance);
batch_norm_to_torch, batch_norm_to_keras, batch_norm_to_flax and
batch_norm_to_onnx give a layer's parameters in theirs. An export carries
the eval-mode parameters exactly: running_var is passed as it is, since every
framework's eval mode divides by sqrt(running_var + eps), whichever variance
its training updates accumulate.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from . import _checks as chk
from ._typing import ArrayLike
from .layers import BatchNorm, FrozenBatchNorm

__all__ = ["batch_norm_from_keras", "batch_norm_from_onnx", "batch_norm_from_flax",
           "batch_norm_to_torch", "batch_norm_to_keras", "batch_norm_to_flax",
           "batch_norm_to_onnx"]

_EXPORTABLE = (BatchNorm, FrozenBatchNorm)


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


def batch_norm_from_flax(variables: Mapping[str, Any], *, epsilon: float = 1e-5,
                         momentum: float = 0.99, axis: int = -1, dtype: Any = None) -> BatchNorm:
    """A BatchNorm (eval mode) from a ``flax.linen.BatchNorm``'s variables.

    Flax's conventions carry over: epsilon (default 1e-5) inside the square
    root, channels last (``axis=-1``), and in training
    ``ra = momentum * ra + (1 - momentum) * batch`` with the biased batch
    variance; so the layer gets ``momentum = 1 - momentum`` and
    ``running_var_unbiased=False``.

    Parameters
    ----------
    variables : mapping
        ``{'params': {'scale': ..., 'bias': ...}, 'batch_stats': {'mean': ...,
        'var': ...}}`` (NumPy or JAX arrays; ``params`` or its entries may be
        absent: ``use_scale=False`` / ``use_bias=False``, weight 1 and bias 0).
    epsilon : float, default 1e-5
        The Flax module's ``epsilon`` (finite, ``>= 0``).
    momentum : float, default 0.99
        The Flax module's ``momentum``, in ``[0, 1]``.
    axis : int, default -1
        The channel axis.
    dtype : float16, float32 or float64, optional
        The layer's dtype; default the mean's floating dtype, else float32.

    Returns
    -------
    BatchNorm
        In eval mode, with the Flax module's parameters and statistics.

    Raises
    ------
    KeyError
        If ``batch_stats`` or its ``mean`` / ``var`` is missing, or
        ``params`` has other keys.
    TypeError
        If ``variables`` is not a mapping, an array is not floating point or
        ``dtype`` is not supported.
    ValueError
        If a shape does not match or ``epsilon`` or ``momentum`` is out of
        range.

    Examples
    --------
    >>> variables = {"params": {"scale": np.array([1.0, 2.0]), "bias": np.array([0.0, 1.0])},
    ...              "batch_stats": {"mean": np.array([1.0, 2.0]), "var": np.array([4.0, 16.0])}}
    >>> bn = bncore.batch_norm_from_flax(variables, epsilon=0.0)
    >>> bn.axis, bn.running_var_unbiased
    (-1, False)
    >>> bn(np.array([[3.0, 6.0]]))
    array([[1., 3.]])
    """
    params = chk.flax_variables(variables)
    momentum = chk.real(momentum, "momentum", 0.0, 1.0)
    return _layer_from(params, eps=chk.real(epsilon, "epsilon", 0.0), momentum=1.0 - momentum,
                       axis=axis, dtype=dtype)


def _exported(layer: Any, what: str) -> dict[str, Any]:
    """Copies of a checked layer's weight, bias (None when not affine) and running
    statistics, in its dtype."""
    chk.exportable(layer, _EXPORTABLE, what)
    return {k: None if getattr(layer, k) is None else np.array(getattr(layer, k))
            for k in ("weight", "bias", "running_mean", "running_var")}


def batch_norm_to_torch(layer: BatchNorm | FrozenBatchNorm) -> OrderedDict[str, Any]:
    """The layer as a state dict that ``torch.nn.BatchNorm{1,2,3}d`` loads as is.

    ``weight`` and ``bias`` (when affine), ``running_mean``, ``running_var``
    and ``num_batches_tracked`` (an int64 scalar tensor; 0 for a
    FrozenBatchNorm) as CPU tensors of the layer's dtype. The torch module
    needs the layer's ``eps`` and ``momentum`` and ``affine``; it takes
    channels on axis 1, and the layer's activation is not part of it.

    Parameters
    ----------
    layer : BatchNorm, its subclasses or FrozenBatchNorm
        A layer with running statistics.

    Returns
    -------
    collections.OrderedDict of str to torch.Tensor
        ``torch.nn.BatchNorm2d(C, eps=layer.eps).load_state_dict(state)``
        accepts it.

    Raises
    ------
    ImportError
        If torch is missing.
    TypeError
        If the layer is not a BatchNorm or FrozenBatchNorm.
    ValueError
        If it has no running statistics.

    Examples
    --------
    >>> import torch
    >>> bn = bncore.BatchNorm(2)
    >>> _ = bn(np.array([[1.0, 2.0], [3.0, 6.0]], np.float32))
    >>> state = bncore.batch_norm_to_torch(bn)
    >>> list(state), state["num_batches_tracked"]
    (['weight', 'bias', 'running_mean', 'running_var', 'num_batches_tracked'], tensor(1))
    >>> torch.nn.BatchNorm1d(2).load_state_dict(state)
    <All keys matched successfully>
    """
    params = _exported(layer, "torch.nn.BatchNorm")
    try:
        import torch
    except ImportError as e:
        raise ImportError("batch_norm_to_torch needs torch: pip install torch") from e
    tracked = getattr(layer, "num_batches_tracked", None)
    state: OrderedDict[str, Any] = OrderedDict(
        (k, torch.from_numpy(v)) for k, v in params.items() if v is not None)
    state["num_batches_tracked"] = torch.tensor(0 if tracked is None else int(tracked),
                                                dtype=torch.int64)
    return state


def batch_norm_to_keras(layer: BatchNorm | FrozenBatchNorm) -> list[Any]:
    """The weights a Keras ``BatchNormalization`` layer's ``set_weights`` takes.

    The inverse of `batch_norm_from_keras`: ``[gamma, beta, moving_mean,
    moving_variance]`` (without gamma and beta for a layer with
    ``affine=False``: Keras's ``scale=False, center=False``), copies in the
    layer's dtype; ``moving_variance`` is ``running_var`` as it is (both
    divide by ``sqrt(variance + epsilon)`` in inference). The Keras layer
    needs ``epsilon=layer.eps`` (Keras's default is 1e-3),
    ``momentum=1 - layer.momentum`` and the layer's channel ``axis``.

    Parameters
    ----------
    layer : BatchNorm, its subclasses or FrozenBatchNorm
        A layer with running statistics.

    Returns
    -------
    list of numpy.ndarray
        ``[gamma, beta, moving_mean, moving_variance]``, or
        ``[moving_mean, moving_variance]``.

    Raises
    ------
    TypeError
        If the layer is not a BatchNorm or FrozenBatchNorm.
    ValueError
        If it has no running statistics.

    Examples
    --------
    >>> bn = bncore.BatchNorm(2, axis=-1)
    >>> weights = bncore.batch_norm_to_keras(bn)
    >>> [w.tolist() for w in weights]
    [[1.0, 1.0], [0.0, 0.0], [0.0, 0.0], [1.0, 1.0]]
    >>> back = bncore.batch_norm_from_keras(weights, epsilon=bn.eps, momentum=1 - bn.momentum)
    >>> np.array_equal(back.running_var, bn.running_var)
    True
    """
    p = _exported(layer, "Keras BatchNormalization")
    return [p[k] for k in ("weight", "bias", "running_mean", "running_var") if p[k] is not None]


def batch_norm_to_flax(layer: BatchNorm | FrozenBatchNorm) -> dict[str, dict[str, Any]]:
    """The variables of a ``flax.linen.BatchNorm`` equivalent to the layer.

    The inverse of `batch_norm_from_flax`: ``{'params': {'scale', 'bias'},
    'batch_stats': {'mean', 'var'}}`` as NumPy copies of the layer's dtype
    (``params`` is empty for a layer with ``affine=False``: Flax's
    ``use_scale=False, use_bias=False``); ``var`` is ``running_var`` as it
    is. The Flax module needs ``epsilon=layer.eps``,
    ``momentum=1 - layer.momentum`` and the layer's channel ``axis`` (Flax's
    default is -1).

    Parameters
    ----------
    layer : BatchNorm, its subclasses or FrozenBatchNorm
        A layer with running statistics.

    Returns
    -------
    dict
        ``module.apply(variables, x, use_running_average=True)`` takes it.

    Raises
    ------
    TypeError
        If the layer is not a BatchNorm or FrozenBatchNorm.
    ValueError
        If it has no running statistics.

    Examples
    --------
    >>> bn = bncore.BatchNorm(2, axis=-1)
    >>> variables = bncore.batch_norm_to_flax(bn)
    >>> sorted(variables["params"]), sorted(variables["batch_stats"])
    (['bias', 'scale'], ['mean', 'var'])
    >>> back = bncore.batch_norm_from_flax(variables, epsilon=bn.eps)
    >>> np.array_equal(back.weight, bn.weight)
    True
    """
    p = _exported(layer, "flax.linen.BatchNorm")
    params = {"scale": p["weight"], "bias": p["bias"]} if p["weight"] is not None else {}
    return {"params": params, "batch_stats": {"mean": p["running_mean"], "var": p["running_var"]}}


_ONNX_TYPES = {np.dtype(np.float16): "FLOAT16", np.dtype(np.float32): "FLOAT",
               np.dtype(np.float64): "DOUBLE"}


def batch_norm_to_onnx(layer: BatchNorm | FrozenBatchNorm, *, ndim: int = 4,
                       opset: int = 15) -> Any:
    """A one-node ONNX model computing the layer's eval mode (needs the onnx package).

    A ``BatchNormalization`` node (epsilon ``layer.eps``; momentum
    ``1 - layer.momentum``, 0.9 for ``momentum=None``) whose scale, B,
    input_mean and input_var are initializers of the layer's dtype (ones and
    zeros for ``affine=False``), followed by ``Relu`` or ``LeakyRelu`` when
    the layer has an activation. Input ``X`` and output ``Y`` have the
    layer's dtype and shape ``(N, C, d2, ...)`` with symbolic N and spatial
    sizes; `batch_norm_from_onnx` reads the BatchNormalization node back.
    ONNX attributes are float32: ``epsilon`` and ``momentum`` are rounded to
    it.

    Parameters
    ----------
    layer : BatchNorm, its subclasses or FrozenBatchNorm
        A layer with running statistics whose channel axis is 1 of an input
        with ``ndim`` dimensions (``axis=-1`` only with ``ndim=2``).
    ndim : int, default 4
        The input's number of dimensions, ``>= 2``.
    opset : int, default 15
        The ONNX operator set, ``>= 15`` (BatchNormalization-15).

    Returns
    -------
    onnx.ModelProto
        A checked model (``onnx.checker``).

    Raises
    ------
    ImportError
        If the onnx package is missing.
    TypeError
        If the layer is not a BatchNorm or FrozenBatchNorm.
    ValueError
        If it has no running statistics, its channel axis is not 1 for
        ``ndim``, or ``ndim`` or ``opset`` is out of range.

    Examples
    --------
    >>> import onnx
    >>> bn = bncore.BatchNorm(3, activation="relu")
    >>> model = bncore.batch_norm_to_onnx(bn)
    >>> [n.op_type for n in model.graph.node]
    ['BatchNormalization', 'Relu']
    >>> back = bncore.batch_norm_from_onnx(model)  # the BatchNormalization node
    >>> round(back.eps, 12), np.array_equal(back.running_var, bn.running_var)
    (1e-05, True)
    """
    p = _exported(layer, "ONNX BatchNormalization")
    ndim = chk.onnx_layout(layer, ndim)
    opset = chk.integer(opset, "opset", 15)
    try:
        import onnx
        from onnx import helper, numpy_helper
    except ImportError as e:
        raise ImportError("batch_norm_to_onnx needs the onnx package: pip install onnx") from e
    dt = layer.dtype
    C = layer.num_features
    values = [np.ones(C, dt) if p["weight"] is None else p["weight"],
              np.zeros(C, dt) if p["bias"] is None else p["bias"],
              p["running_mean"], p["running_var"]]
    names = ["scale", "B", "input_mean", "input_var"]
    inits = [numpy_helper.from_array(v, n) for v, n in zip(values, names)]
    m = getattr(layer, "momentum", None)
    code, slope = chk.activation_code(layer.activation)
    last = "Y" if code == 0 else "Z"
    nodes = [helper.make_node("BatchNormalization", ["X", *names], [last], name="batch_norm",
                              epsilon=float(layer.eps), momentum=0.9 if m is None else 1.0 - m)]
    if code == 1:
        nodes.append(helper.make_node("Relu", [last], ["Y"], name="relu"))
    elif code == 2:
        nodes.append(helper.make_node("LeakyRelu", [last], ["Y"], name="leaky_relu",
                                      alpha=float(slope)))
    elem = getattr(onnx.TensorProto, _ONNX_TYPES[np.dtype(dt)])
    shape = ["N", C] + [f"d{i}" for i in range(2, ndim)]
    graph = helper.make_graph(
        nodes, "bncore_batch_norm",
        [helper.make_tensor_value_info("X", elem, shape)],
        [helper.make_tensor_value_info("Y", elem, shape)], initializer=inits)
    opsets = [helper.make_opsetid("", opset)]
    model = helper.make_model(graph, opset_imports=opsets, producer_name="bncore",
                              ir_version=helper.find_min_ir_version_for(opsets))
    onnx.checker.check_model(model)
    return model
