/*
 * bncore.h -- batch-normalization kernels for C and C++ (no Python needed).
 *
 * Header-only: in exactly ONE translation unit write
 *
 *     #define BNCORE_IMPLEMENTATION
 *     #include "bncore.h"
 *
 * and include it plainly everywhere else. Compile with -O3 and, for threads,
 * -fopenmp (without it every function runs serially and gives the same
 * results). Each function exists for float (suffix _f32) and double (_f64).
 *
 * Layout. Every tensor is a C-contiguous buffer described by bn_shape:
 *   outer x channels x inner   (element (o, c, i) at ((o*channels)+c)*inner+i)
 *   - NCHW / NCL / NCDHW:  outer = N, channels = C, inner = H*W (or L, D*H*W);
 *   - channels-last NHWC and (N, C) features: outer = N*H*W (or N), inner = 1.
 * Statistics are per channel over outer*inner elements ("count").
 *
 * Per-channel parameter and statistic arrays are double[channels], owned by
 * the caller. Data buffers are owned by the caller; outputs may alias their
 * matching input exactly (y == x, dx == dy: in place) but must not partially
 * overlap it. Functions allocate only O(channels + work units) scratch and
 * return 0, or BN_ENOMEM when that allocation fails (nothing written then).
 *
 * Threads. n_threads is the most OpenMP threads a call may use (<= 0 means
 * omp_get_max_threads()); calls below ~64K elements run on the calling thread.
 * Reductions use a fixed blocking and a fixed merge order, so results are
 * bitwise identical for any thread count. Functions are reentrant: several
 * threads may call them at once on distinct outputs.
 *
 * Numerics. Float data is summed in float over short blocks (exact two-pass
 * within a block) and the blocks are merged in double with Chan's formula, so
 * the variance stays accurate when |mean| >> std.
 */
#ifndef BNCORE_H
#define BNCORE_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define BNCORE_VERSION "0.1.0"
#define BN_ENOMEM 1

typedef struct {
    int64_t outer, channels, inner;
} bn_shape;

/* Fused activation applied after the affine map. */
typedef enum { BN_ACT_NONE = 0, BN_ACT_RELU = 1, BN_ACT_LEAKY_RELU = 2 } bn_act;

/* Per-channel count, mean and M2 (sum of squared deviations from the mean):
 * the "local statistics" that merge across processes with bn_merge_stats. */
int bn_stats_f32(const float *x, bn_shape s, double *mean, double *m2, int n_threads);
int bn_stats_f64(const double *x, bn_shape s, double *mean, double *m2, int n_threads);

/* Merges k triples (count[j], mean[j*C + c], m2[j*C + c]) into one per
 * channel with Chan's formula, in order j = 0..k-1. */
void bn_merge_stats(int64_t k, int64_t channels, const double *count,
                    const double *mean, const double *m2,
                    double *out_count, double *out_mean, double *out_m2);

/* y = act((x - center[c]) * scale[c] + shift[c]).  Eval forward uses
 * center = running_mean, scale = weight / sqrt(running_var + eps),
 * shift = bias. slope is the leaky-ReLU negative slope. */
void bn_apply_f32(const float *x, float *y, bn_shape s, const double *center,
                  const double *scale, const double *shift, bn_act act,
                  double slope, int n_threads);
void bn_apply_f64(const double *x, double *y, bn_shape s, const double *center,
                  const double *scale, const double *shift, bn_act act,
                  double slope, int n_threads);

/* Training forward in one parallel region: batch statistics, then
 * y = act((x - mean) * invstd * weight + bias).  weight/bias may be NULL
 * (ones/zeros). Writes save_mean, save_invstd and the biased variance
 * batch_var (each double[C]; batch_var may be NULL). The caller updates
 * running statistics from mean and batch_var (see bn_update_running). */
int bn_train_f32(const float *x, float *y, bn_shape s, const double *weight,
                 const double *bias, double eps, double *save_mean,
                 double *save_invstd, double *batch_var, bn_act act,
                 double slope, int n_threads);
int bn_train_f64(const double *x, double *y, bn_shape s, const double *weight,
                 const double *bias, double eps, double *save_mean,
                 double *save_invstd, double *batch_var, bn_act act,
                 double slope, int n_threads);

/* PyTorch's running-statistics update:
 * rm = (1-momentum)*rm + momentum*mean,
 * rv = (1-momentum)*rv + momentum*var*count/(count-1). */
void bn_update_running(int64_t channels, const double *mean, const double *var,
                       double count, double momentum, double *running_mean,
                       double *running_var);

/* Backward reductions: sum_dy[c] = sum(g), sum_dy_xmu[c] = sum(g*(x-mean[c]))
 * with g = dy * act'(y) (y, the forward output, is read only when act is not
 * BN_ACT_NONE and may be NULL otherwise). */
int bn_backward_reduce_f32(const float *dy, const float *x, const float *y,
                           bn_shape s, const double *mean, bn_act act,
                           double slope, double *sum_dy, double *sum_dy_xmu,
                           int n_threads);
int bn_backward_reduce_f64(const double *dy, const double *x, const double *y,
                           bn_shape s, const double *mean, bn_act act,
                           double slope, double *sum_dy, double *sum_dy_xmu,
                           int n_threads);

/* dx = a[c]*g + b[c]*(x - mean[c]) + c0[c], g as above; x is not read when
 * b is NULL (then b = c0 = 0: the eval-mode backward dx = a*g). */
void bn_backward_apply_f32(const float *dy, const float *x, const float *y,
                           float *dx, bn_shape s, const double *mean,
                           const double *a, const double *b, const double *c0,
                           bn_act act, double slope, int n_threads);
void bn_backward_apply_f64(const double *dy, const double *x, const double *y,
                           double *dx, bn_shape s, const double *mean,
                           const double *a, const double *b, const double *c0,
                           bn_act act, double slope, int n_threads);

/* Full backward in one parallel region. training != 0: gradient through the
 * batch statistics, dx = w*invstd*(g - mean(g) - xhat*mean(g*xhat));
 * training == 0: dx = g*w*invstd. Always writes dweight = sum(g*xhat) and
 * dbias = sum(g) (double[C]). weight may be NULL (ones). */
int bn_backward_f32(const float *dy, const float *x, const float *y, float *dx,
                    bn_shape s, const double *mean, const double *invstd,
                    const double *weight, int training, double *dweight,
                    double *dbias, bn_act act, double slope, int n_threads);
int bn_backward_f64(const double *dy, const double *x, const double *y,
                    double *dx, bn_shape s, const double *mean,
                    const double *invstd, const double *weight, int training,
                    double *dweight, double *dbias, bn_act act, double slope,
                    int n_threads);

/* Build description: compiler, OpenMP, SIMD targets. Static string. */
const char *bn_build_info(void);
/* Threads a call with n_threads <= 0 would use (omp_get_max_threads()). */
int bn_default_threads(void);

/* ---- Normalization family: layer, group and instance normalization ---------
 * Same numerics as above (two-pass moments in double over runs, Chan merge in
 * a fixed order): results do not depend on the thread count.
 *
 * weight/bias may be NULL (ones/zeros); invstd = 1/sqrt(M2/count + eps).
 *
 * Layer normalization of x, rows x cols C-contiguous: statistics per row,
 * affine map per column, y = (x - mean[r]) * invstd[r] * weight[j] + bias[j].
 * Writes mean and invstd (double[rows]). Rows up to 16384 elements are
 * processed one per thread; longer ones are split into runs across threads. */
int bn_layer_norm_f32(const float *x, float *y, int64_t rows, int64_t cols,
                      const double *weight, const double *bias, double eps,
                      double *mean, double *invstd, int n_threads);
int bn_layer_norm_f64(const double *x, double *y, int64_t rows, int64_t cols,
                      const double *weight, const double *bias, double eps,
                      double *mean, double *invstd, int n_threads);

/* Gradient of bn_layer_norm: with g = dy * weight[j] and
 * xhat = (x - mean[r]) * invstd[r],
 * dx = invstd[r] * (g - mean_r(g) - xhat * mean_r(g * xhat)) (dx may be dy),
 * dweight[j] = sum_r dy * xhat, dbias[j] = sum_r dy (double[cols]). */
int bn_layer_norm_backward_f32(const float *dy, const float *x, float *dx,
                               int64_t rows, int64_t cols, const double *mean,
                               const double *invstd, const double *weight,
                               double *dweight, double *dbias, int n_threads);
int bn_layer_norm_backward_f64(const double *dy, const double *x, double *dx,
                               int64_t rows, int64_t cols, const double *mean,
                               const double *invstd, const double *weight,
                               double *dweight, double *dbias, int n_threads);

/* Group normalization of x, N x C x HW C-contiguous, in G groups of C/G
 * channels: mean and invstd per (n, g) (double[N*G]) over C/G*HW elements,
 * y = (x - mean[n,g]) * invstd[n,g] * weight[c] + bias[c]. Instance
 * normalization is G = C. Groups up to 65536 elements are processed one per
 * thread, longer ones split into runs across threads. */
int bn_group_norm_f32(const float *x, float *y, int64_t N, int64_t C, int64_t HW,
                      int64_t G, const double *weight, const double *bias, double eps,
                      double *mean, double *invstd, int n_threads);
int bn_group_norm_f64(const double *x, double *y, int64_t N, int64_t C, int64_t HW,
                      int64_t G, const double *weight, const double *bias, double eps,
                      double *mean, double *invstd, int n_threads);

/* Gradient of bn_group_norm: with g = dy * weight[c], xhat as above,
 * dx = invstd * (g - mean_group(g) - xhat * mean_group(g * xhat)) (dx may be
 * dy), dweight[c] = sum dy * xhat, dbias[c] = sum dy over n and HW. */
int bn_group_norm_backward_f32(const float *dy, const float *x, float *dx, int64_t N,
                               int64_t C, int64_t HW, int64_t G, const double *mean,
                               const double *invstd, const double *weight,
                               double *dweight, double *dbias, int n_threads);
int bn_group_norm_backward_f64(const double *dy, const double *x, double *dx, int64_t N,
                               int64_t C, int64_t HW, int64_t G, const double *mean,
                               const double *invstd, const double *weight,
                               double *dweight, double *dbias, int n_threads);

#ifdef __cplusplus
}
#endif

#ifdef BNCORE_IMPLEMENTATION
#include "bncore_impl.h"
#endif

#endif /* BNCORE_H */
