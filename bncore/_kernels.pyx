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
