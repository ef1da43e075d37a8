"""The NumPy-facing batch-norm functions (contract: shared/API.md).

Each function checks every argument first (bncore._checks), brings x to a
C-contiguous (outer, C, inner) view -- inner == 1 is the channels-last path,
which also serves (N, C) -- and calls one kernel with the GIL released.
"""
import numpy as np

from . import _checks as chk
from . import _kernels as _k

__all__ = [
    "batch_norm_train", "batch_norm_eval", "batch_norm_backward",
    "batch_norm_stats", "merge_stats", "batch_norm_elemt",
    "batch_norm_backward_reduce", "batch_norm_backward_elemt",
]


class _Layout:
    """x checked and laid out for the kernels."""

    def __init__(self, x, axis, name="x"):
        self.x = chk.tensor(x, name)
        self.axis = chk.channel_axis(axis, self.x.ndim)
        self.shape = chk.geometry(self.x.shape, self.axis)
        self.C = self.shape[1]
        self.count = self.shape[0] * self.shape[2]
        self.cd = chk.compute_dtype(self.x.dtype)
        self.sd = chk.stat_dtype(self.x.dtype)

    def flat(self, a):
        """a (shaped like x) as the flat contiguous compute-dtype buffer."""
        return None if a is None else chk.contiguous(a, self.cd).reshape(-1)


def batch_norm_train(x, weight=None, bias=None, *, axis=1, eps=1e-5, running_mean=None,
                     running_var=None, momentum=0.1, out=None, activation=None, n_threads=None,
                     virtual_batch_size=None, running_var_unbiased=True,
                     skip_nonfinite_update=False):
    """Normalize with the batch statistics; update running statistics in place.

    Returns (y, save_mean, save_invstd); see shared/API.md. `activation`
    (None, 'relu' or ('leaky_relu', slope)) is fused into the same pass.
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
    return _train(x, weight, bias, axis, eps, running_mean, running_var, momentum, out,
                  activation, n_threads, virtual_batch_size, skip_nonfinite_update,
                  running_var_unbiased)[:3]


def _train(x, weight, bias, axis, eps, running_mean, running_var, momentum, out, activation,
           n_threads, virtual_batch_size, skip_nonfinite_update, running_var_unbiased=True):
    """batch_norm_train, plus whether the running statistics were updated."""
    if virtual_batch_size is None:
        r = _k.fast_train(x, weight, bias, axis, eps, running_mean, running_var, momentum, out,
                          activation, n_threads, running_var_unbiased, skip_nonfinite_update,
                          chk.forked_child())
        if r is not None:
            return r
    L = _Layout(x, axis)
    w = chk.vector(weight, L.C, "weight")
    b = chk.vector(bias, L.C, "bias")
    eps = chk.real(eps, "eps", 0.0)
    momentum = chk.real(momentum, "momentum", 0.0, 1.0)
    chk.running(running_mean, running_var, L.C)
    act, slope = chk.activation(activation)
    nt = chk.threads(n_threads)
    if L.count < 2:
        raise ValueError(f"x: expected more than 1 value per channel when training, got "
                         f"{L.count} (shape {L.x.shape}, axis={axis})")
    ghosts = _ghost_batches(L, virtual_batch_size)
    buf, final = chk.output(out, L.x, L.cd, (L.x,))
    chk.disjoint_from_running(out, running_mean, running_var)
    if ghosts is not None:
        return _ghost_train(L, ghosts, buf, final, w, b, eps, running_mean, running_var,
                            momentum, act, slope, nt, running_var_unbiased,
                            skip_nonfinite_update)
    mean, invstd, var = np.empty(L.C), np.empty(L.C), np.empty(L.C)
    _k.train(L.flat(L.x), buf.reshape(-1), L.shape, w, b, eps, mean, invstd, var, act, slope, nt)
    update = _updates(running_mean, skip_nonfinite_update, mean, var)
    if update:
        _update_running(running_mean, running_var, mean, var,
                        L.count if running_var_unbiased else 1, momentum)
    y = chk.finish(buf, final, L.x.dtype)
    return y, mean.astype(L.sd, copy=False), invstd.astype(L.sd, copy=False), update


def _updates(running_mean, skip_nonfinite_update, mean, var):
    """Whether the running statistics are updated from these batch statistics."""
    return running_mean is not None and not (
        skip_nonfinite_update and not (np.isfinite(mean).all() and np.isfinite(var).all()))


def _update_running(running_mean, running_var, mean, var, count, momentum):
    # computed aside in float64, then both arrays are written: never half updated;
    # count 1 applies no Bessel correction (bn_update_running)
    rm = np.array(running_mean, dtype=np.float64)
    rv = np.array(running_var, dtype=np.float64)
    _k.update_running(mean, var, float(count), momentum, rm, rv)
    running_mean[...] = rm
    running_var[...] = rv


def batch_norm_eval(x, running_mean, running_var, weight=None, bias=None, *, axis=1, eps=1e-5,
                    out=None, activation=None, n_threads=None):
    """y = (x - running_mean) / sqrt(running_var + eps) * weight + bias."""
    r = _k.fast_eval(x, running_mean, running_var, weight, bias, axis, eps, out, activation,
                     n_threads, chk.forked_child())
    if r is not None:
        return r
    L = _Layout(x, axis)
    rm = chk.vector(running_mean, L.C, "running_mean", required=True)
    rv = chk.vector(running_var, L.C, "running_var", required=True)
    eps = chk.real(eps, "eps", 0.0)
    return _elemt(L, rm, _invstd_of(rv, eps), weight, bias, out, activation, n_threads)


def _invstd_of(var, eps):
    """1/sqrt(var + eps) in float64, taken as 0 where var + eps == 0 (eps = 0 and
    a zero variance), as the training kernel and PyTorch's CPU kernel do."""
    s = np.asarray(var, np.float64) + eps
    with np.errstate(divide="ignore"):  # only s == 0 divides by zero, and is set to 0
        inv = 1.0 / np.sqrt(s)
    inv[s == 0] = 0.0
    return inv


def batch_norm_elemt(x, mean, invstd, weight=None, bias=None, *, axis=1, out=None,
                     activation=None, n_threads=None):
    """y = (x - mean) * invstd * weight + bias with given statistics."""
    L = _Layout(x, axis)
    m = chk.vector(mean, L.C, "mean", required=True)
    inv = chk.vector(invstd, L.C, "invstd", required=True)
    return _elemt(L, m, inv, weight, bias, out, activation, n_threads)


def _elemt(L, center, invstd, weight, bias, out, activation, n_threads):
    w = chk.vector(weight, L.C, "weight")
    b = chk.vector(bias, L.C, "bias")
    act, slope = chk.activation(activation)
    nt = chk.threads(n_threads)
    buf, final = chk.output(out, L.x, L.cd, (L.x,))
    scale = invstd if w is None else w * invstd
    shift = np.zeros(L.C) if b is None else b
    _k.apply(L.flat(L.x), buf.reshape(-1), L.shape, center, scale, shift, act, slope, nt)
    return chk.finish(buf, final, L.x.dtype)


def batch_norm_backward(dy, x, save_mean, save_invstd, weight=None, *, axis=1, training=True,
                        out=None, activation=None, y=None, n_threads=None,
                        virtual_batch_size=None):
    """Gradients (dx, dweight, dbias) of batch_norm_train (training=True) or of
    the eval-mode normalization (training=False). With a fused activation,
    `y` is the forward output, whose sign gives the activation's mask.
    `virtual_batch_size` (training only): the ghost batches of the forward,
    save_mean/save_invstd of shape (K, C)."""
    if virtual_batch_size is None:
        r = _k.fast_backward(dy, x, save_mean, save_invstd, weight, axis, training, out,
                             activation, y, n_threads, chk.forked_child())
        if r is not None:
            return r
    L = _Layout(x, axis)
    dy = chk.like(dy, L.x, "dy")
    if virtual_batch_size is not None and training:
        return _ghost_backward(L, dy, save_mean, save_invstd, weight, out, activation, y,
                               n_threads, virtual_batch_size)
    m = chk.vector(save_mean, L.C, "save_mean", required=True)
    inv = chk.vector(save_invstd, L.C, "save_invstd", required=True)
    w = chk.vector(weight, L.C, "weight")
    act, slope = chk.activation(activation)
    y = _mask_source(y, L, act)
    nt = chk.threads(n_threads)
    buf, final = chk.output(out, L.x, L.cd, (L.x, dy, y))
    dw, db = np.empty(L.C), np.empty(L.C)
    _k.backward(L.flat(dy), L.flat(L.x), L.flat(y), buf.reshape(-1), L.shape, m, inv, w,
                bool(training), dw, db, act, slope, nt)
    dx = chk.finish(buf, final, L.x.dtype)
    return dx, dw.astype(L.sd, copy=False), db.astype(L.sd, copy=False)


def _mask_source(y, L, act):
    if act == 0:
        return None
    if y is None:
        raise ValueError(f"y: expected the forward output (shape {L.x.shape}; its sign is the "
                         f"activation's mask) since activation is set, got None")
    return chk.like(y, L.x, "y")


# ---- building blocks for distributed (synchronized) batch norm --------------------------

def batch_norm_stats(x, *, axis=1, n_threads=None):
    """Local statistics (count, mean, M2) per channel, mean and M2 in float64.

    M2 is the sum of squared deviations from the mean; a shard with no
    samples gives count 0 (and zeros), which merge_stats ignores.
    """
    L = _Layout(x, axis)
    nt = chk.threads(n_threads)
    mean, m2 = np.empty(L.C), np.empty(L.C)
    _k.stats(L.flat(L.x), L.shape, mean, m2, nt)
    return L.count, mean, m2


def merge_stats(counts, means, m2s):
    """Chan's merge of K (count, mean, M2) triples: counts (K,), means and m2s
    (K, C). Returns (count, mean, M2); merged in the given order in float64."""
    try:
        counts = np.asarray(counts, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"counts: expected real numbers, got {counts!r:.80}") from None
    if counts.ndim != 1:
        raise ValueError(f"counts: expected a 1-D array (one count per part), got shape {counts.shape}")
    bad = (counts < 0) | ~np.isfinite(counts)
    if bad.any():
        raise ValueError(f"counts: expected finite non-negative counts, got {counts[bad][0]} "
                         f"at index {np.flatnonzero(bad)[0]}")
    shape = None
    arrays = []
    for a, name in ((means, "means"), (m2s, "m2s")):
        a = np.asarray(a)
        if a.dtype.kind not in "fiu":
            raise TypeError(f"{name}: expected a real array, got dtype {a.dtype}")
        if a.ndim != 2 or a.shape[0] != counts.shape[0]:
            raise ValueError(f"{name}: expected shape ({counts.shape[0]}, C), got {a.shape}")
        if shape is not None and a.shape != shape:
            raise ValueError(f"{name}: expected shape {shape} (the shape of means), got {a.shape}")
        shape = a.shape
        arrays.append(np.ascontiguousarray(a, dtype=np.float64))
    C = shape[1]
    mean, m2 = np.zeros(C), np.zeros(C)
    if counts.shape[0]:
        total = _k.merge_stats(np.ascontiguousarray(counts), arrays[0], arrays[1], mean, m2)
    else:
        total = 0.0
    return int(round(total)), mean, m2


def batch_norm_backward_reduce(dy, x, mean, *, axis=1, activation=None, y=None, n_threads=None):
    """Per channel (sum dy, sum dy*(x - mean)) in float64 (centered sums)."""
    L = _Layout(x, axis)
    dy = chk.like(dy, L.x, "dy")
    m = chk.vector(mean, L.C, "mean", required=True)
    act, slope = chk.activation(activation)
    y = _mask_source(y, L, act)
    nt = chk.threads(n_threads)
    sum_dy, sum_dy_xmu = np.empty(L.C), np.empty(L.C)
    _k.backward_reduce(L.flat(dy), L.flat(L.x), L.flat(y), L.shape, m, act, slope, sum_dy,
                       sum_dy_xmu, nt)
    return sum_dy, sum_dy_xmu


def batch_norm_backward_elemt(dy, x, mean, invstd, weight, sum_dy, sum_dy_xmu, count, *, axis=1,
                              out=None, activation=None, y=None, n_threads=None):
    """dx from globally reduced sums over `count` elements per channel:
    dx = w*invstd*(dy - sum_dy/count - (x-mean)*invstd^2*sum_dy_xmu/count)."""
    L = _Layout(x, axis)
    dy = chk.like(dy, L.x, "dy")
    m = chk.vector(mean, L.C, "mean", required=True)
    inv = chk.vector(invstd, L.C, "invstd", required=True)
    w = chk.vector(weight, L.C, "weight")
    sdy = chk.vector(sum_dy, L.C, "sum_dy", required=True)
    sdx = chk.vector(sum_dy_xmu, L.C, "sum_dy_xmu", required=True)
    count = chk.real(count, "count", 1.0)
    act, slope = chk.activation(activation)
    y = _mask_source(y, L, act)
    nt = chk.threads(n_threads)
    buf, final = chk.output(out, L.x, L.cd, (L.x, dy, y))
    k = inv if w is None else w * inv
    _k.backward_apply(L.flat(dy), L.flat(L.x), L.flat(y), buf.reshape(-1), L.shape, m, k,
                      -k * inv * inv * sdx / count, -k * sdy / count, act, slope, nt)
    return chk.finish(buf, final, L.x.dtype)


# ---- ghost batch normalization (Hoffer et al. 2017) -------------------------------------

def _ghost_batches(L, virtual_batch_size):
    """None, or the (start, stop) sample ranges of the ghost batches along axis 0."""
    if virtual_batch_size is None:
        return None
    v = virtual_batch_size
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
        raise ValueError(f"virtual_batch_size: expected None or a positive int, got {v!r}")
    if L.axis == 0:
        raise ValueError("virtual_batch_size: ghost batches split axis 0 (the samples), which "
                         "must not be the channel axis (axis=0)")
    N = L.x.shape[0]
    ghosts = [(a, min(N, a + int(v))) for a in range(0, N, int(v))]
    per_sample = L.count // max(N, 1)
    small = [b - a for a, b in ghosts if (b - a) * per_sample < 2]
    if small:
        raise ValueError(f"virtual_batch_size: every ghost batch needs more than 1 value per "
                         f"channel; {v} samples of x {L.x.shape} leave a ghost batch of "
                         f"{small[0]} sample(s) with {small[0] * per_sample} value(s) per channel")
    return ghosts


def _ghost_views(L, ghosts, arrays):
    """Per ghost batch: the kernel shape and each flat array's slice (None stays None)."""
    row = L.x.size // max(L.x.shape[0], 1)  # elements per sample
    per_sample_outer = L.shape[0] // max(L.x.shape[0], 1)
    for a, b in ghosts:
        shape = ((b - a) * per_sample_outer, L.C, L.shape[2])
        yield shape, [None if f is None else f[a * row:b * row] for f in arrays]


def _ghost_train(L, ghosts, buf, final, w, b, eps, running_mean, running_var, momentum, act,
                 slope, nt, unbiased=True, skip_nonfinite_update=False):
    K = len(ghosts)
    mean, invstd, var = np.zeros((K, L.C)), np.zeros((K, L.C)), np.zeros((K, L.C))
    counts = np.empty(K)
    for k, (shape, (xk, yk)) in enumerate(_ghost_views(L, ghosts, (L.flat(L.x), buf.reshape(-1)))):
        counts[k] = shape[0] * shape[2]
        _k.train(xk, yk, shape, w, b, eps, mean[k], invstd[k], var[k], act, slope, nt)
    update = _updates(running_mean, skip_nonfinite_update, mean, var)
    if update:
        # average over ghost batches of the means and unbiased variances
        if unbiased:
            var = var * (counts / np.maximum(counts - 1, 1))[:, None]
        rm = (1 - momentum) * np.array(running_mean, np.float64) + momentum * mean.mean(0)
        rv = (1 - momentum) * np.array(running_var, np.float64) + momentum * var.mean(0)
        running_mean[...] = rm
        running_var[...] = rv
    y = chk.finish(buf, final, L.x.dtype)
    return y, mean.astype(L.sd, copy=False), invstd.astype(L.sd, copy=False), update


def _ghost_stats(v, K, C, name):
    a = np.asarray(v)
    if a.dtype.kind != "f":
        raise TypeError(f"{name}: expected a floating-point array, got dtype {a.dtype}")
    if a.shape != (K, C):
        raise ValueError(f"{name}: expected shape ({K}, {C}), one row per ghost batch, "
                         f"got {a.shape}")
    return np.ascontiguousarray(a, dtype=np.float64)


def _ghost_backward(L, dy, save_mean, save_invstd, weight, out, activation, y, n_threads,
                    virtual_batch_size):
    ghosts = _ghost_batches(L, virtual_batch_size)
    m = _ghost_stats(save_mean, len(ghosts), L.C, "save_mean")
    inv = _ghost_stats(save_invstd, len(ghosts), L.C, "save_invstd")
    w = chk.vector(weight, L.C, "weight")
    act, slope = chk.activation(activation)
    y = _mask_source(y, L, act)
    nt = chk.threads(n_threads)
    buf, final = chk.output(out, L.x, L.cd, (L.x, dy, y))
    dw, db = np.zeros(L.C), np.zeros(L.C)
    dwk, dbk = np.empty(L.C), np.empty(L.C)
    flats = (L.flat(dy), L.flat(L.x), L.flat(y), buf.reshape(-1))
    for k, (shape, (dyk, xk, yk, dxk)) in enumerate(_ghost_views(L, ghosts, flats)):
        _k.backward(dyk, xk, yk, dxk, shape, m[k], inv[k], w, True, dwk, dbk, act, slope, nt)
        dw += dwk
        db += dbk
    dx = chk.finish(buf, final, L.x.dtype)
    return dx, dw.astype(L.sd, copy=False), db.astype(L.sd, copy=False)
