# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""The one path from Python to the C kernels (include/bncore.h, declared in _kernels.pxd).

The canonical form of an argument is defined once, here: an exact, aligned,
native-order, C-contiguous float32/float64 ndarray; a parameter of length C
in either dtype; a real scalar in range (`real_in`); a thread count
(`threads`); an activation (`activation_code`). The batch-norm entries
(`train`, `evaluate`, `elemt`, `backward`) own their whole call: they take
canonical arguments, allocate or accept the output, run the kernel without
the GIL, update running statistics and return statistics in their dtype.
Given anything else they return None, and bncore._checks -- the only code
that raises argument errors, and which applies the same predicates --
brings the arguments to canonical form and calls the same entry again.
The lower-level wrappers after them take arrays already made canonical by
the Python layer (flat, contiguous, float64 parameters; None reaches C as
NULL).
"""
import os

cimport numpy as cnp
from cython cimport floating
from libc.math cimport isfinite
from libc.stdint cimport int64_t, uint8_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy

cnp.import_array()

MAX_THREADS = 4096  # n_threads above this are taken as this many (libgomp's limits)
cdef int _MAX_THREADS = MAX_THREADS
bn_thread_cap = bn_default_threads()


def build_info():
    return bn_build_info().decode()


def default_threads():
    return bn_default_threads()


def set_thread_limit(int n):
    """The process-wide limit on the threads of a call with n_threads=None (0: none)."""
    bncore_set_num_threads(n)


def thread_limit():
    """The process-wide limit (0: none)."""
    return bn_thread_limit


def cpu_level():
    """2: AVX-512, 1: AVX2+FMA, 0: baseline (the kernel clone in use)."""
    return 2 if bn_cpu_has(2) else (1 if bn_cpu_has(1) else 0)


cdef inline int _check(int err) except -1:
    if err == BN_ENOMEM:
        raise MemoryError("bncore: could not allocate kernel scratch space")
    if err:  # bncore._checks checks first: this is the C-level safety net
        raise ValueError(f"bncore: a kernel refused its arguments (error {err})")
    return 0


# ---- the canonical form ---------------------------------------------------------------------

# libgomp keeps its thread pool across fork() without the threads: a forked
# child that enters a parallel region waits forever for them. Every kernel
# call in a forked child therefore runs on the calling thread.
cdef bint _forked = False


def _mark_forked_child():
    global _forked
    _forked = True


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_mark_forked_child)


cpdef bint real_in(object v, double lo, double hi):
    """Whether v is an exact float or int, finite, in [lo, hi]."""
    cdef double d
    if type(v) is not float and type(v) is not int:
        return False
    try:
        d = v
    except OverflowError:
        return False
    return isfinite(d) and lo <= d <= hi


cpdef int threads(object n_threads):
    """The kernel's thread argument for n_threads: for None, 0 (OpenMP's current
    maximum, read at call time by the calling thread) or that maximum capped by
    the process-wide limit (set_thread_limit); min(n, MAX_THREADS) for an exact
    int n >= 1; 1 in a forked child; -1 when n_threads is neither."""
    cdef int lim
    if n_threads is None:
        if _forked:
            return 1
        lim = bn_thread_limit
        if lim > 0:
            return min(lim, bn_default_threads())
        return 0
    if type(n_threads) is not int or n_threads < 1:
        return -1
    if _forked:
        return 1
    return _MAX_THREADS if n_threads > _MAX_THREADS else <int>n_threads


cdef int _act(object a, double *slope):
    """Kernel code of None (0), 'relu' (1), 'leaky_relu' or ('leaky_relu', s)
    with s a real_in [0, inf) (2; slope set); -1 otherwise."""
    slope[0] = 0.0
    if a is None:
        return 0
    if type(a) is str:
        if a == "relu":
            return 1
        if a == "leaky_relu":
            slope[0] = 0.01
            return 2
        return -1
    if (type(a) is tuple and len(a) == 2 and type(a[0]) is str and a[0] == "leaky_relu"
            and real_in(a[1], 0.0, float("inf"))):
        slope[0] = a[1]
        return 2
    return -1


def activation_code(a):
    """(code, slope) of a canonical activation, or None."""
    cdef double slope
    cdef int code = _act(a, &slope)
    return None if code < 0 else (code, slope)


cdef enum:
    NOPE = 0
    F32 = cnp.NPY_FLOAT
    F64 = cnp.NPY_DOUBLE


cdef int _kind(object a):
    """F32 or F64 for an exact, aligned, native-order, C-contiguous float32 or
    float64 ndarray; NOPE for anything else."""
    if not cnp.PyArray_CheckExact(a):
        return NOPE
    cdef cnp.ndarray arr = <cnp.ndarray>a
    if not (cnp.PyArray_IS_C_CONTIGUOUS(arr) and cnp.PyArray_ISBEHAVED_RO(arr)):
        return NOPE
    cdef int t = cnp.PyArray_TYPE(arr)
    return t if t == F32 or t == F64 else NOPE


def is_canonical(a):
    """Whether a is a canonical array (see _kind)."""
    return _kind(a) != NOPE


cdef int _vec(object v, int64_t C, double *dst):
    """A canonical length-C parameter copied to dst as double: 1; None: 0;
    anything else: -1."""
    if v is None:
        return 0
    cdef int k = _kind(v)
    if k == NOPE or cnp.PyArray_NDIM(<cnp.ndarray>v) != 1:
        return -1
    if cnp.PyArray_DIMS(<cnp.ndarray>v)[0] != C:
        return -1
    cdef void *p = cnp.PyArray_DATA(<cnp.ndarray>v)
    cdef int64_t i
    if k == F64:
        memcpy(dst, p, C * sizeof(double))
    else:
        for i in range(C):
            dst[i] = (<float *>p)[i]
    return 1


cdef bint _disjoint(object a, object b):
    """Whether two canonical ndarrays (or None) share no byte."""
    if a is None or b is None:
        return True
    cdef char *pa = <char *>cnp.PyArray_DATA(<cnp.ndarray>a)
    cdef char *pb = <char *>cnp.PyArray_DATA(<cnp.ndarray>b)
    return (pa + cnp.PyArray_NBYTES(<cnp.ndarray>a) <= pb or
            pb + cnp.PyArray_NBYTES(<cnp.ndarray>b) <= pa)


cdef int _geometry(object x, object axis, bn_shape *s):
    """The (outer, C, inner) of a canonical x along a canonical axis (see
    channel_span; several adjacent axes make one channel dimension): the kind
    of x, or NOPE."""
    cdef int k = _kind(x)
    if k == NOPE:
        return NOPE
    cdef cnp.ndarray a = <cnp.ndarray>x
    cdef int nd = cnp.PyArray_NDIM(a), i
    span = channel_span(axis, nd) if nd >= 2 else None
    if span is None:
        return NOPE
    cdef long first = span[0], last = span[1]
    s.outer, s.channels, s.inner = 1, 1, 1
    for i in range(nd):
        if i < first:
            s.outer *= cnp.PyArray_DIMS(a)[i]
        elif i > last:
            s.inner *= cnp.PyArray_DIMS(a)[i]
        else:
            s.channels *= cnp.PyArray_DIMS(a)[i]
    return k


cdef bint _off_axis0(object axis, object x):
    """Whether the channel axes (canonical, see channel_span) leave axis 0,
    the samples that ghost batches split."""
    return channel_span(axis, cnp.PyArray_NDIM(<cnp.ndarray>x))[0] != 0


cdef bint _like(object a, object x, int k):
    """Whether a is an array of kind k (see _kind) with the shape of x."""
    if _kind(a) != k or cnp.PyArray_NDIM(<cnp.ndarray>a) != cnp.PyArray_NDIM(<cnp.ndarray>x):
        return False
    cdef int i
    for i in range(cnp.PyArray_NDIM(<cnp.ndarray>x)):
        if cnp.PyArray_DIMS(<cnp.ndarray>a)[i] != cnp.PyArray_DIMS(<cnp.ndarray>x)[i]:
            return False
    return True


cdef object _output(object out, object x, int k, tuple inputs):
    """A fresh array like x, or out when it can be written directly: a canonical,
    writable array like x that is either exactly one of the inputs or disjoint
    from all of them (and from the running statistics, passed as inputs too).
    None otherwise."""
    cdef cnp.ndarray a = <cnp.ndarray>x
    if out is None:
        if cnp.PyArray_NBYTES(a) >= BN_CACHE_MIN:
            return bn_out_empty(x.shape, x.dtype)
        return cnp.PyArray_EMPTY(cnp.PyArray_NDIM(a), cnp.PyArray_DIMS(a), k, 0)
    if not _like(out, x, k) or not cnp.PyArray_ISWRITEABLE(<cnp.ndarray>out):
        return None
    for b in inputs:
        if not (_disjoint(out, b) or (b is not None and _like(b, x, k) and
                cnp.PyArray_DATA(<cnp.ndarray>out) == cnp.PyArray_DATA(<cnp.ndarray>b))):
            return None
    return out


cdef bint _running(object a, int64_t C):
    """Whether a is a canonical, writable running statistic of length C."""
    return (_kind(a) != NOPE and cnp.PyArray_NDIM(<cnp.ndarray>a) == 1
            and cnp.PyArray_DIMS(<cnp.ndarray>a)[0] == C
            and cnp.PyArray_ISWRITEABLE(<cnp.ndarray>a))


cdef object _stat_array(const double *v, int64_t K, int64_t C, int k, bint rows):
    """A new (C,) -- or (K, C) with rows -- array of the statistics dtype
    (float32 for float32 input) holding v."""
    cdef cnp.npy_intp dims[2]
    dims[0], dims[1] = K, C
    cdef cnp.ndarray r = (cnp.PyArray_EMPTY(2, dims, k, 0) if rows
                          else cnp.PyArray_EMPTY(1, &dims[1], k, 0))
    cdef int64_t i, n = K * C
    if k == F64:
        memcpy(cnp.PyArray_DATA(r), v, n * sizeof(double))
    else:
        for i in range(n):
            (<float *>cnp.PyArray_DATA(r))[i] = <float>v[i]
    return r


cdef void _store(object a, const double *v, int64_t C):
    """Writes v into the canonical float32 or float64 array a."""
    cdef void *p = cnp.PyArray_DATA(<cnp.ndarray>a)
    cdef int64_t i
    if cnp.PyArray_TYPE(<cnp.ndarray>a) == F64:
        memcpy(p, v, C * sizeof(double))
    else:
        for i in range(C):
            (<float *>p)[i] = <float>v[i]


cdef int64_t _ghosts(object vbs, object x, int ax_ok, int64_t count):
    """Number of ghost batches of virtual_batch_size vbs along axis 0 of x, 1
    for vbs None; -1 when vbs is not canonical (an exact int >= 1 leaving
    every ghost batch more than one value per channel, axis 0 not the channel
    axis)."""
    if vbs is None:
        return 1
    if type(vbs) is not int or vbs < 1 or not ax_ok:
        return -1
    cdef int64_t N = cnp.PyArray_DIMS(<cnp.ndarray>x)[0]
    if N == 0 or vbs > N:
        return 1 if count >= 2 and N > 0 else -1
    cdef int64_t v = vbs, last = N % v
    if (count // N) * (last if last else v) < 2:
        return -1
    return (N + v - 1) // v


# ---- per-channel rules, written once ---------------------------------------------------------

def invstd(var, double eps):
    """bn_invstd elementwise: 1/sqrt(var + eps), 0 where var + eps == 0 (the
    kernels' rule). var: float64 array of any shape; returns a new array."""
    cdef cnp.ndarray v = cnp.PyArray_FROMANY(var, cnp.NPY_DOUBLE, 0, 0,
                                             cnp.NPY_ARRAY_C_CONTIGUOUS | cnp.NPY_ARRAY_ENSURECOPY)
    cdef double *p = <double *>cnp.PyArray_DATA(v)
    cdef int64_t i, n = cnp.PyArray_SIZE(v)
    with nogil:
        for i in range(n):
            p[i] = bn_invstd(p[i], eps)
    return v


cdef void _moved(int64_t C, int64_t W, const double *mean, const double *var,
                 const double *count, double momentum, double *rm, double *rv) noexcept nogil:
    """bn_update_running with one count for all channels (W == 1) or one per
    channel (W == C: masked statistics)."""
    cdef int64_t c
    if W == 1:
        bn_update_running(C, mean, var, count[0], momentum, rm, rv)
        return
    for c in range(C):
        bn_update_running(1, mean + c, var + c, count[c], momentum, rm + c, rv + c)


cdef void _update(int64_t K, int64_t C, const double *mean, const double *var,
                  const double *count, int64_t W, double momentum, double *rm, double *rv,
                  double *tmp) noexcept nogil:
    """The running-statistics update from K parts (ghost batches, instances):
    the average over the parts of each part's mean and (Bessel-corrected for
    count > 1) variance, moved in with momentum by bn_update_running. count:
    K x W (W = 1 or C, see _moved). tmp: scratch of 4*C doubles (K > 1)."""
    cdef int64_t k, c
    if K == 1:
        _moved(C, W, mean, var, count, momentum, rm, rv)
        return
    cdef double *am = tmp + 2 * C
    cdef double *av = tmp + 3 * C
    for c in range(2 * C):
        am[c] = 0.0  # am, av
    for k in range(K):
        for c in range(2 * C):
            tmp[c] = 0.0
        # momentum 1 yields the part's own mean and corrected variance
        _moved(C, W, mean + k * C, var + k * C, count + k * W, 1.0, tmp, tmp + C)
        for c in range(C):
            am[c] += tmp[c]
            av[c] += tmp[C + c]
    for c in range(C):
        am[c] /= K
        av[c] /= K
    bn_update_running(C, am, av, 1.0, momentum, rm, rv)


def update_running(const double[:, ::1] mean, const double[:, ::1] var,
                   const double[:, ::1] count, double momentum, double[::1] running_mean,
                   double[::1] running_var):
    """_update on float64 arrays: mean, var (K, C), count (K, 1) or (K, C);
    running (C,)."""
    cdef double *tmp = <double *>malloc(sizeof(double) * (4 * mean.shape[1] + 1))
    if tmp == NULL:
        raise MemoryError("bncore: could not allocate kernel scratch space")
    with nogil:
        _update(mean.shape[0], mean.shape[1], &mean[0, 0], &var[0, 0], &count[0, 0],
                count.shape[1], momentum, &running_mean[0], &running_var[0], tmp)
    free(tmp)


# ---- batch norm: one entry per operation -----------------------------------------------------

cdef int _train_kernel(int k, const void *x, void *y, bn_shape s, const double *w,
                       const double *b, double eps, double *mean, double *inv, double *var,
                       int act, double slope, int nt) noexcept nogil:
    if k == F32:
        return bn_train_f32(<const float *>x, <float *>y, s, w, b, eps, mean, inv, var,
                            <bn_act>act, slope, nt)
    return bn_train_f64(<const double *>x, <double *>y, s, w, b, eps, mean, inv, var,
                        <bn_act>act, slope, nt)


def train(x, weight, bias, axis, eps, running_mean, running_var, momentum, out, activation,
          n_threads, bint unbiased, bint skip_nonfinite, virtual_batch_size):
    """batch_norm_train on canonical arguments: (y, save_mean, save_invstd,
    updated), or None. With virtual_batch_size the statistics are (K, C), one
    row per ghost batch of that many samples along axis 0."""
    cdef bn_shape s
    cdef double slope, e, mom
    cdef int k = _geometry(x, axis, &s), act = _act(activation, &slope), nt = threads(n_threads)
    if (k == NOPE or act < 0 or nt < 0 or not real_in(eps, 0.0, float("inf"))
            or not real_in(momentum, 0.0, 1.0) or s.outer * s.inner < 2):
        return None
    e, mom = eps, momentum
    cdef int64_t C = s.channels, K = _ghosts(virtual_batch_size, x, _off_axis0(axis, x),
                                             s.outer * s.inner)
    if K < 0:
        return None
    cdef bint running = running_mean is not None
    if running:
        if not (_running(running_mean, C) and _running(running_var, C)
                and _disjoint(running_mean, running_var)):
            return None
    elif running_var is not None:
        return None
    y = _output(out, x, k, (x, running_mean, running_var))
    if y is None:
        return None
    cdef double *buf = <double *>malloc(sizeof(double) * (8 * C + 3 * K * C + K + 1))
    if buf == NULL:
        raise MemoryError("bncore: could not allocate kernel scratch space")
    cdef double *w = buf
    cdef double *b = buf + C
    cdef double *rm = buf + 2 * C
    cdef double *rv = buf + 3 * C
    cdef double *mean = buf + 4 * C
    cdef double *inv = mean + K * C
    cdef double *var = inv + K * C
    cdef double *count = var + K * C
    cdef int hw, hb, err = 0
    cdef bint update = running
    cdef int64_t i, g, N, per, n0
    cdef char *px = <char *>cnp.PyArray_DATA(<cnp.ndarray>x)
    cdef char *py = <char *>cnp.PyArray_DATA(<cnp.ndarray>y)
    cdef bn_shape sg = s
    cdef int64_t row_bytes, v
    try:
        hw, hb = _vec(weight, C, w), _vec(bias, C, b)
        if hw < 0 or hb < 0:
            return None
        if running:
            _vec(running_mean, C, rm)
            _vec(running_var, C, rv)
        if virtual_batch_size is None:
            count[0] = s.outer * s.inner
            with nogil:
                err = _train_kernel(k, px, py, s, w if hw else NULL, b if hb else NULL, e,
                                    mean, inv, var, act, slope, nt)
        else:
            N = cnp.PyArray_DIMS(<cnp.ndarray>x)[0]
            per = s.outer // N  # outer rows per sample
            row_bytes = per * C * s.inner * cnp.PyArray_ITEMSIZE(<cnp.ndarray>x)
            v = min(<int64_t>virtual_batch_size, N)
            with nogil:
                for g in range(K):
                    n0 = min(v, N - g * v)
                    sg.outer = n0 * per
                    count[g] = sg.outer * s.inner
                    i = g * v
                    err = _train_kernel(k, px + i * row_bytes, py + i * row_bytes, sg,
                                        w if hw else NULL, b if hb else NULL, e, mean + g * C,
                                        inv + g * C, var + g * C, act, slope, nt)
                    if err:
                        break
        if err == BN_EINVAL:
            return None
        _check(err)
        if update and skip_nonfinite:
            for i in range(K * C):
                if not (isfinite(mean[i]) and isfinite(var[i])):
                    update = False
                    break
        if update:
            if not unbiased:
                for i in range(K):
                    count[i] = 1.0
            _update(K, C, mean, var, count, 1, mom, rm, rv, count + K)
            _store(running_mean, rm, C)
            _store(running_var, rv, C)
        rows = virtual_batch_size is not None
        return y, _stat_array(mean, K, C, k, rows), _stat_array(inv, K, C, k, rows), update
    finally:
        free(buf)


cdef object _affine(x, center, stat, weight, bias, axis, out, activation, n_threads,
                    double eps, bint from_var):
    """y = (x - center) * (weight * invstd) + bias through bn_apply, on canonical
    arguments; invstd is `stat`, or bn_invstd(stat, eps) with from_var (the
    eval-mode rule, as bn_eval computes it). None when not canonical (or a
    variance + eps is negative)."""
    cdef bn_shape s
    cdef double slope
    cdef int k = _geometry(x, axis, &s), act = _act(activation, &slope), nt = threads(n_threads)
    if k == NOPE or act < 0 or nt < 0:
        return None
    cdef int64_t C = s.channels, c
    cdef double *buf = <double *>malloc(sizeof(double) * (4 * C + 1))
    if buf == NULL:
        raise MemoryError("bncore: could not allocate kernel scratch space")
    cdef double *m = buf
    cdef double *inv = buf + C
    cdef double *w = buf + 2 * C
    cdef double *b = buf + 3 * C
    cdef int hw, hb, err = 0
    cdef void *px
    cdef void *py
    try:
        if _vec(center, C, m) != 1 or _vec(stat, C, inv) != 1:
            return None
        if from_var:
            for c in range(C):
                if inv[c] + eps < 0:
                    return None
                inv[c] = bn_invstd(inv[c], eps)
        hw, hb = _vec(weight, C, w), _vec(bias, C, b)
        if hw < 0 or hb < 0:
            return None
        y = _output(out, x, k, (x,))
        if y is None:
            return None
        for c in range(C):  # scale and shift, in the place of weight and bias
            w[c] = w[c] * inv[c] if hw else inv[c]
            b[c] = b[c] if hb else 0.0
        px, py = cnp.PyArray_DATA(<cnp.ndarray>x), cnp.PyArray_DATA(<cnp.ndarray>y)
        with nogil:
            if k == F32:
                err = bn_apply_f32(<float *>px, <float *>py, s, m, w, b, <bn_act>act, slope, nt)
            else:
                err = bn_apply_f64(<double *>px, <double *>py, s, m, w, b, <bn_act>act, slope,
                                   nt)
        if err == BN_EINVAL:
            return None
        _check(err)
        return y
    finally:
        free(buf)


def evaluate(x, running_mean, running_var, weight, bias, axis, eps, out, activation,
             n_threads):
    """batch_norm_eval on canonical arguments: y, or None (also when a
    running_var + eps is negative: the Python layer says which)."""
    if not real_in(eps, 0.0, float("inf")):
        return None
    return _affine(x, running_mean, running_var, weight, bias, axis, out, activation,
                   n_threads, eps, True)


def elemt(x, mean, invstd, weight, bias, axis, out, activation, n_threads):
    """batch_norm_elemt on canonical arguments: y = (x - mean) * (invstd * weight)
    + bias, or None."""
    return _affine(x, mean, invstd, weight, bias, axis, out, activation, n_threads, 0.0,
                   False)


cdef int _backward_kernel(int k, const void *dy, const void *x, const void *y, void *dx,
                          bn_shape s, const double *m, const double *inv, const double *w,
                          bint training, double *dw, double *db, int act,
                          double slope, int nt) noexcept nogil:
    if k == F32:
        return bn_backward_f32(<const float *>dy, <const float *>x, <const float *>y,
                               <float *>dx, s, m, inv, w, training, dw, db, <bn_act>act, slope,
                               nt)
    return bn_backward_f64(<const double *>dy, <const double *>x, <const double *>y,
                           <double *>dx, s, m, inv, w, training, dw, db, <bn_act>act, slope, nt)


def backward(dy, x, save_mean, save_invstd, weight, axis, training, out, activation, y,
             n_threads, virtual_batch_size):
    """batch_norm_backward on canonical arguments: (dx, dweight, dbias), or
    None. With virtual_batch_size (training only) save_mean and save_invstd
    are canonical (K, C) arrays, one row per ghost batch."""
    cdef bn_shape s
    cdef double slope
    cdef int k = _geometry(x, axis, &s), act = _act(activation, &slope), nt = threads(n_threads)
    if (k == NOPE or act < 0 or nt < 0 or not _like(dy, x, k) or (act and not _like(y, x, k))
            or type(training) is not bool):
        return None
    if not act:
        y = None
    cdef bint tr = training
    cdef int64_t C = s.channels, K = 1, g, i, N = 0, per = 0, n0
    if virtual_batch_size is not None and tr:
        K = _ghosts(virtual_batch_size, x, _off_axis0(axis, x), s.outer * s.inner)
        if K < 0:
            return None
        for a in (save_mean, save_invstd):
            if (_kind(a) == NOPE or cnp.PyArray_NDIM(<cnp.ndarray>a) != 2
                    or cnp.PyArray_DIMS(<cnp.ndarray>a)[0] != K
                    or cnp.PyArray_DIMS(<cnp.ndarray>a)[1] != C):
                return None
    dx = _output(out, x, k, (x, dy) if y is None else (x, dy, y))
    if dx is None:
        return None
    cdef double *buf = <double *>malloc(sizeof(double) * (2 * K * C + 5 * C + 1))
    if buf == NULL:
        raise MemoryError("bncore: could not allocate kernel scratch space")
    cdef double *w = buf
    cdef double *dw = buf + C
    cdef double *db = buf + 2 * C
    cdef double *dwk = buf + 3 * C
    cdef double *dbk = buf + 4 * C
    cdef double *m = buf + 5 * C
    cdef double *inv = m + K * C
    cdef int hw, err = 0
    cdef char *pdy = <char *>cnp.PyArray_DATA(<cnp.ndarray>dy)
    cdef char *px = <char *>cnp.PyArray_DATA(<cnp.ndarray>x)
    cdef char *py = NULL if y is None else <char *>cnp.PyArray_DATA(<cnp.ndarray>y)
    cdef char *pdx = <char *>cnp.PyArray_DATA(<cnp.ndarray>dx)
    cdef bn_shape sg = s
    cdef int64_t row_bytes, v
    try:
        if K == 1 and virtual_batch_size is None or not tr:
            if _vec(save_mean, C, m) != 1 or _vec(save_invstd, C, inv) != 1:
                return None
        else:
            _vec(save_mean.reshape(-1), K * C, m)
            _vec(save_invstd.reshape(-1), K * C, inv)
        hw = _vec(weight, C, w)
        if hw < 0:
            return None
        if virtual_batch_size is None or not tr:
            with nogil:
                err = _backward_kernel(k, pdy, px, py, pdx, s, m, inv, w if hw else NULL, tr,
                                       dw, db, act, slope, nt)
        else:
            N = cnp.PyArray_DIMS(<cnp.ndarray>x)[0]
            per = s.outer // N
            row_bytes = per * C * s.inner * cnp.PyArray_ITEMSIZE(<cnp.ndarray>x)
            v = min(<int64_t>virtual_batch_size, N)
            with nogil:
                for i in range(C):
                    dw[i] = 0.0
                    db[i] = 0.0
                for g in range(K):
                    n0 = min(v, N - g * v)
                    sg.outer = n0 * per
                    i = g * v * row_bytes
                    err = _backward_kernel(k, pdy + i, px + i, NULL if py == NULL else py + i,
                                           pdx + i, sg, m + g * C, inv + g * C,
                                           w if hw else NULL, True, dwk, dbk, act, slope, nt)
                    if err:
                        break
                    for n0 in range(C):
                        dw[n0] += dwk[n0]
                        db[n0] += dbk[n0]
        if err == BN_EINVAL:
            return None
        _check(err)
        return dx, _stat_array(dw, 1, C, k, False), _stat_array(db, 1, C, k, False)
    finally:
        free(buf)


# ---- lower-level wrappers (arguments made canonical by the Python layer) ---------------------

cdef inline bn_shape _shape(tuple shape):
    cdef bn_shape s
    s.outer, s.channels, s.inner = shape
    return s


cdef inline const double *_opt(const double[::1] v):
    return NULL if v is None else &v[0]


def stats(const floating[::1] x, tuple shape, double[::1] mean, double[::1] m2, int nt):
    cdef bn_shape s = _shape(shape)
    cdef int err
    with nogil:
        if floating is float:
            err = bn_stats_f32(&x[0], s, &mean[0], &m2[0], nt)
        else:
            err = bn_stats_f64(&x[0], s, &mean[0], &m2[0], nt)
    _check(err)


def merge_stats(const double[:, ::1] count, const double[:, ::1] mean,
                const double[:, ::1] m2, double[::1] out_mean, double[::1] out_m2,
                double[::1] out_count):
    """bn_merge_stats of K parts: count (K, 1), one per part, or (K, C), one
    per part and channel (masked statistics: channel by channel). Writes the
    merged count of each channel to out_count (C,); returns the total."""
    cdef int64_t K = mean.shape[0], C = mean.shape[1], j, c
    cdef double total = 0
    cdef double *col
    if count.shape[1] == 1:
        with nogil:
            bn_merge_stats(K, C, &count[0, 0], &mean[0, 0], &m2[0, 0], &total,
                           &out_mean[0] if C else NULL, &out_m2[0] if C else NULL)
            for c in range(C):
                out_count[c] = total
        return total
    col = <double *>malloc(sizeof(double) * (3 * K + 1))
    if col == NULL:
        raise MemoryError("bncore: could not allocate kernel scratch space")
    with nogil:
        for c in range(C):
            for j in range(K):
                col[j] = count[j, c]
                col[K + j] = mean[j, c]
                col[2 * K + j] = m2[j, c]
            bn_merge_stats(K, 1, col, col + K, col + 2 * K, &out_count[c], &out_mean[c],
                           &out_m2[c])
    free(col)
    return total


def backward_reduce(const floating[::1] dy, const floating[::1] x, const floating[::1] y,
                    tuple shape, const double[::1] mean, int act, double slope,
                    double[::1] sum_dy, double[::1] sum_dy_xmu, int nt):
    cdef bn_shape s = _shape(shape)
    cdef const floating *yp = NULL if y is None else &y[0]
    cdef int err
    with nogil:
        if floating is float:
            err = bn_backward_reduce_f32(&dy[0], &x[0], yp, s,
                                         &mean[0], <bn_act>act, slope, &sum_dy[0],
                                         &sum_dy_xmu[0], nt)
        else:
            err = bn_backward_reduce_f64(&dy[0], &x[0], yp, s,
                                         &mean[0], <bn_act>act, slope, &sum_dy[0],
                                         &sum_dy_xmu[0], nt)
    _check(err)


def backward_apply(const floating[::1] dy, const floating[::1] x, const floating[::1] y,
                   floating[::1] dx, tuple shape, const double[::1] mean, const double[::1] a,
                   const double[::1] b, const double[::1] c0, int act, double slope, int nt):
    cdef bn_shape s = _shape(shape)
    cdef const floating *xp = NULL if x is None else &x[0]
    cdef const floating *yp = NULL if y is None else &y[0]
    cdef const double *bp = _opt(b)
    cdef const double *cp = _opt(c0)
    cdef int err
    with nogil:
        if floating is float:
            err = bn_backward_apply_f32(&dy[0], xp, yp, &dx[0], s, &mean[0], &a[0], bp, cp,
                                        <bn_act>act, slope, nt)
        else:
            err = bn_backward_apply_f64(&dy[0], xp, yp, &dx[0], s, &mean[0], &a[0], bp, cp,
                                        <bn_act>act, slope, nt)
    _check(err)


# ---- normalization family (include/bncore_norms_template.h) -------------------------------

def layer_norm(const floating[::1] x, floating[::1] y, int64_t rows, int64_t cols,
               const double[::1] weight, const double[::1] bias, double eps, double[::1] mean,
               double[::1] invstd, int nt):
    cdef const double *w = _opt(weight)
    cdef const double *b = _opt(bias)
    cdef int err
    with nogil:
        if floating is float:
            err = bn_layer_norm_f32(&x[0], &y[0], rows, cols, w, b, eps, &mean[0], &invstd[0], nt)
        else:
            err = bn_layer_norm_f64(&x[0], &y[0], rows, cols, w, b, eps, &mean[0], &invstd[0], nt)
    _check(err)


def layer_norm_backward(const floating[::1] dy, const floating[::1] x, floating[::1] dx,
                        int64_t rows, int64_t cols, const double[::1] mean,
                        const double[::1] invstd, const double[::1] weight,
                        double[::1] dweight, double[::1] dbias, int nt):
    cdef const double *w = _opt(weight)
    cdef int err
    with nogil:
        if floating is float:
            err = bn_layer_norm_backward_f32(&dy[0], &x[0], &dx[0], rows, cols, &mean[0],
                                             &invstd[0], w, &dweight[0], &dbias[0], nt)
        else:
            err = bn_layer_norm_backward_f64(&dy[0], &x[0], &dx[0], rows, cols, &mean[0],
                                             &invstd[0], w, &dweight[0], &dbias[0], nt)
    _check(err)


def group_norm(const floating[::1] x, floating[::1] y, tuple shape, const double[::1] weight,
               const double[::1] bias, double eps, double[::1] mean, double[::1] invstd, int nt):
    """shape = (N, C, HW, G)."""
    cdef int64_t N, C, HW, G
    N, C, HW, G = shape
    cdef const double *w = _opt(weight)
    cdef const double *b = _opt(bias)
    cdef int err
    with nogil:
        if floating is float:
            err = bn_group_norm_f32(&x[0], &y[0], N, C, HW, G, w, b, eps, &mean[0], &invstd[0], nt)
        else:
            err = bn_group_norm_f64(&x[0], &y[0], N, C, HW, G, w, b, eps, &mean[0], &invstd[0], nt)
    _check(err)


def group_norm_backward(const floating[::1] dy, const floating[::1] x, floating[::1] dx,
                        tuple shape, const double[::1] mean, const double[::1] invstd,
                        const double[::1] weight, double[::1] dweight, double[::1] dbias, int nt):
    """shape = (N, C, HW, G)."""
    cdef int64_t N, C, HW, G
    N, C, HW, G = shape
    cdef const double *w = _opt(weight)
    cdef int err
    with nogil:
        if floating is float:
            err = bn_group_norm_backward_f32(&dy[0], &x[0], &dx[0], N, C, HW, G, &mean[0],
                                             &invstd[0], w, &dweight[0], &dbias[0], nt)
        else:
            err = bn_group_norm_backward_f64(&dy[0], &x[0], &dx[0], N, C, HW, G, &mean[0],
                                             &invstd[0], w, &dweight[0], &dbias[0], nt)
    _check(err)


# ---- inference and in-place ABN (bncore/inference.py) --------------------------------------

def backward_from_output(const floating[::1] dy, const floating[::1] y, floating[::1] dx,
                         tuple shape, const double[::1] invstd, const double[::1] weight,
                         const double[::1] bias, bint training, double[::1] dweight,
                         double[::1] dbias, int act, double slope, int nt):
    cdef bn_shape s = _shape(shape)
    cdef const double *w = _opt(weight)
    cdef const double *b = _opt(bias)
    cdef int err
    with nogil:
        if floating is float:
            err = bn_backward_from_output_f32(&dy[0], &y[0], &dx[0], s, &invstd[0], w, b,
                                              training, &dweight[0], &dbias[0], <bn_act>act,
                                              slope, nt)
        else:
            err = bn_backward_from_output_f64(&dy[0], &y[0], &dx[0], s, &invstd[0], w, b,
                                              training, &dweight[0], &dbias[0], <bn_act>act,
                                              slope, nt)
    if err == BN_EINVAL:  # the Python layer checks first; this is the C-level safety net
        raise ValueError("bncore: cannot invert the forward (ReLU, or weight*invstd of 0)")
    _check(err)


# ---- fresh outputs through a bounded cache of freed buffers (include/bncore_alloc.h) ------

def empty_output(shape, dtype):
    """np.empty(shape, dtype) for a bncore output: arrays of 4 MiB and more
    reuse a recently freed output buffer of a fitting size (already faulted
    in) when the cache is on. An ordinary ndarray that owns its memory."""
    return bn_out_empty(shape, dtype)


def output_cache(enabled=None, max_bytes=None):
    """The output cache's state and counters (dict); enabled=False turns it
    off and frees what it holds, max_bytes bounds the bytes it may hold
    (default 256 MiB, or BNCORE_OUTPUT_CACHE=<MiB>; =0 turns it off)."""
    return bn_out_cache(enabled, max_bytes)


# ---- channel axes (the rule bncore._checks.channel_axis explains) --------------------------

cpdef object channel_span(object axis, int nd):
    """(first, last) of the channel axes of an array with nd dims, or None.
    axis is an exact int in [-nd, nd), or a non-empty tuple of such ints naming
    adjacent axes in increasing order (C order: their product is the channel
    dimension)."""
    cdef long a, prev = -1, first = -1
    if type(axis) is int:
        items = (axis,)
    elif type(axis) is tuple and len(<tuple>axis) > 0:
        items = axis
    else:
        return None
    for v in items:
        if type(v) is not int or not -nd <= v < nd:  # compared as Python ints: no overflow
            return None
        a = v
        if a < 0:
            a += nd
        if prev >= 0 and a != prev + 1:
            return None
        if first < 0:
            first = a
        prev = a
    return first, prev


# ---- channels-last group norm and RMS norm (include/bncore_norms_template.h) --------------

def group_norm_cl(const floating[::1] x, floating[::1] y, tuple shape, const double[::1] weight,
                  const double[::1] bias, double eps, double[::1] mean, double[::1] invstd,
                  int nt):
    """shape = (N, S, C, G): per sample S rows of C contiguous channels."""
    cdef int64_t N, S, C, G
    N, S, C, G = shape
    cdef const double *w = _opt(weight)
    cdef const double *b = _opt(bias)
    cdef int err
    with nogil:
        if floating is float:
            err = bn_group_norm_cl_f32(&x[0], &y[0], N, S, C, G, w, b, eps, &mean[0],
                                       &invstd[0], nt)
        else:
            err = bn_group_norm_cl_f64(&x[0], &y[0], N, S, C, G, w, b, eps, &mean[0],
                                       &invstd[0], nt)
    _check(err)


def group_norm_cl_backward(const floating[::1] dy, const floating[::1] x, floating[::1] dx,
                           tuple shape, const double[::1] mean, const double[::1] invstd,
                           const double[::1] weight, double[::1] dweight, double[::1] dbias,
                           int nt):
    """shape = (N, S, C, G)."""
    cdef int64_t N, S, C, G
    N, S, C, G = shape
    cdef const double *w = _opt(weight)
    cdef int err
    with nogil:
        if floating is float:
            err = bn_group_norm_cl_backward_f32(&dy[0], &x[0], &dx[0], N, S, C, G, &mean[0],
                                                &invstd[0], w, &dweight[0], &dbias[0], nt)
        else:
            err = bn_group_norm_cl_backward_f64(&dy[0], &x[0], &dx[0], N, S, C, G, &mean[0],
                                                &invstd[0], w, &dweight[0], &dbias[0], nt)
    _check(err)


def rms_norm(const floating[::1] x, floating[::1] y, int64_t rows, int64_t cols,
             const double[::1] weight, double eps, double[::1] invrms, int nt):
    cdef const double *w = _opt(weight)
    cdef int err
    with nogil:
        if floating is float:
            err = bn_rms_norm_f32(&x[0], &y[0], rows, cols, w, eps, &invrms[0], nt)
        else:
            err = bn_rms_norm_f64(&x[0], &y[0], rows, cols, w, eps, &invrms[0], nt)
    _check(err)


def rms_norm_backward(const floating[::1] dy, const floating[::1] x, floating[::1] dx,
                      int64_t rows, int64_t cols, const double[::1] invrms,
                      const double[::1] weight, double[::1] dweight, int nt):
    cdef const double *w = _opt(weight)
    cdef int err
    with nogil:
        if floating is float:
            err = bn_rms_norm_backward_f32(&dy[0], &x[0], &dx[0], rows, cols, &invrms[0], w,
                                           &dweight[0], nt)
        else:
            err = bn_rms_norm_backward_f64(&dy[0], &x[0], &dx[0], rows, cols, &invrms[0], w,
                                           &dweight[0], nt)
    _check(err)


# ---- masked statistics (padded batches; arguments made canonical by the Python layer) ------

def masked_stats(const floating[::1] x, const uint8_t[::1] mask, tuple shape,
                 double[::1] count, double[::1] mean, double[::1] m2, int nt):
    """bn_masked_stats: per-channel count, mean and M2 of the unmasked values;
    mask is uint8 in x's layout."""
    cdef bn_shape s = _shape(shape)
    cdef int err
    if x.shape[0] == 0 or count.shape[0] == 0:  # empty: no data pointer to pass
        count[:] = 0
        mean[:] = 0
        m2[:] = 0
        return
    with nogil:
        if floating is float:
            err = bn_masked_stats_f32(&x[0], &mask[0], s, &count[0], &mean[0], &m2[0], nt)
        else:
            err = bn_masked_stats_f64(&x[0], &mask[0], s, &count[0], &mean[0], &m2[0], nt)
    _check(err)


def masked_backward_reduce(const floating[::1] dy, const floating[::1] x, const floating[::1] y,
                           const uint8_t[::1] mask, tuple shape, const double[::1] mean,
                           int act, double slope, double[::1] sum_dy, double[::1] sum_dy_xmu,
                           double[::1] count, int nt):
    """bn_masked_backward_reduce: per-channel sum(g), sum(g * (x - mean)) and
    count over the unmasked values."""
    cdef bn_shape s = _shape(shape)
    cdef const floating *yp = NULL if y is None else &y[0]
    cdef int err
    if x.shape[0] == 0 or sum_dy.shape[0] == 0:
        sum_dy[:] = 0
        sum_dy_xmu[:] = 0
        count[:] = 0
        return
    with nogil:
        if floating is float:
            err = bn_masked_backward_reduce_f32(&dy[0], &x[0], yp, &mask[0], s, &mean[0],
                                                <bn_act>act, slope, &sum_dy[0], &sum_dy_xmu[0],
                                                &count[0], nt)
        else:
            err = bn_masked_backward_reduce_f64(&dy[0], &x[0], yp, &mask[0], s, &mean[0],
                                                <bn_act>act, slope, &sum_dy[0], &sum_dy_xmu[0],
                                                &count[0], nt)
    _check(err)


def masked_zero(floating[::1] x, const uint8_t[::1] mask, int nt):
    """bn_masked_zero: x = 0 where mask is 0."""
    cdef int err
    if x.shape[0] == 0:
        return
    with nogil:
        if floating is float:
            err = bn_masked_zero_f32(&x[0], &mask[0], x.shape[0], nt)
        else:
            err = bn_masked_zero_f64(&x[0], &mask[0], x.shape[0], nt)
    _check(err)
