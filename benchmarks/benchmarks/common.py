"""Seeded, cached data builders and the parameter grid shared by the asv suite
and the peer harnesses beside it (``benchmarks/norms.py``, ``inference.py``).

NumPy only at import (asv imports this to discover the suite); ``norm_data``
calls bncore for the saved statistics. Shapes are the logical (N, C, ...)
shapes of the bench grid plus small calls.
Layouts: ``NCHW`` (axis=1), ``NHWC`` (the same tensor permuted to N,H,W,C and
made contiguous, axis=-1) for 4-D shapes; ``NC`` (features, axis=1) for 2-D.
Impossible (layout, shape) pairs raise NotImplementedError, which asv skips.

asv runs every parameter set in a fresh process, so generated data is also
cached on disk (``$BNCORE_BENCH_CACHE``, default a folder in the temp dir):
building the largest inputs takes seconds, loading them a fraction of that.
"""
import functools
import os
import tempfile
import zipfile

import numpy as np

EPS = 1e-5

DTYPES = ["float32", "float64"]
LAYOUTS = ["NCHW", "NHWC", "NC"]
SHAPES = ["32x64x56x56", "32x256x14x14", "8x512x7x7", "128x64x56x56", "64x3x224x224",
          "256x4096", "8192x1024", "64x256"]
THREADS = [1, 2]
# layer norm: rows of 768, 1024 and 4096 features, batch x sequence 8 x 512;
# group norm: GROUPS groups on ResNet-50 activations
GROUPS = 32
LN_SHAPES = ["8x512x768", "8x512x1024", "8x512x4096"]
GN_SHAPES = ["32x64x56x56", "32x256x14x14", "32x512x7x7", "8x512x28x28"]


def parse_shape(shape):
    return tuple(int(d) for d in shape.split("x"))


def check_layout(layout, shape):
    """Raise NotImplementedError (asv: skip) when the layout does not fit the shape."""
    four_d = len(parse_shape(shape)) == 4
    if (layout == "NC") == four_d:
        raise NotImplementedError(f"layout {layout} does not apply to shape {shape}")


def axis_of(layout):
    return -1 if layout == "NHWC" else 1


def layout_of(shape):
    """The channels-first layout of a shape: NCHW for 4-D, NC for 2-D."""
    return "NCHW" if len(parse_shape(shape)) == 4 else "NC"


CACHE_DIR = os.environ.get("BNCORE_BENCH_CACHE",
                           os.path.join(tempfile.gettempdir(), "bncore-bench-cache"))


@functools.lru_cache(maxsize=2)
def data(shape, layout, dtype, offset=0.0, seed=0):
    """Inputs for one (shape, layout, dtype), read-only so no benchmark alters the cache.

    Per-channel means are ``offset`` + U(-1, 1), standard deviations U(0.5, 2).
    ``weight_eval`` makes the eval map's slope lie in [0.5, 1] and
    ``weight_bwd`` = 1 / save_invstd makes the backward a projection of dy, so
    that repeated in-place calls neither overflow nor sink into denormals.
    """
    check_layout(layout, shape)
    path = os.path.join(CACHE_DIR, f"v1-{shape}-{layout}-{dtype}-{offset:g}-{seed}.npz")
    try:
        with np.load(path) as f:
            d = {k: f[k] for k in f.files}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        d = _build(shape, layout, np.dtype(dtype), offset, seed)
        os.makedirs(CACHE_DIR, exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "wb") as fh:
            np.savez(fh, **d)
        os.replace(tmp, path)  # atomic: concurrent runs never read half a file
    for v in d.values():
        v.flags.writeable = False
    d["axis"] = axis_of(layout)
    d["count"] = d["x"].size // d["var64"].size
    return d


def _build(shape, layout, dtype, offset, seed):
    dims = parse_shape(shape)
    rng = np.random.default_rng(seed)
    c = dims[1]
    mu = offset + rng.uniform(-1.0, 1.0, c)
    sd = rng.uniform(0.5, 2.0, c)
    bshape = (1, c) + (1,) * (len(dims) - 2)
    x = rng.standard_normal(dims, dtype=dtype)
    x *= sd.reshape(bshape).astype(dtype)
    x += mu.reshape(bshape).astype(dtype)
    dy = rng.standard_normal(dims, dtype=dtype)
    if layout == "NHWC":
        x = np.ascontiguousarray(np.moveaxis(x, 1, -1))
        dy = np.ascontiguousarray(np.moveaxis(dy, 1, -1))
    axis = axis_of(layout) % x.ndim
    red = tuple(i for i in range(x.ndim) if i != axis)
    x64 = x.astype(np.float64)
    mean64, var64 = x64.mean(axis=red), x64.var(axis=red)
    del x64
    running_var = var64 * rng.uniform(0.8, 1.2, c)
    return {
        "x": x, "dy": dy, "mean64": mean64, "var64": var64,
        "weight": rng.uniform(0.5, 1.5, c).astype(dtype),
        "weight_eval": (np.sqrt(running_var + EPS) * rng.uniform(0.5, 1.0, c)).astype(dtype),
        "weight_bwd": np.sqrt(var64 + EPS).astype(dtype),
        "bias": rng.uniform(-0.5, 0.5, c).astype(dtype),
        "running_mean": (mu + rng.uniform(-0.1, 0.1, c)).astype(dtype),
        "running_var": running_var.astype(dtype),
        "save_mean": mean64.astype(dtype),
        "save_invstd": (1.0 / np.sqrt(var64 + EPS)).astype(dtype),
    }


def filled_like(a):
    """A writable array like ``a`` with every page touched (np.empty is lazily mapped)."""
    out = np.empty_like(a)
    out.fill(0)
    return out


@functools.lru_cache(maxsize=2)
def norm_data(kind, shape, dtype="float32", seed=0):
    """Inputs of layer norm (``kind="layer"``, over the last axis) or group norm
    (``kind="group"``, GROUPS groups over axis 1): x (mean 1, std 2), dy,
    weight, bias, and the saved mean and invstd of bncore's training forward.
    Read-only, as ``data``'s."""
    import bncore
    dims = parse_shape(shape)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(dims, dtype=dtype) * 2 + 1
    nf = dims[-1] if kind == "layer" else dims[1]
    d = {"x": x, "dy": rng.standard_normal(dims, dtype=dtype),
         "weight": rng.uniform(0.5, 1.5, nf).astype(dtype),
         "bias": rng.uniform(-0.5, 0.5, nf).astype(dtype)}
    if kind == "layer":
        _, d["mean"], d["invstd"] = bncore.layer_norm_train(x, nf, d["weight"])
    elif kind == "group":
        _, d["mean"], d["invstd"] = bncore.group_norm_train(x, GROUPS, d["weight"])
    else:
        raise ValueError(f"kind: expected 'layer' or 'group', got {kind!r}")
    for v in d.values():
        v.flags.writeable = False
    return d
