"""Batch normalization and its building blocks: the NumPy-facing operations.

Each batch-norm operation first offers its arguments as given to its one
entry in the compiled module (bncore._kernels), which runs the common,
canonical call straight away. Otherwise every argument is checked
(bncore._checks), brought to canonical form, and the same entry runs it.
Layouts: x is viewed as C-contiguous (outer, C, inner); inner == 1 is the
channels-last path, which also serves (N, C).
"""
import numpy as np

from . import _checks as chk
from . import _kernels as _k

__all__ = [
    "batch_norm_train", "batch_norm_eval", "batch_norm_backward",
    "batch_norm_stats", "merge_stats", "batch_norm_elemt",
    "batch_norm_backward_reduce", "batch_norm_backward_elemt",
    "batch_norm_backward_from_output",
]


def batch_norm_train(x, weight=None, bias=None, *, axis=1, eps=1e-5, running_mean=None,
                     running_var=None, momentum=0.1, out=None, activation=None, n_threads=None,
                     virtual_batch_size=None, running_var_unbiased=True,
                     skip_nonfinite_update=False):
    """Normalize with the batch statistics; update running statistics in place.

    Returns (y, save_mean, save_invstd). `activation` (None, 'relu' or
    ('leaky_relu', slope)) is fused into the same pass.
    `virtual_batch_size` (ghost batch norm, Hoffer et al. 2017): each slice of
    that many samples along axis 0 is normalized with its own statistics;
    save_mean/save_invstd are then (K, C) for K ghost batches and the running
    statistics move toward their average over the ghost batches.
    running_var_unbiased=False updates running_var with the biased batch
    variance (the Keras and ONNX convention) instead of PyTorch's n/(n-1).

    skip_nonfinite_update: when True and the batch mean or the batch variance
    of any channel (of any ghost batch) is NaN or +-inf, running_mean and
    running_var are left exactly as they were, for every channel (a NaN/inf
    batch, e.g. an overflowed mixed-precision step, then does not poison the
    running statistics; PyTorch issue 88474). y, save_mean and save_invstd are
    still returned as computed. Off by default: the update is then PyTorch's,
    and a non-finite channel makes that channel's running statistics non-finite.
    """
    return train(x, weight, bias, axis, eps, running_mean, running_var, momentum, out,
                 activation, n_threads, virtual_batch_size, skip_nonfinite_update,
                 running_var_unbiased)[:3]


def train(x, weight, bias, axis, eps, running_mean, running_var, momentum, out, activation,
          n_threads, virtual_batch_size=None, skip_nonfinite_update=False,
          running_var_unbiased=True):
    """batch_norm_train, plus whether the running statistics were updated."""
    r = _k.train(x, weight, bias, axis, eps, running_mean, running_var, momentum, out,
                 activation, n_threads, running_var_unbiased, skip_nonfinite_update,
                 virtual_batch_size)
    if r is not None:
        return r
    L = chk.Layout(x, axis).trainable()
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
    (K, C) or (C,); count per part; 1 applies no Bessel correction): the
    kernels' one update rule, computed aside in float64 and then written, so
    the arrays are never half updated."""
    mean = np.array(mean, np.float64, ndmin=2, order="C")
    var = np.array(var, np.float64, ndmin=2, order="C")
    count = np.broadcast_to(np.asarray(count, np.float64), mean.shape[:1]).copy()
    rm = np.array(running_mean, dtype=np.float64)
    rv = np.array(running_var, dtype=np.float64)
    _k.update_running(mean, var, count, momentum, rm, rv)
    running_mean[...] = rm
    running_var[...] = rv


def batch_norm_eval(x, running_mean, running_var, weight=None, bias=None, *, axis=1, eps=1e-5,
                    out=None, activation=None, n_threads=None):
    """y = (x - running_mean) / sqrt(running_var + eps) * weight + bias.

    invstd is 0 where running_var + eps == 0 (eps = 0 and a zero variance);
    a negative running_var + eps raises ValueError."""
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


def batch_norm_elemt(x, mean, invstd, weight=None, bias=None, *, axis=1, out=None,
                     activation=None, n_threads=None):
    """y = (x - mean) * invstd * weight + bias with given statistics."""
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


def batch_norm_backward(dy, x, save_mean, save_invstd, weight=None, *, axis=1, training=True,
                        out=None, activation=None, y=None, n_threads=None,
                        virtual_batch_size=None):
    """Gradients (dx, dweight, dbias) of batch_norm_train (training=True) or of
    the eval-mode normalization (training=False). With a fused activation,
    `y` is the forward output, whose sign gives the activation's mask.
    `virtual_batch_size` (training only): the ghost batches of the forward,
    save_mean/save_invstd of shape (K, C)."""
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
    dx, dw, db = _k.backward(L.canonical(dy), L.canonical(L.x), m, inv, w, L.axis, training,
                             buf, act, L.canonical(y), nt, vbs)
    return chk.finish(dx, final, L.x.dtype), dw, db


# ---- building blocks for distributed (synchronized) batch norm --------------------------

def batch_norm_stats(x, *, axis=1, n_threads=None):
    """Local statistics (count, mean, M2) per channel, mean and M2 in float64.

    M2 is the sum of squared deviations from the mean; a shard with no
    samples gives count 0 (and zeros), which merge_stats ignores.
    """
    L = chk.Layout(x, axis)
    nt = chk.threads(n_threads)
    mean, m2 = np.empty(L.C), np.empty(L.C)
    _k.stats(L.flat(L.x), L.shape, mean, m2, nt)
    return L.count, mean, m2


def merge_stats(counts, means, m2s):
    """Chan's merge of K (count, mean, M2) triples: counts (K,), means and m2s
    (K, C). Returns (count, mean, M2); merged in the given order in float64."""
    counts = chk.counts(counts)
    means, m2s = chk.part_rows(((means, "means"), (m2s, "m2s")), counts.shape[0])
    C = means.shape[1]
    mean, m2 = np.zeros(C), np.zeros(C)
    total = _k.merge_stats(np.ascontiguousarray(counts), means, m2s, mean, m2) \
        if counts.shape[0] else 0.0
    return int(round(total)), mean, m2


def batch_norm_backward_reduce(dy, x, mean, *, axis=1, activation=None, y=None, n_threads=None):
    """Per channel (sum dy, sum dy*(x - mean)) in float64 (centered sums)."""
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


def batch_norm_backward_elemt(dy, x, mean, invstd, weight, sum_dy, sum_dy_xmu, count, *, axis=1,
                              out=None, activation=None, y=None, n_threads=None):
    """dx from globally reduced sums over `count` elements per channel:
    dx = w*invstd*(dy - sum_dy/count - (x-mean)*invstd^2*sum_dy_xmu/count)."""
    L = chk.Layout(x, axis)
    dy = chk.like(dy, L.x, "dy")
    m = chk.vector(mean, L.C, "mean", required=True)
    inv = chk.vector(invstd, L.C, "invstd", required=True)
    w = chk.vector(weight, L.C, "weight")
    sdy = chk.vector(sum_dy, L.C, "sum_dy", required=True)
    sdx = chk.vector(sum_dy_xmu, L.C, "sum_dy_xmu", required=True)
    count = chk.real(count, "count", 1.0)
    code, slope = chk.activation_code(activation)
    y = chk.mask_source(y, L.x, activation if code else None)
    nt = chk.threads(n_threads)
    buf, final = chk.output(out, L.x, L.cd, (L.x, dy, y))
    k = inv if w is None else w * inv
    _k.backward_apply(L.flat(dy), L.flat(L.x), L.flat(y), buf.reshape(-1), L.shape, m, k,
                      -k * inv * inv * sdx / count, -k * sdy / count, code, slope, nt)
    return chk.finish(buf, final, L.x.dtype)


def batch_norm_backward_from_output(dy, y, save_invstd, weight=None, bias=None, *, axis=1,
                                    training=True, activation=None, out=None,
                                    min_abs_weight=None, n_threads=None):
    """(dx, dweight, dbias) of batch_norm_train(x, ..., out=x) from its output alone.

    The normalized input is rebuilt inside the backward passes as
    xhat = (act^-1(y) - bias) / weight, so the forward may overwrite x with y
    (Inplace-ABN): one activation buffer is saved per layer. activation is
    None or ('leaky_relu', slope > 0). Rebuilding divides by weight: every
    |weight| must be at least min_abs_weight (default sqrt of the dtype's
    machine epsilon: about 3.5e-4 for float32), or ValueError. `out` may be
    dy or y (the saved output is not needed afterwards).
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
