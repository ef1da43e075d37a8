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
"""
from __future__ import annotations

import numpy as np

from . import _checks as chk
from . import _kernels as _k
from ._typing import Activation, Array, ArrayLike, FloatArray
from .functional import batch_norm_backward, batch_norm_elemt, update_running

__all__ = ["batch_renorm_train", "batch_renorm_backward"]


def batch_renorm_train(x: ArrayLike, running_mean: Array, running_var: Array,
                       weight: ArrayLike | None = None, bias: ArrayLike | None = None, *,
                       axis: int = 1, eps: float = 1e-5, rmax: float = 3.0, dmax: float = 5.0,
                       momentum: float = 0.01, out: Array | None = None,
                       activation: Activation = None, n_threads: int | None = None
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

    Returns
    -------
    y : numpy.ndarray
        x's shape and dtype (``out`` when given).
    save_mean, save_invstd, r, d : numpy.ndarray
        Per-channel, shape ``(C,)``: what `batch_renorm_backward` needs
        (float64 for float64 input, float32 otherwise).

    Raises
    ------
    TypeError
        If x, a parameter, a running statistic or ``out`` has an unsupported
        type or dtype, or ``axis`` is not an int.
    ValueError
        If the running statistics are missing, a shape does not match, a
        channel has one value, or ``eps``, ``rmax``, ``dmax``, ``momentum``,
        ``activation`` or ``n_threads`` is out of range.

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
    nt = chk.threads(n_threads)
    chk.disjoint_from_running(out, running_mean, running_var)
    buf, final = chk.output(out, L.x, L.cd, (L.x,))
    xf = L.flat(L.x)
    mean, m2 = np.empty(L.C), np.empty(L.C)
    _k.stats(xf, L.shape, mean, m2, nt)
    var = m2 / L.count
    invstd = _k.invstd(var, eps)                        # 1 / sigma_B, the kernels' rule
    inv_sigma = _k.invstd(running_var.astype(np.float64), eps)
    r = np.clip(np.sqrt(var + eps) * inv_sigma, 1.0 / rmax, rmax)
    d = np.clip((mean - running_mean.astype(np.float64)) * inv_sigma, -dmax, dmax)
    shift = (d if w is None else w * d) + (0.0 if b is None else b)
    y = batch_norm_elemt(xf.reshape(L.x.shape), mean, invstd * r, w, shift, axis=L.axis,
                         out=buf, activation=act, n_threads=n_threads)
    update_running(running_mean, running_var, mean, var, L.count, momentum)
    y = chk.finish(y, final, L.x.dtype)
    return y, mean.astype(L.sd), invstd.astype(L.sd), r.astype(L.sd), d.astype(L.sd)


def batch_renorm_backward(dy: ArrayLike, x: ArrayLike, save_mean: ArrayLike,
                          save_invstd: ArrayLike, r: ArrayLike, d: ArrayLike,
                          weight: ArrayLike | None = None, *, axis: int = 1,
                          out: Array | None = None, activation: Activation = None,
                          y: ArrayLike | None = None, n_threads: int | None = None
                          ) -> tuple[Array, FloatArray, FloatArray]:
    """Gradient of `batch_renorm_train` with r and d held constant.

    dx is batch norm's training gradient with ``weight * r``,
    ``dweight = sum(dy * (xhat * r + d))``, ``dbias = sum(dy)``.

    Parameters
    ----------
    dy : array_like
        Gradient of the output: x's shape and dtype.
    x : array_like
        The forward's input, dtype float16, float32 or float64.
    save_mean, save_invstd, r, d : array_like
        What `batch_renorm_train` returned, length C each.
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
        ``activation`` or ``n_threads`` is invalid.

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
    xa = chk.tensor(x, "x")
    C = xa.shape[chk.channel_axis(axis, xa.ndim)]
    rv = chk.vector(r, C, "r", required=True)
    dv = chk.vector(d, C, "d", required=True)
    w = chk.vector(weight, C, "weight")
    wr = rv if w is None else w * rv
    dx, dw, db = batch_norm_backward(dy, xa, save_mean, save_invstd, wr, axis=axis,
                                     training=True, out=out, activation=activation, y=y,
                                     n_threads=n_threads)
    sd = dw.dtype
    dweight = rv * dw.astype(np.float64) + dv * db.astype(np.float64)
    return dx, dweight.astype(sd), db
