"""Argument validation: the only code in bncore that raises argument errors.

Every public function and layer checks all of its arguments here before a
kernel runs or any state (an output, a running statistic, a gradient, a
saved record) changes. Messages name the argument and say what was expected
and what was received. The scalar predicates (`real`, `threads`,
`activation`) are the compiled module's own (`_kernels.real_in` and
friends), which also define the canonical form its entries accept, so the
rules exist once.
"""
import math
import numbers

import numpy as np

from . import _kernels as _k

FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))
INF = float("inf")


# ---- scalars ---------------------------------------------------------------------------------

def real(v, name, lo=-INF, hi=INF):
    """v as a float: a finite real number (not a bool) in [lo, hi]."""
    f = v
    if isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_)):
        try:
            f = float(v)
        except OverflowError:  # an int beyond float
            f = None
    if not _k.real_in(f, -INF if lo is None else lo, INF if hi is None else hi):
        if not _k.real_in(f, -INF, INF):
            raise ValueError(f"{name}: expected a finite real number, got {v!r}")
        want = f"a value >= {lo}" if hi == INF else f"a value in [{lo}, {hi}]"
        raise ValueError(f"{name}: expected {want}, got {v!r}")
    return f


def integer(v, name, lo=0):
    """v as an int (not a bool) >= lo."""
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Integral) or v < lo:
        what = "a positive int" if lo == 1 else f"an int >= {lo}"
        raise ValueError(f"{name}: expected {what}, got {v!r}")
    return int(v)


def positive_int(v, name):
    return integer(v, name, 1)


def divisor(v, n, name, of):
    """A positive int dividing n (the count named `of`)."""
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Integral) or v < 1 or n % v:
        raise ValueError(f"{name}: expected a positive int dividing {of}={n}, got {v!r}")
    return int(v)


def choice(v, name, options):
    """v one of the keys of options (a dict of value -> meaning)."""
    if not isinstance(v, str) or v not in options:
        said = " or ".join(f"{k!r} ({m})" for k, m in options.items())
        raise ValueError(f"{name}: expected {said}, got {v!r}")
    return v


def n_threads(n):
    """n_threads in canonical form: None or a positive Python int."""
    m = int(n) if isinstance(n, numbers.Integral) and not isinstance(n, (bool, np.bool_)) else n
    if _k.threads(m) < 0:
        raise ValueError(f"n_threads: expected None or a positive int, got {n!r}")
    return m


def threads(n):
    """The kernels' thread argument for n_threads (see _kernels.threads): 0 for
    None (OpenMP's maximum at call time), else the positive int, capped."""
    return _k.threads(n_threads(n))


def activation(act):
    """act in canonical form: None, 'relu' or ('leaky_relu', float slope >= 0)."""
    if _k.activation_code(act) is not None:
        return act
    if isinstance(act, tuple) and len(act) == 2 and act[0] == "leaky_relu":
        return ("leaky_relu", real(act[1], "activation slope", 0.0))
    raise ValueError(f"activation: expected None, 'relu' or ('leaky_relu', slope), got {act!r}")


def activation_code(act):
    """(kernel code, negative slope) of a canonical activation."""
    return _k.activation_code(activation(act))


# ---- arrays ----------------------------------------------------------------------------------

def _array(a, name):
    if isinstance(a, np.ma.MaskedArray):
        raise TypeError(f"{name}: expected a numpy.ndarray, got a numpy.ma.MaskedArray (masks "
                        f"are not supported: pass the data with the masked entries removed)")
    return a if isinstance(a, np.ndarray) else np.asarray(a)


def dtype(d, name="dtype"):
    """A supported dtype argument (float16, float32, float64)."""
    try:
        dt = np.dtype(d)
    except TypeError:
        dt = None
    if dt is None or dt not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected float16, float32 or float64, "
                        f"got {dt if dt is not None else repr(d)}")
    return dt


def tensor(x, name="x", min_ndim=2) -> np.ndarray:
    """x as an ndarray of a supported dtype with ndim >= min_ndim."""
    x = _array(x, name)
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected dtype float16, float32 or float64, got {x.dtype}")
    if x.ndim < min_ndim:
        raise ValueError(f"{name}: expected an array with ndim >= {min_ndim}"
                         + (" (N, C, ...)" if min_ndim == 2 else "") + f", got shape {x.shape}")
    return x


def like(a, x, name) -> np.ndarray:
    """a checked to match x in shape and dtype (dy, y)."""
    a = tensor(a, name, min(x.ndim, 1))
    if a.shape != x.shape:
        raise ValueError(f"{name}: expected shape {x.shape} (the shape of x), got {a.shape}")
    if a.dtype != x.dtype:
        raise TypeError(f"{name}: expected dtype {x.dtype} (the dtype of x), got {a.dtype}")
    return a


def _one_axis(a, ndim, shown):
    if isinstance(a, (bool, np.bool_)) or not isinstance(a, numbers.Integral):
        raise TypeError(f"axis: expected an int, got {type(a).__name__}"
                        + (f" in {shown!r}" if shown is not None else ""))
    if not -ndim <= a < ndim:
        raise ValueError(f"axis: expected an int in [{-ndim}, {ndim - 1}] for an array with "
                         f"ndim {ndim}, got {a}" + (f" in {shown!r}" if shown is not None else ""))
    return int(a) % ndim


def channel_axis(axis, ndim):
    """The channel axis in canonical form: an int in [0, ndim), or a tuple of
    several adjacent axes in increasing order (non-negative), whose product in
    C order is the channel dimension -- per-channel parameters and statistics
    are then flat, of that product's length. A 1-tuple is its int. The rule
    itself is the compiled module's `channel_span`, which the kernels' entries
    also apply."""
    if isinstance(axis, tuple):
        if not axis:
            raise ValueError("axis: expected an int or a non-empty tuple of adjacent ints, "
                             "got ()")
        ax = tuple(_one_axis(a, ndim, tuple(axis)) for a in axis)
        if len(set(ax)) != len(ax):
            raise ValueError(f"axis: expected distinct axes, got {tuple(axis)!r} (axes "
                             f"{ax} of an array with ndim {ndim})")
        if _k.channel_span(ax, ndim) is None:
            raise ValueError(f"axis: expected adjacent axes in increasing order, such as "
                             f"(1, 2) or (-2, -1), got {tuple(axis)!r} (axes {ax} of an array "
                             f"with ndim {ndim})")
        return ax[0] if len(ax) == 1 else ax
    return _one_axis(axis, ndim, None)


def axis_span(axis):
    """(first, last) channel axis of a canonical axis (see channel_axis)."""
    return (axis[0], axis[-1]) if isinstance(axis, tuple) else (axis, axis)


def compute_dtype(dt):
    return np.dtype(np.float32) if dt == np.float16 else np.dtype(dt)


def stat_dtype(dt):
    """dtype of save_mean / save_invstd and parameter gradients."""
    return np.dtype(np.float64) if dt == np.float64 else np.dtype(np.float32)


def contiguous(x, cd):
    """x itself when it is canonical in cd (the kernels' form), else a contiguous copy."""
    if x.dtype == cd and _k.is_canonical(x):
        return x
    return np.ascontiguousarray(x, dtype=cd)


def param(v, shape, name, *, required=False, what=None, flat=False):
    """A parameter of the given shape as a contiguous float64 copy (None stays
    None), flattened with flat=True."""
    if v is None:
        if required:
            raise TypeError(f"{name}: expected an array of shape {tuple(shape)}, got None")
        return None
    a = _array(v, name)
    if a.dtype.kind != "f":
        raise TypeError(f"{name}: expected a floating-point array, got dtype {a.dtype}")
    if a.shape != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}"
                         + (f", {what}" if what else "") + f", got {a.shape}")
    a = np.array(a, dtype=np.float64, order="C")
    return a.reshape(-1) if flat else a


def vector(v, C, name, *, required=False):
    """A per-channel parameter as a contiguous float64 copy (None stays None)."""
    return param(v, (C,), name, required=required, what="one value per channel")


def float_vector(v, name):
    """Any 1-D floating-point array as float64 (its length sets C)."""
    a = _array(v, name)
    if a.dtype.kind != "f":
        raise TypeError(f"{name}: expected a floating-point array, got dtype {a.dtype}")
    if a.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D array (one value per channel), got shape "
                         f"{a.shape}")
    return a.astype(np.float64)


def layer_weight(weight, min_ndim, what):
    """The weight of a dense (min_ndim 2: exactly 2-D) or convolution layer."""
    W = _array(weight, "weight")
    if W.dtype.kind != "f":
        raise TypeError(f"weight: expected a floating-point array, got dtype {W.dtype}")
    if W.ndim < min_ndim or (min_ndim == 2 and W.ndim != 2):
        raise ValueError(f"weight: expected {what}, got shape {W.shape}")
    return W


def saved(v, size, name):
    """Saved statistics (mean / invstd): any shape holding `size` floats, flat float64."""
    a = _array(v, name)
    if a.dtype.kind != "f":
        raise TypeError(f"{name}: expected a floating-point array, got dtype {a.dtype}")
    if a.size != size:
        raise ValueError(f"{name}: expected {size} values (one per normalized row or group), "
                         f"got shape {a.shape}")
    return np.array(a, dtype=np.float64, order="C").reshape(-1)


def variance(rv, eps, name="running_var"):
    """running_var + eps must not be negative (0 gives invstd 0, the kernels' rule)."""
    bad = np.flatnonzero(rv + eps < 0)
    if bad.size:
        raise ValueError(f"{name}: expected {name} + eps >= 0, got {rv[bad[:5]].tolist()} "
                         f"+ {eps} at channels {bad[:5].tolist()}")
    return rv


def running(rm, rv, C, *, required=False):
    """Checks the pair of running statistics that training updates in place."""
    if required and rm is None and rv is None:
        raise ValueError("running_mean: expected an array of length "
                         f"{C} (running_mean and running_var are required here), got None")
    if (rm is None) != (rv is None):
        missing, given = ("running_var", "running_mean") if rv is None else ("running_mean",
                                                                             "running_var")
        raise ValueError(f"{missing}: expected an array of length {C} since {given} is given "
                         f"(the two go together), got None")
    for a, name in ((rm, "running_mean"), (rv, "running_var")):
        if a is None:
            continue
        if not isinstance(a, np.ndarray) or isinstance(a, np.ma.MaskedArray):
            raise TypeError(f"{name}: expected a numpy.ndarray updated in place, got "
                            f"{type(a).__name__}")
        if a.dtype.kind != "f":
            raise TypeError(f"{name}: expected a floating-point array, got dtype {a.dtype}")
        if a.shape != (C,):
            raise ValueError(f"{name}: expected shape ({C},), one value per channel, got {a.shape}")
        if not a.flags.writeable:
            raise ValueError(f"{name}: expected a writable array (it is updated in place), "
                             f"got a read-only one")
    if rm is not None and np.may_share_memory(rm, rv):
        raise ValueError("running_var: expected an array separate from running_mean, got one "
                         "sharing its memory")


def disjoint_from_running(out, rm, rv):
    """out is written before the running statistics are read: they must not overlap."""
    for a, name in ((rm, "running_mean"), (rv, "running_var")):
        if out is not None and a is not None and np.may_share_memory(out, a):
            raise ValueError(f"out: expected an array separate from {name} (the output is "
                             f"written before {name} is updated from its old value), got one "
                             f"sharing its memory")


def separate_from_input(out, x):
    """A layer keeps x for its backward: its out must not overlap x."""
    if isinstance(out, np.ndarray) and np.may_share_memory(out, x):
        raise ValueError("out: expected an array separate from x (a layer keeps x for "
                         "backward; use the functional API or InPlaceABN to normalize in "
                         "place), got one sharing memory with x")


def _self_overlapping(a):
    """Whether two elements of a share memory (a zero or interleaved stride)."""
    if a.size == 0:
        return False
    extent = a.itemsize
    for st, n in sorted((abs(st), n) for n, st in zip(a.shape, a.strides) if n > 1):
        if st < extent:
            return True
        extent = st * (n - 1) + extent
    return False


def _same_view(a, b):
    return (a.__array_interface__["data"][0] == b.__array_interface__["data"][0]
            and a.strides == b.strides and a.shape == b.shape and a.dtype == b.dtype)


def output(out, x, cd, inputs):
    """(buffer the kernel writes, array to return or copy into).

    The kernel writes straight into `out` when it is a canonical array of the
    compute dtype that is either disjoint from every input or exactly one of
    them (elementwise in place is safe). Otherwise a temporary is used and
    copied into `out` afterwards, so a partially overlapping `out` still gets
    the right answer.
    """
    if out is None:
        return _k.empty_output(x.shape, cd), None
    if not isinstance(out, np.ndarray) or isinstance(out, np.ma.MaskedArray):
        raise TypeError(f"out: expected a numpy.ndarray, got {type(out).__name__}")
    if out.shape != x.shape:
        raise ValueError(f"out: expected shape {x.shape}, got {out.shape}")
    if out.dtype != x.dtype:
        raise TypeError(f"out: expected dtype {x.dtype}, got {out.dtype}")
    if not out.flags.writeable:
        raise ValueError("out: expected a writable array, got a read-only one")
    if _self_overlapping(out):
        raise ValueError(f"out: expected an array whose elements do not overlap, got strides "
                         f"{out.strides} for shape {out.shape}")
    direct = out.dtype == cd and _k.is_canonical(out) and all(
        a is None or not np.may_share_memory(out, a) or _same_view(out, a) for a in inputs)
    return (out, out) if direct else (_k.empty_output(x.shape, cd), out)


def finish(buf, final, dt):
    """The result in the input's dtype, copied into `out` when one was given."""
    if final is None:
        return buf if buf.dtype == dt else buf.astype(dt)
    if buf is not final:
        np.copyto(final, buf, casting="unsafe")
    return final


class Layout:
    """x checked for a per-channel operation along `axis` (an int, or a tuple
    of adjacent axes that form one channel dimension, see `channel_axis`):
    its (outer, C, inner) geometry, element count per channel and dtypes."""

    def __init__(self, x, axis, name="x"):
        self.x = tensor(x, name)
        self.axis = channel_axis(axis, self.x.ndim)  # int, or a tuple of adjacent axes
        self.first, self.last = axis_span(self.axis)
        shape = self.x.shape
        self.shape = (math.prod(shape[:self.first]), math.prod(shape[self.first:self.last + 1]),
                      math.prod(shape[self.last + 1:]))
        self.C = self.shape[1]
        self.count = self.shape[0] * self.shape[2]
        self.cd = compute_dtype(self.x.dtype)
        self.sd = stat_dtype(self.x.dtype)

    def flat(self, a):
        """a (shaped like x) as the flat canonical compute-dtype buffer (None stays None)."""
        return None if a is None else contiguous(a, self.cd).reshape(-1)

    def canonical(self, a):
        """a (shaped like x) as a canonical array of the compute dtype."""
        return None if a is None else contiguous(a, self.cd)

    def channels(self, n, what="x"):
        if self.C != n:
            raise ValueError(f"{what}: expected {n} channels on axis {self.axis}, got shape "
                             f"{self.x.shape}")
        return self

    def trainable(self, empty=False):
        """Training needs more than 1 value per channel; with empty=True, an empty
        batch (count 0) is accepted too (batch norm defines it: empty output,
        running statistics untouched)."""
        if self.count == 1 or (self.count == 0 and not empty):
            raise ValueError(f"x: expected more than 1 value per channel when training, got "
                             f"{self.count} (shape {self.x.shape}, axis={self.axis})")
        return self


def ghost_batches(L, virtual_batch_size):
    """virtual_batch_size checked against the layout: None or an int whose ghost
    batches along axis 0 each hold more than one value per channel."""
    if virtual_batch_size is None:
        return None
    v = positive_int(virtual_batch_size, "virtual_batch_size")
    ghost_axis(L.axis, L.x.ndim)
    if L.count == 0:  # an empty batch: no ghost batch has a value to count
        return v
    N = L.x.shape[0]
    per_sample = L.count // max(N, 1)
    last = N % v if v < N else N
    small = last if last else v
    if small * per_sample < 2:
        raise ValueError(f"virtual_batch_size: every ghost batch needs more than 1 value per "
                         f"channel; {v} samples of x {L.x.shape} leave a ghost batch of "
                         f"{small} sample(s) with {small * per_sample} value(s) per channel")
    return v


def normalized_shape(ns_arg, x=None):
    """normalized_shape as a tuple of non-negative ints, checked against x's trailing dims."""
    ns = ns_arg
    if isinstance(ns, numbers.Integral) and not isinstance(ns, (bool, np.bool_)):
        ns = (int(ns),)
    else:
        try:
            ns = tuple(ns)
        except TypeError:
            raise TypeError(f"normalized_shape: expected an int or a tuple of ints, got "
                            f"{ns_arg!r}") from None
        if not all(isinstance(d, numbers.Integral) and not isinstance(d, (bool, np.bool_))
                   for d in ns):
            raise ValueError(f"normalized_shape: expected a tuple of non-negative ints, got "
                             f"{ns_arg!r}")
        ns = tuple(int(d) for d in ns)
    if not ns or min(ns) < 0:
        raise ValueError(f"normalized_shape: expected a non-empty tuple of non-negative ints, "
                         f"got {ns_arg!r}")
    if x is not None and (len(ns) > x.ndim or x.shape[x.ndim - len(ns):] != ns):
        raise ValueError(f"normalized_shape: expected the trailing dimensions of x, got {ns} "
                         f"for x of shape {x.shape}")
    return ns


def state_entry(key, value, current):
    """A state_dict value checked against the attribute it replaces."""
    v = _array(value, f"state[{key!r}]")
    if v.shape != current.shape:
        raise ValueError(f"state[{key!r}]: expected shape {current.shape}, got {v.shape}")
    if current.dtype.kind in "iu":
        if v.dtype.kind not in "iu":
            raise TypeError(f"state[{key!r}]: expected an integer, got dtype {v.dtype}")
        info = np.iinfo(current.dtype)
        bad = [int(n) for n in np.ravel(v) if not 0 <= int(n) <= info.max]
        if bad:
            raise ValueError(f"state[{key!r}]: expected a count in [0, {info.max}], got {bad[0]}")
    elif v.dtype.kind != "f":
        raise TypeError(f"state[{key!r}]: expected a floating-point array, got dtype {v.dtype}")
    return v


def state_keys(state, names, strict, optional=()):
    """The keys of a state dict checked against the layer's names."""
    if not hasattr(state, "keys"):
        raise TypeError(f"state: expected a mapping of names to arrays, got {type(state).__name__}")
    missing = [k for k in names if k not in state]
    unexpected = [k for k in state if k not in names and k not in optional]
    if unexpected or (strict and missing):
        raise KeyError(f"state: missing keys {missing}, unexpected keys {unexpected}")


# ---- operation-specific rules --------------------------------------------------------------

def mask_source(y, x, act):
    """The forward output y (the activation's mask) when act is set, else None."""
    if act is None:
        return None
    if y is None:
        raise ValueError(f"y: expected the forward output (shape {x.shape}; its sign is the "
                         f"activation's mask) since activation is set, got None")
    return like(y, x, "y")


def counts(v) -> np.ndarray:
    """Part counts for merge_stats: finite counts >= 0, one per part (K,) or
    one per part and channel (K, C)."""
    try:
        c = np.asarray(v, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"counts: expected real numbers, got {v!r:.80}") from None
    if c.ndim not in (1, 2):
        raise ValueError(f"counts: expected shape (K,) (one count per part) or (K, C) (per "
                         f"part and channel), got shape {c.shape}")
    bad = (c < 0) | ~np.isfinite(c)
    if bad.any():
        raise ValueError(f"counts: expected finite non-negative counts, got {c[bad][0]} "
                         f"at index {np.argwhere(bad)[0].tolist()}")
    return c


def part_rows(arrays, K) -> list[np.ndarray]:
    """(K, C) float64 arrays of per-part statistics, all of one shape."""
    shape, out = None, []
    for a, name in arrays:
        a = _array(a, name)
        if a.dtype.kind not in "fiu":
            raise TypeError(f"{name}: expected a real array, got dtype {a.dtype}")
        if a.ndim != 2 or a.shape[0] != K:
            raise ValueError(f"{name}: expected shape ({K}, C), got {a.shape}")
        if shape is not None and a.shape != shape:
            raise ValueError(f"{name}: expected shape {shape} (the shape of "
                             f"{arrays[0][1]}), got {a.shape}")
        shape = a.shape
        out.append(np.ascontiguousarray(a, dtype=np.float64))
    return out


def invertible(activation_arg):
    """(code, slope) of an activation the in-place backward can invert."""
    code, slope = activation_code(activation_arg)
    if code == 1 or (code == 2 and slope <= 0):
        raise ValueError(f"activation: the in-place backward rebuilds x from y, which needs an "
                         f"invertible activation: None or ('leaky_relu', slope > 0), got "
                         f"{activation_arg!r}")
    return code, slope


def rebuildable(w, inv, tol, C):
    """Every |weight| >= tol and weight * save_invstd finite and non-zero: the
    in-place backward divides by them."""
    wabs = np.ones(C) if w is None else np.abs(w)
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        bad = np.flatnonzero(~(wabs >= tol) | ~np.isfinite(1.0 / (wabs * np.abs(inv))))[:5]
    if bad.size:
        shown = (np.ones(C) if w is None else w)[bad]
        raise ValueError(f"weight: the in-place backward divides by weight * save_invstd, so "
                         f"|weight| must be >= {tol:.3g} (min_abs_weight) and save_invstd finite "
                         f"and non-zero; channels {bad.tolist()} have weight {shown.tolist()}, "
                         f"save_invstd {inv[bad].tolist()}")


def groups(num_groups, x, C=None, axis=1):
    """num_groups dividing the channel count C of x (default: axis 1 of x)."""
    G = positive_int(num_groups, "num_groups")
    C = x.shape[1] if C is None else C
    if C % G:
        raise ValueError(f"num_groups: expected a divisor of the channel count "
                         f"{C} (axis {axis} of x, shape {x.shape}), got {G}")
    return G


def spatial(x, n, what, count=None):
    """x with at least n spatial elements per channel (count; default x (N, C, *))."""
    if (math.prod(x.shape[2:]) if count is None else count) < n:
        raise ValueError(f"x: expected more than {n - 1} spatial element per channel {what}, "
                         f"got shape {x.shape}")


def nonempty(x, what, C=None):
    if x.shape[0] == 0 and (x.shape[1] if C is None else C):
        raise ValueError(f"x: expected at least one instance {what}, got shape {x.shape}")


def required(v, name, why):
    if v is None:
        raise ValueError(f"{name}: expected an array, got None ({why})")
    return v


def named_weights(weights, names):
    """A list or mapping of arrays in the order of names."""
    if hasattr(weights, "keys"):
        missing = [k for k in names if k not in weights]
        if missing:
            raise KeyError(f"weights: missing keys {missing} (expected {names})")
        return dict(zip(names, (weights[k] for k in names)))
    weights = list(weights)
    if len(weights) != len(names):
        raise ValueError(f"weights: expected {len(names)} arrays ({', '.join(names)}), got "
                         f"{len(weights)}")
    return dict(zip(names, weights))


def writable_input(x, what):
    """x for a layer that overwrites it: a writable ndarray."""
    if not isinstance(x, np.ndarray) or not x.flags.writeable:
        raise ValueError(f"x: {what} overwrites its input: expected a writable "
                         f"numpy.ndarray, got {type(x).__name__}"
                         + ("" if not isinstance(x, np.ndarray) else " (read-only)"))
    return x


def refuse(name, message, error=ValueError):
    """A setting a layer or function does not support."""
    raise error(f"{name}: {message}")


def steps(x, name, C, t):
    """A recurrent step (N, C) or sequence (T, N, C) and its start step t."""
    x = tensor(x, name)
    if x.ndim not in (2, 3) or x.shape[-1] != C:
        raise ValueError(f"{name}: expected shape (N, {C}) for one step or (T, N, {C}) for a "
                         f"sequence, got {x.shape}")
    if t is None:
        if x.ndim == 2:
            raise ValueError(f"t: the time step is required with a single step {name} "
                             f"of shape {x.shape}")
        t = 0
    return x, integer(t, "t")


def step_grads(dy, saved, first):
    """dy (T, N, C) or (N, C) matching the saved inputs of its steps."""
    for s in range(first, first + (dy.shape[0] if dy.ndim == 3 else 1)):
        x = saved[s].x
        if x.shape != dy.shape[-2:] or x.dtype != dy.dtype:
            raise ValueError(f"dy: expected steps of shape {x.shape} and dtype {x.dtype} "
                             f"(the input of step {s}), got {dy.shape} {dy.dtype}")


def count_in(v, key, hi):
    if not 0 <= int(v) <= hi:
        raise ValueError(f"state[{key!r}]: expected a count in [0, {hi}], got {int(v)}")


# ---- folding: weight layouts and the ONNX pass --------------------------------------------

WEIGHT_LAYOUTS = {"OI": ("fold_into_conv", "a Conv weight (out_channels, in_channels / groups, "
                         "*kernel)"),
                  "IO": ("fold_into_conv_transpose", "a ConvTranspose weight (in_channels, "
                         "out_channels / groups, *kernel)")}


def weight_layout(layout, expected):
    """The stated weight layout of a convolution fold: 'OI' (Conv) or 'IO'
    (ConvTranspose); the other one names the function that takes it."""
    if layout == expected:
        return layout
    if isinstance(layout, str) and layout in WEIGHT_LAYOUTS:
        fn, what = WEIGHT_LAYOUTS[layout]
        raise ValueError(f"layout: {layout!r} is {what}, which "
                         f"{WEIGHT_LAYOUTS[expected][0]} does not take: call bncore.{fn}")
    raise ValueError(f"layout: expected {expected!r} ({WEIGHT_LAYOUTS[expected][1]}), "
                     f"got {layout!r}")


def fold_coefficient(v, C, name, other_C, hint):
    """A batch norm coefficient of length C; a length equal to other_C (what the
    other weight layout would need) adds a hint on the layout to the message."""
    a = _array(v, name) if v is not None else None
    if a is not None and a.ndim == 1 and a.shape[0] == other_C != C:
        raise ValueError(f"{name}: expected shape ({C},), one value per channel, got "
                         f"{a.shape} ({hint})")
    return vector(v, C, name, required=True)


def flag(v, name):
    """A bool argument (True/False, not a truthy object)."""
    if not isinstance(v, (bool, np.bool_)):
        raise TypeError(f"{name}: expected True or False, got {v!r}")
    return bool(v)


def onnx_model_source(model, model_type):
    """An onnx.ModelProto, a path (str or os.PathLike) or serialized bytes."""
    import os
    if not isinstance(model, (model_type, str, bytes, os.PathLike)):
        raise TypeError(f"model: expected an onnx.ModelProto, a path or serialized bytes, got "
                        f"{type(model).__name__}")
    return model


def optional_path(p, name):
    """None or a str / os.PathLike file path."""
    import os
    if p is not None and not isinstance(p, (str, os.PathLike)):
        raise TypeError(f"{name}: expected None or a file path (str or os.PathLike), got "
                        f"{type(p).__name__}")
    return p


def per_sample(L):
    """A Layout whose channel axes leave axis 0 (the samples) alone: the layout
    of group and instance norm."""
    if L.first == 0:
        raise ValueError(f"axis: expected channel axes after axis 0 (the samples), got "
                         f"axis={L.axis} for x of shape {L.x.shape}")
    return L

# ---- synchronized batch norm over an allgather callable ------------------------------------


def allgather_callable(allgather, comm, reduction):
    """An allgather callable given instead of (not with) an MPI communicator."""
    if not callable(allgather):
        raise TypeError(f"allgather: expected a callable (local array -> (world_size, "
                        f"*local.shape) array), got {type(allgather).__name__}")
    if comm is not None:
        raise ValueError("comm: expected None with an allgather callable (give one "
                         "transport), got a communicator")
    if reduction != "allgather":
        raise ValueError(f"reduction: expected 'allgather' with an allgather callable, "
                         f"got {reduction!r}")


def allgather_rank(allgather, rank, virtual_batch_size):
    """This process's row in the callable's result: `rank`, else the callable's
    `rank` attribute; required with ghost batches (None with MPI)."""
    if allgather is None:
        if rank is not None:
            raise ValueError("rank: expected None with MPI (the communicator knows it), "
                             f"got {rank!r}")
        return None
    if rank is None:
        rank = getattr(allgather, "rank", None)
    if rank is None:
        if virtual_batch_size is not None:
            raise ValueError("rank: expected this process's index in the allgather's rank "
                             "order with virtual_batch_size (ghost batches lie over the "
                             "shards in rank order), got None")
        return None
    return integer(rank, "rank")


def gathered(got, send, rank):
    """An allgather callable's result: (world_size, *send.shape) float64 with
    this rank's row equal to what it sent (when the rank is known)."""
    if not isinstance(got, np.ndarray):
        raise TypeError(f"allgather: expected the callable to return a numpy.ndarray of "
                        f"shape (world_size, {', '.join(map(str, send.shape))}), got "
                        f"{type(got).__name__}")
    if got.dtype.kind not in "fiu":
        raise TypeError(f"allgather: expected the callable to return a real array, got "
                        f"dtype {got.dtype}")
    if got.ndim != send.ndim + 1 or got.shape[1:] != send.shape or got.shape[0] < 1:
        raise ValueError(f"allgather: expected the callable to return shape (world_size, "
                         f"{', '.join(map(str, send.shape))}) (every rank's array, stacked "
                         f"in rank order), got {got.shape}")
    got = np.ascontiguousarray(got, dtype=np.float64)
    if rank is not None:
        if rank >= got.shape[0]:
            raise ValueError(f"rank: expected a row of the allgather's {got.shape[0]} rows, "
                             f"got {rank}")
        if got[rank].tobytes() != send.tobytes():
            raise ValueError(f"allgather: row {rank} (this rank's) of the callable's result "
                             f"differs from what this rank sent: expected every rank's array "
                             f"in rank order")
    return got


def ghost_axis(axis, ndim):
    """Ghost batches split axis 0 (the samples), which must not be a channel axis."""
    if axis_span(channel_axis(axis, ndim))[0] == 0:
        raise ValueError("virtual_batch_size: ghost batches split axis 0 (the samples), which "
                         f"must not be a channel axis (axis={axis})")


def torch_group_ready(dist):
    """torch.distributed available and initialized."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("group: expected an initialized torch.distributed (call "
                           "torch.distributed.init_process_group first), got none")


# ---- population statistics (precise.py) ----------------------------------------------------

def population_other(other, cls, C):
    """Statistics to merge: a PopulationStats of the same width."""
    if not isinstance(other, cls):
        raise TypeError(f"other: expected a PopulationStats, got {type(other).__name__}")
    if other.num_features != C:
        raise ValueError(f"other: expected statistics of {C} channels, got {other.num_features}")
    return other


def population_nonempty(count, name="stats", hint="call update first"):
    """Statistics to read or write must hold at least one value per channel."""
    if np.min(count) < 1:
        raise ValueError(f"{name}: expected statistics of at least one value per channel, got "
                         f"count 0 ({hint})")


def communicator(comm):
    """An mpi4py-style communicator: allgather of Python objects."""
    if not callable(getattr(comm, "allgather", None)):
        raise TypeError(f"comm: expected an mpi4py communicator (with allgather), got "
                        f"{type(comm).__name__}")
    return comm


def gathered_widths(widths, what="statistics"):
    """Every rank's statistics have one width (checked on every rank alike)."""
    if any(w != widths[0] for w in widths):
        raise ValueError(f"comm: expected {what} of one width on every rank, got widths "
                         f"{list(widths)} by rank")


def gathered_failures(failed):
    """No rank raised inside collect_population_stats (every rank raises otherwise)."""
    bad = [r for r, f in enumerate(failed) if f]
    if bad:
        raise RuntimeError(f"comm: rank(s) {bad} raised inside collect_population_stats; "
                           f"every layer is restored on every rank (see the error on that rank)")


def running_target(layer, C, name="layer"):
    """A layer with per-channel running statistics of length C (the BatchNorm family,
    FrozenBatchNorm) that load_state_dict can set."""
    rm, rv = getattr(layer, "running_mean", None), getattr(layer, "running_var", None)
    if not (isinstance(rm, np.ndarray) and isinstance(rv, np.ndarray)
            and callable(getattr(layer, "load_state_dict", None))):
        raise TypeError(f"{name}: expected a BatchNorm-family layer with running statistics, "
                        f"got {type(layer).__name__}"
                        + (" with track_running_stats=False" if hasattr(layer, "running_mean")
                           else ""))
    if rm.shape != (C,) or rv.shape != (C,):
        raise ValueError(f"{name}: expected running statistics of shape ({C},), got "
                         f"{rm.shape} ({type(layer).__name__})")
    return layer


def state_targets(state, keys, C):
    """Entries of a state dict to overwrite: present, floating point, C values each."""
    if not hasattr(state, "keys") or not hasattr(state, "__setitem__"):
        raise TypeError(f"state: expected a mutable mapping of names to arrays, got "
                        f"{type(state).__name__}")
    for k in keys:
        if k not in state:
            raise KeyError(f"state: missing key {k!r} (expected {list(keys)})")
        cur = state[k]
        dt = getattr(cur, "dtype", None)  # a NumPy array or a torch tensor
        if not str(dt).removeprefix("torch.").startswith(("float", "half", "double", "bfloat")):
            raise TypeError(f"state[{k!r}]: expected a floating-point array, got dtype {dt}")
        if tuple(getattr(cur, "shape", ())) != (C,):
            raise ValueError(f"state[{k!r}]: expected shape ({C},), got "
                             f"{tuple(getattr(cur, 'shape', ()))}")


def population_layers(layers, batch_norm_cls):
    """The layers of collect_population_stats: BatchNorm-family layers (not
    recurrent) with running statistics, each given once."""
    single = isinstance(layers, batch_norm_cls)
    try:
        seq = [layers] if single else list(layers)
    except TypeError:
        raise TypeError(f"layers: expected a BatchNorm layer or an iterable of them, got "
                        f"{type(layers).__name__}") from None
    for i, layer in enumerate(seq):
        if not isinstance(layer, batch_norm_cls):
            raise TypeError(f"layers[{i}]: expected a BatchNorm-family layer (BatchNorm, "
                            f"BatchRenorm, InPlaceABN, SyncBatchNorm), got "
                            f"{type(layer).__name__}")
        if not layer.track_running_stats:
            raise ValueError(f"layers[{i}]: expected a layer with running statistics, got "
                             f"one with track_running_stats=False")
    if len({id(layer) for layer in seq}) != len(seq):
        raise ValueError("layers: expected each layer once, got one several times")
    return seq


# ---- export (interop.py) -------------------------------------------------------------------

def exportable(layer, kinds, what):
    """A layer whose parameters another framework's batch norm can hold: one of
    kinds (the BatchNorm family, FrozenBatchNorm) with per-channel running
    statistics."""
    if not isinstance(layer, kinds):
        raise TypeError(f"layer: expected a BatchNorm, one of its subclasses or a "
                        f"FrozenBatchNorm, got {type(layer).__name__} ({what} has no "
                        f"equivalent)")
    if getattr(layer, "running_mean", None) is None:
        raise ValueError(f"layer: expected a layer with running statistics, got one with "
                         f"track_running_stats=False (nothing for {what}'s eval mode)")
    return layer


def onnx_layout(layer, ndim):
    """The input rank of an exported ONNX graph, whose channel axis must be 1."""
    ndim = integer(ndim, "ndim", 2)
    axis = layer.axis
    if isinstance(axis, (bool, np.bool_)) or not isinstance(axis, numbers.Integral) \
            or not -ndim <= axis < ndim or axis % ndim != 1:
        raise ValueError(f"layer: ONNX BatchNormalization takes channels on axis 1; the "
                         f"layer's axis={axis} is not axis 1 of an input with ndim={ndim} "
                         f"(transpose to channels first)")
    return ndim


def flax_variables(variables):
    """Flax BatchNorm variables: {'batch_stats': {'mean', 'var'}, 'params': {'scale', 'bias'}}
    (params, scale and bias optional)."""
    if not hasattr(variables, "keys"):
        raise TypeError(f"variables: expected a mapping (Flax variables), got "
                        f"{type(variables).__name__}")
    stats = variables.get("batch_stats")
    if not hasattr(stats, "keys") or "mean" not in stats or "var" not in stats:
        raise KeyError(f"variables: expected variables['batch_stats'] with 'mean' and 'var', "
                       f"got keys {sorted(variables)}"
                       + (f", batch_stats keys {sorted(stats)}" if hasattr(stats, "keys")
                          else ""))
    params = variables.get("params", {})
    if not hasattr(params, "keys"):
        raise TypeError(f"variables['params']: expected a mapping, got {type(params).__name__}")
    unexpected = [k for k in params if k not in ("scale", "bias")]
    if unexpected:
        raise KeyError(f"variables['params']: unexpected keys {unexpected} (expected 'scale', "
                       f"'bias')")
    return {"weight": params.get("scale"), "bias": params.get("bias"),
            "running_mean": stats["mean"], "running_var": stats["var"]}

# ---- masks and padded sequences (masked statistics) ----------------------------------------

def mask(m, x) -> np.ndarray:
    """A boolean mask broadcastable to x, materialized as a C-contiguous uint8
    array of x's shape (1 where a value counts): x.size bytes."""
    a = _array(m, "mask")
    if a.dtype != np.bool_:
        raise TypeError(f"mask: expected a boolean array (True where a value counts), got "
                        f"dtype {a.dtype}")
    try:
        ok = np.broadcast_shapes(a.shape, x.shape) == x.shape
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(f"mask: expected a shape that broadcasts to x's shape {x.shape}, got "
                         f"{a.shape}")
    return np.ascontiguousarray(np.broadcast_to(a, x.shape)).view(np.uint8)


def sequence_axis(x, axis):
    """The one axis of x that is neither the batch axis 0 nor the channel axis."""
    first, last = axis_span(channel_axis(axis, x.ndim))
    rest = [d for d in range(x.ndim) if d != 0 and not first <= d <= last]
    if len(rest) != 1:
        raise ValueError(f"lengths: expected x with exactly one sequence axis besides the batch "
                         f"axis 0 and the channel axis {axis}, e.g. (N, C, T) or channels-last "
                         f"(N, T, C); x has shape {x.shape} (pass mask= instead)")
    return rest[0]


def lengths(v, x, axis) -> np.ndarray:
    """Per-sample lengths (N,) of a padded batch as the mask they define over the
    sequence axis (see sequence_axis): uint8 of x's shape."""
    t = sequence_axis(x, axis)
    a = _array(v, "lengths")
    if a.dtype.kind not in "iu":
        raise TypeError(f"lengths: expected an integer array, got dtype {a.dtype}")
    N, T = x.shape[0], x.shape[t]
    if a.shape != (N,):
        raise ValueError(f"lengths: expected shape ({N},), one length per sample, got {a.shape}")
    bad = np.flatnonzero((a < 0) | (a > T))
    if bad.size:
        raise ValueError(f"lengths: expected lengths in [0, {T}] (axis {t} of x), got "
                         f"{a[bad[:5]].tolist()} at samples {bad[:5].tolist()}")
    shape = [1] * x.ndim
    shape[0], shape[t] = N, T
    m = (np.arange(T)[None, :] < a.astype(np.int64)[:, None]).reshape(shape)
    return np.ascontiguousarray(np.broadcast_to(m, x.shape)).view(np.uint8)


def padding(m, lens, x, axis):
    """The uint8 mask of `mask` or `lengths` (not both), or None for neither."""
    if m is not None and lens is not None:
        raise ValueError("lengths: expected None when mask is given (mask and lengths are two "
                         "ways to say the same thing; pass one), got an array")
    if m is not None:
        return mask(m, x)
    return None if lens is None else lengths(lens, x, axis)


def masked_counts(count, what="channel"):
    """Training with a mask: every channel (ghost batch, instance, group) has
    either no unmasked value or more than one."""
    bad = np.argwhere(np.asarray(count) == 1)
    if bad.size:
        raise ValueError(f"mask: expected 0 or more than 1 unmasked value per {what} when "
                         f"training, got 1 at index {bad[0].tolist()}")


def ghost_size(L, virtual_batch_size):
    """virtual_batch_size for masked or empty batches, where the counts are
    checked from the data: None or a positive int, axis 0 not the channel axis."""
    if virtual_batch_size is None:
        return None
    v = positive_int(virtual_batch_size, "virtual_batch_size")
    ghost_axis(L.axis, L.x.ndim)
    return v


def elemt_count(v, C):
    """batch_norm_backward_elemt's count: values per channel over every shard,
    one real >= 1, or C of them >= 0 (masked statistics; 0: a channel with no
    value, which has nothing to write)."""
    if np.ndim(v) == 0:
        return real(v, "count", 1.0)
    a = _array(v, "count")
    if a.dtype.kind not in "fiu":
        raise TypeError(f"count: expected real numbers, got dtype {a.dtype}")
    c = a.astype(np.float64)
    if c.shape != (C,) or not ((c >= 0) & np.isfinite(c)).all():
        raise ValueError(f"count: expected a number >= 1 or {C} finite counts >= 0, got "
                         f"{np.asarray(v)!r:.80}")
    return c
