"""The suite's property-based tests (hypothesis; the CI profile is in
conftest.py): fuzzing of the batch-norm functions, the BatchNorm layer and the
normalization family (group, layer, instance norm), a training step's
train -> backward -> eval chain, merge_stats over any split, plus every kind of
bad argument (the README's error table, at the end).

Hypothesis draws the structure of a case -- ndim 2-5, sizes 0-5 (now and then
one long axis, to cross the kernels' block and threading thresholds), the
channel axis, float16/32/64, the memory layout of every input (contiguous,
Fortran, transposed, step and negative slices, stride-0 broadcast views),
read-only inputs, parameter dtypes and strides, and the kind of `out` (none,
fresh, strided, x itself, dy itself, a partially overlapping view of x, x
reversed, read-only) -- and a seed for the values. Every case checks:

* the result matches the float64 reference (tests/reference.py) within the
  dtype's tolerance (its table), in the documented output dtypes;
* inputs not meant to change are bitwise unchanged;
* an `out` that overlaps an input is either handled correctly or refused with a
  ValueError naming `out`: never a wrong answer;
* a read-only `out`, or too few values per channel for training, is refused
  with a ValueError naming the argument, and nothing at all is written.

To fuzz another function, add a Spec to SPECS: which x-shaped arrays and
per-channel vectors it takes, how to call it, and its float64 reference.
"""
import os
from dataclasses import dataclass, field

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import bncore  # noqa: E402
import reference as ref  # noqa: E402

EXAMPLES = int(os.environ.get("BNCORE_FUZZ_EXAMPLES", "100"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
# |got - want| <= rtol * |want| + atol * max(1, max |want|), rtol and atol from
# the suite's table for the input dtype
RTOL = {t: v["rtol"] for t, v in ref.TOL.items()}
ATOL = {t: v["atol"] for t, v in ref.TOL.items()}
ACTIVATIONS = [None, "relu", ("leaky_relu", 0.2)]


# ---- the case: arrays, vectors and options drawn by hypothesis ----------------------------

@dataclass
class Case:
    shape: tuple
    axis: int
    dtype: type
    seed: int
    arrays: dict            # name -> array as passed
    orig: dict              # name -> float64 copy of the values
    vectors: dict           # name -> vector as passed (or None)
    opts: dict = field(default_factory=dict)

    @property
    def C(self):
        return self.shape[self.axis]

    @property
    def count(self):
        """Elements per channel (the product of the other axes, even when C == 0)."""
        ax = self.axis % len(self.shape)
        return int(np.prod([s for i, s in enumerate(self.shape) if i != ax]))

    def v64(self, name):
        v = self.vectors.get(name)
        return None if v is None else np.asarray(v, np.float64)


def _values(rng, shape, offset):
    return rng.standard_normal(shape) * rng.uniform(0.5, 3) + offset


def _array(rng, shape, dtype, view, offset):
    """An array of `shape` with the given memory layout."""
    if view == "bcast":  # stride 0 along a random set of axes
        small = tuple(1 if rng.random() < 0.5 else s for s in shape)
        return np.broadcast_to(_values(rng, small, offset).astype(dtype), shape)
    if view == "step":  # every axis sliced with a step of +-1 or +-2
        steps = [int(rng.choice([1, 2, -1, -2])) for _ in shape]
        base = _values(rng, tuple(s * abs(k) for s, k in zip(shape, steps)), offset).astype(dtype)
        return base[tuple(slice(None, None, k) for k in steps)]
    x = _values(rng, shape, offset).astype(dtype)
    if view == "fortran":
        return np.asfortranarray(x)
    if view == "transpose":
        perm = rng.permutation(len(shape))
        return np.ascontiguousarray(x.transpose(perm)).transpose(np.argsort(perm))
    return x


def _vector(rng, C, kind, dtype, layout):
    """A per-channel vector: 'normal' or 'positive' values, any float dtype,
    contiguous, strided, reversed or read-only."""
    v = rng.standard_normal(C) if kind == "normal" else rng.uniform(0.5, 2.0, C)
    if layout == "strided":
        buf = np.zeros(2 * C, dtype)
        buf[::2] = v
        return buf[::2]
    v = v.astype(dtype)
    if layout == "reversed":
        return v[::-1].copy()[::-1]
    if layout == "readonly":
        v.flags.writeable = False
    return v


@st.composite
def geometry(draw, fixed_axis=None):
    ndim = draw(st.integers(2, 5))
    shape = draw(st.lists(st.sampled_from([0, 1, 1, 2, 2, 3, 3, 4, 5, 5, 5]),
                          min_size=ndim, max_size=ndim))
    axis = draw(st.integers(-ndim, ndim - 1)) if fixed_axis is None else fixed_axis
    if draw(st.integers(0, 9)) == 0:
        # one long axis: several kernel blocks and column tiles, many channels,
        # or (70,000) past the single-thread threshold
        k = draw(st.integers(0, ndim - 1))
        n = draw(st.sampled_from([257, 300, 4097, 9000, 70_000]))
        shape = [min(s, 2 if n < 70_000 else 1) for s in shape]
        shape[k] = n
    return tuple(shape), axis


VIEWS = ["contiguous", "contiguous", "fortran", "transpose", "step", "bcast"]
VEC_LAYOUTS = ["contiguous", "strided", "reversed", "readonly"]
OUTS = ["none", "fresh", "fortran", "strided", "alias", "overlap", "reversed", "readonly"]


@st.composite
def cases(draw, spec):
    shape, axis = draw(geometry(spec.fixed_axis))
    dtype = draw(st.sampled_from([np.float16, np.float32, np.float64]))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    offset = draw(st.sampled_from([0.0, 0.0, 5.0]))
    opts = {k: draw(s) for k, s in spec.options.items()}
    arrays = {}
    for name in spec.arrays_for(opts):
        view = draw(st.sampled_from(VIEWS))
        arrays[name] = _array(rng, shape, dtype, view, offset if name == "x" else 0.0)
        if draw(st.integers(0, 3)) == 0 and arrays[name].flags.writeable:
            arrays[name].flags.writeable = False
    C = shape[axis]
    vectors = {}
    for name, kind in spec.vectors.items():
        optional = kind.startswith("opt_")
        if optional and draw(st.booleans()):
            vectors[name] = None
            continue
        layout = draw(st.sampled_from(VEC_LAYOUTS[:2] if kind.startswith("state") else VEC_LAYOUTS))
        vdtype = draw(st.sampled_from([np.float16, np.float32, np.float64]))
        vectors[name] = _vector(rng, C, kind.split("_")[-1], vdtype, layout)
    case = Case(shape, axis, dtype, seed, arrays, {}, vectors, opts)
    out_kind = draw(st.sampled_from(OUTS if spec.out else ["none"]))
    aliases = [a for a in spec.out_aliases if a in arrays]
    alias = draw(st.sampled_from(aliases)) if aliases else None
    out = _make_out(case, out_kind, alias, rng)
    case.orig = {k: np.array(a, np.float64) for k, a in case.arrays.items()}
    return case, out_kind, out


def _make_out(case, kind, alias, rng):
    shape, dtype = case.shape, case.dtype
    n = int(np.prod(shape))
    if kind == "alias" and alias is not None:
        return case.arrays[alias]
    if kind in ("overlap", "reversed") and alias is not None:
        # the aliased input is rebuilt writable inside a buffer the out view shares
        src = np.asarray(case.arrays[alias])
        if kind == "overlap" and n >= 2:
            shift = int(rng.integers(1, n))
            buf = np.empty(n + shift, dtype)
            case.arrays[alias] = buf[:n].reshape(shape)
            case.arrays[alias][...] = src
            return buf[shift:].reshape(shape)
        if kind == "reversed" and shape[0] >= 2:
            case.arrays[alias] = src.copy()
            return case.arrays[alias][::-1]
        kind = "fresh"
    if kind == "fortran":
        return np.empty(shape, dtype, order="F")
    if kind == "strided":
        return np.empty(shape[:-1] + (2 * shape[-1],), dtype)[..., ::-2]
    if kind in ("fresh", "alias", "overlap", "reversed"):
        return np.empty(shape, dtype)
    if kind == "readonly":
        out = np.zeros(shape, dtype)
        out.flags.writeable = False
        return out
    return None


# ---- the function table --------------------------------------------------------------------

@dataclass
class Spec:
    """One public function: its inputs, a call and its float64 reference.

    arrays: names of x-shaped inputs; 'y' is only passed with an activation.
    vectors: per-channel inputs -> 'normal' / 'positive' values; 'opt_' may be
    None; 'state_' is updated in place (writable, never read-only).
    call(case, out) -> tuple of results; reference(case) -> same, in float64.
    like_x: indices of results shaped like x (compared in x's dtype).
    """
    name: str
    arrays: tuple
    vectors: dict
    call: object
    reference: object
    like_x: tuple = (0,)
    out: bool = True
    out_aliases: tuple = ("x",)
    min_count: int = 0
    min_channels: int = 0
    returns_out: bool = True
    refuses_overlap: bool = False
    fixed_axis: object = None
    errors: object = None  # case -> [(exception, argument)] for spec-specific refusals
    scales: object = None  # (case, want) -> {result index: magnitude of its terms}
    options: dict = field(default_factory=dict)

    def arrays_for(self, opts):
        return tuple(a for a in self.arrays if a != "y" or opts.get("activation") is not None)


def _train_call(c, out):
    rm, rv = c.vectors["state_rm"], c.vectors["state_rv"]
    y, m, inv = bncore.batch_norm_train(
        c.arrays["x"], c.vectors["weight"], c.vectors["bias"], axis=c.axis, eps=c.opts["eps"],
        running_mean=rm, running_var=rv, momentum=c.opts["momentum"], out=out,
        activation=c.opts["activation"])
    return y, m, inv, rm, rv


def _train_ref(c):
    x = c.orig["x"]
    y, m, inv, var_u = ref.train(x, c.v64("weight"), c.v64("bias"), c.axis, c.opts["eps"])
    mom = c.opts["momentum"]
    rm = (1 - mom) * c.v64("state_rm") + mom * m
    rv = (1 - mom) * c.v64("state_rv") + mom * var_u
    if c.count == 0:  # an empty batch: mean and invstd 0, running statistics untouched
        m, inv, rm, rv = np.zeros_like(m), np.zeros_like(inv), c.v64("state_rm"), c.v64("state_rv")
    return ref.activate(y, c.opts["activation"]), m, inv, rm, rv


def _eval_call(c, out):
    return (bncore.batch_norm_eval(c.arrays["x"], c.vectors["rm"], c.vectors["rv"],
                                   c.vectors["weight"], c.vectors["bias"], axis=c.axis,
                                   eps=c.opts["eps"], out=out, activation=c.opts["activation"]),)


def _eval_ref(c):
    y = ref.evaluate(c.orig["x"], c.v64("rm"), c.v64("rv"), c.v64("weight"), c.v64("bias"),
                     c.axis, c.opts["eps"])
    return (ref.activate(y, c.opts["activation"]),)


def _elemt_call(c, out):
    return (bncore.batch_norm_elemt(c.arrays["x"], c.vectors["mean"], c.vectors["invstd"],
                                    c.vectors["weight"], c.vectors["bias"], axis=c.axis,
                                    out=out, activation=c.opts["activation"]),)


def _elemt_ref(c):
    y = ref.elemt(c.orig["x"], c.v64("mean"), c.v64("invstd"), c.v64("weight"), c.v64("bias"),
                  c.axis)
    return (ref.activate(y, c.opts["activation"]),)


def _grad_in(c):
    """dy through the activation's mask taken from y, as the functions define it."""
    return ref.activation_grad(c.orig["dy"], c.orig.get("y"), c.opts["activation"])


def _backward_call(c, out):
    return bncore.batch_norm_backward(
        c.arrays["dy"], c.arrays["x"], c.vectors["mean"], c.vectors["invstd"],
        c.vectors["weight"], axis=c.axis, training=c.opts["training"], out=out,
        activation=c.opts["activation"], y=c.arrays.get("y"))


def _backward_ref(c):
    return ref.backward(_grad_in(c), c.orig["x"], c.v64("mean"), c.v64("invstd"),
                        c.v64("weight"), c.axis, c.opts["training"])


def _stats_call(c, out):
    return bncore.batch_norm_stats(c.arrays["x"], axis=c.axis)


def _stats_ref(c):
    _, mean, m2 = ref.stats(c.orig["x"], c.axis)
    return c.count, mean, m2


def _reduce_call(c, out):
    return bncore.batch_norm_backward_reduce(c.arrays["dy"], c.arrays["x"], c.vectors["mean"],
                                             axis=c.axis, activation=c.opts["activation"],
                                             y=c.arrays.get("y"))


def _reduce_ref(c):
    return ref.backward_reduce(_grad_in(c), c.orig["x"], c.v64("mean"), c.axis)


def _belemt_count(c):
    return max(1, c.count)


def _belemt_call(c, out):
    v = c.vectors
    return (bncore.batch_norm_backward_elemt(
        c.arrays["dy"], c.arrays["x"], v["mean"], v["invstd"], v["weight"], v["sum_dy"],
        v["sum_dy_xmu"], _belemt_count(c), axis=c.axis, out=out,
        activation=c.opts["activation"], y=c.arrays.get("y")),)


def _belemt_ref(c):
    return (ref.backward_elemt(_grad_in(c), c.orig["x"], c.v64("mean"), c.v64("invstd"),
                               c.v64("weight"), c.v64("sum_dy"), c.v64("sum_dy_xmu"),
                               _belemt_count(c), c.axis),)


def _layer_call(c, out):
    o = c.opts
    layer = bncore.BatchNorm(c.C, eps=o["eps"], momentum=o["momentum"], affine=o["affine"],
                             axis=c.axis, dtype=c.dtype)
    layer.running_mean[...] = c.vectors["rm"]
    layer.running_var[...] = c.vectors["rv"]
    if o["affine"]:
        layer.weight[...] = c.vectors["w"]
        layer.bias[...] = c.vectors["b"]
    y = layer(c.arrays["x"], out=out)
    y = y.copy()  # out (if any) is reused by the eval call below
    dx = layer.backward(c.arrays["dy"])
    gw = layer.grad_weight if o["affine"] else np.zeros(c.C)
    gb = layer.grad_bias if o["affine"] else np.zeros(c.C)
    layer.eval()
    ye = layer(c.arrays["x"], out=out)
    return (y, dx, ye, gw, gb, layer.running_mean.copy(), layer.running_var.copy(),
            int(layer.num_batches_tracked))


def _layer_ref(c):
    o = c.opts
    dt = c.dtype  # the layer's parameters and buffers are in x's dtype here
    w = c.vectors["w"].astype(dt).astype(np.float64) if o["affine"] else None
    b = c.vectors["b"].astype(dt).astype(np.float64) if o["affine"] else None
    rm0 = c.vectors["rm"].astype(dt).astype(np.float64)
    rv0 = c.vectors["rv"].astype(dt).astype(np.float64)
    x, dy = c.orig["x"], c.orig["dy"]
    y, m, inv, var_u = ref.train(x, w, b, c.axis, o["eps"])
    # the backward is a function of the statistics the layer saved (float32 for
    # float32 input); the forward's are checked against the reference above
    _, m_saved, inv_saved = bncore.batch_norm_train(c.arrays["x"], axis=c.axis, eps=o["eps"])
    dx, dw, db = ref.backward(dy, x, m_saved, inv_saved, w, c.axis, True)
    mom = 1.0 if o["momentum"] is None else o["momentum"]  # cumulative average of one batch
    rm = (1 - mom) * rm0 + mom * m
    rv = (1 - mom) * rv0 + mom * var_u
    if c.count == 0:  # an empty batch: running statistics untouched
        rm, rv = rm0, rv0
    # eval is a function of the running statistics as the layer stored them (in
    # its dtype: a float16 rounding of rm moves y by invstd ulps); they are
    # checked against rm, rv above
    rm_stored, rv_stored = rm0.astype(dt), rv0.astype(dt)
    bncore.batch_norm_train(c.arrays["x"], axis=c.axis, eps=o["eps"], momentum=mom,
                            running_mean=rm_stored, running_var=rv_stored)
    ye = ref.evaluate(x, rm_stored, rv_stored, w, b, c.axis, o["eps"])
    if not o["affine"]:
        dw, db = np.zeros(c.C), np.zeros(c.C)
    return y, dx, ye, dw, db, rm, rv, 1


# ---- the normalization family: train + backward in one call, parameters from the seed ----

def _seeded_params(c, shape):
    rng = np.random.default_rng(c.seed + 1)
    return rng.uniform(0.5, 1.5, shape), rng.standard_normal(shape)


def _group_count(c):
    """The number of groups: a divisor of C picked from the seed."""
    divisors = [g for g in range(1, c.C + 1) if c.C % g == 0] or [1]
    return divisors[c.seed % len(divisors)]


def _layer_norm_shape(c):
    return c.shape[-(1 + c.seed % (len(c.shape) - 1)):]  # 1 .. ndim-1 trailing dims


# group_norm and layer_norm: (train, backward, reference, reference backward,
# their second argument, the shape of the affine parameters)
FAMILY = {
    "group_norm": lambda c: (bncore.group_norm_train, bncore.group_norm_backward, ref.group_norm,
                             ref.group_norm_backward, _group_count(c), c.C),
    "layer_norm": lambda c: (bncore.layer_norm_train, bncore.layer_norm_backward, ref.layer_norm,
                             ref.layer_norm_backward, _layer_norm_shape(c), _layer_norm_shape(c)),
}


def _family_call(name):
    def call(c, out):
        train, backward, _, _, arg, pshape = FAMILY[name](c)
        x, dy = c.arrays["x"], c.arrays["dy"]
        w, b = _seeded_params(c, pshape) if c.opts["affine"] else (None, None)
        _, m, inv = train(x, arg, w, b, c.opts["eps"])
        dx, dw, db = backward(dy, x, arg, m, inv, w)
        y, m, inv = train(x, arg, w, b, c.opts["eps"], out=out)  # last: out may be x
        return y, m, inv, dx, dw, db
    return call


def _family_ref(name):
    def reference(c):
        train, _, forward_ref, backward_ref, arg, pshape = FAMILY[name](c)
        w, b = _seeded_params(c, pshape) if c.opts["affine"] else (None, None)
        # the backward is a function of the statistics the library's forward
        # saved (float32 for float32 input), as in the functions' backward
        saved = train(c.arrays["x"], arg, eps=c.opts["eps"])[1:]
        return (forward_ref(c.orig["x"], arg, w, b, c.opts["eps"])
                + backward_ref(c.orig["dy"], c.orig["x"], arg, *saved, w))
    return reference


def _instance_call(c, out):
    x, dy = c.arrays["x"], c.arrays["dy"]
    rm, rv = c.vectors["state_rm"], c.vectors["state_rv"]
    _, m, inv = bncore.instance_norm_train(x, eps=c.opts["eps"])
    dx, dw, db = bncore.instance_norm_backward(dy, x, m, inv)
    y, m, inv = bncore.instance_norm_train(x, eps=c.opts["eps"], running_mean=rm,
                                           running_var=rv, out=out)  # last: out may be x
    return y, m, inv, dx, dw, db, rm, rv


def _instance_ref(c):
    """Instance norm is group norm with one channel per group."""
    N, C = c.shape[:2]
    HW = int(np.prod(c.shape[2:]))
    x = c.orig["x"]
    saved = bncore.instance_norm_train(c.arrays["x"], eps=c.opts["eps"])[1:]
    y, m, inv = ref.group_norm(x, C, eps=c.opts["eps"])
    dx, dw, db = ref.group_norm_backward(c.orig["dy"], x, C, *saved)
    var_u = x.reshape(N * C, HW).var(1) * HW / (HW - 1) if N * C else np.zeros(0)
    rm = 0.9 * c.v64("state_rm") + 0.1 * m.mean(0)
    rv = 0.9 * c.v64("state_rv") + 0.1 * var_u.reshape(N, C).mean(0)
    if not x.size:  # an empty batch: the running statistics stay as they were
        rm, rv = c.v64("state_rm"), c.v64("state_rv")
    return (y, m, inv, dx, dw, db, rm, rv)


def _dx_terms(c, want):
    """dx = invstd*(g - mean(g) - xhat*mean(g*xhat)) cancels terms of size
    invstd*|g|: a row of one value (or constant) has dx = 0 from terms of
    size |g|/sqrt(eps)."""
    inv = np.nan_to_num(np.abs(np.asarray(want[2], np.float64)), nan=0.0)
    inv_max = float(inv.max()) if inv.size else 0.0
    g_max = float(np.abs(c.orig["dy"]).max()) * 1.5 if c.orig["dy"].size else 0.0  # w <= 1.5
    return {3: 3 * inv_max * g_max}  # three such terms


def _instance_errors(c):
    # one value per instance (an empty batch is defined: test_empty_batches)
    refused = int(np.prod(c.shape)) > 0 and int(np.prod(c.shape[2:])) < 2
    return [(ValueError, "x")] if refused else []


EPS = st.sampled_from([1e-5, 1e-3, 0.1])
ACT = st.sampled_from(ACTIVATIONS)
SPECS = [
    Spec("batch_norm_train", ("x",),
         dict(weight="opt_positive", bias="opt_normal", state_rm="state_normal",
              state_rv="state_positive"),
         _train_call, _train_ref, min_count=2,
         options=dict(eps=EPS, momentum=st.sampled_from([0.0, 0.1, 1.0]), activation=ACT)),
    Spec("batch_norm_eval", ("x",),
         dict(rm="normal", rv="positive", weight="opt_positive", bias="opt_normal"),
         _eval_call, _eval_ref, options=dict(eps=EPS, activation=ACT)),
    Spec("batch_norm_elemt", ("x",),
         dict(mean="normal", invstd="positive", weight="opt_positive", bias="opt_normal"),
         _elemt_call, _elemt_ref, options=dict(activation=ACT)),
    Spec("batch_norm_backward", ("dy", "x", "y"),
         dict(mean="normal", invstd="positive", weight="opt_positive"),
         _backward_call, _backward_ref, out_aliases=("dy", "x", "y"),
         options=dict(training=st.booleans(), activation=ACT)),
    Spec("batch_norm_stats", ("x",), {}, _stats_call, _stats_ref, like_x=(), out=False,
         out_aliases=()),
    Spec("batch_norm_backward_reduce", ("dy", "x", "y"), dict(mean="normal"),
         _reduce_call, _reduce_ref, like_x=(), out=False, out_aliases=(),
         options=dict(activation=ACT)),
    Spec("batch_norm_backward_elemt", ("dy", "x", "y"),
         dict(mean="normal", invstd="positive", weight="opt_positive", sum_dy="normal",
              sum_dy_xmu="normal"),
         _belemt_call, _belemt_ref, out_aliases=("dy", "x", "y"), options=dict(activation=ACT)),
    Spec("BatchNorm", ("dy", "x"),
         dict(rm="state_normal", rv="state_positive", w="positive", b="normal"),
         _layer_call, _layer_ref, like_x=(0, 1, 2), out_aliases=("x",), min_count=2,
         min_channels=1, returns_out=False, refuses_overlap=True,
         options=dict(eps=EPS, momentum=st.sampled_from([None, 0.1, 0.5]),
                      affine=st.booleans())),
    Spec("group_norm", ("dy", "x"), {}, _family_call("group_norm"), _family_ref("group_norm"),
         like_x=(0, 3),
         returns_out=False, fixed_axis=1, scales=_dx_terms,
         options=dict(eps=EPS, affine=st.booleans())),
    Spec("layer_norm", ("dy", "x"), {}, _family_call("layer_norm"), _family_ref("layer_norm"),
         like_x=(0, 3),
         returns_out=False, scales=_dx_terms, options=dict(eps=EPS, affine=st.booleans())),
    Spec("instance_norm", ("dy", "x"), dict(state_rm="state_normal", state_rv="state_positive"),
         _instance_call, _instance_ref, like_x=(0, 3), returns_out=False, fixed_axis=1,
         errors=_instance_errors, scales=_dx_terms, options=dict(eps=EPS)),
]


# ---- the checks ------------------------------------------------------------------------------

def _snapshot(case, out):
    arrays = {k: np.array(a, copy=True) for k, a in case.arrays.items()}
    vectors = {k: None if v is None else np.array(v, copy=True) for k, v in case.vectors.items()}
    return arrays, vectors, None if out is None else np.array(out, copy=True)


def _unchanged(case, snap, out, skip=()):
    arrays, vectors, out0 = snap
    for k, a in case.arrays.items():
        if k not in skip:
            assert np.array_equal(a, arrays[k], equal_nan=True), f"input {k} was modified"
    for k, v in case.vectors.items():
        if v is not None and k not in skip:
            assert np.array_equal(v, vectors[k], equal_nan=True), f"vector {k} was modified"
    if out0 is not None and "out" not in skip:
        assert np.array_equal(out, out0, equal_nan=True), "out was written"


def _expected_errors(spec, case, out_kind, out):
    """(exception type, argument name) the call must raise, if any."""
    errors = []
    if 0 < case.count < spec.min_count:  # an empty batch is defined (test_empty_batches)
        errors.append((ValueError, "x"))
    if out is not None and not out.flags.writeable:
        errors.append((ValueError, "out"))
    if spec.refuses_overlap and out is not None and np.shares_memory(out, case.arrays["x"]):
        errors.append((ValueError, "out"))  # a layer keeps x for backward
    if spec.errors is not None:
        errors += spec.errors(case)
    return errors


def _close(got, want, dtype, name, factor=1.0, terms=0.0):
    """terms: the magnitude of the terms that cancel into want, when larger than want."""
    got64 = np.asarray(got, np.float64)
    want = np.asarray(want, np.float64)
    assert got64.shape == want.shape, f"{name}: shape {got64.shape} != {want.shape}"
    if not want.size:
        return
    both_nan = np.isnan(got64) & np.isnan(want)
    got64, want = np.where(both_nan, 0, got64), np.where(both_nan, 0, want)
    # a value past the result dtype's range (a float16 gradient sum) is its inf
    past = np.abs(want) > np.finfo(np.asarray(got).dtype).max if np.asarray(got).dtype.kind == "f" \
        else np.zeros(want.shape, bool)
    same_inf = past & np.isinf(got64) & (np.sign(got64) == np.sign(want))
    got64, want = np.where(same_inf, 0, got64), np.where(same_inf, 0, want)
    scale = max(1.0, float(np.abs(want).max()), terms)
    err = np.abs(got64 - want)
    bound = factor * (RTOL[dtype] * np.abs(want) + ATOL[dtype] * scale)
    worst = np.unravel_index(np.argmax(err - bound), err.shape)
    assert np.all(err <= bound), (
        f"{name}: |got - ref| = {err[worst]:.3g} at {worst} (got {got64[worst]!r}, "
        f"ref {want[worst]!r}), bound {bound[worst]:.3g}")


PRECISION = [np.float16, np.float32, np.float64]


def _check_results(spec, case, got, want):
    assert len(got) == len(want)
    terms = spec.scales(case, want) if spec.scales else {}
    for i, (g, w) in enumerate(zip(got, want)):
        name = f"{spec.name} result {i}"
        if isinstance(w, (int, np.integer)):
            assert g == w, f"{name}: {g} != {w}"
            continue
        if i in spec.like_x:
            assert g.dtype == case.dtype and g.shape == case.shape, f"{name}: {g.dtype} {g.shape}"
            _close(g, w, case.dtype, name, terms=terms.get(i, 0.0))
        elif g.dtype == np.float64 and spec.name.endswith(("stats", "reduce")):
            # float64 sums of exactly converted inputs: accurate whatever x's dtype
            _close(g, w, np.float64, name, factor=1e3)
        else:
            # statistics in the documented dtype, running statistics in their own
            compute = np.float64 if case.dtype == np.float64 else np.float32
            tol = min(PRECISION.index(compute), PRECISION.index(g.dtype.type))
            if compute == np.float32 and g.dtype != np.float32 and case.dtype != np.float16:
                assert g.dtype.type in (np.float16, np.float64), f"{name}: dtype {g.dtype}"
            _close(g, w, PRECISION[tol], name)


def _run(spec, data):
    case, out_kind, out = data
    if case.C < spec.min_channels:
        return
    snap = _snapshot(case, out)
    errors = _expected_errors(spec, case, out_kind, out)
    if errors:
        with pytest.raises(tuple({e for e, _ in errors})) as info:
            spec.call(case, out)
        msg = str(info.value)
        assert any(msg.startswith(arg) for _, arg in errors), msg
        _unchanged(case, snap, out)
        return
    want = spec.reference(case)
    got = spec.call(case, out)
    if spec.returns_out and out is not None:
        assert got[0] is out, "the result is not the given out"
    if out_kind in ("alias", "overlap", "reversed"):
        modified = {k for k, a in case.arrays.items()
                    if out is not None and np.shares_memory(a, out)}
    else:
        modified = set()
    _unchanged(case, snap, out, skip=modified | {k for k in case.vectors if k.startswith("state")}
               | {"out"})
    _check_results(spec, case, got, want)


@pytest.mark.parametrize("spec", SPECS, ids=[s.name for s in SPECS])
@SETTINGS
@given(data=st.data())
def test_fuzz(spec, data):
    _run(spec, data.draw(cases(spec), label="case"))


# ---- a training step's chain: train, backward with its statistics, eval ---------------------

@settings(SETTINGS, max_examples=max(EXAMPLES, 150))
@given(data=st.data())
def test_fuzz_train_backward_eval_chain(data):
    """batch_norm_train, then batch_norm_backward with the statistics it
    returned, then batch_norm_eval on the same x, into each kind of out, with
    x centred at 0 or at 1e3."""
    shape, axis = data.draw(geometry(), label="geometry")
    ax = axis % len(shape)
    if int(np.prod([s for i, s in enumerate(shape) if i != ax])) < 2:
        shape = tuple(s if i == ax else max(s, 2) for i, s in enumerate(shape))
    dtype = data.draw(st.sampled_from([np.float32, np.float64]), label="dtype")
    # no stride-0 views: a constant channel at 1e3 makes y all rounding (the
    # SPECS cases above bound that by the size of the cancelling terms)
    view = data.draw(st.sampled_from([v for v in VIEWS if v != "bcast"]), label="view")
    out_kind = data.draw(st.sampled_from(["none", "fresh", "fortran", "strided", "alias"]),
                         label="out")
    offset = data.draw(st.sampled_from([0.0, 1e3]), label="offset")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    x = _array(rng, shape, dtype, view, offset)
    C = shape[axis]
    w = rng.uniform(0.5, 1.5, C).astype(dtype)
    b = rng.standard_normal(C).astype(dtype)
    tol = ref.GRAD_TOL[dtype]
    if offset and dtype == np.float32:
        tol = dict(rtol=2e-3, atol=2e-3)  # x - mean in float32 at 1e3 loses ~1e-4 of std
    x_before = x.copy()
    y_ref, m_ref, inv_ref, _ = ref.train(x, w, b, axis)
    case = Case(shape, axis, dtype, 0, {"x": x}, {}, {})
    # later calls get a fresh out of the same kind: in place, x is still needed
    later = "none" if out_kind == "alias" else out_kind
    if out_kind == "alias":
        target = x.copy()
        y, mean, invstd = bncore.batch_norm_train(target, w, b, axis=axis, out=target)
        assert y is target
    else:
        out = _make_out(case, out_kind, None, rng)
        y, mean, invstd = bncore.batch_norm_train(x, w, b, axis=axis, out=out)
        if out is not None:
            assert y is out
        np.testing.assert_array_equal(x, x_before)
    np.testing.assert_allclose(y, y_ref, **tol)
    np.testing.assert_allclose(mean, m_ref, rtol=tol["rtol"] / 10, atol=tol["atol"])
    dy = rng.standard_normal(shape).astype(dtype)
    dx, dw, db = bncore.batch_norm_backward(dy, x, mean, invstd, w, axis=axis,
                                            out=_make_out(case, later, None, rng))
    dx_ref, dw_ref, db_ref = ref.backward(dy, x, mean, invstd, w, axis)
    scale = max(1.0, np.abs(dx_ref).max(initial=0.0))
    np.testing.assert_allclose(dx, dx_ref, rtol=tol["rtol"] * 10, atol=tol["atol"] * scale * 10)
    np.testing.assert_allclose(db, db_ref, rtol=tol["rtol"], atol=tol["atol"] * 10)
    np.testing.assert_allclose(dw, dw_ref, rtol=tol["rtol"] * 10, atol=tol["atol"] * 10)
    rv = rng.uniform(0.5, 2, C)
    ye = bncore.batch_norm_eval(x, m_ref, rv, w, b, axis=axis,
                                out=_make_out(case, later, None, rng))
    np.testing.assert_allclose(ye, ref.evaluate(x, m_ref, rv, w, b, axis), **tol)


# ---- merge_stats: K shards of one batch, in any split ----------------------------------------

@SETTINGS
@given(st.integers(0, 6), st.integers(0, 4), st.lists(st.integers(0, 7), min_size=1, max_size=6),
       st.integers(0, 2**32 - 1), st.sampled_from([0.0, 1e3]))
def test_fuzz_merge_stats(C, extra, sizes, seed, offset):
    rng = np.random.default_rng(seed)
    shards = [rng.standard_normal((n, C, 1 + extra)) * 2 + offset for n in sizes]
    parts = [bncore.batch_norm_stats(s) for s in shards]
    counts = np.array([p[0] for p in parts])
    means = np.array([p[1] for p in parts]).reshape(len(parts), C)
    m2s = np.array([p[2] for p in parts]).reshape(len(parts), C)
    for a in (counts, means, m2s):
        a.flags.writeable = False
    before = [a.copy() for a in (counts, means, m2s)]
    count, mean, m2 = bncore.merge_stats(counts, means, m2s)
    whole = np.concatenate(shards, axis=0)
    _, rmean, rm2 = ref.stats(whole)
    rcount = whole.shape[0] * whole.shape[2]
    assert count == rcount
    np.testing.assert_allclose(mean, rmean, rtol=1e-12, atol=1e-12 * (1 + offset))
    np.testing.assert_allclose(m2, rm2, rtol=1e-10, atol=1e-10 * max(1.0, rcount))
    for a, b in zip((counts, means, m2s), before):
        np.testing.assert_array_equal(a, b)


# ---- every kind of bad argument: the README's error table ------------------------------------

def _bad_inputs():
    """(what is wrong, call) for every kind of bad argument; the call must raise
    TypeError or ValueError whose message starts with the argument's name and
    says what was expected and what was received."""
    x = np.ones((4, 3, 5), np.float32)
    v3, rm, rv = np.ones(3), np.zeros(3, np.float32), np.ones(3, np.float32)
    ro = np.empty_like(x)
    ro.flags.writeable = False
    ro_v = np.ones(3, np.float32)
    ro_v.flags.writeable = False
    buf = np.zeros((2, 3))
    T, E, B = bncore.batch_norm_train, bncore.batch_norm_eval, bncore.batch_norm_backward
    return [
        ("x of an integer, complex or object dtype", lambda: T(x.astype(np.int32))),
        ("x with ndim < 2", lambda: T(np.ones(5, np.float32))),
        ("training with 1 value per channel (N*H*W == 1)", lambda: T(np.ones((1, 3), np.float32))),
        ("axis out of range", lambda: T(x, axis=3)),
        ("axis not an int", lambda: T(x, axis=1.0)),
        ("weight / bias of the wrong length", lambda: T(x, np.ones(4))),
        ("weight / bias of a non-float dtype", lambda: T(x, np.ones(3, np.int64))),
        ("eps negative, NaN or not a number", lambda: T(x, eps=-1e-5)),
        ("momentum outside [0, 1]", lambda: T(x, momentum=1.5)),
        ("only one of running_mean / running_var", lambda: T(x, running_mean=rm)),
        ("running_mean / running_var not an ndarray", lambda: T(x, running_mean=[0.0] * 3,
                                                                running_var=rv)),
        ("running_mean / running_var of the wrong length",
         lambda: T(x, running_mean=rm[:2], running_var=rv)),
        ("running_mean / running_var read-only", lambda: T(x, running_mean=rm, running_var=ro_v)),
        ("running_var sharing memory with running_mean",
         lambda: T(x, running_mean=rm, running_var=rm)),
        ("out of the wrong shape", lambda: T(x, out=np.empty((4, 3, 6), np.float32))),
        ("out of the wrong dtype", lambda: T(x, out=np.empty(x.shape))),
        ("out not an ndarray", lambda: T(x, out=[0.0])),
        ("out read-only", lambda: T(x, out=ro)),
        ("out sharing memory with running_mean / running_var",
         lambda: T(np.ones((2, 3)), running_mean=buf[0], running_var=np.ones(3), out=buf)),
        ("n_threads zero, negative or not an int", lambda: T(x, n_threads=0)),
        ("activation unknown", lambda: T(x, activation="gelu")),
        ("leaky_relu slope negative", lambda: T(x, activation=("leaky_relu", -0.1))),
        ("eval: running_mean / running_var missing", lambda: E(x, None, rv)),
        ("dy / y of another shape", lambda: B(x[:2], x, v3, v3)),
        ("dy / y of another dtype", lambda: B(x.astype(np.float64), x, v3, v3)),
        ("save_mean / save_invstd of the wrong length", lambda: B(x, x, v3, v3[:2])),
        ("activation set without y (backward)", lambda: B(x, x, v3, v3, activation="relu")),
        ("backward_elemt count < 1", lambda: bncore.batch_norm_backward_elemt(
            x, x, v3, v3, None, v3, v3, 0)),
        ("merge_stats counts negative or not finite",
         lambda: bncore.merge_stats([4, -1], np.zeros((2, 3)), np.zeros((2, 3)))),
        ("merge_stats means / m2s of mismatched shapes",
         lambda: bncore.merge_stats([4, 4], np.zeros((2, 3)), np.zeros((2, 4)))),
        ("BatchNorm num_features not a positive int", lambda: bncore.BatchNorm(0)),
        ("BatchNorm dtype not float16/32/64", lambda: bncore.BatchNorm(3, dtype=np.int32)),
        ("BatchNorm dtype not a dtype", lambda: bncore.BatchNorm(3, dtype="foo")),
        ("BatchNorm input with another channel count",
         lambda: bncore.BatchNorm(3)(np.ones((4, 5), np.float32))),
        ("BatchNorm out sharing memory with x", lambda: bncore.BatchNorm(3)(x, out=x)),
        ("BatchNorm state_dict entry of the wrong shape",
         lambda: bncore.BatchNorm(3).load_state_dict({**bncore.BatchNorm(3).state_dict(),
                                                      "running_var": np.ones(4)})),
    ]


BAD = _bad_inputs()


@pytest.mark.parametrize("what,call", BAD, ids=[b[0] for b in BAD])
def test_bad_input_message_names_argument_expected_and_received(what, call):
    with pytest.raises((TypeError, ValueError)) as info:
        call()
    msg = str(info.value)
    arg, _, rest = msg.partition(": ")
    assert arg and " " not in arg.replace("activation slope", "x"), msg
    assert "expected" in rest and "got" in rest, msg


def error_table():
    """The README's table of bad inputs (printed by `python tests/test_fuzz.py`)."""
    rows = ["| bad input | exception | message |", "|---|---|---|"]
    for what, call in BAD:
        try:
            call()
        except (TypeError, ValueError) as e:
            rows.append(f"| {what} | `{type(e).__name__}` | {str(e).replace('|', '/')} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(error_table())
