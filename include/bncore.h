/*
 * bncore.h -- batch-normalization kernels for C and C++ (no Python needed).
 *
 * Header-only: in exactly ONE translation unit write
 *
 *     #define BNCORE_IMPLEMENTATION
 *     #include "bncore.h"
 *
 * and include it plainly everywhere else (or compile a one-file bncore.c
 * holding just those two lines and link it). C99 or C++; link with -lm.
 * Compile with -O3 and, for threads, -fopenmp (without it every function
 * runs serially and gives the same results). Each function exists for float
 * (suffix _f32) and double (_f64). docs/C_API.md has recipes (eval, frozen,
 * training step, in-place ABN, synchronized statistics) and an example.
 *
 * Layout. Every tensor is a C-contiguous buffer described by bn_shape:
 *   outer x channels x inner   (element (o, c, i) at ((o*channels)+c)*inner+i)
 *   - NCHW / NCL / NCDHW:  outer = N, channels = C, inner = H*W (or L, D*H*W);
 *   - channels-last NHWC and (N, C) features: outer = N*H*W (or N), inner = 1.
 * Statistics are per channel over outer*inner elements ("count").
 *
 * Ownership. Every buffer -- data and the per-channel double[channels]
 * parameter and statistic arrays -- is allocated, owned and freed by the
 * caller; no function keeps a pointer after it returns, and there is no
 * global state, handle or init call. Outputs may alias their matching input
 * exactly (y == x, dx == dy: in place) but must not partially overlap it.
 * Functions allocate only O(channels + work units) scratch, freed before
 * they return. Every function returns 0, BN_ENOMEM when that allocation
 * fails, or BN_EINVAL when an argument breaks a rule below; nothing is
 * written then. Inputs are never modified.
 *
 * Arguments (BN_EINVAL otherwise; each function lists its own extra rules):
 *   - sizes (outer, channels, inner, rows, cols, N, C, HW) are >= 0 and the
 *     tensor's byte size fits int64_t; a zero-size tensor is a no-op;
 *   - pointers are non-NULL, except those marked "may be NULL" and those
 *     to zero elements (a data pointer when the tensor is empty, a
 *     per-channel pointer when channels == 0);
 *   - an output overlaps each input either exactly or not at all;
 *   - eps is finite and >= 0; act is a bn_act value, and slope (read only
 *     for BN_ACT_LEAKY_RELU) finite and >= 0;
 *   - n_threads >= 0.
 * Values inside the data (NaN, inf) are not errors: they propagate, each
 * only through its own channel, row or group.
 *
 * Threads. n_threads is the most OpenMP threads a call may use (0 means
 * omp_get_max_threads()); calls below ~64K elements run on the calling thread.
 * Reductions use a fixed blocking and a fixed merge order, so results are
 * bitwise identical for any thread count. Functions are reentrant: several
 * threads may call them at once on distinct outputs, each call forking its
 * own OpenMP team. A service running many requests side by side should pass
 * n_threads = 1 (or a small share of the cores) per call and set
 * OMP_WAIT_POLICY=passive, so that idle team threads sleep instead of
 * spinning on the cores the other requests need.
 *
 * Numerics. Data is summed in double over short blocks (exact two-pass
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
#define BN_ENOMEM 1   /* scratch allocation failed; outputs untouched */
#define BN_EINVAL 2   /* invalid argument (see the function); outputs untouched */

typedef struct {
    int64_t outer, channels, inner;
} bn_shape;

/* Fused activation applied after the affine map: y = v (NONE), max(v, 0)
 * (RELU), v < 0 ? slope * v : v (LEAKY_RELU). Every function taking an act
 * also takes `slope`, finite and >= 0, read only for BN_ACT_LEAKY_RELU. The
 * backward takes the activation's derivative from the forward output y
 * (y > 0), so no mask or pre-activation buffer is kept. */
typedef enum { BN_ACT_NONE = 0, BN_ACT_RELU = 1, BN_ACT_LEAKY_RELU = 2 } bn_act;

/* Per-channel count, mean and M2 (sum of squared deviations from the mean):
 * the "local statistics" that merge across processes with bn_merge_stats. */
int bn_stats_f32(const float *x, bn_shape s, double *mean, double *m2, int n_threads);
int bn_stats_f64(const double *x, bn_shape s, double *mean, double *m2, int n_threads);

/* Merges k triples (count[j], mean[j*C + c], m2[j*C + c]) into one per
 * channel with Chan's formula, in order j = 0..k-1 (the formula every
 * reduction in this library merges with). k >= 0; each count[j] finite and
 * >= 0 (a zero count contributes nothing). */
int bn_merge_stats(int64_t k, int64_t channels, const double *count,
                   const double *mean, const double *m2,
                   double *out_count, double *out_mean, double *out_m2);

/* y = act((x - center[c]) * scale[c] + shift[c]).  Eval forward uses
 * center = running_mean, scale = weight / sqrt(running_var + eps),
 * shift = bias. slope is the leaky-ReLU negative slope. y may be x. */
int bn_apply_f32(const float *x, float *y, bn_shape s, const double *center,
                 const double *scale, const double *shift, bn_act act,
                 double slope, int n_threads);
int bn_apply_f64(const double *x, double *y, bn_shape s, const double *center,
                 const double *scale, const double *shift, bn_act act,
                 double slope, int n_threads);

/* Training forward in one parallel region: batch statistics, then
 * y = act((x - mean) * invstd * weight + bias).  weight/bias may be NULL
 * (ones/zeros). Writes save_mean, save_invstd and the biased variance
 * batch_var (each double[C]; batch_var may be NULL). The caller updates
 * running statistics from mean and batch_var (see bn_update_running).
 * invstd = 1/sqrt(var + eps), taken as 0 where var + eps == 0 (eps = 0 and a
 * constant channel; PyTorch's convention): that channel's y is then bias.
 * This one rule gives every invstd in the library (eval, layer and group
 * norm too). For float32, a channel whose invstd exceeds FLT_MAX (a spread
 * below ~3e-39 with eps = 0) is evaluated in double, so y is the float64
 * answer rounded once (the same holds for every function below). y may be x.
 * A channel with count = outer*inner = 0 has NaN statistics. */
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
 * rv = (1-momentum)*rv + momentum*var*count/(count-1).
 * count <= 1 applies no Bessel correction (rv follows the biased variance,
 * the Keras and ONNX convention, with momentum = 1 - their momentum).
 * The one implementation of this update. count finite and >= 0, momentum in
 * [0, 1]. */
int bn_update_running(int64_t channels, const double *mean, const double *var,
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

/* dx = a[c]*g + b[c]*(x - mean[c]) + c0[c], g as above; b and c0 may be
 * NULL; x and mean are not read (and may be NULL) when b is NULL (then
 * b = c0 = 0: the eval-mode backward dx = a*g). dx may be dy, x or y. */
int bn_backward_apply_f32(const float *dy, const float *x, const float *y,
                          float *dx, bn_shape s, const double *mean,
                          const double *a, const double *b, const double *c0,
                          bn_act act, double slope, int n_threads);
int bn_backward_apply_f64(const double *dy, const double *x, const double *y,
                          double *dx, bn_shape s, const double *mean,
                          const double *a, const double *b, const double *c0,
                          bn_act act, double slope, int n_threads);

/* Full backward in one parallel region. training != 0: gradient through the
 * batch statistics, dx = w*invstd*(g - mean(g) - xhat*mean(g*xhat));
 * training == 0: dx = g*w*invstd. Always writes dweight = sum(g*xhat) and
 * dbias = sum(g) (double[C]). weight may be NULL (ones); y may be NULL when
 * act is BN_ACT_NONE. dx may be dy or x. */
int bn_backward_f32(const float *dy, const float *x, const float *y, float *dx,
                    bn_shape s, const double *mean, const double *invstd,
                    const double *weight, int training, double *dweight,
                    double *dbias, bn_act act, double slope, int n_threads);
int bn_backward_f64(const double *dy, const double *x, const double *y,
                    double *dx, bn_shape s, const double *mean,
                    const double *invstd, const double *weight, int training,
                    double *dweight, double *dbias, bn_act act, double slope,
                    int n_threads);

/* Backward of the in-place training forward (in the spirit of Inplace-ABN):
 * bn_train was run with y == x, so x is gone; the normalized input is rebuilt
 * from the output, xhat = (act^-1(y) - bias) / weight, inside the same passes
 * as bn_backward (no extra memory pass, no full-size scratch). Same results
 * as bn_backward(dy, x, y, ...) to rounding. act is BN_ACT_NONE or
 * BN_ACT_LEAKY_RELU with slope > 0 (ReLU is not invertible); every
 * weight[c] * invstd[c] must be non-zero with a finite inverse. Otherwise
 * returns BN_EINVAL before writing anything. The rebuilt xhat loses about
 * ulp(y) / |weight| of accuracy, so keep |weight| well away from 0.
 * weight/bias may be NULL (ones/zeros). dx may alias dy or y exactly. */
int bn_backward_from_output_f32(const float *dy, const float *y, float *dx, bn_shape s,
                                const double *invstd, const double *weight,
                                const double *bias, int training, double *dweight,
                                double *dbias, bn_act act, double slope, int n_threads);
int bn_backward_from_output_f64(const double *dy, const double *y, double *dx, bn_shape s,
                                const double *invstd, const double *weight,
                                const double *bias, int training, double *dweight,
                                double *dbias, bn_act act, double slope, int n_threads);

/* Eval forward from the stored parameters (the usual inference call):
 * y = act((x - running_mean) / sqrt(running_var + eps) * weight + bias).
 * weight/bias may be NULL. Bitwise the same as bncore.batch_norm_eval in
 * Python. Allocates 2*channels doubles per call; a service calling it often
 * can precompute scale = weight / sqrt(running_var + eps) once and call
 * bn_apply(x, y, s, running_mean, scale, bias, ...) instead (that is what
 * bncore.FrozenBatchNorm does). running_var[c] + eps must not be negative
 * (BN_EINVAL); where it is 0, invstd is 0 and y = act(bias), as in bn_train.
 * A NaN running_var gives NaN in its channel only. y may be x. */
int bn_eval_f32(const float *x, float *y, bn_shape s, const double *running_mean,
                const double *running_var, const double *weight, const double *bias,
                double eps, bn_act act, double slope, int n_threads);
int bn_eval_f64(const double *x, double *y, bn_shape s, const double *running_mean,
                const double *running_var, const double *weight, const double *bias,
                double eps, bn_act act, double slope, int n_threads);

/* Build description: compiler, OpenMP, SIMD targets. Static string. */
const char *bn_build_info(void);
/* Threads a call with n_threads = 0 would use (omp_get_max_threads()). */
int bn_default_threads(void);

/* ---- Normalization family: layer, group and instance normalization ---------
 * Same numerics as above (two-pass moments in double over runs, Chan merge in
 * a fixed order): results do not depend on the thread count.
 *
 * weight/bias may be NULL (ones/zeros); invstd = 1/sqrt(M2/count + eps),
 * 0 where M2/count + eps == 0 (the rule of bn_train).
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
 * thread, longer ones split into runs across threads. G >= 1 and divides C
 * (also for the backward below). */
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

/* Group normalization, channels last: x is N x S x C C-contiguous (per sample
 * S positions of C contiguous channels: NHWC, NLC); otherwise as
 * bn_group_norm, with the same mean and invstd per (n, g) over S*C/G
 * elements. Units of whole rows per sample run across threads. */
int bn_group_norm_cl_f32(const float *x, float *y, int64_t N, int64_t S, int64_t C,
                         int64_t G, const double *weight, const double *bias, double eps,
                         double *mean, double *invstd, int n_threads);
int bn_group_norm_cl_f64(const double *x, double *y, int64_t N, int64_t S, int64_t C,
                         int64_t G, const double *weight, const double *bias, double eps,
                         double *mean, double *invstd, int n_threads);

/* Gradient of bn_group_norm_cl, as bn_group_norm_backward (dx may be dy). */
int bn_group_norm_cl_backward_f32(const float *dy, const float *x, float *dx, int64_t N,
                                  int64_t S, int64_t C, int64_t G, const double *mean,
                                  const double *invstd, const double *weight,
                                  double *dweight, double *dbias, int n_threads);
int bn_group_norm_cl_backward_f64(const double *dy, const double *x, double *dx, int64_t N,
                                  int64_t S, int64_t C, int64_t G, const double *mean,
                                  const double *invstd, const double *weight,
                                  double *dweight, double *dbias, int n_threads);

/* RMS normalization of x, rows x cols C-contiguous: per row
 * invrms[r] = 1/sqrt(mean(x^2) + eps) (the sum of squares in double; 0 where
 * mean(x^2) + eps == 0), y = x * invrms[r] * weight[j] (weight NULL: ones).
 * y may be x. */
int bn_rms_norm_f32(const float *x, float *y, int64_t rows, int64_t cols,
                    const double *weight, double eps, double *invrms, int n_threads);
int bn_rms_norm_f64(const double *x, double *y, int64_t rows, int64_t cols,
                    const double *weight, double eps, double *invrms, int n_threads);

/* Gradient of bn_rms_norm: with g = dy * weight[j],
 * dx = invrms * (g - x * invrms^2 * mean_r(g * x)) (dx may be dy),
 * dweight[j] = sum_r dy * x * invrms (double[cols]). */
int bn_rms_norm_backward_f32(const float *dy, const float *x, float *dx, int64_t rows,
                             int64_t cols, const double *invrms, const double *weight,
                             double *dweight, int n_threads);
int bn_rms_norm_backward_f64(const double *dy, const double *x, double *dx, int64_t rows,
                             int64_t cols, const double *invrms, const double *weight,
                             double *dweight, int n_threads);

/* ---- Masked statistics (padded batches, variable-length sequences) -------
 * mask is a uint8 buffer in x's layout and size (bn_shape s): a value counts
 * where its mask byte is non-zero. Padded values (mask 0) are never read
 * into a sum, so NaN or garbage there does not propagate. Same numerics as
 * bn_stats (double sums, exact two-pass within a unit, Chan merges in a
 * fixed order): bitwise identical for any thread count.
 *
 * Per channel: count[c] = number of unmasked values, mean[c], m2[c] (sum of
 * squared deviations) over them (double[channels] each); a channel with no
 * unmasked value gets count 0, mean 0, m2 0. Merge across processes or
 * ghost batches with bn_merge_stats channel by channel (per-channel counts). */
int bn_masked_stats_f32(const float *x, const uint8_t *mask, bn_shape s, double *count,
                        double *mean, double *m2, int n_threads);
int bn_masked_stats_f64(const double *x, const uint8_t *mask, bn_shape s, double *count,
                        double *mean, double *m2, int n_threads);

/* bn_backward_reduce over the unmasked values only: sum_dy[c] = sum(g),
 * sum_dy_xmu[c] = sum(g*(x-mean[c])), g = dy * act'(y), and the number of
 * unmasked values count[c] (may be NULL: not written). The dx of a masked
 * training step is then bn_backward_apply with each channel's own count in
 * the coefficients, followed by bn_masked_zero(dx). */
int bn_masked_backward_reduce_f32(const float *dy, const float *x, const float *y,
                                  const uint8_t *mask, bn_shape s, const double *mean,
                                  bn_act act, double slope, double *sum_dy,
                                  double *sum_dy_xmu, double *count, int n_threads);
int bn_masked_backward_reduce_f64(const double *dy, const double *x, const double *y,
                                  const uint8_t *mask, bn_shape s, const double *mean,
                                  bn_act act, double slope, double *sum_dy,
                                  double *sum_dy_xmu, double *count, int n_threads);

/* x[i] = 0 where mask[i] == 0, for i < n (padded entries get no gradient). */
int bn_masked_zero_f32(float *x, const uint8_t *mask, int64_t n, int n_threads);
int bn_masked_zero_f64(double *x, const uint8_t *mask, int64_t n, int n_threads);

#ifdef __cplusplus
}
#endif

#ifdef BNCORE_IMPLEMENTATION
#include "bncore_impl.h"
#endif

#endif /* BNCORE_H */
