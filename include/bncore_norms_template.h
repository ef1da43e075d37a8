/* bncore_norms_template.h -- layer-normalization kernels (statistics per row,
 * affine map per column), included by bncore_impl.h right after
 * bncore_template.h once per element type with T and SFX defined. They reuse
 * that file's run_moments and its accuracy scheme: exact two-pass moments over
 * runs of BN_RUN elements, merged in double with Chan's formula in a fixed
 * order, so results are bitwise identical for any thread count. */

#ifndef BN_LN_ROW_MAX
#define BN_LN_ROW_MAX 16384        /* longer rows are split into runs across threads */
#define BN_LN_MAX_BLOCKS 64        /* row blocks of the backward's column partials */
#define BN_LN_SCRATCH (4 << 20)    /* bytes of those partials at most */
#endif

#define LN_CAT2(a, b) a##_##b
#define LN_CAT(a, b) LN_CAT2(a, b)
#define LN(name) LN_CAT(name, SFX)

/* Mean and M2 of one row, runs of BN_RUN merged in order: the same numbers as
 * bn_stats on the shape (1, rows, cols). out = {mean, M2}. */
static void LN(ln_row_moments)(const T *x, int64_t cols, double *out)
{
    double n = 0, m = 0, q = 0, part[2];
    for (int64_t k = 0; k < cols; k += BN_RUN) {
        int64_t len = bn_min64(BN_RUN, cols - k);
        LN(run_moments)(x + k, len, part);
        bn_chan(&n, &m, &q, (double)len, part[0], part[1]);
    }
    out[0] = m;
    out[1] = q;
}

/* y[j] = (x[j] - m) * s * w[j] + b[j] over one segment of a row. */
BN_CLONES static void LN(ln_seg_apply)(const T *x, T *y, int64_t n, T m, T s,
                                       const T *BN_RESTRICT w, const T *BN_RESTRICT b)
{
    for (int64_t j = 0; j < n; j++) y[j] = (x[j] - m) * s * w[j] + b[j];
}

/* Backward reductions over one segment of a row, g = dy * w:
 * out = {sum g, sum g*(x - m)}, and per column pb[j] += dy, pw[j] += dy*xhat. */
BN_CLONES static void LN(ln_seg_sums)(const T *BN_RESTRICT dy, const T *BN_RESTRICT x,
                                      const T *BN_RESTRICT w, int64_t n, double m, double inv,
                                      double *BN_RESTRICT pw, double *BN_RESTRICT pb,
                                      double *out)
{
    double a1[BN_LANES] = {0}, a2[BN_LANES] = {0}, s1 = 0, s2 = 0;
    int64_t nv = n - n % BN_LANES, i;
    for (i = 0; i < nv; i += BN_LANES)
        for (int l = 0; l < BN_LANES; l++) {
            double d = (double)x[i + l] - m, g = (double)dy[i + l];
            a1[l] += g * (double)w[i + l];
            a2[l] += g * (double)w[i + l] * d;
            pb[i + l] += g;
            pw[i + l] += g * d * inv;
        }
    for (; i < n; i++) {
        double d = (double)x[i] - m, g = (double)dy[i];
        s1 += g * (double)w[i];
        s2 += g * (double)w[i] * d;
        pb[i] += g;
        pw[i] += g * d * inv;
    }
    for (int l = 0; l < BN_LANES; l++) {
        s1 += a1[l];
        s2 += a2[l];
    }
    out[0] = s1;
    out[1] = s2;
}

/* dx[j] = a*dy[j]*w[j] + b*(x[j] - m) + c over one segment of a row. */
BN_CLONES static void LN(ln_seg_dx)(const T *dy, const T *x, T *dx,
                                    int64_t n, const T *BN_RESTRICT w, T m, T a, T b, T c)
{
    for (int64_t j = 0; j < n; j++) dx[j] = dy[j] * w[j] * a + (x[j] - m) * b + c;
}

/* Weight and bias rounded to T once per call (ones / zeros for NULL). */
static T *LN(ln_params)(const double *weight, const double *bias, int64_t cols)
{
    T *p = (T *)malloc(sizeof(T) * 2 * (size_t)bn_max64(1, cols));
    if (!p) return NULL;
    for (int64_t j = 0; j < cols; j++) {
        p[j] = weight ? (T)weight[j] : (T)1;
        p[cols + j] = bias ? (T)bias[j] : (T)0;
    }
    return p;
}

static int LN(ln_threads)(int n_threads, int64_t work, int64_t units)
{
#ifdef _OPENMP
    int64_t nt = n_threads > 0 ? n_threads : omp_get_max_threads();
    if (work < BN_MIN_PARALLEL) nt = 1;
    return (int)bn_max64(1, bn_min64(nt, units));
#else
    (void)n_threads; (void)work; (void)units;
    return 1;
#endif
}

int LN(bn_layer_norm)(const T *x, T *y, int64_t rows, int64_t cols, const double *weight,
                      const double *bias, double eps, double *mean, double *invstd,
                      int n_threads)
{
    T *wb = LN(ln_params)(weight, bias, cols);
    if (!wb) return BN_ENOMEM;
    int err = 0;
    if (cols <= BN_LN_ROW_MAX) {
        /* row mode: each row's statistics, then its output while it is in cache */
        int nt = LN(ln_threads)(n_threads, rows * cols, rows);
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
        for (int64_t r = 0; r < rows; r++) {
            double mo[2];
            LN(ln_row_moments)(x + r * cols, cols, mo);
            double inv = 1.0 / sqrt(mo[1] / (double)cols + eps);
            mean[r] = mo[0];
            invstd[r] = inv;
            LN(ln_seg_apply)(x + r * cols, y + r * cols, cols, (T)mo[0], (T)inv, wb, wb + cols);
        }
    } else {
        /* few long rows: the statistics kernel splits rows into runs across
         * threads (same numbers as row mode), then the output runs in parallel */
        bn_shape s = {1, rows, cols};
        err = LN(bn_stats)(x, s, mean, invstd, n_threads);
        if (!err) {
            for (int64_t r = 0; r < rows; r++)
                invstd[r] = 1.0 / sqrt(invstd[r] / (double)cols + eps);
            int64_t kc = bn_cdiv(cols, BN_RUN);
            int nt = LN(ln_threads)(n_threads, rows * cols, rows * kc);
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
            for (int64_t u = 0; u < rows * kc; u++) {
                int64_t r = u / kc, j0 = (u % kc) * BN_RUN, len = bn_min64(BN_RUN, cols - j0);
                int64_t o = r * cols + j0;
                LN(ln_seg_apply)(x + o, y + o, len, (T)mean[r], (T)invstd[r], wb + j0,
                                 wb + cols + j0);
            }
        }
    }
    free(wb);
    return err;
}

int LN(bn_layer_norm_backward)(const T *dy, const T *x, T *dx, int64_t rows, int64_t cols,
                               const double *mean, const double *invstd, const double *weight,
                               double *dweight, double *dbias, int n_threads)
{
    T *w = LN(ln_params)(weight, NULL, cols);
    if (!w) return BN_ENOMEM;
    double dcols = (double)cols;
    if (cols <= BN_LN_ROW_MAX) {
        /* row mode: fixed blocks of rows (a function of the shape only) keep
         * per-column partial sums of dy and dy*xhat, merged in block order */
        int64_t nb = bn_max64(1, bn_min64(bn_min64(bn_cdiv(rows, 8), BN_LN_MAX_BLOCKS),
                                          BN_LN_SCRATCH / (16 * bn_max64(1, cols))));
        int64_t per = bn_cdiv(rows, nb);
        nb = bn_cdiv(rows, per);
        double *part = (double *)calloc(2 * (size_t)nb * (size_t)cols + 1, sizeof(double));
        if (!part) {
            free(w);
            return BN_ENOMEM;
        }
        int nt = LN(ln_threads)(n_threads, rows * cols, nb);
#pragma omp parallel num_threads(nt) if (nt > 1)
        {
#pragma omp for schedule(static)
            for (int64_t blk = 0; blk < nb; blk++) {
                double *pw = part + 2 * blk * cols, *pb = pw + cols;
                for (int64_t r = blk * per; r < bn_min64(rows, (blk + 1) * per); r++) {
                    const T *dr = dy + r * cols, *xr = x + r * cols;
                    double sums[2], inv = invstd[r];
                    LN(ln_seg_sums)(dr, xr, w, cols, mean[r], inv, pw, pb, sums);
                    /* dx = inv*(g - mean(g) - xhat*mean(g*xhat)), g = dy*w */
                    LN(ln_seg_dx)(dr, xr, dx + r * cols, cols, w, (T)mean[r], (T)inv,
                                  (T)(-inv * inv * inv * sums[1] / dcols),
                                  (T)(-inv * sums[0] / dcols));
                }
            }
#pragma omp for schedule(static)
            for (int64_t j = 0; j < cols; j++) {
                double sw = 0, sb = 0;
                for (int64_t blk = 0; blk < nb; blk++) {
                    sw += part[2 * blk * cols + j];
                    sb += part[(2 * blk + 1) * cols + j];
                }
                dweight[j] = sw;
                dbias[j] = sb;
            }
        }
        free(part);
    } else {
        /* few long rows: column chunks own their dweight/dbias entries and keep
         * per-(chunk, row) partial row sums, merged in chunk order */
        int64_t kc = bn_cdiv(cols, BN_RUN);
        double *part = (double *)malloc(sizeof(double) * (2 * (size_t)(kc * rows) + 2 * (size_t)rows));
        if (!part) {
            free(w);
            return BN_ENOMEM;
        }
        double *rs = part + 2 * kc * rows;
        int nt = LN(ln_threads)(n_threads, rows * cols, kc);
#pragma omp parallel num_threads(nt) if (nt > 1)
        {
#pragma omp for schedule(static)
            for (int64_t k = 0; k < kc; k++) {
                int64_t j0 = k * BN_RUN, len = bn_min64(BN_RUN, cols - j0);
                memset(dweight + j0, 0, sizeof(double) * (size_t)len);
                memset(dbias + j0, 0, sizeof(double) * (size_t)len);
                for (int64_t r = 0; r < rows; r++) {
                    int64_t o = r * cols + j0;
                    LN(ln_seg_sums)(dy + o, x + o, w + j0, len, mean[r], invstd[r],
                                    dweight + j0, dbias + j0, part + 2 * (k * rows + r));
                }
            }
#pragma omp for schedule(static)
            for (int64_t r = 0; r < rows; r++) {
                double s0 = 0, s1 = 0;
                for (int64_t k = 0; k < kc; k++) {
                    s0 += part[2 * (k * rows + r)];
                    s1 += part[2 * (k * rows + r) + 1];
                }
                rs[2 * r] = s0;
                rs[2 * r + 1] = s1;
            }
#pragma omp for schedule(static)
            for (int64_t u = 0; u < rows * kc; u++) {
                int64_t r = u / kc, j0 = (u % kc) * BN_RUN, len = bn_min64(BN_RUN, cols - j0);
                int64_t o = r * cols + j0;
                double inv = invstd[r];
                LN(ln_seg_dx)(dy + o, x + o, dx + o, len, w + j0, (T)mean[r], (T)inv,
                              (T)(-inv * inv * inv * rs[2 * r + 1] / dcols),
                              (T)(-inv * rs[2 * r] / dcols));
            }
        }
        free(part);
    }
    free(w);
    return 0;
}

#undef LN
#undef LN_CAT
#undef LN_CAT2
