"""Argument checks and layout plumbing shared by every public function.

Everything here runs before a kernel or a running statistic is touched, so a
bad argument leaves all state as it was. Messages name the argument and say
what was expected and what was received.
"""
import math
import numbers
import operator
import os

import numpy as np

FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))
ACTIVATIONS = {None: 0, "relu": 1, "leaky_relu": 2}


def tensor(x, name="x"):
    """x as an ndarray of a supported dtype with ndim >= 2."""
    if not isinstance(x, np.ndarray):
        x = np.asarray(x)
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected dtype float16, float32 or float64, got {x.dtype}")
    if x.ndim < 2:
        raise ValueError(f"{name}: expected an array with ndim >= 2 (N, C, ...), got shape {x.shape}")
    return x


def like(a, x, name):
    """a checked to match x in shape and dtype (dy, y)."""
    a = tensor(a, name)
    if a.shape != x.shape:
        raise ValueError(f"{name}: expected shape {x.shape} (the shape of x), got {a.shape}")
    if a.dtype != x.dtype:
        raise TypeError(f"{name}: expected dtype {x.dtype} (the dtype of x), got {a.dtype}")
    return a


def channel_axis(axis, ndim):
    try:
        ax = operator.index(axis)
    except TypeError:
        raise TypeError(f"axis: expected an int, got {type(axis).__name__}") from None
    if not -ndim <= ax < ndim:
        raise ValueError(f"axis: expected an int in [{-ndim}, {ndim - 1}] for an array with "
                         f"ndim {ndim}, got {axis}")
    return ax % ndim


def geometry(shape, ax):
    """(outer, C, inner) of a C-contiguous array with channel axis ax."""
    return math.prod(shape[:ax]), shape[ax], math.prod(shape[ax + 1:])


def compute_dtype(dtype):
    return np.dtype(np.float32) if dtype == np.float16 else np.dtype(dtype)


def stat_dtype(dtype):
    """dtype of save_mean / save_invstd and parameter gradients."""
    return np.dtype(np.float64) if dtype == np.float64 else np.dtype(np.float32)


def contiguous(x, cd):
    """x itself when it is already C-contiguous in cd, else a contiguous copy."""
    if x.dtype == cd and x.flags.c_contiguous:
        return x
    return np.ascontiguousarray(x, dtype=cd)


def flat(a):
    return None if a is None else a.reshape(-1)


def vector(v, C, name, *, required=False):
    """A per-channel parameter as a contiguous float64 copy (None stays None)."""
    if v is None:
        if required:
            raise TypeError(f"{name}: expected an array of length {C}, got None")
        return None
    a = np.asarray(v)
    if a.dtype.kind != "f":
        raise TypeError(f"{name}: expected a floating-point array, got dtype {a.dtype}")
    if a.shape != (C,):
        raise ValueError(f"{name}: expected shape ({C},), one value per channel, got {a.shape}")
    return np.array(a, dtype=np.float64, order="C")


def running(rm, rv, C):
    """Checks the pair of running statistics that training updates in place."""
    if (rm is None) != (rv is None):
        missing, given = ("running_var", "running_mean") if rv is None else ("running_mean",
                                                                             "running_var")
        raise ValueError(f"{missing}: expected an array of length {C} since {given} is given "
                         f"(the two go together), got None")
    for a, name in ((rm, "running_mean"), (rv, "running_var")):
        if a is None:
            continue
        if not isinstance(a, np.ndarray):
            raise TypeError(f"{name}: expected a numpy.ndarray updated in place, got {type(a).__name__}")
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


def real(v, name, lo=None, hi=None):
    try:
        f = float(v) if isinstance(v, numbers.Real) and not isinstance(v, bool) else None
    except OverflowError:  # an int beyond float
        f = None
    if f is None or not math.isfinite(f):
        raise ValueError(f"{name}: expected a finite real number, got {v!r}")
    if (lo is not None and f < lo) or (hi is not None and f > hi):
        want = f"a value >= {lo}" if hi is None else f"a value in [{lo}, {hi}]"
        raise ValueError(f"{name}: expected {want}, got {v!r}")
    return f


# libgomp keeps its thread pool across fork() without the threads: a forked
# child that enters a parallel region waits forever for them. Every kernel
# call in a forked child therefore runs on the calling thread.
_forked_child = False


def _mark_forked_child():
    global _forked_child
    _forked_child = True


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_mark_forked_child)


def forked_child():
    return _forked_child


def threads(n_threads):
    """0 (the kernel reads omp_get_max_threads() at call time) or a positive
    int; 1 in a process forked from the one that imported bncore."""
    if n_threads is None:
        return 1 if _forked_child else 0
    if isinstance(n_threads, bool) or not isinstance(n_threads, numbers.Integral) or n_threads < 1:
        raise ValueError(f"n_threads: expected None or a positive int, got {n_threads!r}")
    return 1 if _forked_child else int(min(n_threads, 4096))


def activation(act):
    """(kernel code, negative slope) of None, 'relu', 'leaky_relu' or ('leaky_relu', slope)."""
    slope = 0.01
    name = act
    if isinstance(act, tuple):
        if len(act) != 2 or act[0] != "leaky_relu":
            raise ValueError(f"activation: expected None, 'relu' or ('leaky_relu', slope), got {act!r}")
        name, slope = act
        slope = real(slope, "activation slope", 0.0)
    if not (name is None or isinstance(name, str)) or name not in ACTIVATIONS:
        raise ValueError(f"activation: expected None, 'relu' or ('leaky_relu', slope), got {act!r}")
    return ACTIVATIONS[name], (0.0 if name == "relu" else slope)


def _same_view(a, b):
    return (a.__array_interface__["data"][0] == b.__array_interface__["data"][0]
            and a.strides == b.strides and a.shape == b.shape and a.dtype == b.dtype)


def output(out, x, cd, inputs):
    """(buffer the kernel writes, array to return or copy into).

    The kernel writes straight into `out` when it is a C-contiguous array of
    the compute dtype that is either disjoint from every input or exactly one
    of them (elementwise in place is safe). Otherwise a temporary is used and
    copied into `out` afterwards, so a partially overlapping `out` still gets
    the right answer.
    """
    if out is None:
        return np.empty(x.shape, cd), None
    if not isinstance(out, np.ndarray):
        raise TypeError(f"out: expected a numpy.ndarray, got {type(out).__name__}")
    if out.shape != x.shape:
        raise ValueError(f"out: expected shape {x.shape}, got {out.shape}")
    if out.dtype != x.dtype:
        raise TypeError(f"out: expected dtype {x.dtype}, got {out.dtype}")
    if not out.flags.writeable:
        raise ValueError("out: expected a writable array, got a read-only one")
    direct = out.dtype == cd and out.flags.c_contiguous and all(
        a is None or not np.may_share_memory(out, a) or _same_view(out, a) for a in inputs)
    return (out, out) if direct else (np.empty(x.shape, cd), out)


def finish(buf, final, dtype):
    """The result in the input's dtype, copied into `out` when one was given."""
    if final is None:
        return buf if buf.dtype == dtype else buf.astype(dtype)
    if buf is not final:
        np.copyto(final, buf, casting="unsafe")
    return final
