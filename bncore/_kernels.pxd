# Cython declarations of the C kernels (include/bncore.h and the helpers of
# include/bncore_impl.h that the Python layer shares: one invstd rule, one
# running-statistics update, one Chan merge). _kernels.pyx cimports these
# implicitly (same module name).
from libc.stdint cimport int64_t, uint8_t

cdef extern from *:
    """
    #define BNCORE_IMPLEMENTATION
    #include "bncore.h"
    static int bn_cpu_has(int level) {
    #if defined(__GNUC__) && defined(__x86_64__) && !defined(BNCORE_NO_DISPATCH)
        __builtin_cpu_init();
        return level == 2 ? __builtin_cpu_supports("avx512f")
             : level == 1 ? (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) : 0;
    #else
        (void)level; return 0;
    #endif
    }
    /* The process-wide thread limit (0: none), read by every call with
       n_threads=None from any thread: bncore.set_num_threads and the
       threadpoolctl controller set it (libgomp's own setting is per thread).
       Exported for threadpoolctl, which calls these through ctypes. */
    static volatile int bn_thread_limit = 0;
    static int bn_thread_cap = 0;  /* a new thread's OpenMP maximum, read at import */
    int bncore_get_num_threads(void) {
        return bn_thread_limit > 0 ? bn_thread_limit : bn_thread_cap;
    }
    /* a limit at or above what new threads get limits nothing: none is kept
       (so threadpoolctl's restore of the value it read leaves none) */
    void bncore_set_num_threads(int n) {
        bn_thread_limit = n > 0 && n < bn_thread_cap ? n : 0;
    }
    """
    ctypedef struct bn_shape:
        int64_t outer, channels, inner
    ctypedef enum bn_act:
        pass
    int BN_EINVAL
    int BN_ENOMEM
    int bn_cpu_has(int level)
    const char *bn_build_info()
    int bn_default_threads()
    int bn_thread_limit
    int bn_thread_cap
    int bncore_get_num_threads()
    void bncore_set_num_threads(int n)
    double bn_invstd(double var, double eps) nogil
    int bn_merge_stats(int64_t k, int64_t channels, const double *count, const double *mean,
                        const double *m2, double *out_count, double *out_mean,
                        double *out_m2) nogil
    int bn_update_running(int64_t channels, const double *mean, const double *var,
                           double count, double momentum, double *running_mean,
                           double *running_var) nogil

    int bn_stats_f32(const float *x, bn_shape s, double *mean, double *m2, int nt) nogil
    int bn_stats_f64(const double *x, bn_shape s, double *mean, double *m2, int nt) nogil
    int bn_apply_f32(const float *x, float *y, bn_shape s, const double *center,
                     const double *scale, const double *shift, bn_act act, double slope,
                     int nt) nogil
    int bn_apply_f64(const double *x, double *y, bn_shape s, const double *center,
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
    int bn_backward_apply_f32(const float *dy, const float *x, const float *y, float *dx,
                               bn_shape s, const double *mean, const double *a,
                               const double *b, const double *c0, bn_act act, double slope,
                               int nt) nogil
    int bn_backward_apply_f64(const double *dy, const double *x, const double *y, double *dx,
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
    int bn_backward_from_output_f32(const float *dy, const float *y, float *dx, bn_shape s,
                                    const double *invstd, const double *weight,
                                    const double *bias, int training, double *dweight,
                                    double *dbias, bn_act act, double slope, int nt) nogil
    int bn_backward_from_output_f64(const double *dy, const double *y, double *dx, bn_shape s,
                                    const double *invstd, const double *weight,
                                    const double *bias, int training, double *dweight,
                                    double *dbias, bn_act act, double slope, int nt) nogil

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
    int bn_group_norm_cl_f32(const float *x, float *y, int64_t N, int64_t S, int64_t C,
                             int64_t G, const double *weight, const double *bias, double eps,
                             double *mean, double *invstd, int nt) nogil
    int bn_group_norm_cl_f64(const double *x, double *y, int64_t N, int64_t S, int64_t C,
                             int64_t G, const double *weight, const double *bias, double eps,
                             double *mean, double *invstd, int nt) nogil
    int bn_group_norm_cl_backward_f32(const float *dy, const float *x, float *dx, int64_t N,
                                      int64_t S, int64_t C, int64_t G, const double *mean,
                                      const double *invstd, const double *weight,
                                      double *dweight, double *dbias, int nt) nogil
    int bn_group_norm_cl_backward_f64(const double *dy, const double *x, double *dx, int64_t N,
                                      int64_t S, int64_t C, int64_t G, const double *mean,
                                      const double *invstd, const double *weight,
                                      double *dweight, double *dbias, int nt) nogil
    int bn_rms_norm_f32(const float *x, float *y, int64_t rows, int64_t cols,
                        const double *weight, double eps, double *invrms, int nt) nogil
    int bn_rms_norm_f64(const double *x, double *y, int64_t rows, int64_t cols,
                        const double *weight, double eps, double *invrms, int nt) nogil
    int bn_rms_norm_backward_f32(const float *dy, const float *x, float *dx, int64_t rows,
                                 int64_t cols, const double *invrms, const double *weight,
                                 double *dweight, int nt) nogil
    int bn_rms_norm_backward_f64(const double *dy, const double *x, double *dx, int64_t rows,
                                 int64_t cols, const double *invrms, const double *weight,
                                 double *dweight, int nt) nogil

    # masked statistics (padded batches)
    int bn_masked_stats_f32(const float *x, const uint8_t *mask, bn_shape s, double *count,
                            double *mean, double *m2, int nt) nogil
    int bn_masked_stats_f64(const double *x, const uint8_t *mask, bn_shape s, double *count,
                            double *mean, double *m2, int nt) nogil
    int bn_masked_backward_reduce_f32(const float *dy, const float *x, const float *y,
                                      const uint8_t *mask, bn_shape s, const double *mean,
                                      bn_act act, double slope, double *sum_dy,
                                      double *sum_dy_xmu, double *count, int nt) nogil
    int bn_masked_backward_reduce_f64(const double *dy, const double *x, const double *y,
                                      const uint8_t *mask, bn_shape s, const double *mean,
                                      bn_act act, double slope, double *sum_dy,
                                      double *sum_dy_xmu, double *count, int nt) nogil
    int bn_masked_zero_f32(float *x, const uint8_t *mask, int64_t n, int nt) nogil
    int bn_masked_zero_f64(double *x, const uint8_t *mask, int64_t n, int nt) nogil

cdef extern from "bncore_alloc.h":
    # fresh outputs through a bounded cache of freed buffers (not part of the C API)
    enum: BN_CACHE_MIN
    object bn_out_empty(object shape, object dtype)
    object bn_out_cache(object enabled, object max_bytes)
