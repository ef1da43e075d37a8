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
import math

import numpy as np

from . import _checks as chk
from . import _kernels as _k
from .functional import batch_norm_eval, update_running

__all__ = [
    "layer_norm", "layer_norm_train", "layer_norm_backward",
    "group_norm", "group_norm_train", "group_norm_backward",
    "instance_norm", "instance_norm_train", "instance_norm_backward",
]


# ---- layer norm ------------------------------------------------------------------------

def layer_norm_train(x, normalized_shape, weight=None, bias=None, eps=1e-5, *, out=None,
                     n_threads=None):
    """Layer normalization over the trailing dims `normalized_shape`, as
    torch.nn.functional.layer_norm; returns (y, mean, invstd).

    mean and invstd have shape x.shape[:-k] + (1,)*k (k = len(normalized_shape),
    like torch.native_layer_norm) and are float32 for float16/float32 input,
    float64 for float64 input. weight and bias have shape normalized_shape.
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
    return (chk.finish(buf, final, x.dtype), mean.astype(sd, copy=False).reshape(stat_shape),
            invstd.astype(sd, copy=False).reshape(stat_shape))


def layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5, *, out=None,
               n_threads=None):
    """torch.nn.functional.layer_norm: the normalized output only."""
    return layer_norm_train(x, normalized_shape, weight, bias, eps, out=out,
                            n_threads=n_threads)[0]


def layer_norm_backward(dy, x, normalized_shape, mean, invstd, weight=None, *, out=None,
                        n_threads=None):
    """Gradient of layer_norm_train: (dx, dweight, dbias).

    With g = dy * weight and xhat = (x - mean) * invstd per row,
    dx = invstd * (g - mean(g) - xhat * mean(g * xhat)), dweight = sum(dy * xhat)
    and dbias = sum(dy) over the rows (shape normalized_shape, returned even when
    weight is None). `out` may be dy (in place).
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


def _group_forward(L, weight, bias, eps, out, n_threads):
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


def _group_backward(L, dy, mean, invstd, weight, out, n_threads):
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


def group_norm_train(x, num_groups, weight=None, bias=None, eps=1e-5, *, out=None,
                     n_threads=None):
    """Group normalization of x (N, C, *), as torch.nn.functional.group_norm;
    returns (y, mean, invstd) with mean and invstd of shape (N, num_groups)."""
    L = _Groups(x, num_groups)
    y, mean, invstd = _group_forward(L, weight, bias, eps, out, n_threads)
    return (y, mean.astype(L.sd, copy=False).reshape(L.N, L.G),
            invstd.astype(L.sd, copy=False).reshape(L.N, L.G))


def group_norm(x, num_groups, weight=None, bias=None, eps=1e-5, *, out=None, n_threads=None):
    """torch.nn.functional.group_norm: the normalized output only."""
    return group_norm_train(x, num_groups, weight, bias, eps, out=out, n_threads=n_threads)[0]


def group_norm_backward(dy, x, num_groups, mean, invstd, weight=None, *, out=None,
                        n_threads=None):
    """Gradient of group_norm_train: (dx, dweight, dbias), dweight/dbias of shape (C,).
    `out` may be dy (in place)."""
    return _group_backward(_Groups(x, num_groups), dy, mean, invstd, weight, out, n_threads)


def _instances(x):
    """x (N, C, *) as N*C groups of one channel."""
    x = chk.tensor(x, "x")
    L = _Groups(x, max(x.shape[1], 1))
    if L.C == 0:  # no channels: no groups (not one), so the statistics are (N, 0)
        L.G, L.shape = 0, (L.N, 0, L.HW, 0)
    return L


def instance_norm_train(x, weight=None, bias=None, *, eps=1e-5, running_mean=None,
                        running_var=None, momentum=0.1, out=None, n_threads=None):
    """Instance normalization of x (N, C, *) with each instance's statistics;
    returns (y, mean, invstd) of shape (N, C). Running statistics, when given,
    are updated in place as PyTorch does: with the average over the batch of
    each instance's mean and unbiased variance."""
    L = _instances(x)
    chk.running(running_mean, running_var, L.C)
    momentum = chk.real(momentum, "momentum", 0.0, 1.0)
    chk.spatial(L.x, 2, "when using the input's statistics")
    if running_mean is not None:
        chk.nonempty(L.x, "to update the running statistics from")
    chk.disjoint_from_running(out, running_mean, running_var)
    if running_mean is not None:
        # each instance's exact variance (M2 / HW), not one rebuilt from invstd;
        # taken before the output is written, which may be x itself
        m, m2 = np.empty(L.N * L.C), np.empty(L.N * L.C)
        _k.stats(L.flat(L.x), (1, L.N * L.C, L.HW), m, m2, chk.threads(n_threads))
    y, mean, invstd = _group_forward(L, weight, bias, eps, out, n_threads)
    if running_mean is not None:
        update_running(running_mean, running_var, m.reshape(L.N, L.C),
                       (m2 / L.HW).reshape(L.N, L.C), L.HW, momentum)
    return (y, mean.astype(L.sd, copy=False).reshape(L.N, L.C),
            invstd.astype(L.sd, copy=False).reshape(L.N, L.C))


def instance_norm(x, running_mean=None, running_var=None, weight=None, bias=None,
                  use_input_stats=True, momentum=0.1, eps=1e-5, *, out=None, n_threads=None):
    """torch.nn.functional.instance_norm: normalize with each instance's
    statistics (use_input_stats=True, updating running statistics when given)
    or with the running statistics (use_input_stats=False)."""
    if use_input_stats:
        return instance_norm_train(x, weight, bias, eps=eps, running_mean=running_mean,
                                   running_var=running_var, momentum=momentum, out=out,
                                   n_threads=n_threads)[0]
    chk.required(running_mean, "running_mean", "required when use_input_stats is False")
    chk.required(running_var, "running_var", "required when use_input_stats is False")
    return batch_norm_eval(x, running_mean, running_var, weight, bias, axis=1, eps=eps,
                           out=out, n_threads=n_threads)


def instance_norm_backward(dy, x, mean, invstd, weight=None, *, out=None, n_threads=None):
    """Gradient of instance_norm_train: (dx, dweight, dbias). For
    use_input_stats=False use batch_norm_backward(..., training=False)."""
    L = _instances(x)
    return _group_backward(L, dy, mean, invstd, weight, out, n_threads)


