"""Batch normalization and its building blocks: the NumPy-facing operations.

Each batch-norm operation first offers its arguments as given to its one
entry in the compiled module (bncore._kernels), which runs the common,
canonical call straight away. Otherwise every argument is checked
(bncore._checks), brought to canonical form, and the same entry runs it.
Layouts: x is viewed as C-contiguous (outer, C, inner); inner == 1 is the
channels-last path, which also serves (N, C).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from . import _checks as chk
from . import _kernels as _k
from . import _partition
from ._typing import Activation, Array, ArrayLike, Float64Array, FloatArray

__all__ = [
    "batch_norm_train", "batch_norm_eval", "batch_norm_backward",
    "batch_norm_stats", "merge_stats", "batch_norm_elemt",
    "batch_norm_backward_reduce", "batch_norm_backward_elemt",
    "batch_norm_backward_from_output",
]


def batch_norm_train(x: ArrayLike, weight: ArrayLike | None = None,
                     bias: ArrayLike | None = None, *, axis: int = 1, eps: float = 1e-5,
                     running_mean: Array | None = None, running_var: Array | None = None,
                     momentum: float = 0.1, out: Array | None = None,
                     activation: Activation = None, n_threads: int | None = None,
                     virtual_batch_size: int | None = None, running_var_unbiased: bool = True,
                     skip_nonfinite_update: bool = False, mask: ArrayLike | None = None,
                     lengths: ArrayLike | None = None) -> tuple[Array, FloatArray, FloatArray]:
    """Normalize with the batch statistics; update running statistics in place.

    Per channel ``c`` (the entries of ``x`` along ``axis``),
    ``y = (x - mean_c) * invstd_c * weight_c + bias_c`` with the batch mean
    and the biased batch variance ``var_c`` over every other axis, and
    ``invstd_c = 1 / sqrt(var_c + eps)``. The statistics are accumulated in
    float64 with shifted sums, so float32 input stays accurate when
    ``|mean| >> std``. ``activation`` is fused into the same pass.

    With ``mask`` (or ``lengths``) the statistics are those of the unmasked
    values only: each channel's mean, variance and running update (Bessel's
    correction with that channel's own count) equal batch norm over the
    unpadded values concatenated. Padded entries get the same affine map
    with those statistics (defined and finite wherever x is; multiply by
    the mask for zeros). A channel with no unmasked value gets mean 0 and
    invstd 0 (its output is ``bias``) and keeps its running statistics; one
    with exactly one unmasked value is refused, as unmasked training
    refuses one value per channel. An empty batch (no value per channel:
    N = 0 or a zero-size axis) returns an empty output with mean and invstd
    0 and leaves the running statistics untouched, as PyTorch does.

    Parameters
    ----------
    x : array_like
        Input of dtype float16, float32 or float64 with ``ndim >= 2`` and
        more than one value per channel, or none (an empty batch). float16 is
        computed in float32 and returned as float16.
    weight, bias : array_like, optional
        Per-channel scale and shift, floating point of length C. None means
        1 and 0.
    axis : int, default 1
        The channel axis (negative counts from the end). ``axis=-1`` is
        channels-last; ``(N, C)`` input takes ``axis=1``.
    eps : float, default 1e-5
        Finite, ``>= 0``; added to the variance inside the square root. With
        ``eps=0`` a channel of zero variance gets ``invstd`` 0 (its output is
        ``bias``).
    running_mean, running_var : numpy.ndarray, optional
        Writable floating-point arrays of shape ``(C,)``, both or neither,
        updated in place: ``running = (1 - momentum) * running + momentum *
        batch`` (the batch variance with Bessel's correction n/(n-1) unless
        ``running_var_unbiased=False``).
    momentum : float, default 0.1
        In ``[0, 1]``: the weight of the batch statistics in the update.
    out : numpy.ndarray, optional
        Writable array of x's shape and dtype that receives ``y`` (``out=x``
        normalizes in place); it must not overlap the running statistics.
    activation : None, 'relu', 'leaky_relu' or ('leaky_relu', slope), optional
        Applied to ``y`` in the same pass; 'leaky_relu' alone has slope 0.01.
    n_threads : int, optional
        The most threads to use (capped at 4096). None uses
        `get_num_threads` at the time of the call: OpenMP's maximum in the
        calling thread (``OMP_NUM_THREADS``), capped by the process-wide limit
        (`set_num_threads`, threadpoolctl, the container's CPU quota).
    virtual_batch_size : int, optional
        Ghost batch norm (Hoffer et al. 2017): each slice of that many samples
        along axis 0 is normalized with its own statistics; ``save_mean`` and
        ``save_invstd`` are then ``(K, C)`` for K ghost batches and the running
        statistics move toward their average over the ghost batches. Every
        ghost batch needs more than one value per channel, and ``axis`` must
        not be 0.
    running_var_unbiased : bool, default True
        False updates ``running_var`` with the biased batch variance (the
        Keras and ONNX convention) instead of PyTorch's n/(n-1) correction.
    skip_nonfinite_update : bool, default False
        When True and the batch mean or the batch variance of any channel (of
        any ghost batch) is NaN or +-inf, ``running_mean`` and ``running_var``
        are left exactly as they were, for every channel (a NaN/inf batch,
        e.g. an overflowed mixed-precision step, then does not poison the
        running statistics; PyTorch issue 88474). ``y``, ``save_mean`` and
        ``save_invstd`` are still returned as computed. Off by default: the
        update is then PyTorch's, and a non-finite channel makes that
        channel's running statistics non-finite.
    mask : array_like of bool, optional
        True where a value counts (padded entries False), broadcastable to
        x, e.g. ``(N, 1, T)`` for ``(N, C, T)``. It is materialized as a
        contiguous uint8 array of x's shape (x.size bytes). Composes with
        ``virtual_batch_size``: each ghost batch's masked statistics, the
        running statistics moving toward each channel's average over the
        ghost batches in which it has values. Pass the same mask to
        `batch_norm_backward`.
    lengths : array_like of int, optional
        Instead of ``mask``, for padded sequences: shape ``(N,)``, ``0 <=
        lengths[i] <= T``; sample i counts at positions ``< lengths[i]`` of
        the sequence axis, the one axis of x that is neither axis 0 nor the
        channel axis (``(N, C, T)``, or ``(N, T, C)`` with ``axis=-1``; other
        shapes are refused: use ``mask``).

    Returns
    -------
    y : numpy.ndarray
        The output, x's shape and dtype (``out`` when given).
    save_mean, save_invstd : numpy.ndarray
        The batch mean and ``1 / sqrt(var + eps)`` per channel, shape ``(C,)``
        (``(K, C)`` with ghost batches); float64 for float64 input, float32
        otherwise. They are what `batch_norm_backward` needs.

    Raises
    ------
    TypeError
        If x, a parameter or ``out`` has an unsupported type or dtype,
        ``axis`` is not an int, ``mask`` is not boolean or ``lengths`` not
        integer.
    ValueError
        If a shape does not match, a channel has only one (unmasked) value,
        ``eps``, ``momentum``, ``activation``, ``n_threads``,
        ``virtual_batch_size`` or ``lengths`` is out of range, both ``mask``
        and ``lengths`` are given, or ``out`` is read-only or overlaps the
        running statistics. Nothing is written when an argument is refused.

    See Also
    --------
    batch_norm_eval : Normalization with the running statistics.
    batch_norm_backward : The gradients of this function.

    Examples
    --------
    >>> x = np.array([[1.0, 2.0], [3.0, 6.0]], dtype=np.float32)
    >>> rm, rv = np.zeros(2, np.float32), np.ones(2, np.float32)
    >>> y, mean, invstd = bncore.batch_norm_train(x, running_mean=rm, running_var=rv)
    >>> np.round(y, 4)
    array([[-1., -1.],
           [ 1.,  1.]], dtype=float32)
    >>> mean
    array([2., 4.], dtype=float32)
    >>> np.round(rm, 4), np.round(rv, 4)
    (array([0.2, 0.4], dtype=float32), array([1.1, 1.7], dtype=float32))

    Channels last, with a fused ReLU:

    >>> xt = np.ascontiguousarray(x.T)  # (N, C) with C last
    >>> y, _, _ = bncore.batch_norm_train(xt, axis=-1, activation="relu")
    >>> np.array_equal(y, np.maximum(bncore.batch_norm_train(x, axis=0)[0].T, 0))
    True

    Padded sequences (N, C, T): the padding enters no statistic:

    >>> seq = np.array([[[1.0, 3.0, 99.0]], [[5.0, 99.0, 99.0]]])  # lengths 2 and 1
    >>> y, mean, invstd = bncore.batch_norm_train(seq, lengths=np.array([2, 1]), eps=0.0)
    >>> mean, np.round(y[0, 0, :2] * np.sqrt(8 / 3), 4)
    (array([3.]), array([-2.,  0.]))
    """
    return train(x, weight, bias, axis, eps, running_mean, running_var, momentum, out,
                 activation, n_threads, virtual_batch_size, skip_nonfinite_update,
                 running_var_unbiased, mask, lengths)[:3]


def train(x: Any, weight: Any, bias: Any, axis: Any, eps: Any, running_mean: Any,
          running_var: Any, momentum: Any, out: Any, activation: Any, n_threads: Any,
          virtual_batch_size: Any = None, skip_nonfinite_update: Any = False,
          running_var_unbiased: Any = True, mask: Any = None, lengths: Any = None) -> Any:
    """batch_norm_train, plus whether the running statistics were updated
    (this step counted: False only when skip_nonfinite_update skipped it)."""
    if mask is not None or lengths is not None:
        return _train_masked(x, weight, bias, axis, eps, running_mean, running_var, momentum,
                             out, activation, n_threads, virtual_batch_size,
                             skip_nonfinite_update, running_var_unbiased, mask, lengths)
    r = _k.train(x, weight, bias, axis, eps, running_mean, running_var, momentum, out,
                 activation, n_threads, running_var_unbiased, skip_nonfinite_update,
                 virtual_batch_size)
    if r is not None:
        return r
    L = chk.Layout(x, axis).trainable(empty=True)
    w = chk.vector(weight, L.C, "weight")
    b = chk.vector(bias, L.C, "bias")
    eps = chk.real(eps, "eps", 0.0)
    momentum = chk.real(momentum, "momentum", 0.0, 1.0)
    chk.running(running_mean, running_var, L.C)
    act = chk.activation(activation)
    nt = chk.n_threads(n_threads)
    vbs = chk.ghost_batches(L, virtual_batch_size)
    buf, final = chk.output(out, L.x, L.cd, (L.x,))
    chk.disjoint_from_running(out, running_mean, running_var)
    if L.count == 0:
        return _train_empty(L, vbs, buf, final, running_mean is not None)
    # running statistics the entry cannot update in place are updated in copies
    rm, rv = running_mean, running_var
    if rm is not None and not (_k.is_canonical(rm) and _k.is_canonical(rv)):
        rm, rv = rm.astype(np.float64), rv.astype(np.float64)
    y, mean, invstd, updated = _k.train(
        L.canonical(L.x), w, b, L.axis, eps, rm, rv, momentum, buf, act, nt,
        bool(running_var_unbiased), bool(skip_nonfinite_update), vbs)
    if updated and rm is not running_mean:
        running_mean[...] = rm
        running_var[...] = rv
    return chk.finish(y, final, L.x.dtype), mean, invstd, updated


def update_running(running_mean, running_var, mean, var, count, momentum):
    """Moves checked running statistics toward K parts' statistics (mean, var
    (K, C) or (C,); count per part, or per part and channel as (K, C); 1
    applies no Bessel correction): the kernels' one update rule, computed
    aside in float64 and then written, so the arrays are never half updated."""
    mean = np.array(mean, np.float64, ndmin=2, order="C")
    var = np.array(var, np.float64, ndmin=2, order="C")
    count = np.asarray(count, np.float64)
    per_channel = count.ndim == mean.ndim and count.size == mean.size
    if mean.shape[0] == 0:  # no parts: nothing moves
        return
    count = np.broadcast_to(count, mean.shape if per_channel else mean.shape[:1])
    count = count.reshape(mean.shape[0], mean.shape[1] if per_channel else 1).copy()
    rm = np.array(running_mean, dtype=np.float64)
    rv = np.array(running_var, dtype=np.float64)
    _k.update_running(mean, var, count, momentum, rm, rv)
    running_mean[...] = rm
    running_var[...] = rv


def batch_norm_eval(x: ArrayLike, running_mean: ArrayLike, running_var: ArrayLike,
                    weight: ArrayLike | None = None, bias: ArrayLike | None = None, *,
                    axis: int = 1, eps: float = 1e-5, out: Array | None = None,
                    activation: Activation = None, n_threads: int | None = None) -> Array:
    """Normalize with given (running) statistics: the eval-mode batch norm.

    ``y = (x - running_mean) / sqrt(running_var + eps) * weight + bias`` per
    channel, in one pass. invstd is 0 where ``running_var + eps == 0``
    (``eps=0`` and a zero variance).

    Parameters
    ----------
    x : array_like
        Input of dtype float16, float32 or float64 with ``ndim >= 2``.
        float16 is computed in float32 and returned as float16.
    running_mean, running_var : array_like
        Per-channel statistics, floating point of length C.
    weight, bias : array_like, optional
        Per-channel scale and shift of length C. None means 1 and 0.
    axis : int, default 1
        The channel axis (negative counts from the end).
    eps : float, default 1e-5
        Finite, ``>= 0``; added to ``running_var`` inside the square root.
    out : numpy.ndarray, optional
        Writable array of x's shape and dtype that receives ``y``
        (``out=x`` normalizes in place).
    activation : None, 'relu', 'leaky_relu' or ('leaky_relu', slope), optional
        Applied to ``y`` in the same pass.
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
        If x, a statistic, a parameter or ``out`` has an unsupported type or
        dtype, or ``axis`` is not an int.
    ValueError
        If a shape does not match, ``running_var + eps`` is negative in some
        channel, or ``eps``, ``activation`` or ``n_threads`` is out of range.

    Examples
    --------
    >>> x = np.array([[1.0, 2.0], [3.0, 6.0]])
    >>> bncore.batch_norm_eval(x, running_mean=np.array([1.0, 2.0]),
    ...                        running_var=np.array([4.0, 16.0]), eps=0.0)
    array([[0., 0.],
           [1., 1.]])
    """
    y = _k.evaluate(x, running_mean, running_var, weight, bias, axis, eps, out, activation,
                    n_threads)
    if y is not None:
        return y
    L = chk.Layout(x, axis)
    rm = chk.vector(running_mean, L.C, "running_mean", required=True)
    rv = chk.vector(running_var, L.C, "running_var", required=True)
    w = chk.vector(weight, L.C, "weight")
    b = chk.vector(bias, L.C, "bias")
    eps = chk.real(eps, "eps", 0.0)
    chk.variance(rv, eps)
    act = chk.activation(activation)
    nt = chk.n_threads(n_threads)
    buf, final = chk.output(out, L.x, L.cd, (L.x,))
    y = _k.evaluate(L.canonical(L.x), rm, rv, w, b, L.axis, eps, buf, act, nt)
    return chk.finish(y, final, L.x.dtype)


def batch_norm_elemt(x: ArrayLike, mean: ArrayLike, invstd: ArrayLike,
                     weight: ArrayLike | None = None, bias: ArrayLike | None = None, *,
                     axis: int = 1, out: Array | None = None, activation: Activation = None,
                     n_threads: int | None = None) -> Array:
    """Normalize with given statistics: ``y = (x - mean) * invstd * weight + bias``.

    The elementwise step of synchronized batch norm: ``mean`` and ``invstd``
    come from `merge_stats` over every shard.

    Parameters
    ----------
    x : array_like
        Input of dtype float16, float32 or float64 with ``ndim >= 2``.
        float16 is computed in float32 and returned as float16.
    mean, invstd : array_like
        Per-channel mean and inverse standard deviation, floating point of
        length C.
    weight, bias : array_like, optional
        Per-channel scale and shift of length C. None means 1 and 0.
    axis : int, default 1
        The channel axis (negative counts from the end).
    out : numpy.ndarray, optional
        Writable array of x's shape and dtype that receives ``y``.
    activation : None, 'relu', 'leaky_relu' or ('leaky_relu', slope), optional
        Applied to ``y`` in the same pass.
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
        If x, a statistic, a parameter or ``out`` has an unsupported type or
        dtype, or ``axis`` is not an int.
    ValueError
        If a shape does not match, or ``activation`` or ``n_threads`` is out
        of range.

    Examples
    --------
    >>> x = np.array([[1.0, 2.0], [3.0, 6.0]])
    >>> bncore.batch_norm_elemt(x, mean=np.array([2.0, 4.0]), invstd=np.array([1.0, 0.5]),
    ...                         bias=np.array([0.0, 10.0]))
    array([[-1.,  9.],
           [ 1., 11.]])
    """
    y = _k.elemt(x, mean, invstd, weight, bias, axis, out, activation, n_threads)
    if y is not None:
        return y
    L = chk.Layout(x, axis)
    m = chk.vector(mean, L.C, "mean", required=True)
    inv = chk.vector(invstd, L.C, "invstd", required=True)
    w = chk.vector(weight, L.C, "weight")
    b = chk.vector(bias, L.C, "bias")
    act = chk.activation(activation)
    nt = chk.n_threads(n_threads)
    buf, final = chk.output(out, L.x, L.cd, (L.x,))
    y = _k.elemt(L.canonical(L.x), m, inv, w, b, L.axis, buf, act, nt)
    return chk.finish(y, final, L.x.dtype)


def batch_norm_backward(dy: ArrayLike, x: ArrayLike, save_mean: ArrayLike,
                        save_invstd: ArrayLike, weight: ArrayLike | None = None, *,
                        axis: int = 1, training: bool = True, out: Array | None = None,
                        activation: Activation = None, y: ArrayLike | None = None,
                        n_threads: int | None = None, virtual_batch_size: int | None = None,
                        mask: ArrayLike | None = None, lengths: ArrayLike | None = None
                        ) -> tuple[Array, FloatArray, FloatArray]:
    """Gradients of `batch_norm_train` (``training=True``) or of the eval-mode
    normalization (``training=False``).

    With ``xhat = (x - save_mean) * save_invstd`` and ``g = dy * weight``
    (times the activation's derivative), per channel over its n values:
    ``dx = save_invstd * (g - mean(g) - xhat * mean(g * xhat))`` in training
    mode, ``dx = g * save_invstd`` in eval mode; ``dweight = sum(dy * xhat)``
    and ``dbias = sum(dy)``. With ``mask`` (the forward's), the sums and
    means run over the unmasked values only (each channel's own count) and
    ``dx`` is 0 at padded entries: the gradient of the loss over the
    unmasked outputs. An empty batch gives an empty ``dx`` and zero
    ``dweight`` and ``dbias``.

    Parameters
    ----------
    dy : array_like
        Gradient of the loss with respect to the output: x's shape and dtype.
    x : array_like
        The forward's input, dtype float16, float32 or float64, ``ndim >= 2``.
        float16 is computed in float32.
    save_mean, save_invstd : array_like
        The statistics the forward used: `batch_norm_train`'s ``save_mean``
        and ``save_invstd`` (length C, or ``(K, C)`` with ghost batches), or
        in eval mode the running mean and ``1 / sqrt(running_var + eps)``.
    weight : array_like, optional
        The forward's per-channel scale (None means 1).
    axis : int, default 1
        The channel axis (negative counts from the end).
    training : bool, default True
        True: the statistics depended on x (batch statistics). False: they
        were constants (eval mode).
    out : numpy.ndarray, optional
        Writable array of x's shape and dtype that receives ``dx`` (may be
        ``dy``).
    activation : None, 'relu', 'leaky_relu' or ('leaky_relu', slope), optional
        The activation fused into the forward.
    y : array_like, optional
        The forward's output, required when ``activation`` is set: its sign
        is the activation's mask.
    n_threads : int, optional
        The most threads to use. None uses `get_num_threads` at
        the time of the call.
    virtual_batch_size : int, optional
        Training only: the forward's ghost batch size; ``save_mean`` and
        ``save_invstd`` then have one row per ghost batch.
    mask : array_like of bool, optional
        The forward's mask (see `batch_norm_train`), broadcastable to x.
    lengths : array_like of int, optional
        The forward's lengths, instead of ``mask``.

    Returns
    -------
    dx : numpy.ndarray
        x's shape and dtype (``out`` when given).
    dweight, dbias : numpy.ndarray
        Per-channel gradients of shape ``(C,)``, returned even when ``weight``
        is None; float64 for float64 input, float32 otherwise.

    Raises
    ------
    TypeError
        If an array has an unsupported type or dtype, ``dy`` or ``y`` differs
        from x's dtype, ``axis`` is not an int, ``mask`` is not boolean or
        ``lengths`` not integer.
    ValueError
        If a shape does not match, ``y`` is missing with an activation,
        ``activation``, ``n_threads``, ``virtual_batch_size`` or ``lengths``
        is out of range, or both ``mask`` and ``lengths`` are given.

    Examples
    --------
    >>> x = np.array([[1.0, 2.0], [3.0, 6.0]])
    >>> y, mean, invstd = bncore.batch_norm_train(x, eps=0.0)
    >>> dx, dweight, dbias = bncore.batch_norm_backward(np.ones_like(x), x, mean, invstd)
    >>> dx, dweight, dbias
    (array([[0., 0.],
           [0., 0.]]), array([0., 0.]), array([2., 2.]))
    """
    if mask is not None or lengths is not None:
        return _backward_masked(dy, x, save_mean, save_invstd, weight, axis, training, out,
                                activation, y, n_threads, virtual_batch_size, mask, lengths)
    r = _k.backward(dy, x, save_mean, save_invstd, weight, axis, training, out, activation, y,
                    n_threads, virtual_batch_size)
    if r is not None:
        return r
    L = chk.Layout(x, axis)
    dy = chk.like(dy, L.x, "dy")
    training = bool(training)
    vbs = chk.ghost_batches(L, virtual_batch_size) if training else None
    if vbs is None:
        m = chk.vector(save_mean, L.C, "save_mean", required=True)
        inv = chk.vector(save_invstd, L.C, "save_invstd", required=True)
    else:
        K = -(-L.x.shape[0] // vbs)
        rows = dict(required=True, what="one row per ghost batch")
        m = chk.param(save_mean, (K, L.C), "save_mean", **rows)
        inv = chk.param(save_invstd, (K, L.C), "save_invstd", **rows)
    w = chk.vector(weight, L.C, "weight")
    act = chk.activation(activation)
    y = chk.mask_source(y, L.x, act)
    nt = chk.n_threads(n_threads)
    buf, final = chk.output(out, L.x, L.cd, (L.x, dy, y))
    if L.count == 0:  # an empty batch: empty dx, zero parameter gradients
        return chk.finish(buf, final, L.x.dtype), np.zeros(L.C, L.sd), np.zeros(L.C, L.sd)
    dx, dw, db = _k.backward(L.canonical(dy), L.canonical(L.x), m, inv, w, L.axis, training,
                             buf, act, L.canonical(y), nt, vbs)
    return chk.finish(dx, final, L.x.dtype), dw, db


# ---- building blocks for distributed (synchronized) batch norm --------------------------

def batch_norm_stats(x: ArrayLike, *, axis: int = 1, n_threads: int | None = None
                     ) -> tuple[int, Float64Array, Float64Array]:
    """Local statistics (count, mean, M2) per channel, mean and M2 in float64.

    The first step of synchronized batch norm: each shard's triple goes to
    `merge_stats`. M2 is the sum of squared deviations from the mean; a shard
    with no samples gives count 0 (and zeros), which `merge_stats` ignores.

    Parameters
    ----------
    x : array_like
        A shard, dtype float16, float32 or float64 with ``ndim >= 2``.
    axis : int, default 1
        The channel axis (negative counts from the end).
    n_threads : int, optional
        The most threads to use. None uses `get_num_threads` at
        the time of the call.

    Returns
    -------
    count : int
        Values per channel (the size of x over the other axes).
    mean, m2 : numpy.ndarray
        float64 arrays of shape ``(C,)``.

    Raises
    ------
    TypeError
        If x has an unsupported dtype or ``axis`` is not an int.
    ValueError
        If ``x.ndim < 2``, ``axis`` is out of range or ``n_threads`` is
        invalid.

    Examples
    --------
    >>> x = np.array([[1.0, 2.0], [3.0, 6.0]], dtype=np.float32)
    >>> bncore.batch_norm_stats(x)
    (2, array([2., 4.]), array([2., 8.]))
    """
    L = chk.Layout(x, axis)
    nt = chk.threads(n_threads)
    mean, m2 = np.empty(L.C), np.empty(L.C)
    _k.stats(L.flat(L.x), L.shape, mean, m2, nt)
    return L.count, mean, m2


def merge_stats(counts: ArrayLike, means: ArrayLike, m2s: ArrayLike
                ) -> tuple[Any, Float64Array, Float64Array]:
    """Chan's merge of K (count, mean, M2) triples, in the given order in float64.

    Combines the `batch_norm_stats` of K shards into the statistics of their
    concatenation; parts with count 0 are ignored. The biased variance of the
    whole is ``M2 / count``.

    Parameters
    ----------
    counts : array_like
        Finite, non-negative counts: shape ``(K,)``, one per part, or
        ``(K, C)``, one per part and channel (masked statistics, where
        channels count different values).
    means, m2s : array_like
        Real arrays of shape ``(K, C)``: each part's mean and M2.

    Returns
    -------
    count : int or numpy.ndarray
        The total count: an int for ``(K,)`` counts, a float64 array of
        shape ``(C,)`` for ``(K, C)`` counts.
    mean, m2 : numpy.ndarray
        float64 arrays of shape ``(C,)`` (zeros for K = 0).

    Raises
    ------
    TypeError
        If ``counts`` is not numeric or ``means`` / ``m2s`` are not real.
    ValueError
        If ``counts`` is not 1-D or has a negative or non-finite entry, or
        the shapes do not agree.

    Examples
    --------
    >>> x = np.array([[1.0], [3.0], [5.0], [7.0]])
    >>> parts = [bncore.batch_norm_stats(x[:1]), bncore.batch_norm_stats(x[1:])]
    >>> count, mean, m2 = bncore.merge_stats([p[0] for p in parts], [p[1] for p in parts],
    ...                                      [p[2] for p in parts])
    >>> count, mean, m2 / count, x.var(axis=0)
    (4, array([4.]), array([5.]), array([5.]))

    Per-channel counts merge channel by channel:

    >>> bncore.merge_stats([[1, 2], [3, 0]], [[1.0, 2.0], [5.0, 0.0]],
    ...                    [[0.0, 2.0], [8.0, 0.0]])
    (array([4., 2.]), array([4., 2.]), array([20.,  2.]))
    """
    counts = chk.counts(counts)
    rows = [(means, "means"), (m2s, "m2s")] + [(counts, "counts")] * (counts.ndim == 2)
    means, m2s = chk.part_rows(rows, counts.shape[0])[:2]
    C = means.shape[1]
    mean, m2, total = np.zeros(C), np.zeros(C), np.zeros(C)
    if counts.shape[0]:
        whole = _k.merge_stats(np.ascontiguousarray(counts.reshape(counts.shape[0], -1)),
                               means, m2s, mean, m2, total)
    else:
        whole = 0.0
    return (total if counts.ndim == 2 else int(round(whole))), mean, m2


def batch_norm_backward_reduce(dy: ArrayLike, x: ArrayLike, mean: ArrayLike, *, axis: int = 1,
                               activation: Activation = None, y: ArrayLike | None = None,
                               n_threads: int | None = None) -> tuple[Float64Array, Float64Array]:
    """Per channel ``(sum(dy), sum(dy * (x - mean)))`` in float64 (centered sums).

    The local reduction of synchronized batch norm's backward: sum these over
    every shard, then call `batch_norm_backward_elemt`. With an activation,
    ``dy`` is first multiplied by its derivative (taken from ``y``).

    Parameters
    ----------
    dy : array_like
        Gradient of the output: x's shape and dtype.
    x : array_like
        The forward's input (this shard), dtype float16, float32 or float64.
    mean : array_like
        The global per-channel mean used by the forward, length C.
    axis : int, default 1
        The channel axis (negative counts from the end).
    activation : None, 'relu', 'leaky_relu' or ('leaky_relu', slope), optional
        The activation fused into the forward.
    y : array_like, optional
        The forward's output, required with an activation (its mask).
    n_threads : int, optional
        The most threads to use. None uses `get_num_threads` at
        the time of the call.

    Returns
    -------
    sum_dy, sum_dy_xmu : numpy.ndarray
        float64 arrays of shape ``(C,)``.

    Raises
    ------
    TypeError
        If an array has an unsupported dtype or ``dy`` differs from x's dtype.
    ValueError
        If a shape does not match, ``y`` is missing with an activation, or
        ``activation`` or ``n_threads`` is invalid.

    Examples
    --------
    >>> x = np.array([[1.0, 2.0], [3.0, 6.0]])
    >>> dy = np.array([[1.0, 0.0], [2.0, 1.0]])
    >>> bncore.batch_norm_backward_reduce(dy, x, mean=np.array([2.0, 4.0]))
    (array([3., 1.]), array([1., 2.]))
    """
    L = chk.Layout(x, axis)
    dy = chk.like(dy, L.x, "dy")
    m = chk.vector(mean, L.C, "mean", required=True)
    code, slope = chk.activation_code(activation)
    y = chk.mask_source(y, L.x, activation if code else None)
    nt = chk.threads(n_threads)
    sum_dy, sum_dy_xmu = np.empty(L.C), np.empty(L.C)
    _k.backward_reduce(L.flat(dy), L.flat(L.x), L.flat(y), L.shape, m, code, slope, sum_dy,
                       sum_dy_xmu, nt)
    return sum_dy, sum_dy_xmu


def batch_norm_backward_elemt(dy: ArrayLike, x: ArrayLike, mean: ArrayLike, invstd: ArrayLike,
                              weight: ArrayLike | None, sum_dy: ArrayLike,
                              sum_dy_xmu: ArrayLike, count: float, *, axis: int = 1,
                              out: Array | None = None, activation: Activation = None,
                              y: ArrayLike | None = None, n_threads: int | None = None) -> Array:
    """dx from globally reduced sums over ``count`` elements per channel.

    ``dx = w * invstd * (dy - sum_dy / count - (x - mean) * invstd**2 *
    sum_dy_xmu / count)``, the last step of synchronized batch norm's
    backward; with ``sum_dy`` and ``sum_dy_xmu`` summed over every shard it
    equals `batch_norm_backward` on the whole batch.

    Parameters
    ----------
    dy : array_like
        Gradient of the output: x's shape and dtype.
    x : array_like
        The forward's input (this shard), dtype float16, float32 or float64.
        float16 is computed in float32.
    mean, invstd : array_like
        The global per-channel statistics the forward used, length C.
    weight : array_like or None
        The forward's per-channel scale (None means 1).
    sum_dy, sum_dy_xmu : array_like
        The global sums of `batch_norm_backward_reduce`, length C.
    count : float
        Number of values per channel over every shard, ``>= 1``.
    axis : int, default 1
        The channel axis (negative counts from the end).
    out : numpy.ndarray, optional
        Writable array of x's shape and dtype that receives ``dx``.
    activation : None, 'relu', 'leaky_relu' or ('leaky_relu', slope), optional
        The activation fused into the forward.
    y : array_like, optional
        The forward's output, required with an activation (its mask).
    n_threads : int, optional
        The most threads to use. None uses `get_num_threads` at
        the time of the call.

    Returns
    -------
    numpy.ndarray
        ``dx``, x's shape and dtype (``out`` when given).

    Raises
    ------
    TypeError
        If an array has an unsupported type or dtype, or ``dy`` differs from
        x's dtype.
    ValueError
        If a shape does not match, ``count < 1``, ``y`` is missing with an
        activation, or ``activation`` or ``n_threads`` is invalid.

    Examples
    --------
    >>> x = np.array([[1.0, 2.0], [3.0, 6.0]])
    >>> dy = np.array([[1.0, 0.0], [2.0, 1.0]])
    >>> _, mean, invstd = bncore.batch_norm_train(x, eps=0.0)
    >>> sums = bncore.batch_norm_backward_reduce(dy, x, mean)
    >>> dx = bncore.batch_norm_backward_elemt(dy, x, mean, invstd, None, *sums, count=2)
    >>> np.allclose(dx, bncore.batch_norm_backward(dy, x, mean, invstd)[0])
    True
    """
    L = chk.Layout(x, axis)
    dy = chk.like(dy, L.x, "dy")
    m = chk.vector(mean, L.C, "mean", required=True)
    inv = chk.vector(invstd, L.C, "invstd", required=True)
    w = chk.vector(weight, L.C, "weight")
    sdy = chk.vector(sum_dy, L.C, "sum_dy", required=True)
    sdx = chk.vector(sum_dy_xmu, L.C, "sum_dy_xmu", required=True)
    count = chk.elemt_count(count, L.C)
    code, slope = chk.activation_code(activation)
    y = chk.mask_source(y, L.x, activation if code else None)
    nt = chk.threads(n_threads)
    buf, final = chk.output(out, L.x, L.cd, (L.x, dy, y))
    _k.backward_apply(L.flat(dy), L.flat(L.x), L.flat(y), buf.reshape(-1), L.shape, m,
                      *_dx_coefficients(inv, w, sdy, sdx, count), code, slope, nt)
    return chk.finish(buf, final, L.x.dtype)


def _dx_coefficients(inv: Any, w: Any, sdy: Any, sdx: Any, count: Any) -> tuple[Any, Any, Any]:
    """bn_backward_apply's per-channel (a, b, c), dx = a*dy + b*(x - mean) + c,
    from the sums over ``count`` values per channel (a float or (C,)); sdy None:
    eval mode, dx = a*dy. A channel with count 0 has nothing to write."""
    k = inv if w is None else w * inv
    if sdy is None:
        return k, None, None
    n = np.maximum(count, 1.0)
    return k, -k * inv * inv * sdx / n, -k * sdy / n


def batch_norm_backward_from_output(dy: ArrayLike, y: ArrayLike, save_invstd: ArrayLike,
                                    weight: ArrayLike | None = None,
                                    bias: ArrayLike | None = None, *, axis: int = 1,
                                    training: bool = True, activation: Activation = None,
                                    out: Array | None = None, min_abs_weight: float | None = None,
                                    n_threads: int | None = None
                                    ) -> tuple[Array, FloatArray, FloatArray]:
    """(dx, dweight, dbias) of ``batch_norm_train(x, ..., out=x)`` from its output alone.

    The normalized input is rebuilt inside the backward passes as
    ``xhat = (act^-1(y) - bias) / weight``, so the forward may overwrite x
    with y (Inplace-ABN): one activation buffer is saved per layer.

    Parameters
    ----------
    dy : array_like
        Gradient of the output: y's shape and dtype.
    y : array_like
        The forward's output, dtype float16, float32 or float64,
        ``ndim >= 2``. float16 is computed in float32.
    save_invstd : array_like
        The forward's per-channel ``1 / sqrt(var + eps)``, length C.
    weight, bias : array_like, optional
        The forward's per-channel scale and shift (None means 1 and 0).
    axis : int, default 1
        The channel axis (negative counts from the end).
    training : bool, default True
        Whether the forward used batch statistics (True) or constants.
    activation : None or ('leaky_relu', slope), optional
        The forward's activation; it must be invertible (slope > 0).
    out : numpy.ndarray, optional
        Writable array of y's shape and dtype that receives ``dx``; may be
        ``dy`` or ``y`` (the saved output is not needed afterwards).
    min_abs_weight : float, optional
        Rebuilding divides by weight: every ``abs(weight)`` must be at least
        this (default: the square root of the dtype's machine epsilon, about
        3.5e-4 for float32) and ``save_invstd`` finite and non-zero.
    n_threads : int, optional
        The most threads to use. None uses `get_num_threads` at
        the time of the call.

    Returns
    -------
    dx : numpy.ndarray
        y's shape and dtype (``out`` when given).
    dweight, dbias : numpy.ndarray
        Per-channel gradients of shape ``(C,)``; float64 for float64 input,
        float32 otherwise.

    Raises
    ------
    TypeError
        If an array has an unsupported type or dtype, or ``dy`` differs from
        y's dtype.
    ValueError
        If a shape does not match, ``activation`` is not invertible (e.g.
        'relu'), some ``abs(weight)`` is below ``min_abs_weight`` or some
        ``save_invstd`` is zero or not finite, or ``n_threads`` is invalid.

    Examples
    --------
    >>> x = np.array([[1.0, 2.0], [3.0, 6.0]])
    >>> dy = np.array([[1.0, 0.0], [2.0, 1.0]])
    >>> _, mean, invstd = bncore.batch_norm_train(x)
    >>> expected = bncore.batch_norm_backward(dy, x, mean, invstd)
    >>> bncore.batch_norm_train(x, out=x)[0] is x  # the input is overwritten
    True
    >>> dx, dweight, dbias = bncore.batch_norm_backward_from_output(dy, x, invstd)
    >>> np.allclose(dx, expected[0]), np.allclose(dweight, expected[1])
    (True, True)
    """
    L = chk.Layout(y, axis, "y")
    dy = chk.like(dy, L.x, "dy")
    inv = chk.vector(save_invstd, L.C, "save_invstd", required=True)
    w = chk.vector(weight, L.C, "weight")
    b = chk.vector(bias, L.C, "bias")
    code, slope = chk.invertible(activation)
    tol = (np.sqrt(np.finfo(L.cd).eps) if min_abs_weight is None
           else chk.real(min_abs_weight, "min_abs_weight", 0.0))
    chk.rebuildable(w, inv, tol, L.C)
    nt = chk.threads(n_threads)
    buf, final = chk.output(out, L.x, L.cd, (L.x, dy))
    dw, db = np.empty(L.C), np.empty(L.C)
    _k.backward_from_output(L.flat(dy), L.flat(L.x), buf.reshape(-1), L.shape, inv, w, b,
                            bool(training), dw, db, code, slope, nt)
    dx = chk.finish(buf, final, L.x.dtype)
    return dx, dw.astype(L.sd, copy=False), db.astype(L.sd, copy=False)


# ---- empty batches and masked (padded) batches -------------------------------------------

def _train_empty(L: Any, vbs: Any, buf: Any, final: Any, running: bool) -> Any:
    """Training on a batch with no value per channel (N = 0, or a zero-size
    axis): an empty output, mean 0 and invstd 0 per channel (per ghost batch),
    the running statistics untouched. Reported as a counted step, as PyTorch
    counts it in num_batches_tracked."""
    K = None if vbs is None else -(-L.x.shape[0] // vbs)
    shape = (L.C,) if K is None else (K, L.C)
    zeros = np.zeros(shape, L.sd)
    return chk.finish(buf, final, L.x.dtype), zeros, zeros.copy(), running


def _pieces(L: Any, vbs: Any) -> list[tuple[slice, tuple[int, int, int]]]:
    """The parts of `_partition.plan` (the whole batch, or ghost batches of vbs
    samples along axis 0) as slices of the canonical arrays with their
    (outer, C, inner) geometry."""
    N = L.x.shape[0]
    if vbs is None:
        return [(slice(None), L.shape)]
    per = L.shape[0] // N if N else 0
    return [(sl, ((sl.stop - sl.start) * per, L.C, L.shape[2]))
            for _, sl in _partition.plan([N], 0, vbs).segments]


def _masked_moments(xc: Any, m8: Any, shape: Any, nt: int) -> tuple[Any, Any, Any]:
    """bn_masked_stats on a canonical array and its uint8 mask."""
    C = shape[1]
    count, mean, m2 = np.empty(C), np.empty(C), np.empty(C)
    _k.masked_stats(xc.reshape(-1), m8.reshape(-1), tuple(shape), count, mean, m2, nt)
    return count, mean, m2


def masked_stats(x: ArrayLike, mask: ArrayLike, *, axis: int = 1, n_threads: int | None = None
                 ) -> tuple[Float64Array, Float64Array, Float64Array]:
    """Per-channel (count, mean, M2) of the values of x where ``mask`` is True.

    The masked counterpart of `batch_norm_stats` (not public: the local
    statistics of a masked synchronized batch norm): each triple merges
    across shards with `merge_stats`, which takes the per-channel counts as
    a ``(K, C)`` array. Computed by the C kernel bn_masked_stats (float64
    shifted sums, fixed-order Chan merges: identical for any thread count).

    Parameters
    ----------
    x : array_like
        dtype float16, float32 or float64, ``ndim >= 2``.
    mask : array_like of bool
        Broadcastable to x; True where a value counts. Materialized as a
        contiguous uint8 array of x's shape (x.size bytes).
    axis : int, default 1
        The channel axis.
    n_threads : int, optional
        The most threads to use.

    Returns
    -------
    count, mean, m2 : numpy.ndarray
        float64, shape ``(C,)``; a channel with no unmasked value has count,
        mean and M2 0.

    Raises
    ------
    TypeError
        If x has an unsupported dtype or ``mask`` is not boolean.
    ValueError
        If ``mask`` does not broadcast to x, or ``axis`` / ``n_threads`` is
        invalid.

    Examples
    --------
    >>> x = np.array([[1.0, 2.0], [3.0, 6.0], [100.0, 5.0]])
    >>> masked_stats(x, np.array([True, True, False])[:, None])
    (array([2., 2.]), array([2., 4.]), array([2., 8.]))
    """
    L = chk.Layout(x, axis)
    m8 = chk.mask(mask, L.x)
    nt = chk.threads(n_threads)
    return _masked_moments(L.canonical(L.x), m8, L.shape, nt)


def masked_backward_reduce(dy: ArrayLike, x: ArrayLike, mean: ArrayLike, mask: ArrayLike, *,
                           axis: int = 1, activation: Activation = None,
                           y: ArrayLike | None = None, n_threads: int | None = None
                           ) -> tuple[Float64Array, Float64Array, Float64Array]:
    """Per channel ``(count, sum(dy), sum(dy * (x - mean)))`` over the unmasked values.

    The masked counterpart of `batch_norm_backward_reduce` (not public: the
    local reduction of a masked synchronized batch norm's backward). Sum
    the three over every shard, then ``dx = k * (g - sum_dy / count - (x -
    mean) * invstd**2 * sum_dy_xmu / count)`` with ``k = weight * invstd``
    at unmasked entries and 0 at padded ones (bn_backward_apply, then
    bn_masked_zero; see `batch_norm_backward` with ``mask``).

    Parameters
    ----------
    dy : array_like
        Gradient of the output: x's shape and dtype.
    x : array_like
        The forward's input (this shard).
    mean : array_like
        The (global) per-channel mean the forward used, length C.
    mask : array_like of bool
        Broadcastable to x; True where a value counts.
    axis : int, default 1
        The channel axis.
    activation : None, 'relu', 'leaky_relu' or ('leaky_relu', slope), optional
        The activation fused into the forward.
    y : array_like, optional
        The forward's output, required with an activation.
    n_threads : int, optional
        The most threads to use.

    Returns
    -------
    count, sum_dy, sum_dy_xmu : numpy.ndarray
        float64, shape ``(C,)``.

    Raises
    ------
    TypeError
        If an array has an unsupported dtype or ``mask`` is not boolean.
    ValueError
        If a shape does not match or an argument is out of range.

    Examples
    --------
    >>> x = np.array([[1.0], [3.0], [9.0]])
    >>> masked_backward_reduce(np.ones_like(x), x, [2.0], np.array([[True], [True], [False]]))
    (array([2.]), array([2.]), array([0.]))
    """
    L = chk.Layout(x, axis)
    dy = chk.like(dy, L.x, "dy")
    m = chk.vector(mean, L.C, "mean", required=True)
    m8 = chk.mask(mask, L.x)
    code, slope = chk.activation_code(activation)
    y = chk.mask_source(y, L.x, activation if code else None)
    nt = chk.threads(n_threads)
    count, sdy, sdx = np.empty(L.C), np.empty(L.C), np.empty(L.C)
    _k.masked_backward_reduce(L.flat(dy), L.flat(L.x), L.flat(y), m8.reshape(-1), L.shape, m,
                              code, slope, sdy, sdx, count, nt)
    return count, sdy, sdx


def _update_present(running_mean: Any, running_var: Any, mean: Any, var: Any, count: Any,
                    momentum: float, unbiased: bool) -> None:
    """The running update from K parts' masked statistics (K, C): each channel
    moves toward its average over the parts in which it has values (each with
    its own count for Bessel's correction); a channel without a value in any
    part stays as it is. Channels sharing the same parts go through one
    update_running call; written once, at the end."""
    present = count > 0
    rm = np.array(running_mean, np.float64)
    rv = np.array(running_var, np.float64)
    cnt = count if unbiased else np.ones_like(count)
    cols, inv = np.unique(present, axis=1, return_inverse=True)
    inv = np.asarray(inv).reshape(-1)
    for j in range(cols.shape[1]):
        rows = np.flatnonzero(cols[:, j])
        if rows.size == 0:
            continue
        ch = np.flatnonzero(inv == j)
        sm, sv = rm[ch], rv[ch]
        update_running(sm, sv, mean[np.ix_(rows, ch)], var[np.ix_(rows, ch)],
                       cnt[np.ix_(rows, ch)], momentum)
        rm[ch], rv[ch] = sm, sv
    running_mean[...] = rm
    running_var[...] = rv


def _train_masked(x: Any, weight: Any, bias: Any, axis: Any, eps: Any, running_mean: Any,
                  running_var: Any, momentum: Any, out: Any, activation: Any, n_threads: Any,
                  virtual_batch_size: Any, skip_nonfinite: Any, unbiased: Any, mask: Any,
                  lengths: Any) -> Any:
    """batch_norm_train with a mask (see its docstring): masked statistics per
    part (the batch, or each ghost batch) by bn_masked_stats, the output by the
    one per-channel affine entry (elemt) with those statistics."""
    L = chk.Layout(x, axis)
    w = chk.vector(weight, L.C, "weight")
    b = chk.vector(bias, L.C, "bias")
    eps = chk.real(eps, "eps", 0.0)
    momentum = chk.real(momentum, "momentum", 0.0, 1.0)
    chk.running(running_mean, running_var, L.C)
    act = chk.activation(activation)
    nt = chk.n_threads(n_threads)
    vbs = chk.ghost_size(L, virtual_batch_size)
    m8 = chk.padding(mask, lengths, L.x, L.axis)
    buf, final = chk.output(out, L.x, L.cd, (L.x,))
    chk.disjoint_from_running(out, running_mean, running_var)
    xc = L.canonical(L.x)
    parts = _pieces(L, vbs)
    K = len(parts)
    count, mean, m2 = np.zeros((K, L.C)), np.zeros((K, L.C)), np.zeros((K, L.C))
    for g, (sl, shape) in enumerate(parts):
        count[g], mean[g], m2[g] = _masked_moments(xc[sl], m8[sl], shape, chk.threads(nt))
    # data-dependent, but still before anything is written
    chk.masked_counts(count, "channel" if vbs is None else "channel of a ghost batch")
    # a channel without values: mean 0 and invstd 0, so its output is bias
    # (NaN-free where x is finite) and its gradient 0
    var, invstd = _partition.coefficients(count, mean, m2, eps)[:2]
    # padded entries get the same affine map with the masked statistics: one
    # pass writes every entry (no second pass to zero them), the output is
    # defined everywhere, and finite wherever x is; downstream code that
    # needs zeros there multiplies by the mask
    for g, (sl, _) in enumerate(parts):
        r = _k.elemt(xc[sl], mean[g], invstd[g], w, b, L.axis, buf[sl], act, nt)
        assert r is not None, "canonical arguments"
    updated = running_mean is not None
    if updated and skip_nonfinite and not (np.isfinite(mean) & np.isfinite(var)).all():
        updated = False
    if updated:
        _update_present(running_mean, running_var, mean, var, count, momentum, bool(unbiased))
    rows = (lambda a: a) if vbs is not None else (lambda a: a[0])
    with np.errstate(over="ignore"):
        sm, si = rows(mean).astype(L.sd), rows(invstd).astype(L.sd)
    return chk.finish(buf, final, L.x.dtype), sm, si, updated


def _backward_masked(dy: Any, x: Any, save_mean: Any, save_invstd: Any, weight: Any,
                     axis: Any, training: Any, out: Any, activation: Any, y: Any,
                     n_threads: Any, virtual_batch_size: Any, mask: Any, lengths: Any) -> Any:
    """batch_norm_backward with a mask: per part, the masked reduce
    (bn_masked_backward_reduce, with each channel's count), dx by
    bn_backward_apply with coefficients over that count, then 0 at padded
    entries (bn_masked_zero)."""
    L = chk.Layout(x, axis)
    dy = chk.like(dy, L.x, "dy")
    training = bool(training)
    vbs = chk.ghost_size(L, virtual_batch_size) if training else None
    if vbs is None:
        m = chk.vector(save_mean, L.C, "save_mean", required=True).reshape(1, -1)
        inv = chk.vector(save_invstd, L.C, "save_invstd", required=True).reshape(1, -1)
    else:
        K = -(-L.x.shape[0] // vbs)
        rows = dict(required=True, what="one row per ghost batch")
        m = chk.param(save_mean, (K, L.C), "save_mean", **rows)
        inv = chk.param(save_invstd, (K, L.C), "save_invstd", **rows)
    w = chk.vector(weight, L.C, "weight")
    code, slope = chk.activation_code(activation)
    y = chk.mask_source(y, L.x, activation if code else None)
    nt = chk.threads(n_threads)
    m8 = chk.padding(mask, lengths, L.x, L.axis)
    buf, final = chk.output(out, L.x, L.cd, (L.x, dy, y))
    dyc, xc, yc = L.canonical(dy), L.canonical(L.x), L.canonical(y)
    dw, db = np.zeros(L.C), np.zeros(L.C)
    for g, (sl, shape) in enumerate(_pieces(L, vbs)):
        count, sdy, sdx = np.empty(L.C), np.empty(L.C), np.empty(L.C)
        flat = (lambda a: None if a is None else a[sl].reshape(-1))
        _k.masked_backward_reduce(flat(dyc), flat(xc), flat(yc), flat(m8), shape, m[g], code,
                                  slope, sdy, sdx, count, nt)
        dw += sdx * inv[g]
        db += sdy
        coefs = _dx_coefficients(inv[g], w, sdy if training else None, sdx, count)
        if buf[sl].size:
            _k.backward_apply(flat(dyc), flat(xc), flat(yc), buf[sl].reshape(-1), shape, m[g],
                              *coefs, code, slope, nt)
    if buf.size:
        _k.masked_zero(buf.reshape(-1), m8.reshape(-1), nt)
    return chk.finish(buf, final, L.x.dtype), dw.astype(L.sd), db.astype(L.sd)
