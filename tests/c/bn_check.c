/* Runs every bncore.h entry point on data written by tests/test_c_api.py and
 * writes the results as raw files for the test to compare with the Python API.
 * The implementation comes from a separate translation unit (bncore_impl.c).
 *
 *   bn_check DIR N C H W
 *
 * DIR holds x32.bin, dy32.bin (N*C*H*W float32), x64.bin, dy64.bin (float64),
 * params.bin (4*C doubles: weight, bias, running_mean, running_var). */
#include "bncore.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define BN_IO_PROG "bn_check"
#include "bn_io.h"

int main(int argc, char **argv)
{
    if (argc != 6) {
        fprintf(stderr, "usage: bn_check DIR N C H W\n");
        return 2;
    }
    dir = argv[1];
    int64_t n = atoll(argv[2]), c = atoll(argv[3]), hw = atoll(argv[4]) * atoll(argv[5]);
    size_t m = (size_t)(n * c * hw), cb = (size_t)c * sizeof(double);
    bn_shape nchw = {n, c, hw}, nhwc = {n * hw, c, 1};
    float *x = (float *)get("x32.bin", m * 4), *dy = (float *)get("dy32.bin", m * 4);
    double *xd = (double *)get("x64.bin", m * 8), *dyd = (double *)get("dy64.bin", m * 8);
    double *p = (double *)get("params.bin", 4 * cb);
    const double *w = p, *b = p + c, *rm = p + 2 * c, *rv = p + 3 * c;
    float *y = (float *)malloc(m * 4), *dx = (float *)malloc(m * 4), *buf = (float *)malloc(m * 4);
    double *yd = (double *)malloc(m * 8), *dxd = (double *)malloc(m * 8);
    double *v[6];
    for (int i = 0; i < 6; i++) v[i] = (double *)malloc(cb);

    /* eval, float32, NCHW, leaky ReLU 0.1; default threads and one thread */
    CHECK(bn_eval_f32(x, y, nchw, rm, rv, w, b, 1e-5, BN_ACT_LEAKY_RELU, 0.1, 0));
    put("eval32.bin", y, m * 4);
    CHECK(bn_eval_f32(x, y, nchw, rm, rv, w, b, 1e-5, BN_ACT_LEAKY_RELU, 0.1, 1));
    put("eval32_t1.bin", y, m * 4);
    /* eval, float32, the same buffer read as channels-last (N, H, W, C), no weight/bias */
    CHECK(bn_eval_f32(x, y, nhwc, rm, rv, NULL, NULL, 1e-3, BN_ACT_NONE, 0.0, 0));
    put("eval32_nhwc.bin", y, m * 4);
    /* eval, float64, through bn_apply with precomputed coefficients (the frozen path) */
    for (int64_t k = 0; k < c; k++) v[0][k] = w[k] * (1.0 / sqrt(rv[k] + 1e-5));
    CHECK(bn_apply_f64(xd, yd, nchw, rm, v[0], b, BN_ACT_RELU, 0.0, 0));
    put("apply64.bin", yd, m * 8);

    /* statistics */
    CHECK(bn_stats_f32(x, nchw, v[0], v[1], 0));
    put("stats_mean32.bin", v[0], cb);
    put("stats_m2_32.bin", v[1], cb);

    /* training forward + running update + backward, float32, NCHW, ReLU */
    CHECK(bn_train_f32(x, y, nchw, w, b, 1e-5, v[0], v[1], v[2], BN_ACT_RELU, 0.0, 0));
    put("train32.bin", y, m * 4);
    put("train_mean32.bin", v[0], cb);
    put("train_invstd32.bin", v[1], cb);
    memcpy(v[3], rm, cb);
    memcpy(v[4], rv, cb);
    CHECK(bn_update_running(c, v[0], v[2], (double)(n * hw), 0.1, v[3], v[4]));
    put("running_mean.bin", v[3], cb);
    put("running_var.bin", v[4], cb);
    CHECK(bn_backward_f32(dy, x, y, dx, nchw, v[0], v[1], w, 1, v[3], v[4], BN_ACT_RELU, 0.0, 0));
    put("bwd32.bin", dx, m * 4);
    put("bwd_dw32.bin", v[3], cb);
    put("bwd_db32.bin", v[4], cb);

    /* in-place ABN, float32, channels-last, leaky ReLU 0.05: y written over x */
    memcpy(buf, x, m * 4);
    CHECK(bn_train_f32(buf, buf, nhwc, w, b, 1e-5, v[0], v[1], NULL, BN_ACT_LEAKY_RELU, 0.05, 0));
    put("inplace_y32.bin", buf, m * 4);
    CHECK(bn_backward_from_output_f32(dy, buf, dx, nhwc, v[1], w, b, 1, v[3], v[4],
                                      BN_ACT_LEAKY_RELU, 0.05, 0));
    put("inplace_dx32.bin", dx, m * 4);
    put("inplace_dw32.bin", v[3], cb);
    put("inplace_db32.bin", v[4], cb);
    if (bn_backward_from_output_f32(dy, buf, dx, nhwc, v[1], w, b, 1, v[3], v[4], BN_ACT_RELU,
                                    0.0, 0) != BN_EINVAL) {
        fprintf(stderr, "bn_check: ReLU (not invertible) was not refused\n");
        return 1;
    }

    /* training forward + backward in float64 through the split reduce/apply calls */
    CHECK(bn_train_f64(xd, yd, nchw, w, b, 1e-5, v[0], v[1], NULL, BN_ACT_NONE, 0.0, 0));
    put("train64.bin", yd, m * 8);
    CHECK(bn_backward_reduce_f64(dyd, xd, NULL, nchw, v[0], BN_ACT_NONE, 0.0, v[2], v[3], 0));
    for (int64_t k = 0; k < c; k++) { /* the formula of bncore.batch_norm_backward_elemt */
        double kk = w[k] * v[1][k], cnt = (double)(n * hw);
        v[4][k] = -kk * v[1][k] * v[1][k] * v[3][k] / cnt;
        v[5][k] = -kk * v[2][k] / cnt;
        v[2][k] = kk;
    }
    CHECK(bn_backward_apply_f64(dyd, xd, NULL, dxd, nchw, v[0], v[2], v[4], v[5], BN_ACT_NONE, 0.0, 0));
    put("bwd64.bin", dxd, m * 8);

    free(x); free(dy); free(xd); free(dyd); free(p); free(y); free(dx); free(buf);
    free(yd); free(dxd);
    for (int i = 0; i < 6; i++) free(v[i]);
    printf("%s\n", bn_build_info());
    return 0;
}
