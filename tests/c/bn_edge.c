/* Runs the float32 kernels on data written by tests/test_c_api.py (spreads
 * down to subnormal, constant channels, eps = 0) and writes their results as
 * raw files, for the test to compare with a float64 NumPy reference.
 *
 *   bn_edge DIR bn OUTER C INNER     batch norm: train, eval, apply, backward
 *   bn_edge DIR ln ROWS COLS         layer norm forward and backward
 *   bn_edge DIR gn N C HW G          group norm forward and backward
 *
 * DIR holds x.bin, dy.bin (float32, the whole tensor) and w.bin, b.bin
 * (double: per channel, per column for ln). Every call uses eps = 0. */
#include "bncore.h"

#include <stdio.h>
#include <stdlib.h>

#define BN_IO_PROG "bn_edge"
#include "bn_io.h"

static double *dbl(size_t n) { return (double *)malloc(sizeof(double) * (n ? n : 1)); }

static int batch(int64_t outer, int64_t c, int64_t inner)
{
    bn_shape s = {outer, c, inner};
    size_t m = (size_t)(outer * c * inner), cb = (size_t)c * sizeof(double);
    float *x = (float *)get("x.bin", m * 4), *dy = (float *)get("dy.bin", m * 4);
    float *y = (float *)malloc(m * 4), *dx = (float *)malloc(m * 4);
    double *w = (double *)get("w.bin", cb), *b = (double *)get("b.bin", cb);
    double *mean = dbl(c), *inv = dbl(c), *var = dbl(c), *scale = dbl(c), *dw = dbl(c),
           *db = dbl(c);
    CHECK(bn_train_f32(x, y, s, w, b, 0.0, mean, inv, var, BN_ACT_NONE, 0, 0));
    put("train_y.bin", y, m * 4);
    put("mean.bin", mean, cb);
    put("invstd.bin", inv, cb);
    CHECK(bn_eval_f32(x, y, s, mean, var, w, b, 0.0, BN_ACT_NONE, 0, 0));
    put("eval_y.bin", y, m * 4);
    for (int64_t k = 0; k < c; k++) scale[k] = w[k] * inv[k];
    CHECK(bn_apply_f32(x, y, s, mean, scale, b, BN_ACT_LEAKY_RELU, 0.5, 0));
    put("apply_y.bin", y, m * 4);
    CHECK(bn_backward_f32(dy, x, NULL, dx, s, mean, inv, w, 1, dw, db, BN_ACT_NONE, 0, 0));
    put("bwd_dx.bin", dx, m * 4);
    put("bwd_dw.bin", dw, cb);
    put("bwd_db.bin", db, cb);
    CHECK(bn_backward_f32(dy, x, NULL, dx, s, mean, inv, w, 0, dw, db, BN_ACT_NONE, 0, 0));
    put("bwd_eval_dx.bin", dx, m * 4);
    free(x); free(dy); free(y); free(dx); free(w); free(b);
    free(mean); free(inv); free(var); free(scale); free(dw); free(db);
    return 0;
}

static int norm(int64_t n, int64_t c, int64_t hw, int64_t g)
{
    /* layer norm when g == 0: n rows of c columns */
    int64_t rows = g ? n * g : n, np = g ? c : c;
    size_t m = (size_t)(n * c * (g ? hw : 1)), rb = (size_t)rows * sizeof(double),
           pb = (size_t)np * sizeof(double);
    float *x = (float *)get("x.bin", m * 4), *dy = (float *)get("dy.bin", m * 4);
    float *y = (float *)malloc(m * 4), *dx = (float *)malloc(m * 4);
    double *w = (double *)get("w.bin", pb), *b = (double *)get("b.bin", pb);
    double *mean = dbl(rows), *inv = dbl(rows), *dw = dbl(np), *db = dbl(np);
    if (g) {
        CHECK(bn_group_norm_f32(x, y, n, c, hw, g, w, b, 0.0, mean, inv, 0));
        CHECK(bn_group_norm_backward_f32(dy, x, dx, n, c, hw, g, mean, inv, w, dw, db, 0));
    } else {
        CHECK(bn_layer_norm_f32(x, y, n, c, w, b, 0.0, mean, inv, 0));
        CHECK(bn_layer_norm_backward_f32(dy, x, dx, n, c, mean, inv, w, dw, db, 0));
    }
    put("y.bin", y, m * 4);
    put("mean.bin", mean, rb);
    put("invstd.bin", inv, rb);
    put("dx.bin", dx, m * 4);
    put("dw.bin", dw, pb);
    put("db.bin", db, pb);
    free(x); free(dy); free(y); free(dx); free(w); free(b);
    free(mean); free(inv); free(dw); free(db);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc < 5) {
        fprintf(stderr, "usage: bn_edge DIR bn|ln|gn SIZES...\n");
        return 2;
    }
    dir = argv[1];
    char mode = argv[2][0];
    int64_t a = atoll(argv[3]), b = atoll(argv[4]), c = argc > 5 ? atoll(argv[5]) : 0;
    if (mode == 'b' && argc == 6) return batch(a, b, c);
    if (mode == 'l' && argc == 5) return norm(a, b, 1, 0);
    if (mode == 'g' && argc == 7) return norm(a, b, c, atoll(argv[6]));
    fprintf(stderr, "bn_edge: bad arguments\n");
    return 2;
}
