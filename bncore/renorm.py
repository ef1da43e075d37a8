"""Batch Renormalization (Ioffe 2017, arXiv:1702.03275).

Training normalizes with the batch statistics and then corrects toward the
moving ones, per channel:
    r = clip(sigma_B / sigma, 1/rmax, rmax),  d = clip((mu_B - mu) / sigma, -dmax, dmax)
    y = weight * (xhat * r + d) + bias,       xhat = (x - mu_B) / sigma_B
with sigma_B = sqrt(var_B + eps), sigma = sqrt(running_var + eps) and r, d
treated as constants in the backward. That is one affine map per channel,
so it runs on the batch-norm kernels: statistics, then apply with
scale = weight*r/sigma_B and shift = weight*d + bias; the backward is batch
norm's with weight*r. With rmax=1 and dmax=0 the result is batch norm's,
bit for bit. Eval mode normalizes with the moving statistics.
"""
import numpy as np

from . import _checks as chk
from . import _kernels as _k
from .functional import batch_norm_backward, batch_norm_elemt, update_running

__all__ = ["batch_renorm_train", "batch_renorm_backward"]


def batch_renorm_train(x, running_mean, running_var, weight=None, bias=None, *, axis=1,
                       eps=1e-5, rmax=3.0, dmax=5.0, momentum=0.01, out=None, activation=None,
                       n_threads=None):
    """Batch Renormalization forward: returns (y, save_mean, save_invstd, r, d).

    running_mean / running_var (required, length C) give mu and sigma; they are
    then updated in place like batch norm's (momentum, unbiased variance);
    momentum=0 leaves them unchanged. save_mean, save_invstd, r and d are what
    batch_renorm_backward needs (float32, or float64 for float64 input).
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


def batch_renorm_backward(dy, x, save_mean, save_invstd, r, d, weight=None, *, axis=1,
                          out=None, activation=None, y=None, n_threads=None):
    """Gradient of batch_renorm_train with r and d held constant: (dx, dweight, dbias).

    dx is batch norm's training gradient with weight*r,
    dweight = sum(dy * (xhat*r + d)), dbias = sum(dy). With a fused activation
    pass the forward output as y.
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
