"""Layer, group and instance normalization with PyTorch's semantics: the operations.

Each op comes as a functional form returning the output (`layer_norm`,
`group_norm`, `instance_norm`), a training form that also returns the saved
statistics (`*_train -> (y, mean, invstd)`) and the gradient of that form
(`*_backward -> (dx, dweight, dbias)`); the layers are in bncore.layers.

They run on row kernels (include/bncore_norms_template.h) built from the
batch norm kernels' run loops: statistics per row -- a layer-norm row, or an
(n, group) of C/G*H*W elements -- with the same shifted sums in double, then
the affine map while the row is still in cache; rows too long for that are
split across threads through bn_stats / bn_apply on the (1, rows, length)
view. Instance norm is group norm with one channel per group.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from . import _checks as chk
from . import _kernels as _k
from ._typing import Array, ArrayLike, FloatArray
from .functional import _masked_moments, _update_present, batch_norm_eval, update_running

__all__ = [
    "layer_norm", "layer_norm_train", "layer_norm_backward",
    "group_norm", "group_norm_train", "group_norm_backward",
    "instance_norm", "instance_norm_train", "instance_norm_backward",
]


def _saved_as(a, sd, shape):
    """Saved statistics in their dtype: an invstd beyond float32's range (a
    spread below FLT_MIN with eps = 0) saturates to inf there, as batch
    norm's does; the output itself was computed in double."""
    with np.errstate(over="ignore"):
        return a.astype(sd, copy=False).reshape(shape)


# ---- layer norm ------------------------------------------------------------------------

def layer_norm_train(x: ArrayLike, normalized_shape: int | tuple[int, ...],
                     weight: ArrayLike | None = None, bias: ArrayLike | None = None,
                     eps: float = 1e-5, *, out: Array | None = None,
                     n_threads: int | None = None) -> tuple[Array, FloatArray, FloatArray]:
    """Layer normalization over the trailing dims ``normalized_shape``, with
    its statistics.

    As ``torch.nn.functional.layer_norm`` (and ``torch.native_layer_norm``
    for the statistics): each row of ``prod(normalized_shape)`` trailing
    values is normalized with its own mean and biased variance,
    ``y = (x - mean) * invstd * weight + bias``.

    Parameters
    ----------
    x : array_like
        Input of dtype float16, float32 or float64 with ``ndim >= 1``.
        float16 is computed in float32 and returned as float16.
    normalized_shape : int or tuple of int
        The trailing dims of x to normalize over.
    weight, bias : array_like, optional
        Elementwise scale and shift of shape ``normalized_shape`` (None means
        1 and 0).
    eps : float, default 1e-5
        Finite, ``>= 0``; added to the variance inside the square root
        (``eps=0`` with a zero variance gives invstd 0).
    out : numpy.ndarray, optional
        Writable array of x's shape and dtype that receives ``y``.
    n_threads : int, optional
        The most threads to use. None uses `get_num_threads` at
        the time of the call.

    Returns
    -------
    y : numpy.ndarray
        x's shape and dtype (``out`` when given).
    mean, invstd : numpy.ndarray
        Shape ``x.shape[:-k] + (1,) * k`` with ``k = len(normalized_shape)``;
        float64 for float64 input, float32 otherwise. Rows of no elements get
        mean 0 and invstd NaN, as in PyTorch.

    Raises
    ------
    TypeError
        If x, a parameter or ``out`` has an unsupported type or dtype, or
        ``normalized_shape`` is not an int or a tuple of ints.
    ValueError
        If ``normalized_shape`` does not match x's trailing dims, a shape does
        not match, or ``eps`` or ``n_threads`` is out of range.

    Examples
    --------
    >>> x = np.array([[1.0, 3.0], [2.0, 6.0]])
    >>> y, mean, invstd = bncore.layer_norm_train(x, 2, eps=0.0)
    >>> y
    array([[-1.,  1.],
           [-1.,  1.]])
    >>> mean, invstd
    (array([[2.],
           [4.]]), array([[1. ],
           [0.5]]))
    """
    x = chk.tensor(x, "x", 1)
    ns = chk.normalized_shape(normalized_shape, x)
    w = chk.param(weight, ns, "weight", flat=True)
    b = chk.param(bias, ns, "bias", flat=True)
    eps = chk.real(eps, "eps", 0.0)
    nt = chk.threads(n_threads)
    cd, sd = chk.compute_dtype(x.dtype), chk.stat_dtype(x.dtype)
    lead = x.shape[:x.ndim - len(ns)]
    rows, cols = math.prod(lead), math.prod(ns)
    buf, final = chk.output(out, x, cd, (x,))
    mean, invstd = np.empty(rows), np.empty(rows)
    if rows and cols:
        _k.layer_norm(chk.contiguous(x, cd).reshape(-1), buf.reshape(-1), rows, cols, w, b,
                      eps, mean, invstd, nt)
    else:  # as torch: mean 0 and invstd nan over no elements
        mean[:], invstd[:] = 0.0, np.nan
    stat_shape = lead + (1,) * len(ns)
    return (chk.finish(buf, final, x.dtype), _saved_as(mean, sd, stat_shape),
            _saved_as(invstd, sd, stat_shape))


def layer_norm(x: ArrayLike, normalized_shape: int | tuple[int, ...],
               weight: ArrayLike | None = None, bias: ArrayLike | None = None,
               eps: float = 1e-5, *, out: Array | None = None,
               n_threads: int | None = None) -> Array:
    """Layer normalization, as ``torch.nn.functional.layer_norm``: the output only.

    `layer_norm_train` without the statistics.

    Parameters
    ----------
    x : array_like
        Input of dtype float16, float32 or float64 with ``ndim >= 1``.
        float16 is computed in float32 and returned as float16.
    normalized_shape : int or tuple of int
        The trailing dims of x to normalize over.
    weight, bias : array_like, optional
        Elementwise scale and shift of shape ``normalized_shape``.
    eps : float, default 1e-5
        Finite, ``>= 0``; added to the variance inside the square root.
    out : numpy.ndarray, optional
        Writable array of x's shape and dtype that receives ``y``.
    n_threads : int, optional
        The most threads to use. None uses `get_num_threads` at
        the time of the call.

    Returns
    -------
    numpy.ndarray
        ``y``, x's shape and dtype (``out`` when given).

    Raises
    ------
    TypeError
        If x, a parameter or ``out`` has an unsupported type or dtype.
    ValueError
        If a shape does not match, or ``eps`` or ``n_threads`` is out of range.

    Examples
    --------
    >>> x = np.array([[1.0, 2.0, 3.0, 6.0]], dtype=np.float32)
    >>> np.round(bncore.layer_norm(x, (4,), bias=np.full(4, 10.0)), 3)
    array([[ 8.931,  9.465, 10.   , 11.604]], dtype=float32)
    """
    return layer_norm_train(x, normalized_shape, weight, bias, eps, out=out,
                            n_threads=n_threads)[0]


def layer_norm_backward(dy: ArrayLike, x: ArrayLike, normalized_shape: int | tuple[int, ...],
                        mean: ArrayLike, invstd: ArrayLike, weight: ArrayLike | None = None,
                        *, out: Array | None = None, n_threads: int | None = None
                        ) -> tuple[Array, FloatArray, FloatArray]:
    """Gradient of `layer_norm_train`: (dx, dweight, dbias).

    With ``g = dy * weight`` and ``xhat = (x - mean) * invstd`` per row,
    ``dx = invstd * (g - mean(g) - xhat * mean(g * xhat))``,
    ``dweight = sum(dy * xhat)`` and ``dbias = sum(dy)`` over the rows.

    Parameters
    ----------
    dy : array_like
        Gradient of the output: x's shape and dtype.
    x : array_like
        The forward's input, dtype float16, float32 or float64.
    normalized_shape : int or tuple of int
        The forward's ``normalized_shape``.
    mean, invstd : array_like
        The forward's statistics: one value per row, any shape.
    weight : array_like, optional
        The forward's elementwise scale (None means 1).
    out : numpy.ndarray, optional
        Writable array of x's shape and dtype that receives ``dx``; may be
        ``dy`` (in place).
    n_threads : int, optional
        The most threads to use. None uses `get_num_threads` at
        the time of the call.

    Returns
    -------
    dx : numpy.ndarray
        x's shape and dtype (``out`` when given).
    dweight, dbias : numpy.ndarray
        Shape ``normalized_shape``, returned even when ``weight`` is None;
        float64 for float64 input, float32 otherwise.

    Raises
    ------
    TypeError
        If an array has an unsupported type or dtype, or ``dy`` differs from
        x's dtype.
    ValueError
        If a shape or the number of saved statistics does not match, or
        ``n_threads`` is invalid.

    Examples
    --------
    >>> x = np.array([[1.0, 3.0], [2.0, 6.0]])
    >>> y, mean, invstd = bncore.layer_norm_train(x, 2)
    >>> dx, dweight, dbias = bncore.layer_norm_backward(np.ones_like(x), x, 2, mean, invstd)
    >>> dx, np.round(dweight, 4), dbias
    (array([[0., 0.],
           [0., 0.]]), array([-2.,  2.]), array([2., 2.]))
    """
    x = chk.tensor(x, "x", 1)
    dy = chk.like(dy, x, "dy")
    ns = chk.normalized_shape(normalized_shape, x)
    rows, cols = math.prod(x.shape[:x.ndim - len(ns)]), math.prod(ns)
    m = chk.saved(mean, rows, "mean")
    inv = chk.saved(invstd, rows, "invstd")
    w = chk.param(weight, ns, "weight", flat=True)
    nt = chk.threads(n_threads)
    cd, sd = chk.compute_dtype(x.dtype), chk.stat_dtype(x.dtype)
    buf, final = chk.output(out, x, cd, (x, dy))
    dw, db = np.zeros(cols), np.zeros(cols)
    if rows and cols:
        _k.layer_norm_backward(chk.contiguous(dy, cd).reshape(-1),
                               chk.contiguous(x, cd).reshape(-1), buf.reshape(-1), rows, cols,
                               m, inv, w, dw, db, nt)
    return (chk.finish(buf, final, x.dtype), dw.astype(sd, copy=False).reshape(ns),
            db.astype(sd, copy=False).reshape(ns))


# ---- group and instance norm -------------------------------------------------------------

class _Groups:
    """x (N, C, *) checked and viewed as N*G groups of C/G channels x HW elements."""

    def __init__(self, x, num_groups, name="x"):
        self.x = chk.tensor(x, name)
        self.N, self.C = self.x.shape[:2]
        self.G = chk.groups(num_groups, self.x)
        self.HW = math.prod(self.x.shape[2:])
        self.count = self.C // self.G * self.HW  # elements per group
        self.shape = (self.N, self.C, self.HW, self.G)
        self.cd = chk.compute_dtype(self.x.dtype)
        self.sd = chk.stat_dtype(self.x.dtype)

    def flat(self, a):
        return chk.contiguous(a, self.cd).reshape(-1)


def _group_forward(L: _Groups, weight: Any, bias: Any, eps: Any, out: Any, n_threads: Any
                   ) -> tuple[Any, Any, Any]:
    """(y, mean, invstd) with mean/invstd flat float64 per (n, group)."""
    w = chk.vector(weight, L.C, "weight")
    b = chk.vector(bias, L.C, "bias")
    eps = chk.real(eps, "eps", 0.0)
    nt = chk.threads(n_threads)
    buf, final = chk.output(out, L.x, L.cd, (L.x,))
    mean, invstd = np.empty(L.N * L.G), np.empty(L.N * L.G)
    if L.x.size:
        _k.group_norm(L.flat(L.x), buf.reshape(-1), L.shape, w, b, eps, mean, invstd, nt)
    else:
        mean[:], invstd[:] = 0.0, np.nan
    return chk.finish(buf, final, L.x.dtype), mean, invstd


def _group_backward(L: _Groups, dy: Any, mean: Any, invstd: Any, weight: Any, out: Any,
                    n_threads: Any) -> tuple[Any, Any, Any]:
    dy = chk.like(dy, L.x, "dy")
    m = chk.saved(mean, L.N * L.G, "mean")
    inv = chk.saved(invstd, L.N * L.G, "invstd")
    w = chk.vector(weight, L.C, "weight")
    nt = chk.threads(n_threads)
    buf, final = chk.output(out, L.x, L.cd, (L.x, dy))
    dw, db = np.zeros(L.C), np.zeros(L.C)
    if L.x.size:
        _k.group_norm_backward(L.flat(dy), L.flat(L.x), buf.reshape(-1), L.shape, m, inv, w, dw,
                               db, nt)
    return (chk.finish(buf, final, L.x.dtype), dw.astype(L.sd, copy=False),
            db.astype(L.sd, copy=False))


def group_norm_train(x: ArrayLike, num_groups: int, weight: ArrayLike | None = None,
                     bias: ArrayLike | None = None, eps: float = 1e-5, *,
                     out: Array | None = None, n_threads: int | None = None,
                     mask: ArrayLike | None = None, lengths: ArrayLike | None = None
                     ) -> tuple[Array, FloatArray, FloatArray]:
    """Group normalization of x (N, C, \\*), with its statistics.

    As ``torch.nn.functional.group_norm``: the C channels of each sample are
    split into ``num_groups`` groups of consecutive channels, each normalized
    with its own mean and biased variance over its channels and spatial
    positions; then ``weight`` and ``bias`` apply per channel.

    Parameters
    ----------
    x : array_like
        Input of shape (N, C, ...), dtype float16, float32 or float64.
        float16 is computed in float32 and returned as float16.
    num_groups : int
        A positive divisor of C.
    weight, bias : array_like, optional
        Per-channel scale and shift of length C (None means 1 and 0).
    eps : float, default 1e-5
        Finite, ``>= 0``; added to the variance inside the square root
        (``eps=0`` with a zero variance gives invstd 0).
    out : numpy.ndarray, optional
        Writable array of x's shape and dtype that receives ``y``.
    n_threads : int, optional
        The most threads to use. None uses `get_num_threads` at
        the time of the call.
    mask : array_like of bool, optional
        True where a value counts, broadcastable to x (e.g. ``(N, 1, T)``):
        each group's statistics are taken over its unmasked values only
        (materialized as a uint8 array of x's shape). Padded entries get the
        same affine map; a group without unmasked values gets mean 0 and
        invstd 0 (output ``bias``).
    lengths : array_like of int, optional
        Instead of ``mask``, for (N, C, T) input: sample i counts at
        positions ``< lengths[i]`` of axis 2.

    Returns
    -------
    y : numpy.ndarray
        x's shape and dtype (``out`` when given).
    mean, invstd : numpy.ndarray
        Shape ``(N, num_groups)``; float64 for float64 input, float32
        otherwise.

    Raises
    ------
    TypeError
        If x, a parameter or ``out`` has an unsupported type or dtype.
    ValueError
        If ``num_groups`` does not divide C, a shape does not match, or
        ``eps`` or ``n_threads`` is out of range.

    Examples
    --------
    >>> x = np.array([[[1.0, 3.0], [5.0, 7.0], [0.0, 0.0], [2.0, 2.0]]])  # (1, 4, 2)
    >>> y, mean, invstd = bncore.group_norm_train(x, 2, eps=0.0)
    >>> mean, invstd
    (array([[4., 1.]]), array([[0.4472136, 1.       ]]))
    >>> y[0, 2:]
    array([[-1., -1.],
           [ 1.,  1.]])
    """
    L = _Groups(x, num_groups)
    if mask is not None or lengths is not None:
        y, mean, invstd = _masked_group_forward(L, weight, bias, eps, out, n_threads, mask,
                                                lengths, "group")[:3]
    else:
        y, mean, invstd = _group_forward(L, weight, bias, eps, out, n_threads)
    return y, _saved_as(mean, L.sd, (L.N, L.G)), _saved_as(invstd, L.sd, (L.N, L.G))


def group_norm(x: ArrayLike, num_groups: int, weight: ArrayLike | None = None,
               bias: ArrayLike | None = None, eps: float = 1e-5, *, out: Array | None = None,
               n_threads: int | None = None, mask: ArrayLike | None = None,
               lengths: ArrayLike | None = None) -> Array:
    """Group normalization, as ``torch.nn.functional.group_norm``: the output only.

    `group_norm_train` without the statistics.

    Parameters
    ----------
    x : array_like
        Input of shape (N, C, ...), dtype float16, float32 or float64.
    num_groups : int
        A positive divisor of C.
    weight, bias : array_like, optional
        Per-channel scale and shift of length C (None means 1 and 0).
    eps : float, default 1e-5
        Finite, ``>= 0``; added to the variance inside the square root
        (``eps=0`` with a zero variance gives invstd 0).
    out : numpy.ndarray, optional
        Writable array of x's shape and dtype that receives ``y``.
    n_threads : int, optional
        The most threads to use. None uses `get_num_threads` at
        the time of the call.
    mask : array_like of bool, optional
        True where a value counts, broadcastable to x (e.g. ``(N, 1, T)``):
        each group's statistics are taken over its unmasked values only
        (materialized as a uint8 array of x's shape). Padded entries get the
        same affine map; a group without unmasked values gets mean 0 and
        invstd 0 (output ``bias``).
    lengths : array_like of int, optional
        Instead of ``mask``, for (N, C, T) input: sample i counts at
        positions ``< lengths[i]`` of axis 2.

    Returns
    -------
    numpy.ndarray
        ``y``, x's shape and dtype (``out`` when given).

    Raises
    ------
    TypeError
        If x, a parameter or ``out`` has an unsupported type or dtype.
    ValueError
        If ``num_groups`` does not divide C, a shape does not match, or
        ``eps`` or ``n_threads`` is out of range.

    Examples
    --------
    >>> x = np.arange(8.0).reshape(1, 4, 2)
    >>> np.round(bncore.group_norm(x, 2).reshape(2, 4), 4)
    array([[-1.3416, -0.4472,  0.4472,  1.3416],
           [-1.3416, -0.4472,  0.4472,  1.3416]])
    """
    return group_norm_train(x, num_groups, weight, bias, eps, out=out, n_threads=n_threads,
                            mask=mask, lengths=lengths)[0]


def group_norm_backward(dy: ArrayLike, x: ArrayLike, num_groups: int, mean: ArrayLike,
                        invstd: ArrayLike, weight: ArrayLike | None = None, *,
                        out: Array | None = None, n_threads: int | None = None,
                        mask: ArrayLike | None = None, lengths: ArrayLike | None = None
                        ) -> tuple[Array, FloatArray, FloatArray]:
    """Gradient of `group_norm_train`: (dx, dweight, dbias).

    Per group, with ``g = dy * weight`` and ``xhat = (x - mean) * invstd``:
    ``dx = invstd * (g - mean(g) - xhat * mean(g * xhat))``; per channel
    ``dweight = sum(dy * xhat)`` and ``dbias = sum(dy)``.

    Parameters
    ----------
    dy : array_like
        Gradient of the output: x's shape and dtype.
    x : array_like
        The forward's input, shape (N, C, ...).
    num_groups : int
        The forward's ``num_groups``.
    mean, invstd : array_like
        The forward's statistics: N * num_groups values, any shape.
    weight : array_like, optional
        The forward's per-channel scale (None means 1).
    out : numpy.ndarray, optional
        Writable array of x's shape and dtype that receives ``dx``; may be
        ``dy`` (in place).
    n_threads : int, optional
        The most threads to use. None uses `get_num_threads` at
        the time of the call.
    mask : array_like of bool, optional
        The forward's mask: sums over the unmasked values only, ``dx`` 0 at
        padded entries.
    lengths : array_like of int, optional
        The forward's lengths, instead of ``mask``.

    Returns
    -------
    dx : numpy.ndarray
        x's shape and dtype (``out`` when given).
    dweight, dbias : numpy.ndarray
        Shape ``(C,)``; float64 for float64 input, float32 otherwise.

    Raises
    ------
    TypeError
        If an array has an unsupported type or dtype, or ``dy`` differs from
        x's dtype.
    ValueError
        If ``num_groups`` does not divide C, a shape or the number of saved
        statistics does not match, or ``n_threads`` is invalid.

    Examples
    --------
    >>> x = np.arange(8.0).reshape(1, 4, 2)
    >>> y, mean, invstd = bncore.group_norm_train(x, 2)
    >>> dx, dweight, dbias = bncore.group_norm_backward(np.ones_like(x), x, 2, mean, invstd)
    >>> np.allclose(dx, 0), dbias
    (True, array([2., 2., 2., 2.]))
    """
    L = _Groups(x, num_groups)
    if mask is not None or lengths is not None:
        return _masked_group_backward(L, dy, mean, invstd, weight, out, n_threads, mask,
                                      lengths)
    return _group_backward(L, dy, mean, invstd, weight, out, n_threads)


def _instances(x: Any) -> _Groups:
    """x (N, C, *) as N*C groups of one channel."""
    x = chk.tensor(x, "x")
    L = _Groups(x, max(x.shape[1], 1))
    if L.C == 0:  # no channels: no groups (not one), so the statistics are (N, 0)
        L.G, L.shape = 0, (L.N, 0, L.HW, 0)
    return L


def instance_norm_train(x: ArrayLike, weight: ArrayLike | None = None,
                        bias: ArrayLike | None = None, *, eps: float = 1e-5,
                        running_mean: Array | None = None, running_var: Array | None = None,
                        momentum: float = 0.1, out: Array | None = None,
                        n_threads: int | None = None, mask: ArrayLike | None = None,
                        lengths: ArrayLike | None = None
                        ) -> tuple[Array, FloatArray, FloatArray]:
    """Instance normalization of x (N, C, \\*) with each instance's statistics.

    Each (sample, channel) is normalized over its spatial positions. Running
    statistics, when given, are updated in place as PyTorch does: with the
    average over the batch of each instance's mean and unbiased variance.

    Parameters
    ----------
    x : array_like
        Input of shape (N, C, ...) with more than one spatial element per
        channel, dtype float16, float32 or float64. float16 is computed in
        float32 and returned as float16.
    weight, bias : array_like, optional
        Per-channel scale and shift of length C (None means 1 and 0).
    eps : float, default 1e-5
        Finite, ``>= 0``; added to the variance inside the square root
        (``eps=0`` with a zero variance gives invstd 0).
    running_mean, running_var : numpy.ndarray, optional
        Writable floating-point arrays of shape ``(C,)``, both or neither,
        updated in place (x then needs at least one sample).
    momentum : float, default 0.1
        In ``[0, 1]``: the weight of the batch in the running update.
    out : numpy.ndarray, optional
        Writable array of x's shape and dtype that receives ``y``; it must
        not overlap the running statistics.
    n_threads : int, optional
        The most threads to use. None uses `get_num_threads` at
        the time of the call.
    mask : array_like of bool, optional
        True where a value counts, broadcastable to x (e.g. ``(N, 1, T)``):
        each instance's statistics are taken over its unmasked values only
        (materialized as a uint8 array of x's shape). Padded entries get the
        same affine map; an instance without unmasked values gets mean 0 and
        invstd 0 (output ``bias``); one with a single value is refused.
    lengths : array_like of int, optional
        Instead of ``mask``, for (N, C, T) input: sample i counts at
        positions ``< lengths[i]`` of axis 2.

    Returns
    -------
    y : numpy.ndarray
        x's shape and dtype (``out`` when given).
    mean, invstd : numpy.ndarray
        Shape ``(N, C)``; float64 for float64 input, float32 otherwise.

    Raises
    ------
    TypeError
        If x, a parameter, a running statistic or ``out`` has an unsupported
        type or dtype.
    ValueError
        If a shape does not match, a channel has one spatial element, the
        running statistics are given for an empty batch, or ``eps``,
        ``momentum`` or ``n_threads`` is out of range.

    Examples
    --------
    >>> x = np.array([[[1.0, 3.0], [2.0, 6.0]]])  # (N=1, C=2, L=2)
    >>> rm, rv = np.zeros(2), np.ones(2)
    >>> y, mean, invstd = bncore.instance_norm_train(x, eps=0.0, running_mean=rm,
    ...                                              running_var=rv)
    >>> y
    array([[[-1.,  1.],
            [-1.,  1.]]])
    >>> mean, rm, rv
    (array([[2., 4.]]), array([0.2, 0.4]), array([1.1, 1.7]))
    """
    L = _instances(x)
    chk.running(running_mean, running_var, L.C)
    momentum = chk.real(momentum, "momentum", 0.0, 1.0)
    if mask is not None or lengths is not None:
        return _masked_instance_train(L, weight, bias, eps, running_mean, running_var,
                                      momentum, out, n_threads, mask, lengths)
    if L.x.size:  # an empty batch is defined: empty output, running statistics untouched
        chk.spatial(L.x, 2, "when using the input's statistics")
    chk.disjoint_from_running(out, running_mean, running_var)
    if running_mean is not None and not L.x.size:
        y, mean, invstd = _group_forward(L, weight, bias, eps, out, n_threads)
        return y, _saved_as(mean, L.sd, (L.N, L.C)), _saved_as(invstd, L.sd, (L.N, L.C))
    if running_mean is not None:
        # each instance's exact variance (M2 / HW), not one rebuilt from invstd;
        # taken before the output is written, which may be x itself
        m, m2 = np.empty(L.N * L.C), np.empty(L.N * L.C)
        _k.stats(L.flat(L.x), (1, L.N * L.C, L.HW), m, m2, chk.threads(n_threads))
    y, mean, invstd = _group_forward(L, weight, bias, eps, out, n_threads)
    if running_mean is not None:
        update_running(running_mean, running_var, m.reshape(L.N, L.C),
                       (m2 / L.HW).reshape(L.N, L.C), L.HW, momentum)
    return y, _saved_as(mean, L.sd, (L.N, L.C)), _saved_as(invstd, L.sd, (L.N, L.C))


def instance_norm(x: ArrayLike, running_mean: Array | None = None,
                  running_var: Array | None = None, weight: ArrayLike | None = None,
                  bias: ArrayLike | None = None, use_input_stats: bool = True,
                  momentum: float = 0.1, eps: float = 1e-5, *, out: Array | None = None,
                  n_threads: int | None = None, mask: ArrayLike | None = None,
                  lengths: ArrayLike | None = None) -> Array:
    """Instance normalization, as ``torch.nn.functional.instance_norm``.

    Normalizes with each instance's statistics (``use_input_stats=True``,
    updating the running statistics when given, see `instance_norm_train`)
    or with the running statistics (``use_input_stats=False``, see
    `batch_norm_eval`).

    Parameters
    ----------
    x : array_like
        Input of shape (N, C, ...), dtype float16, float32 or float64.
    running_mean, running_var : numpy.ndarray, optional
        Per-channel running statistics of shape ``(C,)``: updated in place
        with ``use_input_stats=True``, required and used with False.
    weight, bias : array_like, optional
        Per-channel scale and shift of length C (None means 1 and 0).
    use_input_stats : bool, default True
        Whether to normalize with each instance's statistics.
    momentum : float, default 0.1
        In ``[0, 1]``: the weight of the batch in the running update.
    eps : float, default 1e-5
        Finite, ``>= 0``; added to the variance inside the square root.
    out : numpy.ndarray, optional
        Writable array of x's shape and dtype that receives ``y``.
    n_threads : int, optional
        The most threads to use. None uses `get_num_threads` at
        the time of the call.
    mask : array_like of bool, optional
        True where a value counts, broadcastable to x (e.g. ``(N, 1, T)``):
        each instance's statistics are taken over its unmasked values only
        (materialized as a uint8 array of x's shape). Padded entries get the
        same affine map; an instance without unmasked values gets mean 0 and
        invstd 0 (output ``bias``); one with a single value is refused.
    lengths : array_like of int, optional
        Instead of ``mask``, for (N, C, T) input: sample i counts at
        positions ``< lengths[i]`` of axis 2.

    Returns
    -------
    numpy.ndarray
        ``y``, x's shape and dtype (``out`` when given).

    Raises
    ------
    TypeError
        If an array has an unsupported type or dtype.
    ValueError
        If the running statistics are missing with ``use_input_stats=False``,
        or as `instance_norm_train` and `batch_norm_eval`.

    Examples
    --------
    >>> x = np.array([[[1.0, 3.0], [2.0, 6.0]]])
    >>> np.round(bncore.instance_norm(x), 4)
    array([[[-1.,  1.],
            [-1.,  1.]]])
    >>> bncore.instance_norm(x, np.array([1.0, 2.0]), np.array([1.0, 4.0]),
    ...                      use_input_stats=False, eps=0.0)
    array([[[0., 2.],
            [0., 2.]]])
    """
    if use_input_stats:
        return instance_norm_train(x, weight, bias, eps=eps, running_mean=running_mean,
                                   running_var=running_var, momentum=momentum, out=out,
                                   n_threads=n_threads, mask=mask, lengths=lengths)[0]
    if mask is not None or lengths is not None:  # checked: the output does not depend on it
        chk.padding(mask, lengths, chk.tensor(x), 1)
    chk.required(running_mean, "running_mean", "required when use_input_stats is False")
    chk.required(running_var, "running_var", "required when use_input_stats is False")
    # both are arrays here: chk.required refused None
    return batch_norm_eval(x, running_mean, running_var, weight, bias, axis=1,  # type: ignore[arg-type]
                           eps=eps, out=out, n_threads=n_threads)


def instance_norm_backward(dy: ArrayLike, x: ArrayLike, mean: ArrayLike, invstd: ArrayLike,
                           weight: ArrayLike | None = None, *, out: Array | None = None,
                           n_threads: int | None = None, mask: ArrayLike | None = None,
                           lengths: ArrayLike | None = None
                           ) -> tuple[Array, FloatArray, FloatArray]:
    """Gradient of `instance_norm_train`: (dx, dweight, dbias).

    For ``use_input_stats=False`` use ``batch_norm_backward(...,
    training=False)``.

    Parameters
    ----------
    dy : array_like
        Gradient of the output: x's shape and dtype.
    x : array_like
        The forward's input, shape (N, C, ...).
    mean, invstd : array_like
        The forward's statistics: N * C values, any shape.
    weight : array_like, optional
        The forward's per-channel scale (None means 1).
    out : numpy.ndarray, optional
        Writable array of x's shape and dtype that receives ``dx``; may be
        ``dy`` (in place).
    n_threads : int, optional
        The most threads to use. None uses `get_num_threads` at
        the time of the call.
    mask : array_like of bool, optional
        The forward's mask: sums over the unmasked values only, ``dx`` 0 at
        padded entries.
    lengths : array_like of int, optional
        The forward's lengths, instead of ``mask``.

    Returns
    -------
    dx : numpy.ndarray
        x's shape and dtype (``out`` when given).
    dweight, dbias : numpy.ndarray
        Shape ``(C,)``; float64 for float64 input, float32 otherwise.

    Raises
    ------
    TypeError
        If an array has an unsupported type or dtype, or ``dy`` differs from
        x's dtype.
    ValueError
        If a shape or the number of saved statistics does not match, or
        ``n_threads`` is invalid.

    Examples
    --------
    >>> x = np.array([[[1.0, 3.0], [2.0, 6.0]]])
    >>> y, mean, invstd = bncore.instance_norm_train(x)
    >>> dx, dweight, dbias = bncore.instance_norm_backward(y, x, mean, invstd)
    >>> np.allclose(dx, 0, atol=1e-4), np.round(dweight, 4), dbias
    (True, array([2., 2.]), array([0., 0.]))
    """
    L = _instances(x)
    if mask is not None or lengths is not None:
        return _masked_group_backward(L, dy, mean, invstd, weight, out, n_threads, mask,
                                      lengths)
    return _group_backward(L, dy, mean, invstd, weight, out, n_threads)


# ---- masks and padded sequences: per-sample statistics over the unmasked values ---------

def _masked_group_forward(L: _Groups, weight: Any, bias: Any, eps: Any, out: Any,
                          n_threads: Any, mask: Any, lengths: Any, what: str) -> Any:
    """(y, mean, invstd, count, var), flat per (n, group): bn_masked_stats on the
    (1, N*G, C/G*HW) view (groups are contiguous), then the per-(n, c) affine
    map through the one per-channel entry (elemt) on the (1, N*C, HW) view.
    Padded entries get the same affine map (see batch_norm_train); a group
    without unmasked values has mean 0 and invstd 0 (output = bias)."""
    w = chk.vector(weight, L.C, "weight")
    b = chk.vector(bias, L.C, "bias")
    eps = chk.real(eps, "eps", 0.0)
    nt = chk.n_threads(n_threads)
    m8 = chk.padding(mask, lengths, L.x, 1)
    buf, final = chk.output(out, L.x, L.cd, (L.x,))
    N, C, G, HW = L.N, L.C, L.G, L.HW
    cg = C // G if G else 0
    xc = chk.contiguous(L.x, L.cd)
    count, mean, m2 = _masked_moments(xc, m8, (1, N * G, cg * HW), chk.threads(nt))
    if what == "instance":  # as unmasked instance norm refuses one spatial value
        chk.masked_counts(count.reshape(N, G), what)
    empty = count == 0
    var = np.divide(m2, count, out=np.zeros_like(m2), where=~empty)
    invstd = np.where(empty, 0.0, _k.invstd(var, eps))
    _group_apply(L, xc, buf, mean, invstd, w, b, nt)
    return chk.finish(buf, final, L.x.dtype), mean, invstd, count, var


def _group_apply(L: _Groups, xc: Any, buf: Any, mean: Any, invstd: Any, w: Any, b: Any,
                 nt: Any) -> None:
    """y = (x - mean[n, g]) * invstd[n, g] * w[c] + b[c] into buf (compute dtype)."""
    N, C, G, HW = L.N, L.C, L.G, L.HW
    if buf.size:
        cg = C // G
        center = np.repeat(mean.reshape(N, G), cg, axis=1).reshape(-1)
        scale = np.repeat(invstd.reshape(N, G), cg, axis=1) * (1.0 if w is None else w)
        shift = np.tile(np.zeros(C) if b is None else b, N)
        r = _k.elemt(xc.reshape(1, N * C, HW), center, scale.reshape(-1), None, shift, 1,
                     buf.reshape(1, N * C, HW), None, nt)
        assert r is not None, "canonical arguments"


def _masked_group_backward(L: _Groups, dy: Any, mean: Any, invstd: Any, weight: Any, out: Any,
                           n_threads: Any, mask: Any, lengths: Any) -> Any:
    """Group/instance norm backward over the unmasked values: per-(n, c) sums by
    bn_masked_backward_reduce on the (1, N*C, HW) view, combined per group
    with each group's count; dx by bn_backward_apply, 0 at padded entries."""
    dy = chk.like(dy, L.x, "dy")
    m = chk.saved(mean, L.N * L.G, "mean")
    inv = chk.saved(invstd, L.N * L.G, "invstd")
    w = chk.vector(weight, L.C, "weight")
    nt = chk.threads(n_threads)
    m8 = chk.padding(mask, lengths, L.x, 1)
    buf, final = chk.output(out, L.x, L.cd, (L.x, dy))
    N, C, G, HW = L.N, L.C, L.G, L.HW
    if not buf.size:
        z = np.zeros(C, L.sd)
        return chk.finish(buf, final, L.x.dtype), z, z.copy()
    cg = C // G
    center = np.repeat(m.reshape(N, G), cg, axis=1).reshape(-1)
    invc = np.repeat(inv.reshape(N, G), cg, axis=1)
    wv = np.ones(C) if w is None else w
    count, sdy, sdx = np.empty(N * C), np.empty(N * C), np.empty(N * C)
    _k.masked_backward_reduce(L.flat(dy), L.flat(L.x), None, m8.reshape(-1), (1, N * C, HW),
                              center, 0, 0.0, sdy, sdx, count, nt)
    sdy, sdx = sdy.reshape(N, C), sdx.reshape(N, C)
    db = sdy.sum(axis=0)
    dw = (sdx * invc).sum(axis=0)
    sg = (wv * sdy).reshape(N, G, cg).sum(axis=2)
    sgx = (wv * sdx).reshape(N, G, cg).sum(axis=2)
    n = np.maximum(count.reshape(N, G, cg).sum(axis=2), 1.0)  # 0: every entry padded
    ig = inv.reshape(N, G)
    a = invc * wv
    cb = np.repeat(-ig ** 3 * sgx / n, cg, axis=1)
    cc = np.repeat(-ig * sg / n, cg, axis=1)
    _k.backward_apply(L.flat(dy), L.flat(L.x), None, buf.reshape(-1), (1, N * C, HW), center,
                      a.reshape(-1), cb.reshape(-1), cc.reshape(-1), 0, 0.0, nt)
    _k.masked_zero(buf.reshape(-1), m8.reshape(-1), nt)
    return (chk.finish(buf, final, L.x.dtype), dw.astype(L.sd, copy=False),
            db.astype(L.sd, copy=False))


def _masked_instance_train(L: _Groups, weight: Any, bias: Any, eps: Any, running_mean: Any,
                           running_var: Any, momentum: float, out: Any, n_threads: Any,
                           mask: Any, lengths: Any) -> Any:
    """instance_norm_train with a mask: each instance's statistics over its
    unmasked positions; the running statistics move toward each channel's
    average over the instances that have values (unbiased with each
    instance's own count), untouched for a channel without any."""
    chk.disjoint_from_running(out, running_mean, running_var)
    y, mean, invstd, count, var = _masked_group_forward(L, weight, bias, eps, out, n_threads,
                                                        mask, lengths, "instance")
    if running_mean is not None and L.N * L.C:
        _update_present(running_mean, running_var, mean.reshape(L.N, L.C),
                        var.reshape(L.N, L.C), count.reshape(L.N, L.C), momentum, True)
    return y, _saved_as(mean, L.sd, (L.N, L.C)), _saved_as(invstd, L.sd, (L.N, L.C))
