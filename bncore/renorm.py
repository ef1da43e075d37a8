"""Batch Renormalization (Ioffe 2017, arXiv:1702.03275).

Training normalizes with the batch statistics and then corrects toward the
moving ones, per channel::

    r = clip(sigma_B / sigma, 1/rmax, rmax),  d = clip((mu_B - mu) / sigma, -dmax, dmax)
    y = weight * (xhat * r + d) + bias,       xhat = (x - mu_B) / sigma_B

with sigma_B = sqrt(var_B + eps), sigma = sqrt(running_var + eps) and r, d
treated as constants in the backward. That is one affine map per channel,
so it runs on the batch-norm kernels: statistics, then apply with
scale = weight*r/sigma_B and shift = weight*d + bias; the backward is batch
norm's with weight*r. With rmax=1 and dmax=0 the result is batch norm's,
bit for bit. Eval mode normalizes with the moving statistics.

Ghost batches (``virtual_batch_size``) are parts of the pipeline in
bncore/_parts.py: each part gets its own statistics, r and d (against the
same running statistics), and the running statistics move toward the
parts' average, as ghost batch norm's do.
"""
from __future__ import annotations

from . import _checks as chk
from . import _partition, _parts
from ._typing import Activation, Array, ArrayLike, FloatArray
from .functional import update_running

__all__ = ["batch_renorm_train", "batch_renorm_backward"]


def batch_renorm_train(x: ArrayLike, running_mean: Array, running_var: Array,
                       weight: ArrayLike | None = None, bias: ArrayLike | None = None, *,
                       axis: int = 1, eps: float = 1e-5, rmax: float = 3.0, dmax: float = 5.0,
                       momentum: float = 0.01, out: Array | None = None,
                       activation: Activation = None, n_threads: int | None = None,
                       virtual_batch_size: int | None = None
                       ) -> tuple[Array, FloatArray, FloatArray, FloatArray, FloatArray]:
    """Batch Renormalization forward (Ioffe 2017).

    Normalizes with the batch statistics, then corrects toward the moving
    ones per channel: ``r = clip(sigma_B / sigma, 1/rmax, rmax)``,
    ``d = clip((mu_B - mu) / sigma, -dmax, dmax)``,
    ``y = weight * (xhat * r + d) + bias`` with ``xhat = (x - mu_B) / sigma_B``,
    ``sigma_B = sqrt(var_B + eps)`` and ``sigma = sqrt(running_var + eps)``.
    With ``rmax=1`` and ``dmax=0`` the result is batch norm's.

    Parameters
    ----------
    x : array_like
        Input of dtype float16, float32 or float64 with ``ndim >= 2`` and more
        than one value per channel. float16 is computed in float32 and
        returned as float16.
    running_mean, running_var : numpy.ndarray
        Required writable floating-point arrays of shape ``(C,)``: mu and
        sigma; then updated in place like batch norm's (momentum, unbiased
        variance).
    weight, bias : array_like, optional
        Per-channel scale and shift of length C (None means 1 and 0).
    axis : int, default 1
        The channel axis (negative counts from the end).
    eps : float, default 1e-5
        Finite, ``>= 0``; added to the variances inside the square roots
        (``eps=0`` with a zero variance gives invstd 0).
    rmax : float, default 3.0
        ``>= 1``: the bound on r.
    dmax : float, default 5.0
        ``>= 0``: the bound on d.
    momentum : float, default 0.01
        In ``[0, 1]``: the running update's rate; 0 leaves the running
        statistics unchanged.
    out : numpy.ndarray, optional
        Writable array of x's shape and dtype that receives ``y``; it must
        not overlap the running statistics.
    activation : None, 'relu', 'leaky_relu' or ('leaky_relu', slope), optional
        Applied to ``y`` in the same pass.
    n_threads : int, optional
        The most threads to use. None uses `get_num_threads` at
        the time of the call.
    virtual_batch_size : int, optional
        Ghost batches: each slice of that many samples along axis 0 is
        renormalized with its own statistics, r and d (all against the same
        running statistics), and the running statistics move toward the
        ghost batches' average, as in `batch_norm_train`. Every ghost batch
        needs more than one value per channel; ``axis`` must not be 0.

    Returns
    -------
    y : numpy.ndarray
        x's shape and dtype (``out`` when given).
    save_mean, save_invstd, r, d : numpy.ndarray
        Per-channel, shape ``(C,)`` (``(K, C)``, one row per ghost batch,
        with ``virtual_batch_size``): what `batch_renorm_backward` needs
        (float64 for float64 input, float32 otherwise).

    Raises
    ------
    TypeError
        If x, a parameter, a running statistic or ``out`` has an unsupported
        type or dtype, or ``axis`` is not an int.
    ValueError
        If the running statistics are missing, a shape does not match, a
        channel (of a ghost batch) has one value, or ``eps``, ``rmax``,
        ``dmax``, ``momentum``, ``activation``, ``n_threads`` or
        ``virtual_batch_size`` is out of range. Nothing is written when an
        argument is refused.

    Examples
    --------
    >>> x = np.array([[1.0, 2.0], [3.0, 6.0]])
    >>> rm, rv = np.zeros(2), np.ones(2)
    >>> y, mean, invstd, r, d = bncore.batch_renorm_train(x, rm, rv, eps=0.0, momentum=0.1)
    >>> r, d
    (array([1., 2.]), array([2., 4.]))
    >>> y  # mu = 0 and sigma = 1 within the limits: the correction undoes the normalization
    array([[1., 2.],
           [3., 6.]])
    >>> rm, rv
    (array([0.2, 0.4]), array([1.1, 1.7]))

    Ghost batches of 2 samples, each with its own r and d:

    >>> x = np.array([[1.0], [3.0], [10.0], [14.0]])
    >>> y, mean, invstd, r, d = bncore.batch_renorm_train(
    ...     x, np.zeros(1), np.ones(1), eps=0.0, virtual_batch_size=2)
    >>> mean.ravel(), r.ravel(), d.ravel()
    (array([ 2., 12.]), array([1., 2.]), array([2., 5.]))
    """
    L = chk.Layout(x, axis).trainable()
    chk.running(running_mean, running_var, L.C, required=True)
    w = chk.vector(weight, L.C, "weight")
    b = chk.vector(bias, L.C, "bias")
    eps = chk.real(eps, "eps", 0.0)
    rmax = chk.real(rmax, "rmax", 1.0)
    dmax = chk.real(dmax, "dmax", 0.0)
    momentum = chk.real(momentum, "momentum", 0.0, 1.0)
    act = chk.activation(activation)
    chk.threads(n_threads)
    vbs = chk.ghost_batches(L, virtual_batch_size)
    chk.disjoint_from_running(out, running_mean, running_var)
    buf, final = chk.output(out, L.x, L.cd, (L.x,))
    # (1) statistics of the parts, (2) renormalize each, (3) the running update
    p = _partition.plan([L.x.shape[0]], 0, vbs)
    xc = L.canonical(L.x)
    counts, mean, m2 = _parts.local_stats(xc, L.axis, p, n_threads)
    counts = _partition.uniform(counts)
    var, invstd, r, d = _partition.coefficients(counts, mean, m2, eps, (rmax, dmax),
                                            running_mean, running_var)
    _parts.apply(xc, p, mean, invstd, r, d, w, b, L.axis, buf, act, n_threads)
    update_running(running_mean, running_var, mean, var, counts, momentum)
    y = chk.finish(buf, final, L.x.dtype)
    rows = slice(None) if vbs is not None else 0
    return y, *(a[rows].astype(L.sd) for a in (mean, invstd, r, d))


def batch_renorm_backward(dy: ArrayLike, x: ArrayLike, save_mean: ArrayLike,
                          save_invstd: ArrayLike, r: ArrayLike, d: ArrayLike,
                          weight: ArrayLike | None = None, *, axis: int = 1,
                          out: Array | None = None, activation: Activation = None,
                          y: ArrayLike | None = None, n_threads: int | None = None,
                          virtual_batch_size: int | None = None
                          ) -> tuple[Array, FloatArray, FloatArray]:
    """Gradient of `batch_renorm_train` with r and d held constant.

    dx is batch norm's training gradient with ``weight * r``,
    ``dweight = sum(dy * (xhat * r + d))``, ``dbias = sum(dy)``; with ghost
    batches, each ghost batch's with its own statistics, r and d, and the
    parameter gradients summed over them.

    Parameters
    ----------
    dy : array_like
        Gradient of the output: x's shape and dtype.
    x : array_like
        The forward's input, dtype float16, float32 or float64.
    save_mean, save_invstd, r, d : array_like
        What `batch_renorm_train` returned, length C each (``(K, C)`` with
        ``virtual_batch_size``).
    weight : array_like, optional
        The forward's per-channel scale (None means 1).
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
    virtual_batch_size : int, optional
        The forward's ghost batch size.

    Returns
    -------
    dx : numpy.ndarray
        x's shape and dtype (``out`` when given).
    dweight, dbias : numpy.ndarray
        Per-channel, shape ``(C,)``; float64 for float64 input, float32
        otherwise.

    Raises
    ------
    TypeError
        If an array has an unsupported type or dtype, or ``axis`` is not an
        int.
    ValueError
        If a shape does not match, ``y`` is missing with an activation, or
        ``activation``, ``n_threads`` or ``virtual_batch_size`` is invalid.
        Nothing is written when an argument is refused.

    Examples
    --------
    >>> x = np.array([[1.0, 2.0], [3.0, 6.0]])
    >>> y, mean, invstd, r, d = bncore.batch_renorm_train(x, np.zeros(2), np.ones(2), eps=0.0)
    >>> dx, dweight, dbias = bncore.batch_renorm_backward(np.ones_like(x), x, mean, invstd,
    ...                                                    r, d)
    >>> dx, dweight, dbias
    (array([[0., 0.],
           [0., 0.]]), array([4., 8.]), array([2., 2.]))
    """
    L = chk.Layout(x, axis)
    dy = chk.like(dy, L.x, "dy")
    vbs = chk.ghost_batches(L, virtual_batch_size)
    p = _partition.plan([L.x.shape[0]], 0, vbs)
    if vbs is None:
        stats = [chk.vector(v, L.C, n, required=True)[None] for v, n in
                 ((save_mean, "save_mean"), (save_invstd, "save_invstd"), (r, "r"), (d, "d"))]
    else:
        rows = dict(required=True, what="one row per ghost batch")
        stats = [chk.param(v, (p.K, L.C), n, **rows) for v, n in
                 ((save_mean, "save_mean"), (save_invstd, "save_invstd"), (r, "r"), (d, "d"))]
    m, inv, rv, dv = stats
    w = chk.vector(weight, L.C, "weight")
    act = chk.activation(activation)
    y = chk.mask_source(y, L.x, act)
    chk.threads(n_threads)
    buf, final = chk.output(out, L.x, L.cd, (L.x, dy, y))
    dyc, xc, yc = L.canonical(dy), L.canonical(L.x), L.canonical(y)
    counts = [L.count // max(L.x.shape[0], 1) * len(range(*sl.indices(L.x.shape[0])))
              for _, sl in p.segments]
    sum_dy, sum_dy_xmu = _parts.part_sums(dyc, xc, yc, p, m, L.axis, act, n_threads)
    _parts.backward_apply(dyc, xc, yc, p, m, inv, rv, w, sum_dy, sum_dy_xmu, counts, L.axis,
                          buf, act, n_threads)
    dweight, dbias = _parts.param_grads(inv, rv, dv, sum_dy, sum_dy_xmu)
    return chk.finish(buf, final, L.x.dtype), dweight.astype(L.sd), dbias.astype(L.sd)
