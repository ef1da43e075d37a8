# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Thin typed layer over the C kernels of include/bncore.h.

Arguments arrive already checked, contiguous and flattened (see
functional.py); each call releases the GIL around one kernel. Optional
arrays are passed as None and reach C as NULL.
"""
from cython cimport floating
from libc.stdint cimport int64_t

cdef extern from *:
    """
    #define BNCORE_IMPLEMENTATION
    #include "bncore.h"
    static int bn_cpu_has(int level) {
    #if defined(__GNUC__) && defined(__x86_64__)
        __builtin_cpu_init();
        return level == 2 ? __builtin_cpu_supports("avx512f")
             : level == 1 ? (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) : 0;
    #else
        (void)level; return 0;
    #endif
    }
    """
    ctypedef struct bn_shape:
        int64_t outer, channels, inner
    ctypedef enum bn_act:
        pass
    int bn_cpu_has(int level)
    const char *bn_build_info()
    int bn_default_threads()
    void bn_merge_stats(int64_t k, int64_t channels, const double *count, const double *mean,
                        const double *m2, double *out_count, double *out_mean,
                        double *out_m2) nogil
    void bn_update_running(int64_t channels, const double *mean, const double *var,
                           double count, double momentum, double *running_mean,
                           double *running_var) nogil
    int bn_stats_f32(const float *x, bn_shape s, double *mean, double *m2, int nt) nogil
    int bn_stats_f64(const double *x, bn_shape s, double *mean, double *m2, int nt) nogil
    void bn_apply_f32(const float *x, float *y, bn_shape s, const double *center,
                      const double *scale, const double *shift, bn_act act, double slope,
                      int nt) nogil
    void bn_apply_f64(const double *x, double *y, bn_shape s, const double *center,
                      const double *scale, const double *shift, bn_act act, double slope,
                      int nt) nogil
    int bn_train_f32(const float *x, float *y, bn_shape s, const double *weight,
                     const double *bias, double eps, double *save_mean, double *save_invstd,
                     double *batch_var, bn_act act, double slope, int nt) nogil
    int bn_train_f64(const double *x, double *y, bn_shape s, const double *weight,
                     const double *bias, double eps, double *save_mean, double *save_invstd,
                     double *batch_var, bn_act act, double slope, int nt) nogil
    int bn_backward_reduce_f32(const float *dy, const float *x, const float *y, bn_shape s,
                               const double *mean, bn_act act, double slope, double *sum_dy,
                               double *sum_dy_xmu, int nt) nogil
    int bn_backward_reduce_f64(const double *dy, const double *x, const double *y, bn_shape s,
                               const double *mean, bn_act act, double slope, double *sum_dy,
                               double *sum_dy_xmu, int nt) nogil
    void bn_backward_apply_f32(const float *dy, const float *x, const float *y, float *dx,
                               bn_shape s, const double *mean, const double *a,
                               const double *b, const double *c0, bn_act act, double slope,
                               int nt) nogil
    void bn_backward_apply_f64(const double *dy, const double *x, const double *y, double *dx,
                               bn_shape s, const double *mean, const double *a,
                               const double *b, const double *c0, bn_act act, double slope,
                               int nt) nogil
    int bn_backward_f32(const float *dy, const float *x, const float *y, float *dx, bn_shape s,
                        const double *mean, const double *invstd, const double *weight,
                        int training, double *dweight, double *dbias, bn_act act,
                        double slope, int nt) nogil
    int bn_backward_f64(const double *dy, const double *x, const double *y, double *dx,
                        bn_shape s, const double *mean, const double *invstd,
                        const double *weight, int training, double *dweight, double *dbias,
                        bn_act act, double slope, int nt) nogil


cdef inline bn_shape _shape(tuple shape):
    cdef bn_shape s
    s.outer, s.channels, s.inner = shape
    return s


cdef inline const double *_opt(const double[::1] v):
    return NULL if v is None else &v[0]


cdef inline int _check(int err) except -1:
    if err:
        raise MemoryError("bncore: could not allocate kernel scratch space")
    return 0


def build_info():
    return bn_build_info().decode()


def default_threads():
    return bn_default_threads()


def cpu_level():
    """2: AVX-512, 1: AVX2+FMA, 0: baseline (the kernel clone in use)."""
    return 2 if bn_cpu_has(2) else (1 if bn_cpu_has(1) else 0)


def stats(const floating[::1] x, tuple shape, double[::1] mean, double[::1] m2, int nt):
    cdef bn_shape s = _shape(shape)
    cdef int err
    with nogil:
        if floating is float:
            err = bn_stats_f32(&x[0], s, &mean[0], &m2[0], nt)
        else:
            err = bn_stats_f64(&x[0], s, &mean[0], &m2[0], nt)
    _check(err)


def merge_stats(const double[::1] count, const double[:, ::1] mean, const double[:, ::1] m2,
                double[::1] out_mean, double[::1] out_m2):
    cdef double total
    with nogil:
        bn_merge_stats(mean.shape[0], mean.shape[1], &count[0], &mean[0, 0], &m2[0, 0],
                       &total, &out_mean[0], &out_m2[0])
    return total


def apply(const floating[::1] x, floating[::1] y, tuple shape, const double[::1] center,
          const double[::1] scale, const double[::1] shift, int act, double slope, int nt):
    cdef bn_shape s = _shape(shape)
    with nogil:
        if floating is float:
            bn_apply_f32(&x[0], &y[0], s, &center[0], &scale[0], &shift[0], <bn_act>act,
                         slope, nt)
        else:
            bn_apply_f64(&x[0], &y[0], s, &center[0], &scale[0], &shift[0], <bn_act>act,
                         slope, nt)


def train(const floating[::1] x, floating[::1] y, tuple shape, const double[::1] weight,
          const double[::1] bias, double eps, double[::1] save_mean, double[::1] save_invstd,
          double[::1] batch_var, int act, double slope, int nt):
    cdef bn_shape s = _shape(shape)
    cdef const double *w = _opt(weight)
    cdef const double *b = _opt(bias)
    cdef int err
    with nogil:
        if floating is float:
            err = bn_train_f32(&x[0], &y[0], s, w, b, eps, &save_mean[0], &save_invstd[0],
                               &batch_var[0], <bn_act>act, slope, nt)
        else:
            err = bn_train_f64(&x[0], &y[0], s, w, b, eps, &save_mean[0], &save_invstd[0],
                               &batch_var[0], <bn_act>act, slope, nt)
    _check(err)


def update_running(const double[::1] mean, const double[::1] var, double count,
                   double momentum, double[::1] running_mean, double[::1] running_var):
    with nogil:
        bn_update_running(mean.shape[0], &mean[0], &var[0], count, momentum,
                          &running_mean[0], &running_var[0])


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
    with nogil:
        if floating is float:
            bn_backward_apply_f32(&dy[0], xp, yp, &dx[0], s, &mean[0], &a[0], bp, cp,
                                  <bn_act>act, slope, nt)
        else:
            bn_backward_apply_f64(&dy[0], xp, yp, &dx[0], s, &mean[0], &a[0], bp, cp,
                                  <bn_act>act, slope, nt)


def backward(const floating[::1] dy, const floating[::1] x, const floating[::1] y,
             floating[::1] dx, tuple shape, const double[::1] mean, const double[::1] invstd,
             const double[::1] weight, bint training, double[::1] dweight, double[::1] dbias,
             int act, double slope, int nt):
    cdef bn_shape s = _shape(shape)
    cdef const floating *yp = NULL if y is None else &y[0]
    cdef const double *w = _opt(weight)
    cdef int err
    with nogil:
        if floating is float:
            err = bn_backward_f32(&dy[0], &x[0], yp, &dx[0], s, &mean[0], &invstd[0],
                                  w, training, &dweight[0], &dbias[0],
                                  <bn_act>act, slope, nt)
        else:
            err = bn_backward_f64(&dy[0], &x[0], yp, &dx[0], s, &mean[0], &invstd[0],
                                  w, training, &dweight[0], &dbias[0],
                                  <bn_act>act, slope, nt)
    _check(err)


# ---- normalization family (include/bncore_norms_template.h) -------------------------------

cdef extern from *:
    int bn_layer_norm_f32(const float *x, float *y, int64_t rows, int64_t cols,
                          const double *weight, const double *bias, double eps, double *mean,
                          double *invstd, int nt) nogil
    int bn_layer_norm_f64(const double *x, double *y, int64_t rows, int64_t cols,
                          const double *weight, const double *bias, double eps, double *mean,
                          double *invstd, int nt) nogil
    int bn_layer_norm_backward_f32(const float *dy, const float *x, float *dx, int64_t rows,
                                   int64_t cols, const double *mean, const double *invstd,
                                   const double *weight, double *dweight, double *dbias,
                                   int nt) nogil
    int bn_layer_norm_backward_f64(const double *dy, const double *x, double *dx, int64_t rows,
                                   int64_t cols, const double *mean, const double *invstd,
                                   const double *weight, double *dweight, double *dbias,
                                   int nt) nogil


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


cdef extern from *:
    int bn_group_norm_f32(const float *x, float *y, int64_t N, int64_t C, int64_t HW, int64_t G,
                          const double *weight, const double *bias, double eps, double *mean,
                          double *invstd, int nt) nogil
    int bn_group_norm_f64(const double *x, double *y, int64_t N, int64_t C, int64_t HW,
                          int64_t G, const double *weight, const double *bias, double eps,
                          double *mean, double *invstd, int nt) nogil
    int bn_group_norm_backward_f32(const float *dy, const float *x, float *dx, int64_t N,
                                   int64_t C, int64_t HW, int64_t G, const double *mean,
                                   const double *invstd, const double *weight,
                                   double *dweight, double *dbias, int nt) nogil
    int bn_group_norm_backward_f64(const double *dy, const double *x, double *dx, int64_t N,
                                   int64_t C, int64_t HW, int64_t G, const double *mean,
                                   const double *invstd, const double *weight,
                                   double *dweight, double *dbias, int nt) nogil


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

cdef extern from "bncore.h":
    int BN_EINVAL
    int bn_backward_from_output_f32(const float *dy, const float *y, float *dx, bn_shape s,
                                    const double *invstd, const double *weight,
                                    const double *bias, int training, double *dweight,
                                    double *dbias, bn_act act, double slope, int nt) nogil
    int bn_backward_from_output_f64(const double *dy, const double *y, double *dx, bn_shape s,
                                    const double *invstd, const double *weight,
                                    const double *bias, int training, double *dweight,
                                    double *dbias, bn_act act, double slope, int nt) nogil


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


# ---- fast paths -------------------------------------------------------------------------
# batch_norm_train / _eval / _backward spend more time in argument checks and
# NumPy conversions than in the kernel on small tensors. These entry points
# take the common, unambiguous case -- exact ndarrays, float32/float64,
# native-order, aligned, C-contiguous, parameters of length C, out None or
# disjoint (or x itself) -- check it with the NumPy C API, and call the same
# kernel with the same per-channel arithmetic as functional.py, so results
# are identical. Anything else returns None and functional.py's full checks
# take over (they also raise every error), before any state changes.

cimport numpy as cnp
from libc.stdlib cimport malloc, free
from libc.string cimport memcpy
from libc.math cimport isfinite

cnp.import_array()

cdef extern from *:
    int bn_eval_f32(const float *x, float *y, bn_shape s, const double *running_mean,
                    const double *running_var, const double *weight, const double *bias,
                    double eps, bn_act act, double slope, int nt) nogil
    int bn_eval_f64(const double *x, double *y, bn_shape s, const double *running_mean,
                    const double *running_var, const double *weight, const double *bias,
                    double eps, bn_act act, double slope, int nt) nogil

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


cdef int _vec(object v, int64_t C, double *dst):
    """A length-C parameter copied to dst as double: 1; None: 0; anything else: -1."""
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
    """Whether two C-contiguous ndarrays (or None) share no byte; callers
    have checked both with _kind."""
    if a is None or b is None:
        return True
    cdef char *pa = <char *>cnp.PyArray_DATA(<cnp.ndarray>a)
    cdef char *pb = <char *>cnp.PyArray_DATA(<cnp.ndarray>b)
    return (pa + cnp.PyArray_NBYTES(<cnp.ndarray>a) <= pb or
            pb + cnp.PyArray_NBYTES(<cnp.ndarray>b) <= pa)


cdef int _geometry(object x, object axis, bn_shape *s):
    """The (outer, C, inner) of x along axis: the kind of x, or NOPE."""
    cdef int k = _kind(x)
    if k == NOPE or type(axis) is not int:
        return NOPE
    cdef cnp.ndarray a = <cnp.ndarray>x
    cdef int nd = cnp.PyArray_NDIM(a), i
    if nd < 2 or not -nd <= axis < nd:  # compared as Python ints: no overflow
        return NOPE
    cdef long ax = axis
    if ax < 0:
        ax += nd
    s.outer, s.channels, s.inner = 1, cnp.PyArray_DIMS(a)[ax], 1
    for i in range(nd):
        if i < ax:
            s.outer *= cnp.PyArray_DIMS(a)[i]
        elif i > ax:
            s.inner *= cnp.PyArray_DIMS(a)[i]
    return k


cdef bint _real(object v, double lo, double hi, double *dst):
    """An exact float or int in [lo, hi] (finite) into dst."""
    if type(v) is not float and type(v) is not int:
        return False
    try:
        dst[0] = v
    except OverflowError:
        return False
    return lo <= dst[0] <= hi


cdef int _threads(object n_threads, bint forked):
    """0 (default), n, or -1 when n_threads is not None or a positive int."""
    if n_threads is None:
        return 1 if forked else 0
    if type(n_threads) is not int or n_threads < 1:
        return -1
    return 1 if forked else (4096 if n_threads > 4096 else <int>n_threads)


cdef int _act(object activation):
    """0 for None, 1 for 'relu', -1 otherwise (leaky ReLU takes the full path)."""
    if activation is None:
        return 0
    if type(activation) is str and activation == "relu":
        return 1
    return -1


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
    """A fresh array like x, or out when it can be written directly: an exact
    ndarray like x that is either one of the inputs or disjoint from all of
    them. None otherwise (the full path copes)."""
    cdef cnp.ndarray a = <cnp.ndarray>x
    if out is None:
        return cnp.PyArray_EMPTY(cnp.PyArray_NDIM(a), cnp.PyArray_DIMS(a), k, 0)
    if not _like(out, x, k) or not cnp.PyArray_ISWRITEABLE(<cnp.ndarray>out):
        return None
    for b in inputs:
        if not (_disjoint(out, b) or
                cnp.PyArray_DATA(<cnp.ndarray>out) == cnp.PyArray_DATA(<cnp.ndarray>b)):
            return None
    return out


cdef object _stat_array(const double *v, int64_t C, int k):
    """A new length-C array of the statistics dtype (float32 for float32 input)."""
    cdef cnp.npy_intp n = C
    cdef cnp.ndarray r = cnp.PyArray_EMPTY(1, &n, k, 0)
    cdef int64_t i
    if k == F64:
        memcpy(cnp.PyArray_DATA(r), v, C * sizeof(double))
    else:
        for i in range(C):
            (<float *>cnp.PyArray_DATA(r))[i] = <float>v[i]
    return r


cdef void _store(object a, const double *v, int64_t C):
    """Writes v into the float32 or float64 array a."""
    cdef void *p = cnp.PyArray_DATA(<cnp.ndarray>a)
    cdef int64_t i
    if cnp.PyArray_TYPE(<cnp.ndarray>a) == F64:
        memcpy(p, v, C * sizeof(double))
    else:
        for i in range(C):
            (<float *>p)[i] = <float>v[i]


def fast_eval(x, running_mean, running_var, weight, bias, axis, eps, out, activation,
              n_threads, bint forked):
    cdef bn_shape s
    cdef int k = _geometry(x, axis, &s), act = _act(activation), nt = _threads(n_threads, forked)
    cdef double e
    if k == NOPE or act < 0 or nt < 0 or not _real(eps, 0.0, float("inf"), &e):
        return None
    cdef int64_t C = s.channels
    cdef double *buf = <double *>malloc(sizeof(double) * (4 * C + 1))
    if buf == NULL:
        return None
    cdef double *rm = buf, *rv = buf + C, *w = buf + 2 * C, *b = buf + 3 * C
    cdef int hw, hb, err = 0
    cdef void *px
    cdef void *py
    try:
        if _vec(running_mean, C, rm) != 1 or _vec(running_var, C, rv) != 1:
            return None
        hw, hb = _vec(weight, C, w), _vec(bias, C, b)
        if hw < 0 or hb < 0:
            return None
        y = _output(out, x, k, (x,))
        if y is None:
            return None
        px, py = cnp.PyArray_DATA(<cnp.ndarray>x), cnp.PyArray_DATA(<cnp.ndarray>y)
        with nogil:
            if k == F32:
                err = bn_eval_f32(<float *>px, <float *>py, s, rm, rv, w if hw else NULL,
                                  b if hb else NULL, e, <bn_act>act, 0.0, nt)
            else:
                err = bn_eval_f64(<double *>px, <double *>py, s, rm, rv, w if hw else NULL,
                                  b if hb else NULL, e, <bn_act>act, 0.0, nt)
        _check(err)
        return y
    finally:
        free(buf)


def fast_train(x, weight, bias, axis, eps, running_mean, running_var, momentum, out,
               activation, n_threads, bint unbiased, bint skip_nonfinite, bint forked):
    """(y, save_mean, save_invstd, updated) or None."""
    cdef bn_shape s
    cdef int k = _geometry(x, axis, &s), act = _act(activation), nt = _threads(n_threads, forked)
    cdef double e, mom
    if (k == NOPE or act < 0 or nt < 0 or not _real(eps, 0.0, float("inf"), &e)
            or not _real(momentum, 0.0, 1.0, &mom) or s.outer * s.inner < 2):
        return None
    cdef bint running = running_mean is not None
    if running:  # both exact, writable, separate ndarrays (checked before any cast)
        if (running_var is None or _kind(running_mean) == NOPE or _kind(running_var) == NOPE
                or not cnp.PyArray_ISWRITEABLE(<cnp.ndarray>running_mean)
                or not cnp.PyArray_ISWRITEABLE(<cnp.ndarray>running_var)
                or not _disjoint(running_mean, running_var)):
            return None
    elif running_var is not None:
        return None
    cdef int64_t C = s.channels, i
    cdef double *buf = <double *>malloc(sizeof(double) * (7 * C + 1))
    if buf == NULL:
        return None
    cdef double *w = buf, *b = buf + C, *mean = buf + 2 * C, *inv = buf + 3 * C
    cdef double *var = buf + 4 * C, *rm = buf + 5 * C, *rv = buf + 6 * C
    cdef int hw, hb, err = 0
    cdef bint update = running
    cdef void *px
    cdef void *py
    try:
        hw, hb = _vec(weight, C, w), _vec(bias, C, b)
        if hw < 0 or hb < 0:
            return None
        if running and (_vec(running_mean, C, rm) != 1 or _vec(running_var, C, rv) != 1):
            return None
        y = _output(out, x, k, (x,))
        if y is None or not (_disjoint(y, running_mean) and _disjoint(y, running_var)):
            return None
        px, py = cnp.PyArray_DATA(<cnp.ndarray>x), cnp.PyArray_DATA(<cnp.ndarray>y)
        with nogil:
            if k == F32:
                err = bn_train_f32(<float *>px, <float *>py, s, w if hw else NULL,
                                   b if hb else NULL, e, mean, inv, var, <bn_act>act, 0.0, nt)
            else:
                err = bn_train_f64(<double *>px, <double *>py, s, w if hw else NULL,
                                   b if hb else NULL, e, mean, inv, var, <bn_act>act, 0.0, nt)
        _check(err)
        if update and skip_nonfinite:
            for i in range(C):
                if not (isfinite(mean[i]) and isfinite(var[i])):
                    update = False
                    break
        if update:
            bn_update_running(C, mean, var, <double>(s.outer * s.inner) if unbiased else 1.0,
                              mom, rm, rv)
            _store(running_mean, rm, C)
            _store(running_var, rv, C)
        return y, _stat_array(mean, C, k), _stat_array(inv, C, k), update
    finally:
        free(buf)


def fast_backward(dy, x, save_mean, save_invstd, weight, axis, training, out, activation,
                  y, n_threads, bint forked):
    """(dx, dweight, dbias) or None."""
    cdef bn_shape s
    cdef int k = _geometry(x, axis, &s), act = _act(activation), nt = _threads(n_threads, forked)
    if k == NOPE or act < 0 or nt < 0 or not _like(dy, x, k) or (act and not _like(y, x, k)):
        return None
    cdef cnp.ndarray a = <cnp.ndarray>x
    if not act:
        y = None
    cdef int64_t C = s.channels
    cdef double *buf = <double *>malloc(sizeof(double) * (5 * C + 1))
    if buf == NULL:
        return None
    cdef double *m = buf, *inv = buf + C, *w = buf + 2 * C, *dw = buf + 3 * C, *db = buf + 4 * C
    cdef int hw, err = 0
    cdef bint tr = bool(training)
    cdef void *pdy
    cdef void *px
    cdef void *py
    cdef void *pdx
    try:
        if _vec(save_mean, C, m) != 1 or _vec(save_invstd, C, inv) != 1:
            return None
        hw = _vec(weight, C, w)
        if hw < 0:
            return None
        dx = _output(out, x, k, (x, dy) if y is None else (x, dy, y))
        if dx is None:
            return None
        pdy, px = cnp.PyArray_DATA(<cnp.ndarray>dy), cnp.PyArray_DATA(a)
        py = NULL if y is None else cnp.PyArray_DATA(<cnp.ndarray>y)
        pdx = cnp.PyArray_DATA(<cnp.ndarray>dx)
        with nogil:
            if k == F32:
                err = bn_backward_f32(<float *>pdy, <float *>px, <float *>py, <float *>pdx, s,
                                      m, inv, w if hw else NULL, tr, dw, db, <bn_act>act, 0.0,
                                      nt)
            else:
                err = bn_backward_f64(<double *>pdy, <double *>px, <double *>py,
                                      <double *>pdx, s, m, inv, w if hw else NULL, tr, dw, db,
                                      <bn_act>act, 0.0, nt)
        _check(err)
        return dx, _stat_array(dw, C, k), _stat_array(db, C, k)
    finally:
        free(buf)


# ---- fresh outputs through a bounded cache of freed buffers (include/bncore_alloc.h) ------

cdef extern from "bncore_alloc.h":
    object bn_out_empty(object shape, object dtype)
    object bn_out_cache(object enabled, object max_bytes)


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
