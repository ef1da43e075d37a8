"""Folding an eval-mode batch norm into the layer next to it.

fold_batch_norm gives the per-channel (scale, shift) of the eval-mode
normalization; fold_into_linear and fold_into_conv fold it into the weights
of the layer before it (or, for dense and unpadded convolutions, the layer
after it).
"""
import numpy as np

from . import _checks as chk
from . import _kernels as _k

__all__ = ["fold_batch_norm", "fold_into_linear", "fold_into_conv", "eval_coefficients"]


def eval_coefficients(rm, rv, w, b, eps):
    """(center, scale, shift) of batch_norm_eval for checked float64 parameters:
    y = (x - center) * scale + shift, scale = weight * invstd (the kernels' rule)."""
    chk.variance(rv, eps)
    inv = _k.invstd(rv, eps)
    return rm, (inv if w is None else w * inv), (np.zeros_like(rm) if b is None else b)


def fold_batch_norm(running_mean, running_var, weight=None, bias=None, *, eps=1e-5):
    """(scale, shift), float64, with BN_eval(x) = x * scale + shift per channel.

    scale = weight / sqrt(running_var + eps), shift = bias - running_mean * scale.
    """
    rm = chk.float_vector(running_mean, "running_mean")
    C = rm.shape[0]
    rv = chk.vector(running_var, C, "running_var", required=True)
    w = chk.vector(weight, C, "weight")
    b = chk.vector(bias, C, "bias")
    eps = chk.real(eps, "eps", 0.0)
    center, scale, shift = eval_coefficients(rm, rv, w, b, eps)
    return scale, shift - center * scale


def _fold_args(W, bias, scale, shift, order, C_after, C_before):
    chk.choice(order, "order", {"layer_bn": "batch norm after the layer",
                                "bn_layer": "batch norm before it"})
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
    W = chk.layer_weight(weight, 2, "a 2-D (out_features, in_features) array")
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
    W = chk.layer_weight(weight, 3, "(out_channels, in_channels / groups, *kernel)")
    groups = chk.divisor(groups, W.shape[0], "groups", "out_channels")
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
