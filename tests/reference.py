"""The test oracle: every quantity bncore computes, written independently of
bncore in float64 NumPy from the textbook formulas (two-pass variance), the
one finite-difference helper, and the one tolerance table.

Tests import this module (`import reference as ref`); pytest's conftest is not
a module to import, so what tests share lives here.
"""
import numpy as np

# ---- tolerances --------------------------------------------------------------------------

# Element-wise assert_allclose tolerances per input dtype. TOL is for values
# computed from a few terms (y, mean, invstd, running statistics); GRAD_TOL for
# gradients and other sums over the whole batch, whose rounding grows with it.
TOL = {np.float16: dict(rtol=2e-3, atol=2e-3),
       np.float32: dict(rtol=2e-5, atol=2e-5),
       np.float64: dict(rtol=1e-12, atol=1e-12)}
GRAD_TOL = {np.float16: dict(rtol=5e-3, atol=5e-3),
            np.float32: dict(rtol=1e-4, atol=1e-4),
            np.float64: dict(rtol=1e-11, atol=1e-11)}


def tol(dtype, grad=False, scale=1.0):
    """The table's tolerance for dtype; atol multiplied by scale (the magnitude
    of the compared values, where they are far from 1)."""
    t = (GRAD_TOL if grad else TOL)[np.dtype(dtype).type]
    return dict(rtol=t["rtol"], atol=t["atol"] * scale)


# Norm-wise bounds for assert_close (the largest error over the largest value),
# tighter than the element-wise float32 entry: one rounding of the largest value
# bounds every error.
NORM_RTOL = {np.float16: 2e-3, np.float32: 1e-5, np.float64: 1e-12}


def assert_close(got, want, rtol, what=""):
    """max |got - want| <= rtol * max(1, max |want|): a norm-wise bound, for
    results whose small entries carry the rounding of the large ones."""
    got = np.asarray(got, np.float64)
    want = np.asarray(want, np.float64)
    scale = max(np.abs(want).max(initial=0.0), 1.0)
    err = np.abs(got - want).max(initial=0.0) / scale
    assert err <= rtol, f"{what}: relative error {err:.3g} > {rtol}"


# ---- finite differences ------------------------------------------------------------------

def numeric_grad(loss, arr, h=1e-6):
    """Central finite differences of the scalar loss() with respect to arr,
    perturbing arr in place one element at a time."""
    num = np.empty_like(arr)
    for i in np.ndindex(arr.shape):
        old = arr[i]
        arr[i] = old + h
        up = loss()
        arr[i] = old - h
        num[i] = (up - loss()) / (2 * h)
        arr[i] = old
    return num


def assert_grads(loss, pairs, h=1e-6, rtol=1e-5, atol=1e-7):
    """Each (array, gradient) pair: the gradient equals numeric_grad(loss, array)."""
    for arr, grad in pairs:
        np.testing.assert_allclose(grad, numeric_grad(loss, arr, h), rtol=rtol, atol=atol)


# ---- batch norm --------------------------------------------------------------------------

def axes(x, axis):
    """(the reduction axes, the shape that broadcasts a per-channel vector)."""
    axis %= x.ndim
    red = tuple(i for i in range(x.ndim) if i != axis)
    shape = [1] * x.ndim
    shape[axis] = -1
    return red, tuple(shape)


def _per_channel(v, shape, default):
    return default if v is None else np.asarray(v, np.float64).reshape(shape)


def stats(x, axis=1):
    """(count, mean, M2) in float64, two-pass."""
    red, shape = axes(x, axis)
    x64 = np.asarray(x, dtype=np.float64)
    count = x64.size // x64.shape[axis % x64.ndim] if x64.shape[axis % x64.ndim] else 0
    mean = x64.mean(red) if count else np.zeros(x64.shape[axis])
    m2 = ((x64 - mean.reshape(shape)) ** 2).sum(red)
    return count, mean, m2


def elemt(x, mean, invstd, weight=None, bias=None, axis=1):
    """(x - mean) * invstd * weight + bias with the statistics given."""
    _, shape = axes(x, axis)
    y = (np.asarray(x, np.float64) - _per_channel(mean, shape, 0.0)) * \
        _per_channel(invstd, shape, 1.0)
    return y * _per_channel(weight, shape, 1.0) + _per_channel(bias, shape, 0.0)


def train(x, weight=None, bias=None, axis=1, eps=1e-5):
    """(y, mean, invstd, unbiased var) in float64."""
    count, mean, m2 = stats(x, axis)
    invstd = 1.0 / np.sqrt(m2 / count + eps)
    return elemt(x, mean, invstd, weight, bias, axis), mean, invstd, m2 / (count - 1)


def evaluate(x, rm, rv, weight=None, bias=None, axis=1, eps=1e-5):
    """Inference: the running statistics in place of the batch's."""
    invstd = 1.0 / np.sqrt(np.asarray(rv, np.float64) + eps)
    return elemt(x, rm, invstd, weight, bias, axis)


def backward(dy, x, mean, invstd, weight=None, axis=1, training=True):
    """(dx, dweight, dbias) in float64 from the textbook formulas."""
    red, shape = axes(x, axis)
    dy64 = np.asarray(dy, np.float64)
    xhat = elemt(x, mean, invstd, axis=axis)
    w = np.ones(x.shape[axis]) if weight is None else np.asarray(weight, np.float64)
    dbias = dy64.sum(red)
    dweight = (dy64 * xhat).sum(red)
    k = (w * np.asarray(invstd, np.float64)).reshape(shape)
    if training:
        dx = k * (dy64 - dy64.mean(red, keepdims=True)
                  - xhat * (dy64 * xhat).mean(red, keepdims=True))
    else:
        dx = k * dy64
    return dx, dweight, dbias


def eval_backward(dy, running_var, weight=None, axis=1, eps=1e-5):
    """dx of inference-mode batch norm: dy * weight / sqrt(running_var + eps)."""
    _, shape = axes(dy, axis)
    return np.asarray(dy, np.float64) * _per_channel(weight, shape, 1.0) / np.sqrt(
        np.asarray(running_var, np.float64).reshape(shape) + eps)


def backward_reduce(dy, x, mean, axis=1):
    """(sum dy, sum dy * (x - mean)) per channel."""
    red, shape = axes(x, axis)
    dy64 = np.asarray(dy, np.float64)
    xmu = np.asarray(x, np.float64) - _per_channel(mean, shape, 0.0)
    return dy64.sum(red), (dy64 * xmu).sum(red)


def backward_elemt(dy, x, mean, invstd, weight, sum_dy, sum_dy_xmu, count, axis=1):
    """dx from the reduced sums of the whole (distributed) batch."""
    _, shape = axes(x, axis)
    inv = _per_channel(invstd, shape, 1.0)
    xmu = np.asarray(x, np.float64) - _per_channel(mean, shape, 0.0)
    return _per_channel(weight, shape, 1.0) * inv * (
        np.asarray(dy, np.float64) - _per_channel(sum_dy, shape, 0.0) / count
        - xmu * inv**2 * _per_channel(sum_dy_xmu, shape, 0.0) / count)


def activate(v, activation):
    if activation is None:
        return v
    slope = 0.0 if activation == "relu" else activation[1]
    return np.where(v < 0, v * slope, v)


def activation_grad(dy, y, activation):
    if activation is None:
        return dy
    slope = 0.0 if activation == "relu" else activation[1]
    return np.where(y > 0, dy, dy * slope)


# ---- ghost batch norm (Hoffer et al. 2017) -------------------------------------------------

def ghost_slices(N, v):
    return [slice(a, min(N, a + v)) for a in range(0, N, v)]


def ghost_train(x, virtual_batch_size, weight=None, bias=None, axis=1, eps=1e-5):
    """Batch norm of each ghost batch of virtual_batch_size samples along axis 0:
    (y, mean, invstd, unbiased var), the statistics shaped (ghost batches, C)."""
    parts = [train(x[s], weight, bias, axis, eps) for s in ghost_slices(len(x), virtual_batch_size)]
    stacked = (np.stack([p[i] for p in parts]) for i in (1, 2, 3))
    return (np.concatenate([p[0] for p in parts]), *stacked)


def ghost_backward(dy, x, mean, invstd, virtual_batch_size, weight=None, axis=1):
    """(dx, dweight, dbias) of ghost batch norm given each ghost batch's statistics."""
    back = [backward(dy[s], x[s], m, inv, weight, axis) for s, m, inv in
            zip(ghost_slices(len(x), virtual_batch_size), mean, invstd)]
    return (np.concatenate([q[0] for q in back]), np.sum([q[1] for q in back], 0),
            np.sum([q[2] for q in back], 0))


# ---- batch renormalization (Ioffe 2017) ----------------------------------------------------

def renorm(x, rm, rv, weight=None, bias=None, axis=1, eps=1e-5, rmax=3.0, dmax=5.0, r=None,
           d=None):
    """(y, r, d) of Ioffe 2017, Algorithm 1. r and d, when given, are held at
    those values (the gradient treats them as constants)."""
    red, shape = axes(x, axis)
    x64 = np.asarray(x, np.float64)
    mu = x64.mean(red)
    sigma_b = np.sqrt(((x64 - mu.reshape(shape)) ** 2).mean(red) + eps)
    sigma = np.sqrt(np.asarray(rv, np.float64) + eps)
    if r is None:
        r = np.clip(sigma_b / sigma, 1 / rmax, rmax)
    if d is None:
        d = np.clip((mu - np.asarray(rm, np.float64)) / sigma, -dmax, dmax)
    r, d = np.asarray(r, np.float64), np.asarray(d, np.float64)
    xhat = (x64 - mu.reshape(shape)) / sigma_b.reshape(shape) * r.reshape(shape) + d.reshape(shape)
    return xhat * _per_channel(weight, shape, 1.0) + _per_channel(bias, shape, 0.0), r, d


# ---- layer, group and instance norm ----------------------------------------------------------

def _rows_stats(xr, eps):
    """Mean and invstd of each row of the 2-D xr; a row of no values has mean 0
    and invstd NaN."""
    n = xr.shape[1]
    if not n:
        return np.zeros((xr.shape[0], 1)), np.full((xr.shape[0], 1), np.nan)
    mean = xr.mean(1, keepdims=True)
    return mean, 1 / np.sqrt(((xr - mean) ** 2).mean(1, keepdims=True) + eps)


def _rows_backward(g, xhat, invstd):
    """dx of normalization over the rows of 2-D arrays, g = dy * weight."""
    if not g.shape[1]:
        return g
    return invstd * (g - g.mean(1, keepdims=True) - xhat * (g * xhat).mean(1, keepdims=True))


def layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    """(y, mean, invstd) over the trailing normalized_shape; the statistics are
    shaped like x's leading axes followed by ones."""
    x = np.asarray(x, np.float64)
    k = len(normalized_shape)
    lead = x.shape[:x.ndim - k]
    rows = (int(np.prod(lead)), int(np.prod(normalized_shape)))
    mean, invstd = _rows_stats(x.reshape(rows), eps)
    y = ((x.reshape(rows) - mean) * invstd).reshape(x.shape)
    if weight is not None:
        y = y * np.asarray(weight, np.float64)
    if bias is not None:
        y = y + np.asarray(bias, np.float64)
    stat = lead + (1,) * k
    return y, mean.reshape(stat), invstd.reshape(stat)


def layer_norm_backward(dy, x, normalized_shape, mean, invstd, weight=None):
    """(dx, dweight, dbias) given the saved statistics."""
    x, dy = np.asarray(x, np.float64), np.asarray(dy, np.float64)
    k = len(normalized_shape)
    rows = (int(np.prod(x.shape[:x.ndim - k])), int(np.prod(normalized_shape)))
    m = np.asarray(mean, np.float64).reshape(-1, 1)
    inv = np.asarray(invstd, np.float64).reshape(-1, 1)
    xhat = (x.reshape(rows) - m) * inv
    g = dy if weight is None else dy * np.asarray(weight, np.float64)
    dx = _rows_backward(g.reshape(rows), xhat, inv).reshape(x.shape)
    red = tuple(range(x.ndim - k))
    return dx, (dy * xhat.reshape(x.shape)).sum(red), dy.sum(red)


def _group_rows(x, G):
    N, C = x.shape[:2]
    return N * G, (C // G if G else 0) * int(np.prod(x.shape[2:]))


def group_norm(x, G, weight=None, bias=None, eps=1e-5):
    """(y, mean, invstd) of G groups of channels (axis 1) per sample; the
    statistics are shaped (N, G). Instance norm is G = C."""
    x = np.asarray(x, np.float64)
    N, C = x.shape[:2]
    rows = _group_rows(x, G)
    mean, invstd = _rows_stats(x.reshape(rows), eps)
    y = ((x.reshape(rows) - mean) * invstd).reshape(x.shape)
    bshape = (1, C) + (1,) * (x.ndim - 2)
    if weight is not None:
        y = y * np.asarray(weight, np.float64).reshape(bshape)
    if bias is not None:
        y = y + np.asarray(bias, np.float64).reshape(bshape)
    return y, mean.reshape(N, G), invstd.reshape(N, G)


def group_norm_backward(dy, x, G, mean, invstd, weight=None):
    """(dx, dweight, dbias) given the saved (N, G) statistics."""
    x, dy = np.asarray(x, np.float64), np.asarray(dy, np.float64)
    C = x.shape[1]
    rows = _group_rows(x, G)
    m = np.asarray(mean, np.float64).reshape(-1, 1)
    inv = np.asarray(invstd, np.float64).reshape(-1, 1)
    xhat = (x.reshape(rows) - m) * inv
    bshape = (1, C) + (1,) * (x.ndim - 2)
    g = dy if weight is None else dy * np.asarray(weight, np.float64).reshape(bshape)
    dx = _rows_backward(g.reshape(rows), xhat, inv).reshape(x.shape)
    red = (0,) + tuple(range(2, x.ndim))
    return dx, (dy * xhat.reshape(x.shape)).sum(red), dy.sum(red)


# ---- inference: folding and loaders ----------------------------------------------------------

def convolution(x, W, b, groups=1):
    """Stride-1, unpadded convolution (cross-correlation), any spatial dims."""
    x, W = np.asarray(x, np.float64), np.asarray(W, np.float64)
    nd = W.ndim - 2
    win = np.lib.stride_tricks.sliding_window_view(x, W.shape[2:], axis=tuple(range(2, 2 + nd)))
    cin_g, cout_g = W.shape[1], W.shape[0] // groups
    k, s = "klm"[:nd], "xyz"[:nd]
    outs = [np.einsum(f"ni{s}{k},oi{k}->no{s}", win[:, g * cin_g:(g + 1) * cin_g],
                      W[g * cout_g:(g + 1) * cout_g]) for g in range(groups)]
    return np.concatenate(outs, axis=1) + np.asarray(b, np.float64).reshape((1, -1) + (1,) * nd)


def keras_batch_norm(x, gamma, beta, moving_mean, moving_var, eps, momentum, training):
    """Keras BatchNormalization (channels last) from its documented formulas:
    (y, moving_mean, moving_var). Training uses the batch mean and biased
    variance and moves moving = moving * momentum + batch * (1 - momentum);
    inference uses the moving statistics."""
    x = np.asarray(x, np.float64)
    red = tuple(range(x.ndim - 1))
    if training:
        mean = x.mean(red)
        var = ((x - mean) ** 2).mean(red)
        moving_mean = moving_mean * momentum + mean * (1 - momentum)
        moving_var = moving_var * momentum + var * (1 - momentum)
    else:
        mean, var = moving_mean, moving_var
    return gamma * (x - mean) / np.sqrt(var + eps) + beta, moving_mean, moving_var


def _per_dim(v, nd):
    return (v,) * nd if np.isscalar(v) else tuple(v)


def conv_nd(x, W, b=None, stride=1, padding=0, dilation=1, groups=1):
    """Convolution (cross-correlation) of x (N, C_in, *spatial) with W (C_out,
    C_in / groups, *kernel): per spatial dim a stride, a dilation and a zero
    padding, either one int for both sides or a (begin, end) pair."""
    x, W = np.asarray(x, np.float64), np.asarray(W, np.float64)
    nd = W.ndim - 2
    stride, dilation = _per_dim(stride, nd), _per_dim(dilation, nd)
    pads = [(p, p) if np.isscalar(p) else tuple(p)
            for p in (padding if isinstance(padding, (list, tuple)) else (padding,) * nd)]
    xp = np.pad(x, [(0, 0), (0, 0)] + pads)
    K = W.shape[2:]
    L = [(xp.shape[2 + i] - dilation[i] * (K[i] - 1) - 1) // stride[i] + 1 for i in range(nd)]
    cin_g, cout_g = W.shape[1], W.shape[0] // groups
    out = np.zeros((x.shape[0], W.shape[0], *L))
    for k in np.ndindex(*K):
        win = xp[(slice(None), slice(None)) + tuple(
            slice(k[i] * dilation[i], k[i] * dilation[i] + (L[i] - 1) * stride[i] + 1, stride[i])
            for i in range(nd))]
        for g in range(groups):
            xs = win[:, g * cin_g:(g + 1) * cin_g]              # (N, cin_g, *L)
            ws = W[g * cout_g:(g + 1) * cout_g, :][(...,) + k]  # (cout_g, cin_g)
            out[:, g * cout_g:(g + 1) * cout_g] += np.moveaxis(
                np.tensordot(xs, ws, axes=([1], [1])), -1, 1)
    if b is not None:
        out += np.asarray(b, np.float64).reshape((1, -1) + (1,) * nd)
    return out


def conv_transpose_nd(x, W, b=None, stride=1, padding=0, output_padding=0, dilation=1,
                      groups=1):
    """Transposed convolution of x (N, C_in, *spatial) with W (C_in, C_out /
    groups, *kernel), by its definition: every input value, times the kernel,
    is added at stride * position + dilation * tap of the full output (length
    (L - 1) * stride + dilation * (K - 1) + 1, plus output_padding zeros at the
    end), which is then cropped by the padding (an int for both sides or a
    (begin, end) pair per dim). Input channel i of group g = i // (C_in /
    groups) feeds output channels g * (C_out / groups) + j through W[i, j]."""
    x, W = np.asarray(x, np.float64), np.asarray(W, np.float64)
    nd = W.ndim - 2
    stride, dilation = _per_dim(stride, nd), _per_dim(dilation, nd)
    opad = _per_dim(output_padding, nd)
    pads = [(p, p) if np.isscalar(p) else tuple(p)
            for p in (padding if isinstance(padding, (list, tuple)) else (padding,) * nd)]
    K, Lin = W.shape[2:], x.shape[2:]
    full = [(Lin[i] - 1) * stride[i] + dilation[i] * (K[i] - 1) + 1 + opad[i] for i in range(nd)]
    cin_g, cout_g = W.shape[0] // groups, W.shape[1]
    out = np.zeros((x.shape[0], groups * cout_g, *full))
    for k in np.ndindex(*K):
        dst = (slice(None),) + tuple(
            slice(k[i] * dilation[i], k[i] * dilation[i] + (Lin[i] - 1) * stride[i] + 1, stride[i])
            for i in range(nd))
        for g in range(groups):
            xs = x[:, g * cin_g:(g + 1) * cin_g]              # (N, cin_g, *Lin)
            ws = W[g * cin_g:(g + 1) * cin_g][(slice(None), slice(None)) + k]  # (cin_g, cout_g)
            out[(slice(None), slice(g * cout_g, (g + 1) * cout_g)) + dst[1:]] += np.moveaxis(
                np.tensordot(xs, ws, axes=([1], [0])), -1, 1)
    out = out[(slice(None), slice(None)) + tuple(
        slice(pads[i][0], full[i] - pads[i][1]) for i in range(nd))]
    if b is not None:
        out = out + np.asarray(b, np.float64).reshape((1, -1) + (1,) * nd)
    return out

# ---- group and instance norm on any channel axis; RMS norm -----------------------------------


def channel_view(x, axis):
    """x in float64 as (N, P, C, Q) around its channel axes: an int or a tuple
    of adjacent axes whose product (C order) is C; axis 0 is the samples."""
    x = np.asarray(x, np.float64)
    ax = [a % x.ndim for a in (axis if isinstance(axis, tuple) else (axis,))]
    f, last, s = ax[0], ax[-1], x.shape
    return x.reshape(s[0], int(np.prod(s[1:f])), int(np.prod(s[f:last + 1])),
                     int(np.prod(s[last + 1:])))


def group_norm_axis(x, G, weight=None, bias=None, eps=1e-5, axis=1):
    """(y, mean, invstd) of group norm with the channels on `axis`: per sample
    and group, the statistics of the group's channels over every position.
    Statistics (N, G); weight and bias flat (C,)."""
    v = channel_view(x, axis)
    N, P, C, Q = v.shape
    g = v.reshape(N, P, G, C // G, Q)
    mean = g.mean(axis=(1, 3, 4))
    d = g - mean[:, None, :, None, None]
    invstd = 1 / np.sqrt((d ** 2).mean(axis=(1, 3, 4)) + eps)
    y = (d * invstd[:, None, :, None, None]).reshape(N, P, C, Q)
    if weight is not None:
        y = y * np.asarray(weight, np.float64).reshape(1, 1, C, 1)
    if bias is not None:
        y = y + np.asarray(bias, np.float64).reshape(1, 1, C, 1)
    return y.reshape(np.shape(x)), mean, invstd


def group_norm_axis_backward(dy, x, G, mean, invstd, weight=None, axis=1):
    """(dx, dweight, dbias) of group_norm_axis given its (N, G) statistics."""
    v, d = channel_view(x, axis), channel_view(dy, axis)
    N, P, C, Q = v.shape
    shape5 = (N, P, G, C // G, Q)
    m = np.asarray(mean, np.float64).reshape(N, 1, G, 1, 1)
    inv = np.asarray(invstd, np.float64).reshape(N, 1, G, 1, 1)
    xhat = (v.reshape(shape5) - m) * inv
    w = np.ones(C) if weight is None else np.asarray(weight, np.float64)
    g = (d * w.reshape(1, 1, C, 1)).reshape(shape5)
    red = (1, 3, 4)
    dx = inv * (g - g.mean(red, keepdims=True) - xhat * (g * xhat).mean(red, keepdims=True))
    dw = (d.reshape(shape5) * xhat).reshape(N, P, C, Q).sum((0, 1, 3))
    return dx.reshape(np.shape(x)), dw, d.sum((0, 1, 3))


def instance_running(x, rm, rv, momentum, axis=1):
    """PyTorch's instance-norm running update: the batch average of each
    instance's mean and unbiased variance."""
    v = channel_view(x, axis)
    n = v.shape[1] * v.shape[3]
    means = v.mean(axis=(1, 3))
    var = ((v - means[:, None, :, None]) ** 2).sum(axis=(1, 3)) / (n - 1)
    return ((1 - momentum) * np.asarray(rm, np.float64) + momentum * means.mean(0),
            (1 - momentum) * np.asarray(rv, np.float64) + momentum * var.mean(0))


def rms_norm(x, normalized_shape, weight=None, eps=None):
    """(y, invrms) over the trailing normalized_shape; eps None is the input
    dtype's machine epsilon; invrms shaped like x's leading axes then ones."""
    eps = float(np.finfo(np.asarray(x).dtype).eps) if eps is None else eps
    x = np.asarray(x, np.float64)
    k = len(normalized_shape)
    lead = x.shape[:x.ndim - k]
    xr = x.reshape(int(np.prod(lead)), -1)
    invrms = 1 / np.sqrt((xr ** 2).mean(1, keepdims=True) + eps)
    y = (xr * invrms).reshape(x.shape)
    if weight is not None:
        y = y * np.asarray(weight, np.float64)
    return y, invrms.reshape(lead + (1,) * k)


def rms_norm_backward(dy, x, normalized_shape, invrms, weight=None):
    """(dx, dweight): with g = dy * weight and r = invrms,
    dx = r * g - x * r**3 * mean(g * x) per row, dweight = sum(dy * x * r)."""
    x, dy = np.asarray(x, np.float64), np.asarray(dy, np.float64)
    k = len(normalized_shape)
    rows = (int(np.prod(x.shape[:x.ndim - k])), int(np.prod(normalized_shape)))
    r = np.asarray(invrms, np.float64).reshape(-1, 1)
    g = dy if weight is None else dy * np.asarray(weight, np.float64)
    g, xr = g.reshape(rows), x.reshape(rows)
    dx = r * g - xr * r ** 3 * (g * xr).mean(1, keepdims=True)
    return dx.reshape(x.shape), (dy.reshape(rows) * xr * r).sum(0).reshape(normalized_shape)

# ---- composable variants: statistics per part, plain or renormalized ----------------------


def part_slices(N, virtual_batch_size):
    """The parts along axis 0: the whole batch, or its ghost batches."""
    return [slice(0, N)] if virtual_batch_size is None else ghost_slices(N, virtual_batch_size)


def parts_train(x, rm, rv, virtual_batch_size=None, weight=None, bias=None, axis=1, eps=1e-5,
                limits=None, momentum=0.1):
    """Batch norm (limits None) or batch renorm (limits = (rmax, dmax)) applied
    to each part with its own statistics, all against the same running
    statistics: (y, mean, invstd, r, d, new running mean, new running var),
    the statistics (parts, C); the running statistics move toward the parts'
    average mean and unbiased variance."""
    ys, rows = [], []
    for s in part_slices(len(x), virtual_batch_size):
        _, mean, invstd, var_u = train(x[s], axis=axis, eps=eps)
        if limits is None:
            y = train(x[s], weight, bias, axis, eps)[0]
            r, d = np.ones_like(mean), np.zeros_like(mean)
        else:
            y, r, d = renorm(x[s], rm, rv, weight, bias, axis, eps, *limits)
        ys.append(y)
        rows.append((mean, invstd, r, d, var_u))
    mean, invstd, r, d, var_u = (np.stack(v) for v in zip(*rows))
    new_rm = (1 - momentum) * np.asarray(rm, np.float64) + momentum * mean.mean(0)
    new_rv = (1 - momentum) * np.asarray(rv, np.float64) + momentum * var_u.mean(0)
    return np.concatenate(ys), mean, invstd, r, d, new_rm, new_rv


def parts_backward(dy, x, r, d, virtual_batch_size=None, weight=None, axis=1, eps=1e-5):
    """(dx, dweight, dbias) of parts_train with r and d held constant: per part
    batch norm's gradient with weight * r, dweight = sum(dy * (xhat * r + d))."""
    red, shape = axes(x, axis)
    C = x.shape[axis]
    w = np.ones(C) if weight is None else np.asarray(weight, np.float64)
    dxs, dweight, dbias = [], np.zeros(C), np.zeros(C)
    for k, s in enumerate(part_slices(len(x), virtual_batch_size)):
        _, mean, invstd, _ = train(x[s], axis=axis, eps=eps)
        dxs.append(backward(dy[s], x[s], mean, invstd, w * r[k], axis)[0])
        xhat = elemt(x[s], mean, invstd, axis=axis)
        dy64 = np.asarray(dy[s], np.float64)
        dweight += (dy64 * (xhat * r[k].reshape(shape) + d[k].reshape(shape))).sum(red)
        dbias += dy64.sum(red)
    return np.concatenate(dxs), dweight, dbias

# ---- masked (padded) batches ---------------------------------------------------------------

def _channel_rows(a, axis):
    """a moved to (values, C): one column per channel."""
    a = np.moveaxis(np.asarray(a), axis % a.ndim, -1)
    return a.reshape(-1, a.shape[-1])


def masked_train(x, mask, weight=None, bias=None, axis=1, eps=1e-5):
    """Batch norm over each channel's unmasked values, concatenated (float64):
    (y, mean, invstd, count, var). y uses the same affine map at padded
    entries; a channel without values has mean 0, invstd 0 (y = bias)."""
    x = np.asarray(x, np.float64)
    m = np.broadcast_to(mask, x.shape)
    xs, ms = _channel_rows(x, axis), _channel_rows(m, axis)
    C = xs.shape[1]
    mean, invstd, count, var = np.zeros(C), np.zeros(C), np.zeros(C), np.zeros(C)
    for c in range(C):
        v = xs[ms[:, c], c]
        count[c] = v.size
        if v.size:
            mean[c], var[c] = v.mean(), ((v - v.mean()) ** 2).mean()
            invstd[c] = 1 / np.sqrt(var[c] + eps) if var[c] + eps > 0 else 0.0
    _, shape = axes(x, axis)
    w = _per_channel(weight, shape, 1.0)
    b = _per_channel(bias, shape, 0.0)
    y = (x - mean.reshape(shape)) * invstd.reshape(shape) * w + b
    return y, mean, invstd, count, var


def masked_backward(dy, x, mask, mean, invstd, weight=None, axis=1):
    """Gradients of masked_train's loss sum(dy * y) over the unmasked entries:
    (dx, dweight, dbias), dx 0 at padded entries."""
    x = np.asarray(x, np.float64)
    dy = np.asarray(dy, np.float64)
    m = np.broadcast_to(mask, x.shape)
    _, shape = axes(x, axis)
    w = _per_channel(weight, shape, 1.0)
    mean, invstd = np.reshape(mean, shape), np.reshape(invstd, shape)
    red = axes(x, axis)[0]
    n = np.maximum(m.sum(axis=red, keepdims=True), 1)
    g = np.where(m, dy, 0.0)
    xhat = (x - mean) * invstd
    dx = w * invstd * (g - g.sum(red, keepdims=True) / n
                       - xhat * (g * xhat).sum(red, keepdims=True) / n)
    return np.where(m, dx, 0.0), (g * xhat).sum(red), g.sum(red)


def masked_group_norm(x, mask, G, weight=None, bias=None, eps=1e-5):
    """Group norm (N, C, *) over each (n, group)'s unmasked values (float64):
    (y, mean (N, G), invstd (N, G))."""
    x = np.asarray(x, np.float64)
    m = np.broadcast_to(mask, x.shape)
    N, C = x.shape[:2]
    cg = C // G
    mean, invstd = np.zeros((N, G)), np.zeros((N, G))
    y = np.empty_like(x)
    for n in range(N):
        for g in range(G):
            blk = slice(g * cg, (g + 1) * cg)
            v = x[n, blk][m[n, blk]]
            if v.size:
                mean[n, g] = v.mean()
                var = ((v - v.mean()) ** 2).mean()
                invstd[n, g] = 1 / np.sqrt(var + eps) if var + eps > 0 else 0.0
            y[n, blk] = (x[n, blk] - mean[n, g]) * invstd[n, g]
    shape = (1, C) + (1,) * (x.ndim - 2)
    y = y * _per_channel(weight, shape, 1.0) + _per_channel(bias, shape, 0.0)
    return y, mean, invstd
