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
from .functional import _Layout, _update_running, batch_norm_backward
from .layers import BatchNorm

__all__ = ["batch_renorm_train", "batch_renorm_backward", "BatchRenorm"]


def batch_renorm_train(x, running_mean, running_var, weight=None, bias=None, *, axis=1,
                       eps=1e-5, rmax=3.0, dmax=5.0, momentum=0.01, out=None, activation=None,
                       n_threads=None):
    """Batch Renormalization forward: returns (y, save_mean, save_invstd, r, d).

    running_mean / running_var (required, length C) give mu and sigma; they are
    then updated in place like batch norm's (momentum, unbiased variance);
    momentum=0 leaves them unchanged. save_mean, save_invstd, r and d are what
    batch_renorm_backward needs (float32, or float64 for float64 input).
    """
    L = _Layout(x, axis)
    if running_mean is None or running_var is None:
        raise ValueError("running_mean: running_mean and running_var are required (the "
                         "moving statistics define r and d)")
    chk.running(running_mean, running_var, L.C)
    w = chk.vector(weight, L.C, "weight")
    b = chk.vector(bias, L.C, "bias")
    eps = chk.real(eps, "eps", 0.0)
    rmax = chk.real(rmax, "rmax", 1.0)
    dmax = chk.real(dmax, "dmax", 0.0)
    momentum = chk.real(momentum, "momentum", 0.0, 1.0)
    act, slope = chk.activation(activation)
    nt = chk.threads(n_threads)
    if L.count < 2:
        raise ValueError(f"x: expected more than 1 value per channel when training, got "
                         f"{L.count} (shape {L.x.shape}, axis={axis})")
    buf, final = chk.output(out, L.x, L.cd, (L.x,))
    xf = L.flat(L.x)
    mean, m2 = np.empty(L.C), np.empty(L.C)
    _k.stats(xf, L.shape, mean, m2, nt)
    var = m2 / L.count
    invstd = 1.0 / np.sqrt(var + eps)
    sigma = np.sqrt(running_var.astype(np.float64) + eps)
    r = np.clip(1.0 / (invstd * sigma), 1.0 / rmax, rmax)
    d = np.clip((mean - running_mean.astype(np.float64)) / sigma, -dmax, dmax)
    scale = invstd * r if w is None else w * invstd * r
    shift = (d if w is None else w * d) + (0.0 if b is None else b)
    _k.apply(xf, buf.reshape(-1), L.shape, mean, scale, shift, act, slope, nt)
    _update_running(running_mean, running_var, mean, var, L.count, momentum)
    y = chk.finish(buf, final, L.x.dtype)
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


class BatchRenorm(BatchNorm):
    """Batch Renormalization layer (eval mode: the moving statistics).

    rmax and dmax follow the paper's schedule over training steps (forward
    calls in training mode, counted by num_batches_tracked): rmax=1, dmax=0
    (plain batch norm) for `warmup_steps`, then linear relaxation to `rmax`
    over `rmax_ramp_steps` and to `dmax` over `dmax_ramp_steps`. The defaults
    are the paper's (5000 steps, rmax=3 at 40k steps, dmax=5 at 25k); pass
    warmup_steps=0, rmax_ramp_steps=0, dmax_ramp_steps=0 for fixed limits.
    momentum (default 0.01) is the moving statistics' update rate; None is the
    cumulative average as in BatchNorm.
    """

    def __init__(self, num_features, *, eps=1e-5, momentum=0.01, affine=True, axis=1,
                 dtype=np.float32, rmax=3.0, dmax=5.0, warmup_steps=5000,
                 rmax_ramp_steps=35000, dmax_ramp_steps=20000):
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine,
                         track_running_stats=True, axis=axis, dtype=dtype)
        self.rmax = chk.real(rmax, "rmax", 1.0)
        self.dmax = chk.real(dmax, "dmax", 0.0)
        for name, v in (("warmup_steps", warmup_steps), ("rmax_ramp_steps", rmax_ramp_steps),
                        ("dmax_ramp_steps", dmax_ramp_steps)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
                raise ValueError(f"{name}: expected a non-negative int, got {v!r}")
        self.warmup_steps = int(warmup_steps)
        self.rmax_ramp_steps = int(rmax_ramp_steps)
        self.dmax_ramp_steps = int(dmax_ramp_steps)
        self._rd = None

    def __repr__(self):
        return (f"BatchRenorm({self.num_features}, eps={self.eps}, momentum={self.momentum}, "
                f"rmax={self.rmax}, dmax={self.dmax}, warmup_steps={self.warmup_steps}, "
                f"axis={self.axis})")

    def limits(self, step=None):
        """(rmax, dmax) in force at training step `step` (default: the next one)."""
        step = int(self.num_batches_tracked) if step is None else step
        if step < self.warmup_steps:
            return 1.0, 0.0

        def ramp(target, start, length):
            frac = 1.0 if length == 0 else min(1.0, (step - self.warmup_steps) / length)
            return start + (target - start) * frac

        return (ramp(self.rmax, 1.0, self.rmax_ramp_steps),
                ramp(self.dmax, 0.0, self.dmax_ramp_steps))

    def forward(self, x, *, out=None, n_threads=None):
        if not self.training:
            self._rd = None
            return super().forward(x, out=out, n_threads=n_threads)
        x = self._check_input(x)
        if isinstance(out, np.ndarray) and np.may_share_memory(out, x):
            raise ValueError("out: must not overlap x in a layer (backward needs the input); "
                             "use the functional API for in-place normalization")
        n = int(self.num_batches_tracked) + 1
        rmax, dmax = self.limits()
        y, mean, invstd, r, d = batch_renorm_train(
            x, self.running_mean, self.running_var, self.weight, self.bias, axis=self.axis,
            eps=self.eps, rmax=rmax, dmax=dmax,
            momentum=1.0 / n if self.momentum is None else self.momentum,
            out=out, n_threads=n_threads)
        self.num_batches_tracked[...] = n
        self._saved = (x, mean, invstd, True)
        self._rd = (r, d)
        return y

    def backward(self, dy, *, out=None, n_threads=None):
        """dx of the most recent forward (r, d constant); sets grad_weight and grad_bias."""
        if self._saved is None or self._rd is None:
            return super().backward(dy, out=out, n_threads=n_threads)
        x, mean, invstd, _ = self._saved
        dx, dw, db = batch_renorm_backward(dy, x, mean, invstd, *self._rd, self.weight,
                                           axis=self.axis, out=out, n_threads=n_threads)
        if self.affine:
            self.grad_weight = dw.astype(self.weight.dtype)
            self.grad_bias = db.astype(self.bias.dtype)
        return dx
