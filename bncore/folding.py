"""Folding an eval-mode batch norm into the layer next to it.

fold_batch_norm gives the per-channel (scale, shift) of the eval-mode
normalization; fold_into_linear, fold_into_conv (weight (out, in / groups,
*kernel)) and fold_into_conv_transpose (weight (in, out / groups, *kernel))
fold it into the weights of the layer before it (or, for dense and unpadded
convolutions, the layer after it). bncore.onnx_folding applies them to a
whole ONNX model.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from . import _checks as chk
from . import _kernels as _k
from ._typing import Array, ArrayLike, Float64Array

__all__ = ["fold_batch_norm", "fold_into_linear", "fold_into_conv", "fold_into_conv_transpose",
           "eval_coefficients"]


def eval_coefficients(rm: Any, rv: Any, w: Any, b: Any, eps: float) -> tuple[Any, Any, Any]:
    """(center, scale, shift) of batch_norm_eval for checked float64 parameters:
    y = (x - center) * scale + shift, scale = weight * invstd (the kernels' rule)."""
    chk.variance(rv, eps)
    inv = _k.invstd(rv, eps)
    return rm, (inv if w is None else w * inv), (np.zeros_like(rm) if b is None else b)


def fold_batch_norm(running_mean: ArrayLike, running_var: ArrayLike,
                    weight: ArrayLike | None = None, bias: ArrayLike | None = None, *,
                    eps: float = 1e-5) -> tuple[Float64Array, Float64Array]:
    """The per-channel (scale, shift) of an eval-mode batch norm.

    ``batch_norm_eval(x) == x * scale + shift`` per channel, with
    ``scale = weight / sqrt(running_var + eps)`` and
    ``shift = bias - running_mean * scale``; scale is 0 where
    ``running_var + eps == 0``.

    Parameters
    ----------
    running_mean : array_like
        1-D floating-point array; its length sets C.
    running_var : array_like
        Floating-point array of length C.
    weight, bias : array_like, optional
        Per-channel scale and shift of length C (None means 1 and 0).
    eps : float, default 1e-5
        Finite, ``>= 0``; added to ``running_var`` inside the square root.

    Returns
    -------
    scale, shift : numpy.ndarray
        float64 arrays of shape ``(C,)``.

    Raises
    ------
    TypeError
        If an array is not floating point.
    ValueError
        If a shape does not match, ``eps`` is negative or not finite, or
        ``running_var + eps`` is negative.

    Examples
    --------
    >>> scale, shift = bncore.fold_batch_norm(np.array([1.0, 2.0]), np.array([4.0, 16.0]),
    ...                                       bias=np.array([0.0, 1.0]), eps=0.0)
    >>> scale, shift
    (array([0.5 , 0.25]), array([-0.5,  0.5]))
    """
    rm = chk.float_vector(running_mean, "running_mean")
    C = rm.shape[0]
    rv = chk.vector(running_var, C, "running_var", required=True)
    w = chk.vector(weight, C, "weight")
    b = chk.vector(bias, C, "bias")
    eps = chk.real(eps, "eps", 0.0)
    center, scale, shift = eval_coefficients(rm, rv, w, b, eps)
    return scale, shift - center * scale


def _fold_args(W: Any, bias: Any, scale: Any, shift: Any, order: Any, C_after: int,
               C_before: int, C_bias: int | None = None, layout_hint: str | None = None
               ) -> tuple[Any, Any, Any]:
    chk.choice(order, "order", {"layer_bn": "batch norm after the layer",
                                "bn_layer": "batch norm before it"})
    C, other = (C_after, C_before) if order == "layer_bn" else (C_before, C_after)
    if layout_hint is None:
        s = chk.vector(scale, C, "scale", required=True)
    else:
        s = chk.fold_coefficient(scale, C, "scale", other, layout_hint)
    t = chk.vector(shift, C, "shift", required=True)
    C_bias = W.shape[0] if C_bias is None else C_bias
    b = np.zeros(C_bias) if bias is None else chk.vector(bias, C_bias, "bias")
    return s, t, b


def fold_into_linear(weight: ArrayLike, bias: ArrayLike | None, scale: ArrayLike,
                     shift: ArrayLike, *, order: str = "layer_bn") -> tuple[Array, Array]:
    """Fold a batch norm (scale, shift) into a dense layer ``y = x @ weight.T + bias``.

    Parameters
    ----------
    weight : array_like
        Floating-point array of shape ``(out_features, in_features)``.
    bias : array_like or None
        Shape ``(out_features,)``; None means zeros.
    scale, shift : array_like
        The batch norm's per-channel coefficients (`fold_batch_norm`): length
        out_features for ``order='layer_bn'``, in_features for
        ``order='bn_layer'``.
    order : {'layer_bn', 'bn_layer'}, default 'layer_bn'
        'layer_bn': the batch norm follows the layer, ``BN(x @ W.T + b)``;
        'bn_layer': it precedes it, ``BN(x) @ W.T + b``.

    Returns
    -------
    weight, bias : numpy.ndarray
        The folded layer, in weight's dtype (computed in float64).

    Raises
    ------
    TypeError
        If ``weight`` or a vector is not floating point.
    ValueError
        If ``weight`` is not 2-D, a length does not match, or ``order`` is
        not one of the two.

    Examples
    --------
    >>> W, b = np.array([[1.0, 2.0], [3.0, 4.0]]), np.array([1.0, -1.0])
    >>> scale, shift = np.array([2.0, 0.5]), np.array([0.0, 1.0])
    >>> Wf, bf = bncore.fold_into_linear(W, b, scale, shift)
    >>> Wf, bf
    (array([[2. , 4. ],
           [1.5, 2. ]]), array([2. , 0.5]))
    >>> x = np.array([[1.0, 1.0]])
    >>> np.allclose(x @ Wf.T + bf, (x @ W.T + b) * scale + shift)
    True
    """
    W = chk.layer_weight(weight, 2, "a 2-D (out_features, in_features) array")
    s, t, b = _fold_args(W, bias, scale, shift, order, W.shape[0], W.shape[1])
    W64 = W.astype(np.float64)
    if order == "layer_bn":
        Wf, bf = W64 * s[:, None], b * s + t
    else:  # W (s*x + t) + b
        Wf, bf = W64 * s[None, :], b + W64 @ t
    return Wf.astype(W.dtype), bf.astype(W.dtype)


_CONV_WEIGHT = "(out_channels, in_channels / groups, *kernel)"
_CONV_T_WEIGHT = "(in_channels, out_channels / groups, *kernel)"


def fold_into_conv(weight: ArrayLike, bias: ArrayLike | None, scale: ArrayLike,
                   shift: ArrayLike, *, groups: int = 1, order: str = "layer_bn",
                   layout: str = "OI") -> tuple[Array, Array]:
    """Fold a batch norm into a Conv with weight ``(out_channels, in_channels / groups, *kernel)``.

    .. warning::
       This is the layout of a *convolution* (PyTorch ``Conv*d``, ONNX
       ``Conv``). A *transposed* convolution (PyTorch ``ConvTranspose*d``,
       ONNX ``ConvTranspose``) stores ``(in_channels, out_channels / groups,
       *kernel)``: fold it with `fold_into_conv_transpose`. When in_channels
       equals out_channels the two layouts have the same shape, and passing a
       transposed weight here would scale the wrong axis without any error.

    ``order='layer_bn'`` (BN after the convolution) is exact for any stride,
    padding and dilation. ``order='bn_layer'`` (BN before it) is exact only
    without zero padding (or with ``shift == 0``): padding adds zeros after
    the batch norm, which the folded convolution would see as
    ``-shift/scale``.

    Parameters
    ----------
    weight : array_like
        The Conv weight: a floating-point array of shape ``(out_channels,
        in_channels / groups, *kernel)`` (PyTorch's and ONNX's Conv layout,
        any number of spatial dims). Not a ConvTranspose weight.
    bias : array_like or None
        Shape ``(out_channels,)``; None means zeros.
    scale, shift : array_like
        The batch norm's per-channel coefficients (`fold_batch_norm`): length
        out_channels for 'layer_bn', in_channels for 'bn_layer'.
    groups : int, default 1
        The convolution's groups: a positive divisor of out_channels.
    order : {'layer_bn', 'bn_layer'}, default 'layer_bn'
        Whether the batch norm follows the convolution or precedes it.
    layout : {'OI'}, default 'OI'
        States the weight layout at the call site: the order of its first two
        axes, as in the kernel layouts ``OIHW`` (Conv) and ``IOHW``
        (ConvTranspose). Only 'OI' is accepted; 'IO' raises an error that
        names `fold_into_conv_transpose`.

    Returns
    -------
    weight, bias : numpy.ndarray
        The folded convolution, in weight's dtype (computed in float64).

    Raises
    ------
    TypeError
        If ``weight`` or a vector is not floating point.
    ValueError
        If ``weight`` has fewer than 3 dims, ``groups`` does not divide
        out_channels, a length does not match, ``order`` is not one of
        the two, or ``layout`` is not 'OI'.

    See Also
    --------
    fold_into_conv_transpose : the same for a ConvTranspose weight
        ``(in_channels, out_channels / groups, *kernel)``.

    Examples
    --------
    >>> W = np.ones((2, 1, 3))  # a 1-D convolution: 2 output channels, kernel 3
    >>> Wf, bf = bncore.fold_into_conv(W, None, np.array([2.0, 0.5]), np.array([1.0, 0.0]))
    >>> Wf[:, 0], bf
    (array([[2. , 2. , 2. ],
           [0.5, 0.5, 0.5]]), array([1., 0.]))
    """
    chk.weight_layout(layout, "OI")
    W = chk.layer_weight(weight, 3, f"a Conv weight {_CONV_WEIGHT} with ndim >= 3 (for a "
                         f"ConvTranspose weight {_CONV_T_WEIGHT} call fold_into_conv_transpose)")
    groups = chk.divisor(groups, W.shape[0], "groups", "out_channels (axis 0 of the Conv weight)")
    cin_g = W.shape[1]
    s, t, b = _fold_args(W, bias, scale, shift, order, W.shape[0], groups * cin_g,
                         layout_hint=f"the other order's channel count: is the batch norm on "
                         f"the other side, or is this a ConvTranspose weight {_CONV_T_WEIGHT}, "
                         f"for fold_into_conv_transpose?")
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


def fold_into_conv_transpose(weight: ArrayLike, bias: ArrayLike | None, scale: ArrayLike,
                             shift: ArrayLike, *, groups: int = 1, order: str = "layer_bn",
                             layout: str = "IO") -> tuple[Array, Array]:
    """Fold a batch norm into a ConvTranspose with weight ``(in_channels, out_channels / groups, *kernel)``.

    .. warning::
       This is the layout of a *transposed* convolution (PyTorch
       ``ConvTranspose*d``, ONNX ``ConvTranspose``): axis 0 is the input
       channels, axis 1 the output channels of one group. An ordinary
       convolution (``(out_channels, in_channels / groups, *kernel)``) is
       folded by `fold_into_conv`. When in_channels equals out_channels the
       two layouts have the same shape, and the wrong function scales the
       wrong axis without any error.

    Output channel ``o = g * (out_channels / groups) + j`` of group ``g`` is
    computed from ``weight[g*in_g:(g+1)*in_g, j]`` with ``in_g = in_channels /
    groups``.

    ``order='layer_bn'`` (BN after the transposed convolution) scales the
    weight along those output channels and is exact for any stride, padding,
    output padding, dilation and groups. ``order='bn_layer'`` (BN before it)
    scales along axis 0 (the input channels) and adds ``shift`` times the
    kernel sums to the bias, which assumes that every output position
    receives every kernel tap from an input position. That holds, and the fold
    is exact, when in every spatial dimension the stride is 1 and the output
    is cropped by at least ``dilation * (kernel - 1)`` on both sides: begin
    padding ``>= dilation * (kernel - 1)`` and end padding ``>= dilation *
    (kernel - 1) + output_padding`` (a 1x1 kernel with stride 1 and no output
    padding always qualifies), or when ``shift`` is 0. Otherwise the border
    positions (and with stride > 1, positions between input samples, and
    positions added by output padding) see fewer taps than the folded bias
    assumes.

    Parameters
    ----------
    weight : array_like
        The ConvTranspose weight: a floating-point array of shape
        ``(in_channels, out_channels / groups, *kernel)`` (PyTorch's and
        ONNX's ConvTranspose layout, any number of spatial dims). Not a Conv
        weight.
    bias : array_like or None
        Shape ``(out_channels,)`` with ``out_channels = groups *
        weight.shape[1]``; None means zeros.
    scale, shift : array_like
        The batch norm's per-channel coefficients (`fold_batch_norm`): length
        out_channels for 'layer_bn', in_channels (``weight.shape[0]``) for
        'bn_layer'.
    groups : int, default 1
        The transposed convolution's groups: a positive divisor of
        in_channels.
    order : {'layer_bn', 'bn_layer'}, default 'layer_bn'
        Whether the batch norm follows the transposed convolution or precedes
        it.
    layout : {'IO'}, default 'IO'
        States the weight layout at the call site: the order of its first two
        axes, as in the kernel layouts ``IOHW`` (ConvTranspose) and ``OIHW``
        (Conv). Only 'IO' is accepted; 'OI' raises an error that names
        `fold_into_conv`.

    Returns
    -------
    weight, bias : numpy.ndarray
        The folded transposed convolution (same layout), in weight's dtype
        (computed in float64).

    Raises
    ------
    TypeError
        If ``weight`` or a vector is not floating point.
    ValueError
        If ``weight`` has fewer than 3 dims, ``groups`` does not divide
        in_channels, a length does not match, ``order`` is not one of the
        two, or ``layout`` is not 'IO'.

    See Also
    --------
    fold_into_conv : the same for a Conv weight ``(out_channels, in_channels /
        groups, *kernel)``.

    Examples
    --------
    >>> W = np.ones((1, 2, 3))  # 1 input channel, 2 output channels, kernel 3
    >>> Wf, bf = bncore.fold_into_conv_transpose(W, None, np.array([2.0, 0.5]),
    ...                                          np.array([1.0, 0.0]))
    >>> Wf[0], bf
    (array([[2. , 2. , 2. ],
           [0.5, 0.5, 0.5]]), array([1., 0.]))
    """
    chk.weight_layout(layout, "IO")
    W = chk.layer_weight(weight, 3, f"a ConvTranspose weight {_CONV_T_WEIGHT} with ndim >= 3 "
                         f"(for a Conv weight {_CONV_WEIGHT} call fold_into_conv)")
    groups = chk.divisor(groups, W.shape[0], "groups",
                         "in_channels (axis 0 of the ConvTranspose weight)")
    cin, cout_g = W.shape[0], W.shape[1]
    cin_g, cout = cin // groups, groups * cout_g
    s, t, b = _fold_args(W, bias, scale, shift, order, cout, cin, C_bias=cout,
                         layout_hint=f"the other order's channel count: is the batch norm on "
                         f"the other side, or is this a Conv weight {_CONV_WEIGHT}, for "
                         f"fold_into_conv?")
    W64 = W.astype(np.float64)
    tail = (1,) * (W.ndim - 2)
    if order == "layer_bn":
        # weight[i, j] (i in group g = i // cin_g) feeds output channel g * cout_g + j
        per_row = np.repeat(s.reshape(groups, cout_g), cin_g, axis=0)  # (cin, cout_g)
        Wf, bf = W64 * per_row.reshape(W.shape[:2] + tail), b * s + t
    else:  # input channel i scaled; its shift reaches each output through the kernel sum
        Wf = W64 * s.reshape((-1, 1) + tail)
        ksum = W64.reshape(cin, cout_g, -1).sum(2)
        bf = b + (t[:, None] * ksum).reshape(groups, cin_g, cout_g).sum(1).reshape(cout)
    return Wf.astype(W.dtype), bf.astype(W.dtype)
