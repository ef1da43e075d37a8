"""Inference services: folding, frozen batch norm, in-place ABN and loaders.

* fold_batch_norm / fold_into_linear / fold_into_conv: an eval-mode batch norm
  as a per-channel (scale, shift), folded into the weights of the layer before
  it (or, for dense and unpadded convolutions, the layer after it).
* FrozenBatchNorm: fixed parameters, coefficients computed once, one fused
  pass per call, stateless (one instance serves many threads at once).
* InPlaceABN and batch_norm_backward_from_output: training that overwrites x
  with y and rebuilds the normalized input from y in the backward.
* batch_norm_from_keras / batch_norm_from_onnx: layers from other frameworks'
  parameters with their conventions (eps, momentum, biased running variance).
"""
import numbers
import os

import numpy as np

from . import _checks as chk
from . import _kernels as _k
from .functional import _Layout
from .layers import BatchNorm

__all__ = [
    "fold_batch_norm", "fold_into_linear", "fold_into_conv", "FrozenBatchNorm",
    "batch_norm_backward_from_output", "InPlaceABN", "batch_norm_from_keras",
    "batch_norm_from_onnx",
]

_ORDERS = ("layer_bn", "bn_layer")


# ---- folding ---------------------------------------------------------------------------

def _param_vector(v, name):
    a = np.asarray(v)
    if a.dtype.kind != "f":
        raise TypeError(f"{name}: expected a floating-point array, got dtype {a.dtype}")
    if a.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D array (one value per channel), got shape {a.shape}")
    return a.astype(np.float64)


def _eval_coefficients(rm, rv, w, eps):
    """scale = weight / sqrt(running_var + eps), in the operation order of batch_norm_eval."""
    if not np.all(rv + eps > 0):
        bad = np.flatnonzero(~(rv + eps > 0))[:5]
        raise ValueError(f"running_var: running_var + eps must be > 0 to invert, got "
                         f"{rv[bad]} + {eps} at channels {bad.tolist()}")
    invstd = 1.0 / np.sqrt(rv + eps)
    return invstd if w is None else w * invstd


def fold_batch_norm(running_mean, running_var, weight=None, bias=None, *, eps=1e-5):
    """(scale, shift), float64, with BN_eval(x) = x * scale + shift per channel.

    scale = weight / sqrt(running_var + eps), shift = bias - running_mean * scale.
    """
    rm = _param_vector(running_mean, "running_mean")
    C = rm.shape[0]
    rv = chk.vector(running_var, C, "running_var", required=True)
    w = chk.vector(weight, C, "weight")
    b = chk.vector(bias, C, "bias")
    eps = chk.real(eps, "eps", 0.0)
    scale = _eval_coefficients(rm, rv, w, eps)
    shift = (0.0 if b is None else b) - rm * scale
    return scale, shift


def _layer_weight(weight, min_ndim, what):
    W = np.asarray(weight)
    if W.dtype.kind != "f":
        raise TypeError(f"weight: expected a floating-point array, got dtype {W.dtype}")
    if W.ndim < min_ndim or (min_ndim == 2 and W.ndim != 2):
        raise ValueError(f"weight: expected {what}, got shape {W.shape}")
    return W


def _fold_args(W, bias, scale, shift, order, C_after, C_before):
    if order not in _ORDERS:
        raise ValueError(f"order: expected 'layer_bn' (batch norm after the layer) or "
                         f"'bn_layer' (batch norm before it), got {order!r}")
    C = C_after if order == "layer_bn" else C_before
    s = chk.vector(scale, C, "scale", required=True)
    t = chk.vector(shift, C, "shift", required=True)
    b = np.zeros(W.shape[0]) if bias is None else chk.vector(bias, W.shape[0], "bias")
    return s, t, b


def fold_into_linear(weight, bias, scale, shift, *, order="layer_bn"):
    """Fold a batch norm (scale, shift) into a dense layer y = x @ weight.T + bias.

    weight is (out_features, in_features), bias (out_features,) or None.
    order='layer_bn': the batch norm follows the layer, BN(x @ W.T + b);
    order='bn_layer': it precedes it, BN(x) @ W.T + b. Returns the folded
    (weight, bias) in weight's dtype (computed in float64).
    """
    W = _layer_weight(weight, 2, "a 2-D (out_features, in_features) array")
    s, t, b = _fold_args(W, bias, scale, shift, order, W.shape[0], W.shape[1])
    W64 = W.astype(np.float64)
    if order == "layer_bn":
        Wf, bf = W64 * s[:, None], b * s + t
    else:  # W (s*x + t) + b
        Wf, bf = W64 * s[None, :], b + W64 @ t
    return Wf.astype(W.dtype), bf.astype(W.dtype)


def fold_into_conv(weight, bias, scale, shift, *, groups=1, order="layer_bn"):
    """Fold a batch norm (scale, shift) into a convolution.

    weight is (out_channels, in_channels / groups, *kernel) (PyTorch's and
    ONNX's layout, any number of spatial dims), bias (out_channels,) or None.
    order='layer_bn' (BN after the convolution) is exact for any stride,
    padding and dilation. order='bn_layer' (BN before it) is exact only without
    zero padding: padding adds zeros after the batch norm, which the folded
    convolution would see as -shift/scale. Returns the folded (weight, bias).
    """
    W = _layer_weight(weight, 3, "(out_channels, in_channels / groups, *kernel)")
    if (isinstance(groups, bool) or not isinstance(groups, numbers.Integral) or groups < 1
            or W.shape[0] % groups):
        raise ValueError(f"groups: expected a positive int dividing out_channels={W.shape[0]}, "
                         f"got {groups!r}")
    cin_g = W.shape[1]
    s, t, b = _fold_args(W, bias, scale, shift, order, W.shape[0], groups * cin_g)
    W64 = W.astype(np.float64)
    tail = (1,) * (W.ndim - 2)
    if order == "layer_bn":
        Wf, bf = W64 * s.reshape((-1, 1) + tail), b * s + t
    else:
        # output channel o of group g reads input channels g*cin_g .. (g+1)*cin_g - 1
        per_out = lambda v: np.repeat(v.reshape(groups, cin_g), W.shape[0] // groups, axis=0)
        Wf = W64 * per_out(s).reshape(W.shape[:2] + tail)
        bf = b + (W64 * per_out(t).reshape(W.shape[:2] + tail)).reshape(W.shape[0], -1).sum(1)
    return Wf.astype(W.dtype), bf.astype(W.dtype)


# ---- frozen batch norm -----------------------------------------------------------------

def _num_features(n):
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise ValueError(f"num_features: expected a positive int, got {n!r}")
    return int(n)


class FrozenBatchNorm:
    """Batch norm with fixed parameters, like torchvision's FrozenBatchNorm2d.

    y = act((x - running_mean) * scale + bias), scale = weight / sqrt(running_var + eps),
    with eps inside the square root (torchvision's convention since 0.8 and
    detectron2's: default 1e-5; checkpoints from code that used no eps load
    with eps=0). The coefficients are computed once, when the parameters are
    set, and a call is one fused pass over x, bitwise the same as
    batch_norm_eval. Keeping running_mean as the center (instead of the folded
    x * scale + shift) costs nothing in a memory-bound pass and keeps float32
    exact when |mean| >> std; `scale` and `shift` give the folded form.

    Parameters are read-only arrays: change them with load_state_dict, which
    recomputes the coefficients. Calls keep no state, so one instance serves
    any number of threads at once. backward(dy) is dx = dy * scale (times the
    activation's derivative, taken from the output y); nothing is trained.
    """

    def __init__(self, num_features, *, eps=1e-5, axis=1, activation=None, dtype=np.float32):
        C = _num_features(num_features)
        dtype = np.dtype(dtype)
        if dtype not in chk.FLOAT_DTYPES:
            raise TypeError(f"dtype: expected float16, float32 or float64, got {dtype}")
        self.num_features = C
        self.eps = chk.real(eps, "eps", 0.0)
        self.axis = axis
        self.dtype = dtype
        self._act = chk.activation(activation)
        self.activation = activation
        self._checked = {}  # (shape, dtype) -> kernel geometry, for forward's fast path
        self._set(np.ones(C, dtype), np.zeros(C, dtype), np.zeros(C, dtype), np.ones(C, dtype))

    @classmethod
    def from_state_dict(cls, state, *, eps=1e-5, axis=1, activation=None, dtype=None):
        """From PyTorch-style keys (weight, bias, running_mean, running_var;
        num_batches_tracked is ignored; weight/bias may be absent: affine=False)."""
        if "running_mean" not in state:
            raise KeyError("state: missing key 'running_mean'")
        rm = np.asarray(state["running_mean"])
        if rm.ndim != 1:
            raise ValueError(f"state['running_mean']: expected a 1-D array, got shape {rm.shape}")
        if dtype is None:
            dtype = rm.dtype if rm.dtype in chk.FLOAT_DTYPES else np.float32
        layer = cls(rm.shape[0], eps=eps, axis=axis, activation=activation, dtype=dtype)
        layer.load_state_dict(state, strict=False)
        return layer

    def _set(self, w, b, rm, rv):
        params = []
        for a, name in zip((w, b, rm, rv), ("weight", "bias", "running_mean", "running_var")):
            a = chk.vector(a, self.num_features, name, required=True).astype(self.dtype)
            a.flags.writeable = False
            params.append(a)
        # coefficients from the stored (rounded) parameters: the same as batch_norm_eval's
        w, b, rm, rv = (a.astype(np.float64) for a in params)
        scale = _eval_coefficients(rm, rv, w, self.eps)
        # everything is validated: now assign
        self.weight, self.bias, self.running_mean, self.running_var = params
        self._center, self._scale, self._shift = rm, scale, b

    def load_state_dict(self, state, strict=True):
        """Sets any of weight, bias, running_mean, running_var (missing keys keep
        their values unless strict); checked fully before anything changes."""
        names = ("weight", "bias", "running_mean", "running_var")
        unexpected = [k for k in state if k not in names + ("num_batches_tracked",)]
        missing = [k for k in names if k not in state]
        if unexpected or (strict and missing):
            raise KeyError(f"state: missing keys {missing}, unexpected keys {unexpected}")
        self._set(*(state.get(k, getattr(self, k)) for k in names))

    def state_dict(self):
        return {k: np.array(getattr(self, k)) for k in
                ("weight", "bias", "running_mean", "running_var")}

    @property
    def scale(self):
        """Folded per-channel scale (float64): weight / sqrt(running_var + eps)."""
        return self._scale.copy()

    @property
    def shift(self):
        """Folded per-channel shift (float64): bias - running_mean * scale."""
        return self._shift - self._center * self._scale

    def __repr__(self):
        act = "" if self.activation is None else f", activation={self.activation!r}"
        return f"FrozenBatchNorm({self.num_features}, eps={self.eps}, axis={self.axis}{act})"

    def _layout(self, x, name="x"):
        L = _Layout(x, self.axis, name)
        if L.C != self.num_features:
            raise ValueError(f"{name}: expected {self.num_features} channels on axis "
                             f"{self.axis}, got shape {L.x.shape}")
        return L

    def __call__(self, x, **kwargs):
        return self.forward(x, **kwargs)

    def forward(self, x, *, out=None, n_threads=None):
        act, slope = self._act
        # serving fast path: an input shape and dtype already checked once
        # (C-contiguous float32/64, fresh output) skips the argument machinery
        fast = (out is None and type(x) is np.ndarray and x.flags.c_contiguous
                and (n_threads is None or (type(n_threads) is int and 0 < n_threads <= 4096)))
        geometry = self._checked.get((x.shape, x.dtype)) if fast else None
        if geometry is not None:
            y = np.empty(x.shape, x.dtype)
            _k.apply(x.reshape(-1), y.reshape(-1), geometry, self._center, self._scale,
                     self._shift, act, slope, n_threads or 0)
            return y
        L = self._layout(x)
        nt = chk.threads(n_threads)
        buf, final = chk.output(out, L.x, L.cd, (L.x,))
        _k.apply(L.flat(L.x), buf.reshape(-1), L.shape, self._center, self._scale, self._shift,
                 act, slope, nt)
        if fast and L.x is x and L.cd == x.dtype:
            if len(self._checked) >= 64:
                self._checked.clear()
            self._checked[x.shape, x.dtype] = L.shape
        return chk.finish(buf, final, L.x.dtype)

    def backward(self, dy, *, y=None, out=None, n_threads=None):
        """dx = act'(y) * dy * scale; y (the forward output) is needed only with
        an activation, as its mask."""
        L = self._layout(dy, "dy")
        act, slope = self._act
        if act and y is None:
            raise ValueError("y: the forward output is required when activation is set "
                             "(its sign is the activation's mask)")
        y = chk.like(y, L.x, "y") if act else None
        nt = chk.threads(n_threads)
        buf, final = chk.output(out, L.x, L.cd, (L.x, y))
        _k.backward_apply(L.flat(L.x), None, L.flat(y), buf.reshape(-1), L.shape, self._center,
                          self._scale, None, None, act, slope, nt)
        return chk.finish(buf, final, L.x.dtype)


# ---- in-place activated batch norm -----------------------------------------------------

def _invertible(activation):
    act, slope = chk.activation(activation)
    if act == 1 or (act == 2 and slope <= 0):
        raise ValueError(f"activation: the in-place backward rebuilds x from y, which needs an "
                         f"invertible activation: None or ('leaky_relu', slope > 0), got "
                         f"{activation!r}")
    return act, slope


def batch_norm_backward_from_output(dy, y, save_invstd, weight=None, bias=None, *, axis=1,
                                    training=True, activation=None, out=None,
                                    min_abs_weight=None, n_threads=None):
    """(dx, dweight, dbias) of batch_norm_train(x, ..., out=x) from its output alone.

    The normalized input is rebuilt inside the backward passes as
    xhat = (act^-1(y) - bias) / weight, so the forward may overwrite x with y
    (Inplace-ABN): one activation buffer is saved per layer. activation is
    None or ('leaky_relu', slope > 0). Rebuilding divides by weight: every
    |weight| must be at least min_abs_weight (default sqrt of the dtype's
    machine epsilon: about 3.5e-4 for float32), or ValueError. `out` may be
    dy or y (the saved output is not needed afterwards).
    """
    L = _Layout(y, axis, "y")
    dy = chk.like(dy, L.x, "dy")
    inv = chk.vector(save_invstd, L.C, "save_invstd", required=True)
    w = chk.vector(weight, L.C, "weight")
    b = chk.vector(bias, L.C, "bias")
    act, slope = _invertible(activation)
    tol = (np.sqrt(np.finfo(L.cd).eps) if min_abs_weight is None
           else chk.real(min_abs_weight, "min_abs_weight", 0.0))
    wabs = np.ones(L.C) if w is None else np.abs(w)
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        bad = np.flatnonzero(~(wabs >= tol) | ~np.isfinite(1.0 / (wabs * np.abs(inv))))[:5]
    if bad.size:
        shown = (np.ones(L.C) if w is None else w)[bad]
        raise ValueError(f"weight: the in-place backward divides by weight * save_invstd, so "
                         f"|weight| must be >= {tol:.3g} (min_abs_weight) and save_invstd finite "
                         f"and non-zero; channels {bad.tolist()} have weight {shown.tolist()}, "
                         f"save_invstd {inv[bad].tolist()}")
    nt = chk.threads(n_threads)
    buf, final = chk.output(out, L.x, L.cd, (L.x, dy))
    dw, db = np.empty(L.C), np.empty(L.C)
    _k.backward_from_output(L.flat(dy), L.flat(L.x), buf.reshape(-1), L.shape, inv, w, b,
                            bool(training), dw, db, act, slope, nt)
    dx = chk.finish(buf, final, L.x.dtype)
    return dx, dw.astype(L.sd, copy=False), db.astype(L.sd, copy=False)


class InPlaceABN(BatchNorm):
    """Batch norm + activation whose forward overwrites its input x with y.

    In the spirit of Inplace-ABN (Rota Bulo et al., 2018): the backward
    rebuilds the normalized input from y (batch_norm_backward_from_output), so
    a training step keeps one activation buffer per layer instead of two.
    activation is None or ('leaky_relu', slope > 0) (default slope 0.01);
    other arguments as BatchNorm. x must be a writable ndarray; forward
    returns x (filled with y) and the caller must not need x afterwards.
    """

    def __init__(self, num_features, *, activation=("leaky_relu", 0.01), min_abs_weight=None,
                 **kwargs):
        _invertible(activation)
        if kwargs.get("virtual_batch_size") is not None:
            raise ValueError("virtual_batch_size: not supported by InPlaceABN (its backward "
                             "rebuilds x from one set of batch statistics)")
        super().__init__(num_features, activation=activation, **kwargs)
        self.min_abs_weight = min_abs_weight

    def _check_out(self, x, out):
        if out is not x:
            raise ValueError("out: InPlaceABN always writes its output into x")

    def forward(self, x, *, n_threads=None):
        if not isinstance(x, np.ndarray) or not x.flags.writeable:
            raise ValueError("x: InPlaceABN overwrites its input: expected a writable "
                             f"numpy.ndarray, got {type(x).__name__}"
                             + ("" if not isinstance(x, np.ndarray) else " (read-only)"))
        return super().forward(x, out=x, n_threads=n_threads)

    def backward(self, dy, *, out=None, n_threads=None):
        """dx of the most recent forward (out may be dy); sets grad_weight, grad_bias."""
        if self._saved is None:
            raise RuntimeError("backward: no forward call to differentiate; call forward first")
        _, _, invstd, training = self._saved
        y = self._saved_y
        dx, dw, db = batch_norm_backward_from_output(
            dy, y, invstd, self.weight, self.bias, axis=self.axis, training=training,
            activation=self.activation, out=out, min_abs_weight=self.min_abs_weight,
            n_threads=n_threads)
        if self.affine:
            self.grad_weight = dw.astype(self.weight.dtype)
            self.grad_bias = db.astype(self.bias.dtype)
        return dx


# ---- loaders ---------------------------------------------------------------------------

def _layer_from(params, *, eps, momentum, axis, dtype, training=False):
    """A BatchNorm with the biased running-variance convention of Keras and ONNX;
    params maps weight, bias, running_mean, running_var (float arrays)."""
    rm = _param_vector(params["running_mean"], "running_mean")
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
    if hasattr(weights, "keys"):
        missing = [k for k in names if k not in weights]
        if missing:
            raise KeyError(f"weights: missing keys {missing} (expected {names})")
        vals = dict(zip(names, (weights[k] for k in names)))
    else:
        weights = list(weights)
        if len(weights) != len(names):
            raise ValueError(f"weights: expected {len(names)} arrays ({', '.join(names)}), got "
                             f"{len(weights)}")
        vals = dict(zip(names, weights))
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
