/* Calls every bncore.h function with each kind of invalid argument its
 * contract names and checks that it returns BN_EINVAL without writing any
 * output (all outputs hold a sentinel, every input keeps its bytes); then a
 * few edge calls that are valid. Prints each failure; exits 1 if any.
 * Run by tests/test_c_api.py. */
#include "bncore.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

#define NE 24   /* elements of the test tensor s = {2, 3, 4} */
#define NC 3
#define SENT 777.0

static int fails;
static float xf[2 * NE], xf0[2 * NE], dyf[NE], yf[2 * NE];
static double xd[NE], dyd[NE], yd[NE];
static double pin[8][NC];        /* per-channel inputs: mean, var, weight, bias, ... */
static double pout[6][NC];       /* per-channel outputs */
static double cnt[2] = {5, 7}, mm[2 * NC], m2[2 * NC], out_count;

static void reset(void)
{
    for (int i = 0; i < 2 * NE; i++) yf[i] = (float)SENT, xf[i] = xf0[i];
    for (int i = 0; i < NE; i++) yd[i] = SENT;
    for (int k = 0; k < 6; k++)
        for (int c = 0; c < NC; c++) pout[k][c] = SENT;
    out_count = SENT;
}

static int untouched(void)
{
    for (int i = 0; i < 2 * NE; i++)
        if (yf[i] != (float)SENT || memcmp(&xf[i], &xf0[i], sizeof(float))) return 0;
    for (int i = 0; i < NE; i++)
        if (yd[i] != SENT) return 0;
    for (int k = 0; k < 6; k++)
        for (int c = 0; c < NC; c++)
            if (pout[k][c] != SENT) return 0;
    return out_count == SENT;
}

#define BAD(call)                                                                   \
    do {                                                                            \
        reset();                                                                    \
        int r_ = (call);                                                            \
        if (r_ != BN_EINVAL || !untouched()) {                                      \
            fprintf(stderr, "line %d: %s returned %d%s\n", __LINE__, #call, r_,      \
                    untouched() ? "" : " and wrote an output");                     \
            fails++;                                                                \
        }                                                                           \
    } while (0)

#define OK(call)                                                                    \
    do {                                                                            \
        reset();                                                                    \
        int r_ = (call);                                                            \
        if (r_ != 0) {                                                              \
            fprintf(stderr, "line %d: %s returned %d, expected 0\n", __LINE__, #call, r_); \
            fails++;                                                                \
        }                                                                           \
    } while (0)

int main(void)
{
    for (int i = 0; i < 2 * NE; i++) xf0[i] = (float)(i % 7) - 3.0f;
    for (int i = 0; i < NE; i++) dyf[i] = 0.5f, xd[i] = i % 5, dyd[i] = 1;
    for (int k = 0; k < 8; k++)
        for (int c = 0; c < NC; c++) pin[k][c] = 1.0 + c;
    for (int i = 0; i < 2 * NC; i++) mm[i] = i, m2[i] = 1;
    const double *mean = pin[0], *var = pin[1], *w = pin[2], *b = pin[3];
    double *o0 = pout[0], *o1 = pout[1], *o2 = pout[2];
    bn_shape s = {2, NC, 4};
    bn_shape bad_shapes[] = {{-1, NC, 4}, {2, -1, 4}, {2, NC, -4}, {INT64_MAX, 2, 1},
                             {(int64_t)1 << 40, (int64_t)1 << 40, 1}};
    const float *x = xf, *dy = dyf;
    float *y = yf;

    for (int k = 0; k < 5; k++) {
        bn_shape t = bad_shapes[k];
        BAD(bn_stats_f32(x, t, o0, o1, 0));
        BAD(bn_apply_f32(x, y, t, mean, w, b, BN_ACT_NONE, 0, 0));
        BAD(bn_train_f32(x, y, t, w, b, 1e-5, o0, o1, o2, BN_ACT_NONE, 0, 0));
        BAD(bn_backward_reduce_f32(dy, x, NULL, t, mean, BN_ACT_NONE, 0, o0, o1, 0));
        BAD(bn_backward_apply_f32(dy, x, NULL, y, t, mean, w, b, b, BN_ACT_NONE, 0, 0));
        BAD(bn_backward_f32(dy, x, NULL, y, t, mean, var, w, 1, o0, o1, BN_ACT_NONE, 0, 0));
        BAD(bn_backward_from_output_f32(dy, x, y, t, var, w, b, 1, o0, o1, BN_ACT_NONE, 0, 0));
        BAD(bn_eval_f32(x, y, t, mean, var, w, b, 1e-5, BN_ACT_NONE, 0, 0));
        BAD(bn_eval_f64(xd, yd, t, mean, var, w, b, 1e-5, BN_ACT_NONE, 0, 0));
    }

    /* bn_stats */
    BAD(bn_stats_f32(NULL, s, o0, o1, 0));
    BAD(bn_stats_f32(x, s, NULL, o1, 0));
    BAD(bn_stats_f32(x, s, o0, NULL, 0));
    BAD(bn_stats_f32(x, s, o0, o1, -1));
    BAD(bn_stats_f64(xd, s, o0, o1, -1));

    /* bn_merge_stats */
    BAD(bn_merge_stats(-1, NC, cnt, mm, m2, &out_count, o0, o1));
    BAD(bn_merge_stats(2, -1, cnt, mm, m2, &out_count, o0, o1));
    BAD(bn_merge_stats(2, NC, NULL, mm, m2, &out_count, o0, o1));
    BAD(bn_merge_stats(2, NC, cnt, NULL, m2, &out_count, o0, o1));
    BAD(bn_merge_stats(2, NC, cnt, mm, m2, NULL, o0, o1));
    BAD(bn_merge_stats(2, NC, cnt, mm, m2, &out_count, o0, NULL));
    {
        double bad_counts[3] = {-1, NAN, INFINITY};
        for (int k = 0; k < 3; k++) {
            double c2[2] = {5, bad_counts[k]};
            BAD(bn_merge_stats(2, NC, c2, mm, m2, &out_count, o0, o1));
        }
    }

    /* bn_update_running (o0, o1 are the running statistics) */
    BAD(bn_update_running(-1, mean, var, 10, 0.1, o0, o1));
    BAD(bn_update_running(NC, NULL, var, 10, 0.1, o0, o1));
    BAD(bn_update_running(NC, mean, var, 10, 0.1, o0, NULL));
    BAD(bn_update_running(NC, mean, var, -1, 0.1, o0, o1));
    BAD(bn_update_running(NC, mean, var, NAN, 0.1, o0, o1));
    BAD(bn_update_running(NC, mean, var, 10, 1.5, o0, o1));
    BAD(bn_update_running(NC, mean, var, 10, -0.1, o0, o1));
    BAD(bn_update_running(NC, mean, var, 10, NAN, o0, o1));

    /* bn_apply: pointers, activation, threads, partial overlap */
    BAD(bn_apply_f32(NULL, y, s, mean, w, b, BN_ACT_NONE, 0, 0));
    BAD(bn_apply_f32(x, NULL, s, mean, w, b, BN_ACT_NONE, 0, 0));
    BAD(bn_apply_f32(x, y, s, NULL, w, b, BN_ACT_NONE, 0, 0));
    BAD(bn_apply_f32(x, y, s, mean, NULL, b, BN_ACT_NONE, 0, 0));
    BAD(bn_apply_f32(x, y, s, mean, w, NULL, BN_ACT_NONE, 0, 0));
    BAD(bn_apply_f32(x, y, s, mean, w, b, (bn_act)7, 0, 0));
    BAD(bn_apply_f32(x, y, s, mean, w, b, BN_ACT_LEAKY_RELU, -0.1, 0));
    BAD(bn_apply_f32(x, y, s, mean, w, b, BN_ACT_LEAKY_RELU, NAN, 0));
    BAD(bn_apply_f32(x, y, s, mean, w, b, BN_ACT_LEAKY_RELU, INFINITY, 0));
    BAD(bn_apply_f32(x, y, s, mean, w, b, BN_ACT_NONE, 0, -1));
    BAD(bn_apply_f32(xf, xf + 1, s, mean, w, b, BN_ACT_NONE, 0, 0));
    BAD(bn_apply_f32(xf + 5, xf, s, mean, w, b, BN_ACT_NONE, 0, 0));
    BAD(bn_apply_f64(xd, yd, s, mean, w, b, BN_ACT_NONE, 0, -1));

    /* bn_train */
    {
        double bad_eps[3] = {-1e-5, NAN, INFINITY};
        for (int k = 0; k < 3; k++) {
            BAD(bn_train_f32(x, y, s, w, b, bad_eps[k], o0, o1, o2, BN_ACT_NONE, 0, 0));
            BAD(bn_eval_f32(x, y, s, mean, var, w, b, bad_eps[k], BN_ACT_NONE, 0, 0));
            BAD(bn_layer_norm_f32(x, y, 2, 12, NULL, NULL, bad_eps[k], o0, o1, 0));
            BAD(bn_group_norm_f32(x, y, 2, NC, 4, 1, NULL, NULL, bad_eps[k], o0, o1, 0));
        }
    }
    BAD(bn_train_f32(NULL, y, s, w, b, 1e-5, o0, o1, o2, BN_ACT_NONE, 0, 0));
    BAD(bn_train_f32(x, NULL, s, w, b, 1e-5, o0, o1, o2, BN_ACT_NONE, 0, 0));
    BAD(bn_train_f32(x, y, s, w, b, 1e-5, NULL, o1, o2, BN_ACT_NONE, 0, 0));
    BAD(bn_train_f32(x, y, s, w, b, 1e-5, o0, NULL, o2, BN_ACT_NONE, 0, 0));
    BAD(bn_train_f32(x, y, s, w, b, 1e-5, o0, o1, o2, (bn_act)-1, 0, 0));
    BAD(bn_train_f32(x, y, s, w, b, 1e-5, o0, o1, o2, BN_ACT_LEAKY_RELU, -1, 0));
    BAD(bn_train_f32(x, y, s, w, b, 1e-5, o0, o1, o2, BN_ACT_NONE, 0, -3));
    BAD(bn_train_f32(xf, xf + 3, s, w, b, 1e-5, o0, o1, o2, BN_ACT_NONE, 0, 0));
    BAD(bn_train_f64(xd, yd, s, w, b, -1, o0, o1, o2, BN_ACT_NONE, 0, 0));

    /* backward reductions and elementwise pass */
    BAD(bn_backward_reduce_f32(NULL, x, NULL, s, mean, BN_ACT_NONE, 0, o0, o1, 0));
    BAD(bn_backward_reduce_f32(dy, NULL, NULL, s, mean, BN_ACT_NONE, 0, o0, o1, 0));
    BAD(bn_backward_reduce_f32(dy, x, NULL, s, mean, BN_ACT_RELU, 0, o0, o1, 0));
    BAD(bn_backward_reduce_f32(dy, x, NULL, s, NULL, BN_ACT_NONE, 0, o0, o1, 0));
    BAD(bn_backward_reduce_f32(dy, x, NULL, s, mean, BN_ACT_NONE, 0, NULL, o1, 0));
    BAD(bn_backward_reduce_f32(dy, x, NULL, s, mean, BN_ACT_NONE, 0, o0, o1, -1));
    BAD(bn_backward_apply_f32(dy, x, NULL, y, s, mean, NULL, b, b, BN_ACT_NONE, 0, 0));
    BAD(bn_backward_apply_f32(dy, NULL, NULL, y, s, mean, w, b, b, BN_ACT_NONE, 0, 0));
    BAD(bn_backward_apply_f32(dy, x, NULL, y, s, NULL, w, b, b, BN_ACT_NONE, 0, 0));
    BAD(bn_backward_apply_f32(dy, x, NULL, y, s, mean, w, b, b, BN_ACT_LEAKY_RELU, 0.1, 0));
    BAD(bn_backward_apply_f32(NULL, x, NULL, y, s, mean, w, b, b, BN_ACT_NONE, 0, 0));
    BAD(bn_backward_apply_f32(dy, x, NULL, NULL, s, mean, w, b, b, BN_ACT_NONE, 0, 0));
    BAD(bn_backward_apply_f32(dy, xf, NULL, xf + 2, s, mean, w, b, b, BN_ACT_NONE, 0, 0));

    /* full backward and the in-place ABN backward */
    BAD(bn_backward_f32(dy, x, NULL, y, s, mean, NULL, w, 1, o0, o1, BN_ACT_NONE, 0, 0));
    BAD(bn_backward_f32(dy, x, NULL, y, s, NULL, var, w, 1, o0, o1, BN_ACT_NONE, 0, 0));
    BAD(bn_backward_f32(dy, x, NULL, y, s, mean, var, w, 1, NULL, o1, BN_ACT_NONE, 0, 0));
    BAD(bn_backward_f32(dy, x, NULL, y, s, mean, var, w, 1, o0, NULL, BN_ACT_NONE, 0, 0));
    BAD(bn_backward_f32(dy, x, NULL, y, s, mean, var, w, 1, o0, o1, BN_ACT_RELU, 0, 0));
    BAD(bn_backward_f32(dy, x, NULL, y, s, mean, var, w, 1, o0, o1, BN_ACT_NONE, 0, -1));
    BAD(bn_backward_f32(dy, xf, NULL, xf + 1, s, mean, var, w, 1, o0, o1, BN_ACT_NONE, 0, 0));
    BAD(bn_backward_from_output_f32(dy, x, y, s, NULL, w, b, 1, o0, o1, BN_ACT_NONE, 0, 0));
    BAD(bn_backward_from_output_f32(dy, x, y, s, var, w, b, 1, o0, o1, BN_ACT_RELU, 0, 0));
    BAD(bn_backward_from_output_f32(dy, x, y, s, var, w, b, 1, o0, o1, BN_ACT_LEAKY_RELU, 0, 0));
    BAD(bn_backward_from_output_f32(dy, x, y, s, var, w, b, 1, NULL, o1, BN_ACT_NONE, 0, 0));
    BAD(bn_backward_from_output_f32(dy, xf, xf + 1, s, var, w, b, 1, o0, o1, BN_ACT_NONE, 0, 0));
    {
        double zero_w[NC] = {1, 0, 1};
        BAD(bn_backward_from_output_f32(dy, x, y, s, var, zero_w, b, 1, o0, o1, BN_ACT_NONE, 0, 0));
    }

    /* bn_eval: running_var + eps < 0, missing statistics */
    {
        double neg[NC] = {1, -1, 1};
        BAD(bn_eval_f32(x, y, s, mean, neg, w, b, 0.5, BN_ACT_NONE, 0, 0));
        BAD(bn_eval_f64(xd, yd, s, mean, neg, w, b, 0.5, BN_ACT_NONE, 0, 0));
        neg[1] = -INFINITY;
        BAD(bn_eval_f32(x, y, s, mean, neg, w, b, 1e-5, BN_ACT_NONE, 0, 0));
    }
    BAD(bn_eval_f32(x, y, s, NULL, var, w, b, 1e-5, BN_ACT_NONE, 0, 0));
    BAD(bn_eval_f32(x, y, s, mean, NULL, w, b, 1e-5, BN_ACT_NONE, 0, 0));
    BAD(bn_eval_f32(x, y, s, mean, var, w, b, 1e-5, BN_ACT_NONE, 0, -1));
    BAD(bn_eval_f32(x, y, s, mean, var, w, b, 1e-5, (bn_act)3, 0, 0));

    /* layer norm: 2 rows x 12 columns */
    BAD(bn_layer_norm_f32(x, y, -1, 12, NULL, NULL, 1e-5, o0, o1, 0));
    BAD(bn_layer_norm_f32(x, y, 2, -12, NULL, NULL, 1e-5, o0, o1, 0));
    BAD(bn_layer_norm_f32(x, y, INT64_MAX, 2, NULL, NULL, 1e-5, o0, o1, 0));
    BAD(bn_layer_norm_f32(NULL, y, 2, 12, NULL, NULL, 1e-5, o0, o1, 0));
    BAD(bn_layer_norm_f32(x, y, 2, 12, NULL, NULL, 1e-5, NULL, o1, 0));
    BAD(bn_layer_norm_f32(x, y, 2, 12, NULL, NULL, 1e-5, o0, NULL, 0));
    BAD(bn_layer_norm_f32(x, y, 2, 12, NULL, NULL, 1e-5, o0, o1, -1));
    BAD(bn_layer_norm_f32(xf, xf + 4, 2, 12, NULL, NULL, 1e-5, o0, o1, 0));
    BAD(bn_layer_norm_f64(xd, yd, 2, 12, NULL, NULL, -1, o0, o1, 0));
    BAD(bn_layer_norm_backward_f32(NULL, x, y, 2, 12, mean, var, NULL, pout[2], pout[2], 0));
    BAD(bn_layer_norm_backward_f32(dy, x, y, 2, 12, mean, var, NULL, NULL, pout[2], 0));
    BAD(bn_layer_norm_backward_f32(dy, x, y, 2, 12, NULL, var, NULL, pout[2], pout[2], 0));
    BAD(bn_layer_norm_backward_f32(dy, x, y, -2, 12, mean, var, NULL, pout[2], pout[2], 0));
    BAD(bn_layer_norm_backward_f32(dy, xf, xf + 1, 2, 12, mean, var, NULL, pout[2], pout[2], 0));

    /* group norm: G >= 1 dividing C (G = 0 used to divide by zero) */
    {
        static double gw[6], gb[6];
        BAD(bn_group_norm_f32(x, y, 2, NC, 4, 0, NULL, NULL, 1e-5, o0, o1, 0));
        BAD(bn_group_norm_f64(xd, yd, 2, NC, 4, 0, NULL, NULL, 1e-5, o0, o1, 0));
        BAD(bn_group_norm_f32(x, y, 2, NC, 4, -3, NULL, NULL, 1e-5, o0, o1, 0));
        BAD(bn_group_norm_f32(x, y, 2, NC, 4, 2, NULL, NULL, 1e-5, o0, o1, 0));
        BAD(bn_group_norm_f32(x, y, -2, NC, 4, 1, NULL, NULL, 1e-5, o0, o1, 0));
        BAD(bn_group_norm_f32(x, y, 2, NC, -4, 1, NULL, NULL, 1e-5, o0, o1, 0));
        BAD(bn_group_norm_f32(x, y, 2, NC, INT64_MAX, 1, NULL, NULL, 1e-5, o0, o1, 0));
        BAD(bn_group_norm_f32(x, y, 2, NC, 4, 1, NULL, NULL, 1e-5, NULL, o1, 0));
        BAD(bn_group_norm_f32(x, y, 2, NC, 4, 1, NULL, NULL, 1e-5, o0, o1, -1));
        BAD(bn_group_norm_f32(xf, xf + 1, 2, NC, 4, 1, NULL, NULL, 1e-5, o0, o1, 0));
        BAD(bn_group_norm_backward_f32(dy, x, y, 2, NC, 4, 0, mean, var, NULL, gw, gb, 0));
        BAD(bn_group_norm_backward_f64(dyd, xd, yd, 2, NC, 4, 0, mean, var, NULL, gw, gb, 0));
        BAD(bn_group_norm_backward_f32(dy, x, y, 2, NC, 4, 2, mean, var, NULL, gw, gb, 0));
        BAD(bn_group_norm_backward_f32(dy, x, y, 2, NC, 4, 1, mean, var, NULL, NULL, gb, 0));
        BAD(bn_group_norm_backward_f32(dy, x, y, 2, NC, 4, 1, NULL, var, NULL, gw, gb, 0));
        /* channels last: N x S x C = 2 x 4 x NC */
        BAD(bn_group_norm_cl_f32(x, y, 2, 4, NC, 0, NULL, NULL, 1e-5, o0, o1, 0));
        BAD(bn_group_norm_cl_f64(xd, yd, 2, 4, NC, 2, NULL, NULL, 1e-5, o0, o1, 0));
        BAD(bn_group_norm_cl_f32(x, y, -2, 4, NC, 1, NULL, NULL, 1e-5, o0, o1, 0));
        BAD(bn_group_norm_cl_f32(x, y, 2, -4, NC, 1, NULL, NULL, 1e-5, o0, o1, 0));
        BAD(bn_group_norm_cl_f32(x, y, 2, INT64_MAX, NC, 1, NULL, NULL, 1e-5, o0, o1, 0));
        BAD(bn_group_norm_cl_f32(NULL, y, 2, 4, NC, 1, NULL, NULL, 1e-5, o0, o1, 0));
        BAD(bn_group_norm_cl_f32(x, y, 2, 4, NC, 1, NULL, NULL, 1e-5, o0, NULL, 0));
        BAD(bn_group_norm_cl_f32(x, y, 2, 4, NC, 1, NULL, NULL, -1e-5, o0, o1, 0));
        BAD(bn_group_norm_cl_f32(x, y, 2, 4, NC, 1, NULL, NULL, NAN, o0, o1, 0));
        BAD(bn_group_norm_cl_f32(x, y, 2, 4, NC, 1, NULL, NULL, 1e-5, o0, o1, -1));
        BAD(bn_group_norm_cl_f32(xf, xf + 1, 2, 4, NC, 1, NULL, NULL, 1e-5, o0, o1, 0));
        BAD(bn_group_norm_cl_backward_f32(dy, x, y, 2, 4, NC, 0, mean, var, NULL, gw, gb, 0));
        BAD(bn_group_norm_cl_backward_f64(dyd, xd, yd, 2, 4, NC, 2, mean, var, NULL, gw, gb, 0));
        BAD(bn_group_norm_cl_backward_f32(NULL, x, y, 2, 4, NC, 1, mean, var, NULL, gw, gb, 0));
        BAD(bn_group_norm_cl_backward_f32(dy, x, y, 2, 4, NC, 1, mean, var, NULL, NULL, gb, 0));
        BAD(bn_group_norm_cl_backward_f32(dy, x, y, 2, 4, NC, 1, NULL, var, NULL, gw, gb, 0));
        BAD(bn_group_norm_cl_backward_f32(dy, x, y, 2, 4, NC, 1, mean, var, NULL, gw, gb, -1));
        BAD(bn_group_norm_cl_backward_f32(dy, xf, xf + 1, 2, 4, NC, 1, mean, var, NULL, gw, gb,
                                          0));
    }

    /* RMS norm: 2 rows x 12 columns */
    BAD(bn_rms_norm_f32(x, y, -1, 12, NULL, 1e-5, o0, 0));
    BAD(bn_rms_norm_f32(x, y, 2, -12, NULL, 1e-5, o0, 0));
    BAD(bn_rms_norm_f32(x, y, INT64_MAX, 2, NULL, 1e-5, o0, 0));
    BAD(bn_rms_norm_f32(NULL, y, 2, 12, NULL, 1e-5, o0, 0));
    BAD(bn_rms_norm_f32(x, y, 2, 12, NULL, 1e-5, NULL, 0));
    BAD(bn_rms_norm_f32(x, y, 2, 12, NULL, -1e-5, o0, 0));
    BAD(bn_rms_norm_f64(xd, yd, 2, 12, NULL, INFINITY, o0, 0));
    BAD(bn_rms_norm_f32(x, y, 2, 12, NULL, 1e-5, o0, -1));
    BAD(bn_rms_norm_f32(xf, xf + 4, 2, 12, NULL, 1e-5, o0, 0));
    BAD(bn_rms_norm_backward_f32(NULL, x, y, 2, 12, var, NULL, pout[2], 0));
    BAD(bn_rms_norm_backward_f32(dy, x, y, 2, 12, var, NULL, NULL, 0));
    BAD(bn_rms_norm_backward_f32(dy, x, y, 2, 12, NULL, NULL, pout[2], 0));
    BAD(bn_rms_norm_backward_f64(dyd, xd, yd, -2, 12, var, NULL, pout[2], 0));
    BAD(bn_rms_norm_backward_f32(dy, x, y, 2, 12, var, NULL, pout[2], -1));
    BAD(bn_rms_norm_backward_f32(dy, xf, xf + 1, 2, 12, var, NULL, pout[2], 0));

    /* valid edge calls */
    OK(bn_stats_f32(NULL, (bn_shape){0, NC, 4}, o0, o1, 0));
    OK(bn_apply_f32(NULL, NULL, (bn_shape){2, 0, 4}, NULL, NULL, NULL, BN_ACT_NONE, 0, 0));
    OK(bn_group_norm_f32(NULL, NULL, 0, NC, 4, NC, NULL, NULL, 1e-5, NULL, NULL, 0));
    OK(bn_group_norm_cl_f32(NULL, NULL, 0, 4, NC, NC, NULL, NULL, 1e-5, NULL, NULL, 0));
    OK(bn_rms_norm_f32(NULL, NULL, 0, 12, NULL, 1e-5, NULL, 0));
    OK(bn_merge_stats(0, NC, NULL, NULL, NULL, &out_count, o0, o1));
    OK(bn_apply_f32(xf, xf, s, mean, w, b, BN_ACT_NONE, 0, 0));  /* in place */
    for (int i = 0; i < NE; i++) xf[i] = xf0[i];
    /* running_var + eps == 0: invstd 0, y = bias, as bn_train's constant channel */
    {
        double zero[NC] = {0, 0, 0};
        OK(bn_eval_f32(x, y, s, mean, zero, w, b, 0.0, BN_ACT_NONE, 0, 0));
        for (int i = 0; i < NE; i++)
            if (yf[i] != (float)b[(i / 4) % NC]) {
                fprintf(stderr, "bn_eval with running_var + eps == 0: y[%d] = %g\n", i, yf[i]);
                fails++;
                break;
            }
    }
    /* ReLU ignores slope (read only for leaky ReLU): negative values give 0 */
    OK(bn_apply_f32(x, y, s, mean, w, b, BN_ACT_RELU, 0.5, 0));
    for (int i = 0; i < NE; i++)
        if (!(yf[i] >= 0)) {
            fprintf(stderr, "ReLU with slope 0.5 gave y[%d] = %g\n", i, yf[i]);
            fails++;
            break;
        }
    if (fails) fprintf(stderr, "bn_invalid: %d failures\n", fails);
    else printf("bn_invalid: all checks passed\n");
    return fails != 0;
}
