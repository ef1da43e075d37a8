"""Layer, group, instance and RMS normalization with PyTorch's semantics: the operations.

Each op comes as a functional form returning the output (`layer_norm`,
`group_norm`, `instance_norm`, `rms_norm`), a training form that also returns
the saved statistics (`*_train -> (y, mean, invstd)`; RMS norm `(y, invrms)`)
and the gradient of that form (`*_backward -> (dx, dweight, dbias)`; RMS norm
`(dx, dweight)`); the layers are in bncore.layers.

They run on row kernels (include/bncore_norms_template.h) built from the
batch norm kernels' run loops: statistics per row -- a layer-norm row, or an
(n, group) of C/G*H*W elements -- with the same shifted sums in double, then
the affine map while the row is still in cache; rows too long for that are
split across threads through bn_stats / bn_apply on the (1, rows, length)
view. Instance norm is group norm with one channel per group. Group and
instance norm take the channels on any axis after the samples (`axis`, the
rule of `_checks.Layout`): channels first runs on those row kernels, any
other layout on the channels-last kernels, in place, without a transposed
copy.
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
    "rms_norm", "rms_norm_train", "rms_norm_backward",
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
    """x checked and viewed per sample as (P, C, Q) around its channel axes
    (`_checks.Layout`; axis 0 is the samples), in N*G groups of C/G channels.
    P == 1 (channels first, NCHW) runs on the row kernels, the rest on the
    channels-last kernels as P rows of C*Q columns: no transposed copy."""

    def __init__(self, x, num_groups, axis=1, name="x"):
        L = chk.per_sample(chk.Layout(x, axis, name))
        self.x, self.axis, self.C = L.x, L.axis, L.C
        self.N = self.x.shape[0]
        self.P = math.prod(self.x.shape[1:L.first])
        self.Q = L.shape[2]
        self.HW = self.P * self.Q
        self.G = chk.groups(num_groups, self.x, self.C, L.axis)
        self.count = self.C // self.G * self.HW  # elements per group
        self.cd, self.sd = L.cd, L.sd

    @property
    def kernel_shape(self):
        """(N, C, HW, G) for the row kernels, (N, S, columns, G) for channels last."""
        if self.P == 1:
            return (self.N, self.C, self.Q, self.G)
        return (self.N, self.P, self.C * self.Q, self.G)

    def columns(self, v):
        """A per-channel parameter as the kernel's per-column one."""
        return v if v is None or self.P == 1 or self.Q == 1 else np.repeat(v, self.Q)

    def channels(self, v):
        """The kernel's per-column gradient summed back per channel."""
        return v if self.P == 1 or self.Q == 1 else v.reshape(self.C, self.Q).sum(axis=1)

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
        run = _k.group_norm if L.P == 1 else _k.group_norm_cl
        run(L.flat(L.x), buf.reshape(-1), L.kernel_shape, L.columns(w), L.columns(b), eps, mean,
            invstd, nt)
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
    cols = L.kernel_shape[1 if L.P == 1 else 2]
    dw, db = np.zeros(cols), np.zeros(cols)
    if L.x.size:
        run = _k.group_norm_backward if L.P == 1 else _k.group_norm_cl_backward
        run(L.flat(dy), L.flat(L.x), buf.reshape(-1), L.kernel_shape, m, inv, L.columns(w), dw,
            db, nt)
    return (chk.finish(buf, final, L.x.dtype), L.channels(dw).astype(L.sd, copy=False),
            L.channels(db).astype(L.sd, copy=False))


def group_norm_train(x: ArrayLike, num_groups: int, weight: ArrayLike | None = None,
                     bias: ArrayLike | None = None, eps: float = 1e-5, *,
                     axis: int | tuple[int, ...] = 1,
                     out: Array | None = None, n_threads: int | None = None,
                     mask: ArrayLike | None = None, lengths: ArrayLike | None = None
                     ) -> tuple[Array, FloatArray, FloatArray]:
    """Group normalization of x (N, C, \\*) or channels last, with its statistics.

    As ``torch.nn.functional.group_norm``: the C channels of each sample are
    split into ``num_groups`` groups of consecutive channels, each normalized
    with its own mean and biased variance over its channels and spatial
    positions; then ``weight`` and ``bias`` apply per channel. ``axis``
    places the channels anywhere after the samples (``axis=-1``: NHWC, NLC),
    read in place, without a transposed copy.

    Parameters
    ----------
    x : array_like
        Input of shape (N, C, ...) (or with the channels on ``axis``), dtype
        float16, float32 or float64. float16 is computed in float32 and
        returned as float16.
    num_groups : int
        A positive divisor of C.
    weight, bias : array_like, optional
        Per-channel scale and shift of length C (None means 1 and 0).
    eps : float, default 1e-5
        Finite, ``>= 0``; added to the variance inside the square root
        (``eps=0`` with a zero variance gives invstd 0).
    axis : int or tuple of int, default 1
        The channel axis (negative counts from the end; not 0, the samples):
        1 is channels first (N, C, ...), -1 channels last (N, ..., C). A
        tuple of adjacent axes, such as (-2, -1), makes their product (in C
        order) the channel dimension; per-channel arrays are then flat.
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
        If x, a parameter, ``axis`` or ``out`` has an unsupported type or
        dtype.
    ValueError
        If ``num_groups`` does not divide C, a shape does not match, ``axis``
        is out of range, includes 0 or names axes that are not adjacent, or
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

    Channels last, the same numbers:

    >>> y_last, mean_last, _ = bncore.group_norm_train(x.transpose(0, 2, 1), 2, eps=0.0,
    ...                                                axis=-1)
    >>> np.array_equal(y_last, y.transpose(0, 2, 1)), mean_last
    (True, array([[4., 1.]]))
    """
    L = _Groups(x, num_groups, axis)
    if mask is not None or lengths is not None:
        y, mean, invstd = _masked_group_forward(L, weight, bias, eps, out, n_threads, mask,
                                                lengths, "group")[:3]
    else:
        y, mean, invstd = _group_forward(L, weight, bias, eps, out, n_threads)
    return y, _saved_as(mean, L.sd, (L.N, L.G)), _saved_as(invstd, L.sd, (L.N, L.G))


def group_norm(x: ArrayLike, num_groups: int, weight: ArrayLike | None = None,
               bias: ArrayLike | None = None, eps: float = 1e-5, *,
               axis: int | tuple[int, ...] = 1, out: Array | None = None,
               n_threads: int | None = None, mask: ArrayLike | None = None,
               lengths: ArrayLike | None = None) -> Array:
    """Group normalization, as ``torch.nn.functional.group_norm``: the output only.

    `group_norm_train` without the statistics.

    Parameters
    ----------
    x : array_like
        Input of shape (N, C, ...) (or with the channels on ``axis``), dtype
        float16, float32 or float64.
    num_groups : int
        A positive divisor of C.
    weight, bias : array_like, optional
        Per-channel scale and shift of length C (None means 1 and 0).
    eps : float, default 1e-5
        Finite, ``>= 0``; added to the variance inside the square root
        (``eps=0`` with a zero variance gives invstd 0).
    axis : int or tuple of int, default 1
        The channel axis (negative counts from the end; not 0, the samples):
        1 is channels first (N, C, ...), -1 channels last (N, ..., C). A
        tuple of adjacent axes, such as (-2, -1), makes their product (in C
        order) the channel dimension; per-channel arrays are then flat.
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
        If x, a parameter, ``axis`` or ``out`` has an unsupported type or
        dtype.
    ValueError
        If ``num_groups`` does not divide C, a shape does not match, ``axis``
        is invalid (see `group_norm_train`), or ``eps`` or ``n_threads`` is
        out of range.

    Examples
    --------
    >>> x = np.arange(8.0).reshape(1, 4, 2)
    >>> np.round(bncore.group_norm(x, 2).reshape(2, 4), 4)
    array([[-1.3416, -0.4472,  0.4472,  1.3416],
           [-1.3416, -0.4472,  0.4472,  1.3416]])

    Groups as an axis of their own: x (N, L, G, C/G) with ``axis=(-2, -1)``

    >>> x4 = np.arange(16.0).reshape(1, 2, 4, 2)
    >>> y4 = bncore.group_norm(x4, 4, axis=(-2, -1))
    >>> np.allclose(y4.mean(axis=(1, 3)), 0)
    True
    """
    return group_norm_train(x, num_groups, weight, bias, eps, axis=axis, out=out,
                            n_threads=n_threads, mask=mask, lengths=lengths)[0]


def group_norm_backward(dy: ArrayLike, x: ArrayLike, num_groups: int, mean: ArrayLike,
                        invstd: ArrayLike, weight: ArrayLike | None = None, *,
                        axis: int | tuple[int, ...] = 1,
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
        The forward's input, shape (N, C, ...) (or with the channels on
        ``axis``).
    num_groups : int
        The forward's ``num_groups``.
    mean, invstd : array_like
        The forward's statistics: N * num_groups values, any shape.
    weight : array_like, optional
        The forward's per-channel scale (None means 1).
    axis : int or tuple of int, default 1
        The forward's channel axis.
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
        statistics does not match, ``axis`` is invalid, or ``n_threads`` is
        invalid.

    Examples
    --------
    >>> x = np.arange(8.0).reshape(1, 4, 2)
    >>> y, mean, invstd = bncore.group_norm_train(x, 2)
    >>> dx, dweight, dbias = bncore.group_norm_backward(np.ones_like(x), x, 2, mean, invstd)
    >>> np.allclose(dx, 0), dbias
    (True, array([2., 2., 2., 2.]))
    >>> xl = x.transpose(0, 2, 1)  # channels last
    >>> yl, ml, il = bncore.group_norm_train(xl, 2, axis=-1)
    >>> dxl, dwl, dbl = bncore.group_norm_backward(np.ones_like(xl), xl, 2, ml, il, axis=-1)
    >>> np.allclose(dxl, 0), dbl
    (True, array([2., 2., 2., 2.]))
    """
    L = _Groups(x, num_groups, axis)
    if mask is not None or lengths is not None:
        return _masked_group_backward(L, dy, mean, invstd, weight, out, n_threads, mask,
                                      lengths)
    return _group_backward(L, dy, mean, invstd, weight, out, n_threads)


def _instances(x: Any, axis: Any) -> _Groups:
    """x as N*C groups of one channel."""
    L = _Groups(x, 1, axis)
    if L.C:
        L.G = L.C
    else:  # no channels: no groups (not one), so the statistics are (N, 0)
        L.G = 0
    return L


def instance_norm_train(x: ArrayLike, weight: ArrayLike | None = None,
                        bias: ArrayLike | None = None, *, eps: float = 1e-5,
                        running_mean: Array | None = None, running_var: Array | None = None,
                        momentum: float = 0.1, axis: int | tuple[int, ...] = 1,
                        out: Array | None = None,
                        n_threads: int | None = None, mask: ArrayLike | None = None,
                        lengths: ArrayLike | None = None
                        ) -> tuple[Array, FloatArray, FloatArray]:
    """Instance normalization of x (N, C, \\*) or channels last, with each
    instance's statistics.

    Each (sample, channel) is normalized over its spatial positions. Running
    statistics, when given, are updated in place as PyTorch does: with the
    average over the batch of each instance's mean and unbiased variance.
    ``axis`` places the channels anywhere after the samples (``axis=-1``:
    NHWC, NLC), read in place, without a transposed copy.

    Parameters
    ----------
    x : array_like
        Input of shape (N, C, ...) (or with the channels on ``axis``) with
        more than one spatial element per channel, dtype float16, float32 or
        float64. float16 is computed in float32 and returned as float16.
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
    axis : int or tuple of int, default 1
        The channel axis (negative counts from the end; not 0, the samples):
        1 is channels first (N, C, ...), -1 channels last (N, ..., C). A
        tuple of adjacent axes makes their product (in C order) the channel
        dimension; per-channel arrays are then flat.
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
        If x, a parameter, a running statistic, ``axis`` or ``out`` has an
        unsupported type or dtype.
    ValueError
        If a shape does not match, a channel has one spatial element, the
        running statistics are given for an empty batch, ``axis`` is out of
        range, includes 0 or names axes that are not adjacent, or ``eps``,
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
    >>> y_last, mean_last, _ = bncore.instance_norm_train(x.transpose(0, 2, 1), eps=0.0,
    ...                                                   axis=-1)  # (N, L, C)
    >>> y_last[0].T, mean_last
    (array([[-1.,  1.],
           [-1.,  1.]]), array([[2., 4.]]))
    """
    L = _instances(x, axis)
    chk.running(running_mean, running_var, L.C)
    momentum = chk.real(momentum, "momentum", 0.0, 1.0)
    if mask is not None or lengths is not None:
        return _masked_instance_train(L, weight, bias, eps, running_mean, running_var,
                                      momentum, out, n_threads, mask, lengths)
    if L.x.size:  # an empty batch is defined: empty output, running statistics untouched
        chk.spatial(L.x, 2, "when using the input's statistics", L.HW)
    chk.disjoint_from_running(out, running_mean, running_var)
    if running_mean is not None and not L.x.size:
        y, mean, invstd = _group_forward(L, weight, bias, eps, out, n_threads)
        return y, _saved_as(mean, L.sd, (L.N, L.C)), _saved_as(invstd, L.sd, (L.N, L.C))
    if running_mean is not None:
        # each instance's exact variance (M2 / HW), not one rebuilt from invstd;
        # taken before the output is written, which may be x itself
        m, m2 = np.empty(L.N * L.C), np.empty(L.N * L.C)
        xf, nt = L.flat(L.x), chk.threads(n_threads)
        if L.P == 1:
            _k.stats(xf, (1, L.N * L.C, L.HW), m, m2, nt)
        else:  # per sample: the channels' statistics over its (P, Q) positions, in place
            per = L.C * L.HW
            for n in range(L.N):
                _k.stats(xf[n * per:(n + 1) * per], (L.P, L.C, L.Q), m[n * L.C:(n + 1) * L.C],
                         m2[n * L.C:(n + 1) * L.C], nt)
    y, mean, invstd = _group_forward(L, weight, bias, eps, out, n_threads)
    if running_mean is not None:
        update_running(running_mean, running_var, m.reshape(L.N, L.C),
                       (m2 / L.HW).reshape(L.N, L.C), L.HW, momentum)
    return y, _saved_as(mean, L.sd, (L.N, L.C)), _saved_as(invstd, L.sd, (L.N, L.C))


def instance_norm(x: ArrayLike, running_mean: Array | None = None,
                  running_var: Array | None = None, weight: ArrayLike | None = None,
                  bias: ArrayLike | None = None, use_input_stats: bool = True,
                  momentum: float = 0.1, eps: float = 1e-5, *,
                  axis: int | tuple[int, ...] = 1, out: Array | None = None,
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
        Input of shape (N, C, ...) (or with the channels on ``axis``), dtype
        float16, float32 or float64.
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
    axis : int or tuple of int, default 1
        The channel axis (negative counts from the end; not 0, the samples):
        1 is channels first (N, C, ...), -1 channels last (N, ..., C). A
        tuple of adjacent axes makes their product (in C order) the channel
        dimension; per-channel arrays are then flat.
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
        If an array or ``axis`` has an unsupported type or dtype.
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
                                   running_var=running_var, momentum=momentum, axis=axis,
                                   out=out, n_threads=n_threads, mask=mask, lengths=lengths)[0]
    if mask is not None or lengths is not None:  # checked: the output does not depend on it
        chk.padding(mask, lengths, chk.tensor(x), axis)
    chk.required(running_mean, "running_mean", "required when use_input_stats is False")
    chk.required(running_var, "running_var", "required when use_input_stats is False")
    axis = chk.per_sample(chk.Layout(x, axis)).axis
    # both are arrays here: chk.required refused None
    return batch_norm_eval(x, running_mean, running_var, weight, bias, axis=axis,  # type: ignore[arg-type]
                           eps=eps, out=out, n_threads=n_threads)


def instance_norm_backward(dy: ArrayLike, x: ArrayLike, mean: ArrayLike, invstd: ArrayLike,
                           weight: ArrayLike | None = None, *,
                           axis: int | tuple[int, ...] = 1, out: Array | None = None,
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
        The forward's input, shape (N, C, ...) (or with the channels on
        ``axis``).
    mean, invstd : array_like
        The forward's statistics: N * C values, any shape.
    weight : array_like, optional
        The forward's per-channel scale (None means 1).
    axis : int or tuple of int, default 1
        The forward's channel axis.
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
        If a shape or the number of saved statistics does not match, ``axis``
        is invalid, or ``n_threads`` is invalid.

    Examples
    --------
    >>> x = np.array([[[1.0, 3.0], [2.0, 6.0]]])
    >>> y, mean, invstd = bncore.instance_norm_train(x)
    >>> dx, dweight, dbias = bncore.instance_norm_backward(y, x, mean, invstd)
    >>> np.allclose(dx, 0, atol=1e-4), np.round(dweight, 4), dbias
    (True, array([2., 2.]), array([0., 0.]))
    >>> yl, ml, il = bncore.instance_norm_train(x.transpose(0, 2, 1), axis=-1)
    >>> dxl, dwl, dbl = bncore.instance_norm_backward(yl, x.transpose(0, 2, 1), ml, il, axis=-1)
    >>> np.allclose(dxl, 0, atol=1e-4), np.round(dwl, 4)
    (True, array([2., 2.]))
    """
    L = _instances(x, axis)
    if mask is not None or lengths is not None:
        return _masked_group_backward(L, dy, mean, invstd, weight, out, n_threads, mask,
                                      lengths)
    return _group_backward(L, dy, mean, invstd, weight, out, n_threads)


# ---- RMS norm ------------------------------------------------------------------------------

def _rms_eps(eps, dt):
    """eps: None means the input dtype's machine epsilon, as torch.nn.functional.rms_norm."""
    return float(np.finfo(dt).eps) if eps is None else chk.real(eps, "eps", 0.0)


def rms_norm_train(x: ArrayLike, normalized_shape: int | tuple[int, ...],
                   weight: ArrayLike | None = None, *, eps: float | None = None,
                   out: Array | None = None, n_threads: int | None = None
                   ) -> tuple[Array, FloatArray]:
    """RMS normalization over the trailing dims ``normalized_shape``, with the
    saved per-row inverse root mean square.

    As ``torch.nn.functional.rms_norm``: each row of ``prod(normalized_shape)``
    trailing values is scaled by ``invrms = 1 / sqrt(mean(x**2) + eps)``,
    ``y = x * invrms * weight`` (no centering, no bias). The sum of squares is
    taken in float64.

    Parameters
    ----------
    x : array_like
        Input of dtype float16, float32 or float64 with ``ndim >= 1``.
        float16 is computed in float32 and returned as float16.
    normalized_shape : int or tuple of int
        The trailing dims of x to normalize over.
    weight : array_like, optional
        Elementwise scale of shape ``normalized_shape`` (None means 1).
    eps : float, optional
        Finite, ``>= 0``; added to the mean square inside the square root.
        None means ``np.finfo(x.dtype).eps``, as in PyTorch (``eps=0`` with
        an all-zero row gives invrms 0).
    out : numpy.ndarray, optional
        Writable array of x's shape and dtype that receives ``y``; may be x.
    n_threads : int, optional
        The most threads to use. None uses `get_num_threads` at
        the time of the call.

    Returns
    -------
    y : numpy.ndarray
        x's shape and dtype (``out`` when given).
    invrms : numpy.ndarray
        Shape ``x.shape[:-k] + (1,) * k`` with ``k = len(normalized_shape)``;
        float64 for float64 input, float32 otherwise. Rows of no elements get
        NaN.

    Raises
    ------
    TypeError
        If x, ``weight`` or ``out`` has an unsupported type or dtype, or
        ``normalized_shape`` is not an int or a tuple of ints.
    ValueError
        If ``normalized_shape`` does not match x's trailing dims, a shape does
        not match, or ``eps`` or ``n_threads`` is out of range.

    Examples
    --------
    >>> x = np.array([[3.0, 4.0], [1.0, -1.0]])
    >>> y, invrms = bncore.rms_norm_train(x, 2, eps=0.0)
    >>> np.round(y, 4)
    array([[ 0.8485,  1.1314],
           [ 1.    , -1.    ]])
    >>> np.round(invrms, 4)
    array([[0.2828],
           [1.    ]])
    """
    x = chk.tensor(x, "x", 1)
    ns = chk.normalized_shape(normalized_shape, x)
    w = chk.param(weight, ns, "weight", flat=True)
    eps = _rms_eps(eps, x.dtype)
    nt = chk.threads(n_threads)
    cd, sd = chk.compute_dtype(x.dtype), chk.stat_dtype(x.dtype)
    lead = x.shape[:x.ndim - len(ns)]
    rows, cols = math.prod(lead), math.prod(ns)
    buf, final = chk.output(out, x, cd, (x,))
    invrms = np.empty(rows)
    if rows and cols:
        _k.rms_norm(chk.contiguous(x, cd).reshape(-1), buf.reshape(-1), rows, cols, w, eps,
                    invrms, nt)
    else:  # the mean square of no elements
        invrms[:] = np.nan
    return (chk.finish(buf, final, x.dtype),
            _saved_as(invrms, sd, lead + (1,) * len(ns)))


def rms_norm(x: ArrayLike, normalized_shape: int | tuple[int, ...],
             weight: ArrayLike | None = None, *, eps: float | None = None,
             out: Array | None = None, n_threads: int | None = None) -> Array:
    """RMS normalization, as ``torch.nn.functional.rms_norm``: the output only.

    `rms_norm_train` without the saved statistics:
    ``y = x / sqrt(mean(x**2) + eps) * weight`` over the trailing dims.

    Parameters
    ----------
    x : array_like
        Input of dtype float16, float32 or float64 with ``ndim >= 1``.
    normalized_shape : int or tuple of int
        The trailing dims of x to normalize over.
    weight : array_like, optional
        Elementwise scale of shape ``normalized_shape`` (None means 1).
    eps : float, optional
        Finite, ``>= 0``; None means ``np.finfo(x.dtype).eps``.
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
        If x, ``weight`` or ``out`` has an unsupported type or dtype.
    ValueError
        If a shape does not match, or ``eps`` or ``n_threads`` is out of range.

    Examples
    --------
    >>> x = np.array([[1.0, -1.0, 1.0, -1.0]], dtype=np.float32)
    >>> bncore.rms_norm(x, 4, weight=np.array([1.0, 2.0, 3.0, 4.0]), eps=0.0)
    array([[ 1., -2.,  3., -4.]], dtype=float32)
    """
    return rms_norm_train(x, normalized_shape, weight, eps=eps, out=out,
                          n_threads=n_threads)[0]


def rms_norm_backward(dy: ArrayLike, x: ArrayLike, normalized_shape: int | tuple[int, ...],
                      invrms: ArrayLike, weight: ArrayLike | None = None, *,
                      out: Array | None = None, n_threads: int | None = None
                      ) -> tuple[Array, FloatArray]:
    """Gradient of `rms_norm_train`: (dx, dweight).

    With ``g = dy * weight`` and ``r = invrms`` per row,
    ``dx = r * (g - x * r**2 * mean(g * x))`` and
    ``dweight = sum(dy * x * r)`` over the rows.

    Parameters
    ----------
    dy : array_like
        Gradient of the output: x's shape and dtype.
    x : array_like
        The forward's input, dtype float16, float32 or float64.
    normalized_shape : int or tuple of int
        The forward's ``normalized_shape``.
    invrms : array_like
        The forward's saved inverse root mean square: one value per row, any
        shape.
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
    dweight : numpy.ndarray
        Shape ``normalized_shape``, returned even when ``weight`` is None;
        float64 for float64 input, float32 otherwise.

    Raises
    ------
    TypeError
        If an array has an unsupported type or dtype, or ``dy`` differs from
        x's dtype.
    ValueError
        If a shape or the number of saved values does not match, or
        ``n_threads`` is invalid.

    Examples
    --------
    >>> x = np.array([[3.0, 4.0]])
    >>> y, invrms = bncore.rms_norm_train(x, 2, eps=0.0)
    >>> dx, dweight = bncore.rms_norm_backward(x, x, 2, invrms)  # dy parallel to x
    >>> np.allclose(dx, 0), np.round(dweight, 4)
    (True, array([2.5456, 4.5255]))
    """
    x = chk.tensor(x, "x", 1)
    dy = chk.like(dy, x, "dy")
    ns = chk.normalized_shape(normalized_shape, x)
    rows, cols = math.prod(x.shape[:x.ndim - len(ns)]), math.prod(ns)
    r = chk.saved(invrms, rows, "invrms")
    w = chk.param(weight, ns, "weight", flat=True)
    nt = chk.threads(n_threads)
    cd, sd = chk.compute_dtype(x.dtype), chk.stat_dtype(x.dtype)
    buf, final = chk.output(out, x, cd, (x, dy))
    dw = np.zeros(cols)
    if rows and cols:
        _k.rms_norm_backward(chk.contiguous(dy, cd).reshape(-1),
                             chk.contiguous(x, cd).reshape(-1), buf.reshape(-1), rows, cols, r,
                             w, dw, nt)
    return chk.finish(buf, final, x.dtype), dw.astype(sd, copy=False).reshape(ns)


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
    m8 = chk.padding(mask, lengths, L.x, L.axis)
    buf, final = chk.output(out, L.x, L.cd, (L.x,))
    N, C, G, HW = L.N, L.C, L.G, L.HW
    cg = C // G if G else 0
    xc, m8 = _channels_first(L, chk.contiguous(L.x, L.cd)), _channels_first(L, m8)
    count, mean, m2 = _masked_moments(xc, m8, (1, N * G, cg * HW), chk.threads(nt))
    if what == "instance":  # as unmasked instance norm refuses one spatial value
        chk.masked_counts(count.reshape(N, G), what)
    empty = count == 0
    var = np.divide(m2, count, out=np.zeros_like(m2), where=~empty)
    invstd = np.where(empty, 0.0, _k.invstd(var, eps))
    if L.P == 1:
        _group_apply(L, xc, buf, mean, invstd, w, b, nt)
    else:
        y = np.empty_like(xc)
        _group_apply(L, xc, y, mean, invstd, w, b, nt)
        buf[...] = _channels_back(L, y)
    return chk.finish(buf, final, L.x.dtype), mean, invstd, count, var


def _channels_first(L: _Groups, a: Any) -> Any:
    """a (x's shape, C-contiguous) as the (N, C, HW) layout the masked group
    kernels read: itself for channels first, else one transposed copy (masked
    channels-last group and instance norm go through it)."""
    if L.P == 1:
        return a
    return np.ascontiguousarray(
        a.reshape(L.N, L.P, L.C, L.Q).transpose(0, 2, 1, 3)).reshape(L.N, L.C, L.HW)


def _channels_back(L: _Groups, a: Any) -> Any:
    """The inverse of _channels_first: (N, C, HW) back in x's layout (a view)."""
    return a.reshape(L.N, L.C, L.P, L.Q).transpose(0, 2, 1, 3).reshape(L.x.shape)


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
    m8 = chk.padding(mask, lengths, L.x, L.axis)
    buf, final = chk.output(out, L.x, L.cd, (L.x, dy))
    N, C, G, HW = L.N, L.C, L.G, L.HW
    if not buf.size:
        z = np.zeros(C, L.sd)
        return chk.finish(buf, final, L.x.dtype), z, z.copy()
    dyc, xc = (_channels_first(L, chk.contiguous(a, L.cd)).reshape(-1) for a in (dy, L.x))
    m8 = _channels_first(L, m8).reshape(-1)
    dx = buf if L.P == 1 else np.empty((N, C, HW), L.cd)
    cg = C // G
    center = np.repeat(m.reshape(N, G), cg, axis=1).reshape(-1)
    invc = np.repeat(inv.reshape(N, G), cg, axis=1)
    wv = np.ones(C) if w is None else w
    count, sdy, sdx = np.empty(N * C), np.empty(N * C), np.empty(N * C)
    _k.masked_backward_reduce(dyc, xc, None, m8, (1, N * C, HW), center, 0, 0.0, sdy, sdx,
                              count, nt)
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
    _k.backward_apply(dyc, xc, None, dx.reshape(-1), (1, N * C, HW), center, a.reshape(-1),
                      cb.reshape(-1), cc.reshape(-1), 0, 0.0, nt)
    _k.masked_zero(dx.reshape(-1), m8, nt)
    if L.P != 1:
        buf[...] = _channels_back(L, dx)
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
