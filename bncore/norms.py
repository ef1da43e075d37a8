"""Layer, group and instance normalization with PyTorch's semantics.

Each op comes as a functional form returning the output (`layer_norm`,
`group_norm`, `instance_norm`), a training form that also returns the saved
statistics (`*_train -> (y, mean, invstd)`), the gradient of that form
(`*_backward -> (dx, dweight, dbias)`) and a layer (`LayerNorm`, `GroupNorm`,
`InstanceNorm`).

Both run on row kernels (include/bncore_norms_template.h) built from the batch
norm kernels' run loops: statistics per row -- a layer-norm row, or an (n,
group) of C/G*H*W elements -- with the same two-pass-in-double scheme, then
the affine map while the row is still in cache; rows too long for that are
split across threads through bn_stats / bn_apply on the (1, rows, length)
view. Instance norm is group norm with one channel per group.
"""
import math
import numbers

import numpy as np

from . import _checks as chk
from . import _kernels as _k
from .functional import batch_norm_backward, batch_norm_eval
from .layers import BatchNorm

__all__ = [
    "layer_norm", "layer_norm_train", "layer_norm_backward",
    "group_norm", "group_norm_train", "group_norm_backward",
    "instance_norm", "instance_norm_train", "instance_norm_backward",
    "LayerNorm", "GroupNorm", "InstanceNorm",
]


# ---- shared checks ---------------------------------------------------------------------

def _array(x, name, min_ndim):
    if not isinstance(x, np.ndarray):
        x = np.asarray(x)
    if x.dtype not in chk.FLOAT_DTYPES:
        raise TypeError(f"{name}: expected dtype float16, float32 or float64, got {x.dtype}")
    if x.ndim < min_ndim:
        raise ValueError(f"{name}: expected an array with ndim >= {min_ndim}, got shape {x.shape}")
    return x


def _like(a, x, name):
    a = _array(a, name, 1)
    if a.shape != x.shape:
        raise ValueError(f"{name}: expected shape {x.shape} (the shape of x), got {a.shape}")
    if a.dtype != x.dtype:
        raise TypeError(f"{name}: expected dtype {x.dtype} (the dtype of x), got {a.dtype}")
    return a


def _param(v, shape, name):
    """A parameter of the given shape as a flat contiguous float64 copy (None stays None)."""
    if v is None:
        return None
    a = np.asarray(v)
    if a.dtype.kind != "f":
        raise TypeError(f"{name}: expected a floating-point array, got dtype {a.dtype}")
    if a.shape != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {a.shape}")
    return np.array(a, dtype=np.float64, order="C").reshape(-1)


def _saved(v, size, name):
    """Saved statistics (mean / invstd): any shape holding `size` floats."""
    a = np.asarray(v)
    if a.dtype.kind != "f":
        raise TypeError(f"{name}: expected a floating-point array, got dtype {a.dtype}")
    if a.size != size:
        raise ValueError(f"{name}: expected {size} values (one per normalized row or group), "
                         f"got shape {a.shape}")
    return np.array(a, dtype=np.float64, order="C").reshape(-1)


def _positive_int(v, name):
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
        raise ValueError(f"{name}: expected a positive int, got {v!r}")
    return int(v)


def _normalized_shape(normalized_shape, x=None):
    """normalized_shape as a tuple of non-negative ints, checked against x's trailing dims."""
    ns = normalized_shape
    if isinstance(ns, numbers.Integral) and not isinstance(ns, bool):
        ns = (int(ns),)
    elif not isinstance(ns, tuple) or not all(type(d) is int for d in ns):
        try:
            ns = tuple(ns)
        except TypeError:
            raise TypeError(f"normalized_shape: expected an int or a tuple of ints, got "
                            f"{normalized_shape!r}") from None
        if not all(isinstance(d, numbers.Integral) and not isinstance(d, bool) for d in ns):
            raise ValueError(f"normalized_shape: expected a tuple of non-negative ints, got "
                             f"{normalized_shape!r}")
        ns = tuple(int(d) for d in ns)
    if not ns or min(ns) < 0:
        raise ValueError(f"normalized_shape: expected a non-empty tuple of non-negative ints, "
                         f"got {normalized_shape!r}")
    if x is not None and (len(ns) > x.ndim or x.shape[x.ndim - len(ns):] != ns):
        raise ValueError(f"normalized_shape: expected the trailing dimensions of x, got {ns} "
                         f"for x of shape {x.shape}")
    return ns


def _prod(shape):
    return math.prod(int(d) for d in shape)


# ---- layer norm ------------------------------------------------------------------------

def layer_norm_train(x, normalized_shape, weight=None, bias=None, eps=1e-5, *, out=None,
                     n_threads=None):
    """Layer normalization over the trailing dims `normalized_shape`, as
    torch.nn.functional.layer_norm; returns (y, mean, invstd).

    mean and invstd have shape x.shape[:-k] + (1,)*k (k = len(normalized_shape),
    like torch.native_layer_norm) and are float32 for float16/float32 input,
    float64 for float64 input. weight and bias have shape normalized_shape.
    """
    x = _array(x, "x", 1)
    ns = _normalized_shape(normalized_shape, x)
    w = _param(weight, ns, "weight")
    b = _param(bias, ns, "bias")
    eps = chk.real(eps, "eps", 0.0)
    nt = chk.threads(n_threads)
    cd, sd = chk.compute_dtype(x.dtype), chk.stat_dtype(x.dtype)
    lead = x.shape[:x.ndim - len(ns)]
    rows, cols = _prod(lead), _prod(ns)
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
    x = _array(x, "x", 1)
    dy = _like(dy, x, "dy")
    ns = _normalized_shape(normalized_shape, x)
    rows, cols = _prod(x.shape[:x.ndim - len(ns)]), _prod(ns)
    m = _saved(mean, rows, "mean")
    inv = _saved(invstd, rows, "invstd")
    w = _param(weight, ns, "weight")
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
        self.G = _positive_int(num_groups, "num_groups")
        if self.C % self.G:
            raise ValueError(f"num_groups: expected a divisor of the channel count "
                             f"{self.C} (axis 1 of x, shape {self.x.shape}), got {self.G}")
        self.HW = _prod(self.x.shape[2:])
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
    m = _saved(mean, L.N * L.G, "mean")
    inv = _saved(invstd, L.N * L.G, "invstd")
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
    return _Groups(x, max(x.shape[1], 1))


def instance_norm_train(x, weight=None, bias=None, *, eps=1e-5, running_mean=None,
                        running_var=None, momentum=0.1, out=None, n_threads=None):
    """Instance normalization of x (N, C, *) with each instance's statistics;
    returns (y, mean, invstd) of shape (N, C). Running statistics, when given,
    are updated in place as PyTorch does: with the average over the batch of
    each instance's mean and unbiased variance."""
    L = _instances(x)
    chk.running(running_mean, running_var, L.C)
    momentum = chk.real(momentum, "momentum", 0.0, 1.0)
    if L.HW < 2:
        raise ValueError(f"x: expected more than 1 spatial element per channel when using "
                         f"the input's statistics, got shape {L.x.shape}")
    y, mean, invstd = _group_forward(L, weight, bias, eps, out, n_threads)
    if running_mean is not None:
        mean_c = mean.reshape(L.N, L.C).mean(0)
        var = 1.0 / invstd ** 2 - eps  # the biased variance the kernel used
        var_c = (var * (L.HW / (L.HW - 1))).reshape(L.N, L.C).mean(0)
        rm = (1 - momentum) * running_mean.astype(np.float64) + momentum * mean_c
        rv = (1 - momentum) * running_var.astype(np.float64) + momentum * var_c
        running_mean[...] = rm
        running_var[...] = rv
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
    if running_mean is None or running_var is None:
        raise ValueError("running_mean: running_mean and running_var are required when "
                         "use_input_stats is False")
    return batch_norm_eval(x, running_mean, running_var, weight, bias, axis=1, eps=eps,
                           out=out, n_threads=n_threads)


def instance_norm_backward(dy, x, mean, invstd, weight=None, *, out=None, n_threads=None):
    """Gradient of instance_norm_train: (dx, dweight, dbias). For
    use_input_stats=False use batch_norm_backward(..., training=False)."""
    L = _instances(x)
    return _group_backward(L, dy, mean, invstd, weight, out, n_threads)


# ---- layers ------------------------------------------------------------------------------

class _Module:
    """Mode switching and PyTorch-keyed state shared with BatchNorm."""
    train = BatchNorm.train
    eval = BatchNorm.eval
    __call__ = BatchNorm.__call__
    state_dict = BatchNorm.state_dict
    load_state_dict = BatchNorm.load_state_dict

    def _setup(self, dtype, eps):
        dtype = np.dtype(dtype)
        if dtype not in chk.FLOAT_DTYPES:
            raise TypeError(f"dtype: expected float16, float32 or float64, got {dtype}")
        self.dtype = dtype
        self.eps = chk.real(eps, "eps", 0.0)
        self.training = True
        self.grad_weight = self.grad_bias = None
        self._saved = None

    def _last(self):
        if self._saved is None:
            raise RuntimeError("backward: no forward call to differentiate; call forward first")
        return self._saved

    def _grads(self, dw, db):
        if self.weight is not None:
            self.grad_weight = dw.astype(self.weight.dtype)
        if self.bias is not None:
            self.grad_bias = db.astype(self.bias.dtype)


def _not_overlapping(out, x):
    if isinstance(out, np.ndarray) and np.may_share_memory(out, x):
        raise ValueError("out: must not overlap x in a layer (backward needs the input); "
                         "use the functional API for in-place normalization")


class LayerNorm(_Module):
    """Layer normalization over the trailing dims, like torch.nn.LayerNorm.

    weight (ones) and bias (zeros) have shape normalized_shape; training and
    eval mode behave the same. backward(dy) returns dx of the most recent
    forward and sets grad_weight / grad_bias.
    """

    def __init__(self, normalized_shape, *, eps=1e-5, elementwise_affine=True, bias=True,
                 dtype=np.float32):
        self._setup(dtype, eps)
        self.normalized_shape = _normalized_shape(normalized_shape)
        self.elementwise_affine = bool(elementwise_affine)
        affine = self.elementwise_affine
        self.weight = np.ones(self.normalized_shape, self.dtype) if affine else None
        self.bias = np.zeros(self.normalized_shape, self.dtype) if affine and bias else None

    def __repr__(self):
        return (f"LayerNorm({self.normalized_shape}, eps={self.eps}, "
                f"elementwise_affine={self.elementwise_affine}, bias={self.bias is not None})")

    def _state_names(self):
        return [k for k in ("weight", "bias") if getattr(self, k) is not None]

    def forward(self, x, *, out=None, n_threads=None):
        _not_overlapping(out, x)
        y, mean, invstd = layer_norm_train(x, self.normalized_shape, self.weight, self.bias,
                                           self.eps, out=out, n_threads=n_threads)
        self._saved = (np.asarray(x), mean, invstd)
        return y

    def backward(self, dy, *, out=None, n_threads=None):
        """dx of the most recent forward; sets grad_weight and grad_bias."""
        x, mean, invstd = self._last()
        dx, dw, db = layer_norm_backward(dy, x, self.normalized_shape, mean, invstd, self.weight,
                                         out=out, n_threads=n_threads)
        self._grads(dw, db)
        return dx


class GroupNorm(_Module):
    """Group normalization of (N, C, *) input, like torch.nn.GroupNorm:
    num_groups groups of num_channels/num_groups channels, per-channel weight
    (ones) and bias (zeros) when affine."""

    def __init__(self, num_groups, num_channels, *, eps=1e-5, affine=True, dtype=np.float32):
        self._setup(dtype, eps)
        self.num_groups = _positive_int(num_groups, "num_groups")
        self.num_channels = _positive_int(num_channels, "num_channels")
        if self.num_channels % self.num_groups:
            raise ValueError(f"num_groups: expected a divisor of num_channels "
                             f"{self.num_channels}, got {self.num_groups}")
        self.affine = bool(affine)
        C = self.num_channels
        self.weight = np.ones(C, self.dtype) if affine else None
        self.bias = np.zeros(C, self.dtype) if affine else None

    def __repr__(self):
        return (f"GroupNorm({self.num_groups}, {self.num_channels}, eps={self.eps}, "
                f"affine={self.affine})")

    def _state_names(self):
        return ["weight", "bias"] if self.affine else []

    def forward(self, x, *, out=None, n_threads=None):
        x = chk.tensor(x, "x")
        if x.shape[1] != self.num_channels:
            raise ValueError(f"x: expected {self.num_channels} channels on axis 1, got shape "
                             f"{x.shape}")
        _not_overlapping(out, x)
        y, mean, invstd = group_norm_train(x, self.num_groups, self.weight, self.bias, self.eps,
                                           out=out, n_threads=n_threads)
        self._saved = (x, mean, invstd)
        return y

    def backward(self, dy, *, out=None, n_threads=None):
        """dx of the most recent forward; sets grad_weight and grad_bias."""
        x, mean, invstd = self._last()
        dx, dw, db = group_norm_backward(dy, x, self.num_groups, mean, invstd, self.weight,
                                         out=out, n_threads=n_threads)
        self._grads(dw, db)
        return dx


class InstanceNorm(BatchNorm):
    """Instance normalization of (N, C, *) input, like torch.nn.InstanceNorm{1,2,3}d
    (affine=False and track_running_stats=False by default).

    Training mode, or no running statistics: each instance's own statistics
    (running statistics, when tracked, updated with the batch average as
    PyTorch does). Eval mode with tracked statistics: the running statistics.
    momentum=None means 0 (running statistics stay put), as in PyTorch.
    """

    def __init__(self, num_features, *, eps=1e-5, momentum=0.1, affine=False,
                 track_running_stats=False, dtype=np.float32):
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine,
                         track_running_stats=track_running_stats, axis=1, dtype=dtype)

    def __repr__(self):
        return (f"InstanceNorm({self.num_features}, eps={self.eps}, momentum={self.momentum}, "
                f"affine={self.affine}, track_running_stats={self.track_running_stats})")

    def forward(self, x, *, out=None, n_threads=None):
        x = self._check_input(x)
        _not_overlapping(out, x)
        if self.training or not self.track_running_stats:
            update = self.training and self.track_running_stats
            y, mean, invstd = instance_norm_train(
                x, self.weight, self.bias, eps=self.eps,
                running_mean=self.running_mean if update else None,
                running_var=self.running_var if update else None,
                momentum=0.0 if self.momentum is None else self.momentum,
                out=out, n_threads=n_threads)
            self._saved = (x, mean, invstd, True)
        else:
            y = batch_norm_eval(x, self.running_mean, self.running_var, self.weight, self.bias,
                                eps=self.eps, out=out, n_threads=n_threads)
            invstd = 1.0 / np.sqrt(self.running_var.astype(np.float64) + self.eps)
            self._saved = (x, self.running_mean.astype(np.float64), invstd, False)
        return y

    def backward(self, dy, *, out=None, n_threads=None):
        """dx of the most recent forward; sets grad_weight and grad_bias."""
        if self._saved is None:
            raise RuntimeError("backward: no forward call to differentiate; call forward first")
        x, mean, invstd, per_instance = self._saved
        if per_instance:
            dx, dw, db = instance_norm_backward(dy, x, mean, invstd, self.weight, out=out,
                                                n_threads=n_threads)
        else:
            dx, dw, db = batch_norm_backward(dy, x, mean, invstd, self.weight, training=False,
                                             out=out, n_threads=n_threads)
        if self.affine:
            self.grad_weight = dw.astype(self.weight.dtype)
            self.grad_bias = db.astype(self.bias.dtype)
        return dx
