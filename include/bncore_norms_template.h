/* bncore_norms_template.h -- layer and group normalization kernels
 * (statistics per row or per (sample, group), affine map per column or per
 * channel), included by bncore_impl.h right after bncore_template.h once per
 * element type with T and SFX defined. They reuse that file's run loops and
 * its accuracy scheme: two-pass moments in double over runs of BN_RUN
 * elements, merged with Chan's formula in a fixed order, so results are
 * bitwise identical for any thread count. */

#ifndef BN_LN_ROW_MAX
#define BN_LN_ROW_MAX 16384        /* longer rows are split into runs across threads */
#define BN_LN_MAX_BLOCKS 64        /* row blocks of the backward's column partials */
#define BN_LN_SCRATCH (4 << 20)    /* bytes of those partials at most */
#define BN_GN_ROW_MAX 65536        /* longer groups: statistics split into runs across threads */
#define BN_GN_SHORT 256            /* channel runs shorter than this: gn_short_dot */
#endif

#define LN(name) FN(name)  /* bncore_impl.h's name macro */

/* Mean and M2 of one row: runs of BN_RUN merged with Chan's formula in order. */
static void LN(ln_row_moments)(const T *x, int64_t cols, double *out)
{
    double n = 0, m = 0, q = 0, part[2];
    for (int64_t k = 0; k < cols; k += BN_RUN) {
        int64_t len = bn_min64(BN_RUN, cols - k);
        LN(run_moments)(x + k, len, 1, 0, part);
        bn_chan(&n, &m, &q, (double)len, part[0], part[1]);
    }
    out[0] = m;
    out[1] = q;
}

/* y[j] = (x[j] - m) * s * w[j] + b[j] over one segment of a row, the mean
 * split as m = mh + ml (ml its rounding residue in T) as in bncore_template.h:
 * x - mh is exact for x near the mean, so float32 output keeps its precision
 * when |mean| >> std. */
BN_CLONES static void LN(ln_seg_apply)(const T *x, T *y, int64_t n, T mh, T ml, T s,
                                       const T *BN_RESTRICT w, const T *BN_RESTRICT b)
{
    for (int64_t j = 0; j < n; j++) y[j] = ((x[j] - mh) - ml) * s * w[j] + b[j];
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

/* dx[j] = a*dy[j]*w[j] + b*(x[j] - m) + c over one segment of a row (m split
 * as in ln_seg_apply). */
BN_CLONES static void LN(ln_seg_dx)(const T *dy, const T *x, T *dx, int64_t n,
                                    const T *BN_RESTRICT w, T mh, T ml, T a, T b, T c)
{
    for (int64_t j = 0; j < n; j++) dx[j] = dy[j] * w[j] * a + ((x[j] - mh) - ml) * b + c;
}

/* Rows (or channels) whose T coefficients leave T's range (float32 with
 * invstd > FLT_MAX: a subnormal spread and eps = 0; see overflows in
 * bncore_template.h) are evaluated in double and rounded once:
 * y = (x - m) * s * w[j] + b[j], w/b NULL: 1 and b0. */
static void LN(wide_apply)(const T *x, T *y, int64_t n, double m, double s, const double *w,
                           const double *b, double b0)
{
    for (int64_t j = 0; j < n; j++)
        y[j] = (T)(((double)x[j] - m) * s * (w ? w[j] : 1.0) + (b ? b[j] : b0));
}

/* dx = (dy * w[j] * a + (x - m) * b + c) * k in double, w NULL: w0. */
static void LN(wide_dx)(const T *dy, const T *x, T *dx, int64_t n, const double *w, double w0,
                        double m, double a, double b, double c, double k)
{
    for (int64_t j = 0; j < n; j++)
        dx[j] = (T)(((double)dy[j] * (w ? w[j] : w0) * a + ((double)x[j] - m) * b + c) * k);
}

/* Checks shared by the layer and group norm entry points (see bncore.h). */
static int LN(bad_norm_args)(int64_t rows, int64_t cols, const T *x, const T *y, const T *dy,
                             const double *mean, const double *invstd, int n_threads)
{
    bn_shape s = {rows, cols, 1};
    int64_t n = rows * cols;
    return bn_bad_shape(s, sizeof(T)) || BN_MISSING(x, n) || BN_MISSING(y, n) ||
           bn_partial_overlap(x, y, n, sizeof(T)) || (dy && bn_partial_overlap(dy, y, n, sizeof(T))) ||
           BN_MISSING(mean, rows) || BN_MISSING(invstd, rows) || n_threads < 0;
}

/* The mean as T plus its rounding residue. */
#define LN_SPLIT(m) (T)(m), (T)((m) - (double)(T)(m))

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

int LN(bn_layer_norm)(const T *x, T *y, int64_t rows, int64_t cols, const double *weight,
                      const double *bias, double eps, double *mean, double *invstd,
                      int n_threads)
{
    if (LN(bad_norm_args)(rows, cols, x, y, NULL, mean, invstd, n_threads) || bn_bad_eps(eps))
        return BN_EINVAL;
    T *wb = LN(ln_params)(weight, bias, cols);
    if (!wb) return BN_ENOMEM;
    int err = 0;
    if (cols <= BN_LN_ROW_MAX) {
        /* row mode: each row's statistics, then its output while it is in cache */
        int nt = bn_threads_for(n_threads, rows * cols, rows);
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
        for (int64_t r = 0; r < rows; r++) {
            double mo[2];
            LN(ln_row_moments)(x + r * cols, cols, mo);
            double inv = bn_invstd(mo[1] / (double)cols, eps);
            mean[r] = mo[0];
            invstd[r] = inv;
            if (LN(overflows)(inv))
                LN(wide_apply)(x + r * cols, y + r * cols, cols, mo[0], inv, weight, bias, 0);
            else
                LN(ln_seg_apply)(x + r * cols, y + r * cols, cols, LN_SPLIT(mo[0]), (T)inv, wb,
                             wb + cols);
        }
    } else {
        /* few long rows: the statistics kernel splits rows into runs across
         * threads, then the output runs in parallel */
        bn_shape s = {1, rows, cols};
        err = LN(bn_stats)(x, s, mean, invstd, n_threads);
        if (!err) {
            for (int64_t r = 0; r < rows; r++)
                invstd[r] = bn_invstd(invstd[r] / (double)cols, eps);
            int64_t kc = bn_cdiv(cols, BN_RUN);
            int nt = bn_threads_for(n_threads, rows * cols, rows * kc);
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
            for (int64_t u = 0; u < rows * kc; u++) {
                int64_t r = u / kc, j0 = (u % kc) * BN_RUN, len = bn_min64(BN_RUN, cols - j0);
                int64_t o = r * cols + j0;
                if (LN(overflows)(invstd[r]))
                    LN(wide_apply)(x + o, y + o, len, mean[r], invstd[r], weight ? weight + j0 : NULL,
                                   bias ? bias + j0 : NULL, 0);
                else
                    LN(ln_seg_apply)(x + o, y + o, len, LN_SPLIT(mean[r]), (T)invstd[r], wb + j0,
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
    if (LN(bad_norm_args)(rows, cols, x, dx, dy, mean, invstd, n_threads) ||
        BN_MISSING(dy, rows * cols) || BN_MISSING(dweight, cols) || BN_MISSING(dbias, cols))
        return BN_EINVAL;
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
        int nt = bn_threads_for(n_threads, rows * cols, nb);
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
                    double cb = -inv * inv * inv * sums[1] / dcols, cc = -inv * sums[0] / dcols;
                    if (LN(overflows)(inv) || LN(overflows)(cb) || LN(overflows)(cc))
                        LN(wide_dx)(dr, xr, dx + r * cols, cols, weight, 1, mean[r], inv, cb, cc, 1);
                    else
                        LN(ln_seg_dx)(dr, xr, dx + r * cols, cols, w, LN_SPLIT(mean[r]), (T)inv,
                                      (T)cb, (T)cc);
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
        double *part = (double *)malloc(sizeof(double) * 2 * (size_t)(kc * rows + rows));
        if (!part) {
            free(w);
            return BN_ENOMEM;
        }
        double *rs = part + 2 * kc * rows;
        int nt = bn_threads_for(n_threads, rows * cols, kc);
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
                double cb = -inv * inv * inv * rs[2 * r + 1] / dcols, cc = -inv * rs[2 * r] / dcols;
                if (LN(overflows)(inv) || LN(overflows)(cb) || LN(overflows)(cc))
                    LN(wide_dx)(dy + o, x + o, dx + o, len, weight ? weight + j0 : NULL, 1, mean[r],
                                inv, cb, cc, 1);
                else
                    LN(ln_seg_dx)(dy + o, x + o, dx + o, len, w + j0, LN_SPLIT(mean[r]), (T)inv,
                                  (T)cb, (T)cc);
            }
        }
        free(part);
    }
    free(w);
    return 0;
}

/* ---- group normalization: x is N x C x HW, rows (n, g) of cpg = C/G channels ---- */

/* y over channel c's HW elements of row (n, g) with that channel's coefficients. */
/* dweight[c], dbias[c] from the per-sample partials pdx, pdy (N x C), summed
 * over the samples in order (both group-norm backwards end with it). */
static void LN(gn_param_grads)(const double *pdx, const double *pdy, int64_t N, int64_t C,
                               int64_t c, double *dweight, double *dbias)
{
    double sw = 0, sb = 0;
    for (int64_t n = 0; n < N; n++) {
        sw += pdx[n * C + c];
        sb += pdy[n * C + c];
    }
    dweight[c] = sw;
    dbias[c] = sb;
}

static void LN(gn_channel_apply)(const T *x, T *y, int64_t hw, T mh, T ml, T a, T b)
{
    for (int64_t k = 0; k < hw; k += BN_RUN)
        LN(run_apply)(x + k, y + k, bn_min64(BN_RUN, hw - k), mh, ml, a, b, BN_ACT_NONE, 0);
}

int LN(bn_group_norm)(const T *x, T *y, int64_t N, int64_t C, int64_t HW, int64_t G,
                      const double *weight, const double *bias, double eps, double *mean,
                      double *invstd, int n_threads)
{
    if (G < 1 || C < 0 || C % G != 0 || HW < 0 || N < 0 || (N > 0 && G > INT64_MAX / N) ||
        (HW > 0 && C / G > INT64_MAX / HW) ||
        LN(bad_norm_args)(N * G, C / G * HW, x, y, NULL, mean, invstd, n_threads) || bn_bad_eps(eps))
        return BN_EINVAL;
    int64_t cpg = C / G, len = cpg * HW, rows = N * G;
    if (len > BN_GN_ROW_MAX) {
        /* long rows: statistics split into runs across threads, then the
         * per-(n, c) affine map */
        bn_shape s = {1, rows, len}, sa = {1, N * C, HW};
        double *co = (double *)malloc(sizeof(double) * 3 * (size_t)bn_max64(1, N * C));
        int err = co ? LN(bn_stats)(x, s, mean, invstd, n_threads) : BN_ENOMEM;
        if (!err) {
            for (int64_t r = 0; r < rows; r++)
                invstd[r] = bn_invstd(invstd[r] / (double)len, eps);
            for (int64_t i = 0; i < N * C; i++) {
                int64_t r = (i / C) * G + (i % C) / cpg;
                co[i] = mean[r];
                co[N * C + i] = invstd[r] * (weight ? weight[i % C] : 1.0);
                co[2 * N * C + i] = bias ? bias[i % C] : 0.0;
            }
            LN(bn_apply)(x, y, sa, co, co + N * C, co + 2 * N * C, BN_ACT_NONE, 0, n_threads);
        }
        free(co);
        return err;
    }
    T *wb = LN(ln_params)(weight, bias, C);
    if (!wb) return BN_ENOMEM;
    int nt = bn_threads_for(n_threads, rows * len, rows);
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
    for (int64_t r = 0; r < rows; r++) {
        const T *xr = x + r * len;
        T *yr = y + r * len;
        int64_t c0 = (r % G) * cpg;
        double mo[2];
        LN(ln_row_moments)(xr, len, mo);
        double inv = bn_invstd(mo[1] / (double)len, eps);
        mean[r] = mo[0];
        invstd[r] = inv;
        if (HW == 1) { /* (N, C) input: per-element weights, as layer norm */
            if (LN(overflows)(inv))
                LN(wide_apply)(xr, yr, len, mo[0], inv, weight ? weight + c0 : NULL,
                               bias ? bias + c0 : NULL, 0);
            else
                LN(ln_seg_apply)(xr, yr, len, LN_SPLIT(mo[0]), (T)inv, wb + c0, wb + C + c0);
            continue;
        }
        for (int64_t c = 0; c < cpg; c++) {
            double a = inv * (weight ? weight[c0 + c] : 1.0), b = bias ? bias[c0 + c] : 0.0;
            if (LN(overflows)(a))
                LN(wide_apply)(xr + c * HW, yr + c * HW, HW, mo[0], a, NULL, NULL, b);
            else
                LN(gn_channel_apply)(xr + c * HW, yr + c * HW, HW, LN_SPLIT(mo[0]), (T)a, (T)b);
        }
    }
    free(wb);
    return 0;
}

/* {sum dy, sum dy*(x - m)} of a short run (n < BN_GN_SHORT, e.g. a 7x7
 * channel): eight lanes closed by a tree, so the closing reduction costs less
 * than run_dot's many-lane chain on such runs. */
BN_CLONES static void LN(gn_short_dot)(const T *BN_RESTRICT dy, const T *BN_RESTRICT x,
                                       int64_t n, double m, double *out)
{
    double a1[8] = {0}, a2[8] = {0};
    int64_t nv = n - n % 8, i;
    for (i = 0; i < nv; i += 8)
        for (int l = 0; l < 8; l++) {
            double g = dy[i + l];
            a1[l] += g;
            a2[l] += g * ((double)x[i + l] - m);
        }
    for (; i < n; i++) {
        double g = dy[i];
        a1[i - nv] += g;
        a2[i - nv] += g * ((double)x[i] - m);
    }
    for (int l = 0; l < 4; l++) {
        a1[l] += a1[l + 4];
        a2[l] += a2[l + 4];
    }
    out[0] = (a1[0] + a1[1]) + (a1[2] + a1[3]);
    out[1] = (a2[0] + a2[1]) + (a2[2] + a2[3]);
}

/* Backward for long groups: the batch-norm reductions and dx kernels over the
 * (1, N*C, HW) view, which split long rows across threads. */
static int LN(gn_backward_long)(const T *dy, const T *x, T *dx, int64_t N, int64_t C,
                                int64_t HW, int64_t G, const double *mean,
                                const double *invstd, const double *weight, double *dweight,
                                double *dbias, int n_threads)
{
    int64_t NC = N * C, cpg = C / G;
    double len = (double)(cpg * HW);
    bn_shape s = {1, NC, HW};
    double *co = (double *)malloc(sizeof(double) * 6 * (size_t)bn_max64(1, NC));
    if (!co) return BN_ENOMEM;
    double *m = co, *sdy = co + NC, *sdx = co + 2 * NC, *a = co + 3 * NC, *b = co + 4 * NC,
           *c = co + 5 * NC;
    for (int64_t i = 0; i < NC; i++) m[i] = mean[(i / C) * G + (i % C) / cpg];
    int err = LN(bn_backward_reduce)(dy, x, NULL, s, m, BN_ACT_NONE, 0, sdy, sdx, n_threads);
    if (!err) {
        for (int64_t r = 0; r < N * G; r++) {
            int64_t i0 = (r / G) * C + (r % G) * cpg;
            double sg = 0, sgx = 0, inv = invstd[r];
            for (int64_t j = 0; j < cpg; j++) {
                double wj = weight ? weight[(r % G) * cpg + j] : 1.0;
                sg += wj * sdy[i0 + j];
                sgx += wj * sdx[i0 + j];
            }
            for (int64_t j = 0; j < cpg; j++) {
                a[i0 + j] = inv * (weight ? weight[(r % G) * cpg + j] : 1.0);
                b[i0 + j] = -inv * inv * inv * sgx / len;
                c[i0 + j] = -inv * sg / len;
            }
        }
        for (int64_t ch = 0; ch < C; ch++) {
            double sw = 0, sb = 0;
            for (int64_t n = 0; n < N; n++) {
                sw += sdx[n * C + ch] * invstd[n * G + ch / cpg];
                sb += sdy[n * C + ch];
            }
            dweight[ch] = sw;
            dbias[ch] = sb;
        }
        LN(bn_backward_apply)(dy, x, NULL, dx, s, m, a, b, c, BN_ACT_NONE, 0, n_threads);
    }
    free(co);
    return err;
}

int LN(bn_group_norm_backward)(const T *dy, const T *x, T *dx, int64_t N, int64_t C,
                               int64_t HW, int64_t G, const double *mean,
                               const double *invstd, const double *weight, double *dweight,
                               double *dbias, int n_threads)
{
    if (G < 1 || C < 0 || C % G != 0 || HW < 0 || N < 0 || (N > 0 && G > INT64_MAX / N) ||
        (HW > 0 && C / G > INT64_MAX / HW) ||
        LN(bad_norm_args)(N * G, C / G * HW, x, dx, dy, mean, invstd, n_threads) ||
        BN_MISSING(dy, N * C * HW) || BN_MISSING(dweight, C) || BN_MISSING(dbias, C))
        return BN_EINVAL;
    int64_t cpg = C / G, len = cpg * HW, rows = N * G;
    double dlen = (double)len;
    if (len > BN_GN_ROW_MAX)
        return LN(gn_backward_long)(dy, x, dx, N, C, HW, G, mean, invstd, weight, dweight,
                                    dbias, n_threads);
    /* per (n, c): sum dy and sum dy*xhat, then summed over n in order */
    double *part = (double *)malloc(sizeof(double) * 2 * (size_t)bn_max64(1, N * C));
    T *w = LN(ln_params)(weight, NULL, C);
    if (!part || !w) {
        free(part);
        free(w);
        return BN_ENOMEM;
    }
    double *pdy = part, *pdx = part + N * C;
    int nt = bn_threads_for(n_threads, rows * len, rows);
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; r++) {
            const T *dr = dy + r * len, *xr = x + r * len;
            int64_t c0 = (r % G) * cpg, i0 = (r / G) * C + c0;
            double m = mean[r], inv = invstd[r], sums[2] = {0, 0};
            if (HW == 1) {
                memset(pdy + i0, 0, sizeof(double) * (size_t)cpg);
                memset(pdx + i0, 0, sizeof(double) * (size_t)cpg);
                LN(ln_seg_sums)(dr, xr, w + c0, len, m, inv, pdx + i0, pdy + i0, sums);
            } else {
                for (int64_t c = 0; c < cpg; c++) {
                    double sc[2] = {0, 0}, part2[2];
                    for (int64_t k = 0; k < HW; k += BN_RUN) {
                        int64_t o = c * HW + k, n = bn_min64(BN_RUN, HW - k);
                        if (n < BN_GN_SHORT)
                            LN(gn_short_dot)(dr + o, xr + o, n, m, part2);
                        else
                            LN(run_dot)(dr + o, xr + o, NULL, n, 1, 0, m, BN_ACT_NONE, 0, 1, part2);
                        sc[0] += part2[0];
                        sc[1] += part2[1];
                    }
                    pdy[i0 + c] = sc[0];
                    pdx[i0 + c] = sc[1] * inv;
                    sums[0] += sc[0] * (double)w[c0 + c];
                    sums[1] += sc[1] * (double)w[c0 + c];
                }
            }
            /* dx = inv*(g - mean(g) - xhat*mean(g*xhat)) over the group, g = dy*w */
            double bcoef = -inv * inv * inv * sums[1] / dlen, ccoef = -inv * sums[0] / dlen;
            /* the same with inv factored out, for run_dx: inv^3 * sums[1] ~ 1/std^2 would
             * leave float's range when std does, inv^2 * sums[1] ~ 1/std does not */
            double bk = -inv * inv * sums[1] / dlen, ck = -sums[0] / dlen;
            if (HW == 1) {
                if (LN(overflows)(inv) || LN(overflows)(bcoef) || LN(overflows)(ccoef))
                    LN(wide_dx)(dr, xr, dx + r * len, len, weight ? weight + c0 : NULL, 1, m, inv,
                                bcoef, ccoef, 1);
                else
                    LN(ln_seg_dx)(dr, xr, dx + r * len, len, w + c0, LN_SPLIT(m), (T)inv,
                                  (T)bcoef, (T)ccoef);
                continue;
            }
            if (LN(overflows)(inv) || LN(overflows)(bk)) {
                for (int64_t c = 0; c < cpg; c++)
                    LN(wide_dx)(dr + c * HW, xr + c * HW, dx + r * len + c * HW, HW, NULL,
                                weight ? weight[c0 + c] : 1.0, m, 1, bk, ck, inv);
                continue;
            }
            for (int64_t c = 0; c < cpg; c++)
                for (int64_t k = 0; k < HW; k += BN_RUN) {
                    int64_t o = c * HW + k;
                    LN(run_dx)(dr + o, xr + o, NULL, dx + r * len + o, bn_min64(BN_RUN, HW - k),
                               LN_SPLIT(m), (T)w[c0 + c], (T)bk, (T)ck, (T)inv, BN_ACT_NONE, 0, 1);
                }
        }
#pragma omp for schedule(static)
        for (int64_t c = 0; c < C; c++)
            LN(gn_param_grads)(pdx, pdy, N, C, c, dweight, dbias);
    }
    free(part);
    free(w);
    return 0;
}

/* ---- group normalization, channels last: per sample n an S x C block with C
 * contiguous (NHWC, NLC); rows (n, g) are the S x cpg sub-blocks ----------------
 * Units are (sample, block of rows) with a block height fixed by C only, so
 * the per-column partials, and their merge order, do not depend on the thread
 * count. (N, P, C, Q) input with P, Q > 1 runs here too as S = P rows of
 * C*Q columns, each channel repeated Q times (the Python layer expands the
 * parameters). */

#ifndef BN_GN_CL_ELEMS
#define BN_GN_CL_ELEMS 16384       /* channels last: elements per unit (rows x C) */
#endif

static int64_t LN(gn_cl_rows)(int64_t S, int64_t C)
{
    return bn_max64(1, bn_min64(S, BN_GN_CL_ELEMS / bn_max64(1, C)));
}

static int LN(gn_cl_bad)(int64_t N, int64_t S, int64_t C, int64_t G, const T *x, const T *y,
                         const T *dy, const double *mean, const double *invstd, int n_threads)
{
    return G < 1 || C < 0 || C % G != 0 || S < 0 || N < 0 || (N > 0 && G > INT64_MAX / N) ||
           (S > 0 && C / G > INT64_MAX / S) ||
           LN(bad_norm_args)(N * G, C / G * S, x, y, dy, mean, invstd, n_threads);
}

/* Per (n, g): Chan's merge of the per-(unit, column) partials `part` (mean,
 * M2 pairs, 2*C per unit), block by block for each channel in order. */
static void LN(gn_cl_merge)(const double *part, int64_t r, int64_t S, int64_t C, int64_t G,
                            int64_t B, double *mo)
{
    int64_t nb = bn_cdiv(S, B), cpg = C / G, n = r / G, c0 = (r % G) * cpg;
    double cnt = 0, m = 0, q = 0;
    for (int64_t c = c0; c < c0 + cpg; c++)
        for (int64_t b = 0; b < nb; b++) {
            const double *pu = part + 2 * C * (n * nb + b);
            bn_chan(&cnt, &m, &q, (double)bn_min64(B, S - b * B), pu[2 * c], pu[2 * c + 1]);
        }
    mo[0] = m;
    mo[1] = q;
}

int LN(bn_group_norm_cl)(const T *x, T *y, int64_t N, int64_t S, int64_t C, int64_t G,
                         const double *weight, const double *bias, double eps, double *mean,
                         double *invstd, int n_threads)
{
    if (LN(gn_cl_bad)(N, S, C, G, x, y, NULL, mean, invstd, n_threads) || bn_bad_eps(eps))
        return BN_EINVAL;
    int64_t cpg = C / G, B = LN(gn_cl_rows)(S, C), nb = bn_cdiv(S, B), units = N * nb;
    double len = (double)(cpg * S);
    double *part = (double *)malloc(sizeof(double) * (2 * (size_t)(units * C) + 1));
    /* per-sample column coefficients in T: mean (split), scale, shift */
    T *co = (T *)malloc(sizeof(T) * (4 * (size_t)(N * C) + 1));
    char *wide = (char *)calloc((size_t)(N * G) + 1, 1);  /* per (n, g): coefficients beyond T */
    if (!part || !co || !wide) {
        free(part);
        free(co);
        free(wide);
        return BN_ENOMEM;
    }
    T *mh = co, *ml = co + N * C, *ka = co + 2 * N * C, *kb = co + 3 * N * C;
    int nt = bn_threads_for(n_threads, N * S * C, units);
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
#pragma omp for schedule(static)
        for (int64_t u = 0; u < units; u++) {
            int64_t n = u / nb, r0 = (u % nb) * B;
            LN(tile_moments)(x + (n * S + r0) * C, bn_min64(B, S - r0), C, C, part + 2 * C * u);
        }
#pragma omp for schedule(static)
        for (int64_t r = 0; r < N * G; r++) {
            double mo[2];
            LN(gn_cl_merge)(part, r, S, C, G, B, mo);
            double inv = bn_invstd(mo[1] / len, eps);
            mean[r] = mo[0];
            invstd[r] = inv;
            int64_t n = r / G, c0 = (r % G) * cpg;
            for (int64_t c = c0; c < c0 + cpg; c++) {
                double a = inv * (weight ? weight[c] : 1.0);
                if (LN(overflows)(a)) wide[r] = 1;
                mh[n * C + c] = (T)mo[0];
                ml[n * C + c] = (T)(mo[0] - (double)(T)mo[0]);
                ka[n * C + c] = (T)a;
                kb[n * C + c] = bias ? (T)bias[c] : (T)0;
            }
        }
#pragma omp for schedule(static)
        for (int64_t u = 0; u < units; u++) {
            int64_t n = u / nb, r0 = (u % nb) * B, nr = bn_min64(B, S - r0);
            int64_t o = (n * S + r0) * C;
            if (!memchr(wide + n * G, 1, (size_t)G)) {
                LN(tile_apply)(x + o, y + o, nr, C, C, mh + n * C, ml + n * C, ka + n * C,
                               kb + n * C, BN_ACT_NONE, 0);
                continue;
            }
            for (int64_t i = 0; i < nr; i++)  /* coefficients beyond T: in double */
                for (int64_t c = 0; c < C; c++) {
                    int64_t g = n * G + c / cpg;
                    y[o + i * C + c] = (T)(((double)x[o + i * C + c] - mean[g]) * invstd[g] *
                                           (weight ? weight[c] : 1.0) + (bias ? bias[c] : 0.0));
                }
        }
    }
    free(part);
    free(co);
    free(wide);
    return 0;
}

int LN(bn_group_norm_cl_backward)(const T *dy, const T *x, T *dx, int64_t N, int64_t S,
                                  int64_t C, int64_t G, const double *mean,
                                  const double *invstd, const double *weight, double *dweight,
                                  double *dbias, int n_threads)
{
    if (LN(gn_cl_bad)(N, S, C, G, x, dx, dy, mean, invstd, n_threads) ||
        BN_MISSING(dy, N * C * S) || BN_MISSING(dweight, C) || BN_MISSING(dbias, C))
        return BN_EINVAL;
    int64_t cpg = C / G, B = LN(gn_cl_rows)(S, C), nb = bn_cdiv(S, B), units = N * nb;
    double len = (double)(cpg * S);
    size_t nc = (size_t)(N * C);
    /* per (unit, column) {sum dy, sum dy*(x - m)}; per (n, c) the mean as a
     * column, then sum dy and sum dy*xhat */
    double *part = (double *)malloc(sizeof(double) *
                                    (2 * (size_t)(units * C) + 3 * nc + 2 * (size_t)(N * G) + 1));
    T *co = (T *)malloc(sizeof(T) * (6 * nc + 1));
    char *wide = (char *)calloc((size_t)(N * G) + 1, 1);
    if (!part || !co || !wide) {
        free(part);
        free(co);
        free(wide);
        return BN_ENOMEM;
    }
    double *mcol = part + 2 * units * C, *pdy = mcol + nc, *pdx = pdy + nc, *rb = pdx + nc;
    T *mh = co, *ml = co + nc, *ka = co + 2 * nc, *kb = co + 3 * nc, *kc = co + 4 * nc,
      *kk = co + 5 * nc;
    int nt = bn_threads_for(n_threads, N * S * C, units);
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
#pragma omp for schedule(static)
        for (int64_t i = 0; i < N * C; i++) mcol[i] = mean[(i / C) * G + (i % C) / cpg];
#pragma omp for schedule(static)
        for (int64_t u = 0; u < units; u++) {
            int64_t n = u / nb, r0 = (u % nb) * B, o = (n * S + r0) * C;
            LN(tile_dot)(dy + o, x + o, NULL, bn_min64(B, S - r0), C, C, mcol + n * C,
                         BN_ACT_NONE, 0, 1, part + 2 * C * u, NULL, NULL);
        }
#pragma omp for schedule(static)
        for (int64_t r = 0; r < N * G; r++) {
            int64_t n = r / G, c0 = (r % G) * cpg;
            double inv = invstd[r], m = mean[r], s0 = 0, s1 = 0;
            for (int64_t c = c0; c < c0 + cpg; c++) {
                double a = 0, b = 0, w = weight ? weight[c] : 1.0;
                for (int64_t blk = 0; blk < nb; blk++) {
                    a += part[2 * C * (n * nb + blk) + 2 * c];
                    b += part[2 * C * (n * nb + blk) + 2 * c + 1];
                }
                pdy[n * C + c] = a;
                pdx[n * C + c] = b * inv;
                s0 += w * a;
                s1 += w * b;
            }
            /* dx = inv*(g - mean(g) - xhat*mean(g*xhat)), g = dy*w, with inv
             * factored out: (g + (x - m)*bk + ck) * inv keeps float's range */
            double bk = -inv * inv * s1 / len, ck = -s0 / len;
            rb[2 * r] = bk;
            rb[2 * r + 1] = ck;
            wide[r] = LN(overflows)(inv) || LN(overflows)(bk) || LN(overflows)(ck);
            for (int64_t c = c0; c < c0 + cpg; c++) {
                mh[n * C + c] = (T)m;
                ml[n * C + c] = (T)(m - (double)(T)m);
                ka[n * C + c] = weight ? (T)weight[c] : (T)1;
                kb[n * C + c] = (T)bk;
                kc[n * C + c] = (T)ck;
                kk[n * C + c] = (T)inv;
            }
        }
#pragma omp for schedule(static)
        for (int64_t u = 0; u < units; u++) {
            int64_t n = u / nb, r0 = (u % nb) * B, nr = bn_min64(B, S - r0);
            int64_t o = (n * S + r0) * C;
            if (!memchr(wide + n * G, 1, (size_t)G)) {
                LN(tile_dx)(dy + o, x + o, NULL, dx + o, nr, C, C, mh + n * C, ml + n * C,
                            ka + n * C, kb + n * C, kc + n * C, kk + n * C, BN_ACT_NONE, 0, 1);
                continue;
            }
            for (int64_t g = n * G; g < (n + 1) * G; g++) {  /* in double */
                int64_t c0 = (g % G) * cpg;
                double inv = invstd[g], bk = rb[2 * g], ck = rb[2 * g + 1];
                for (int64_t i = 0; i < nr; i++)
                    for (int64_t c = c0; c < c0 + cpg; c++) {
                        int64_t e = o + i * C + c;
                        dx[e] = (T)(((double)dy[e] * (weight ? weight[c] : 1.0) +
                                     ((double)x[e] - mean[g]) * bk + ck) * inv);
                    }
            }
        }
#pragma omp for schedule(static)
        for (int64_t c = 0; c < C; c++)
            LN(gn_param_grads)(pdx, pdy, N, C, c, dweight, dbias);
    }
    free(part);
    free(co);
    free(wide);
    return 0;
}

/* ---- RMS normalization: y = x * invrms[r] * weight[j] per row ---------------------
 * invrms = bn_invstd(mean(x^2), eps), the sum of squares in double; rows of
 * up to BN_LN_ROW_MAX one per thread, longer ones in chunks of BN_RUN whose
 * partial sums are added in chunk order. */

/* sum of squares of n values in double over BN_LANES lanes */
BN_CLONES static void LN(rms_sumsq)(const T *BN_RESTRICT x, int64_t n, double *out)
{
    double a[BN_LANES] = {0}, s = 0;
    int64_t nv = n - n % BN_LANES, i;
    for (i = 0; i < nv; i += BN_LANES)
        for (int l = 0; l < BN_LANES; l++) a[l] += (double)x[i + l] * (double)x[i + l];
    for (; i < n; i++) s += (double)x[i] * (double)x[i];
    for (int l = 0; l < BN_LANES; l++) s += a[l];
    *out = s;
}

/* y = x * s * w over n values; in double when s leaves T's range */
BN_CLONES static void LN(rms_seg_apply)(const T *x, T *y, int64_t n, double s,
                                        const T *BN_RESTRICT w, const double *wd)
{
    if (LN(overflows)(s)) {
        for (int64_t j = 0; j < n; j++) y[j] = (T)((double)x[j] * s * (wd ? wd[j] : 1.0));
        return;
    }
    T st = (T)s;
    for (int64_t j = 0; j < n; j++) y[j] = x[j] * st * w[j];
}

int LN(bn_rms_norm)(const T *x, T *y, int64_t rows, int64_t cols, const double *weight,
                    double eps, double *invrms, int n_threads)
{
    if (LN(bad_norm_args)(rows, cols, x, y, NULL, invrms, invrms, n_threads) || bn_bad_eps(eps))
        return BN_EINVAL;
    T *w = LN(ln_params)(weight, NULL, cols);
    if (!w) return BN_ENOMEM;
    double dcols = (double)cols;
    if (cols <= BN_LN_ROW_MAX) {
        int nt = bn_threads_for(n_threads, rows * cols, rows);
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
        for (int64_t r = 0; r < rows; r++) {
            double ss;
            LN(rms_sumsq)(x + r * cols, cols, &ss);
            invrms[r] = bn_invstd(ss / dcols, eps);
            LN(rms_seg_apply)(x + r * cols, y + r * cols, cols, invrms[r], w, weight);
        }
        free(w);
        return 0;
    }
    int64_t kc = bn_cdiv(cols, BN_RUN);
    double *part = (double *)malloc(sizeof(double) * (size_t)(rows * kc + 1));
    if (!part) {
        free(w);
        return BN_ENOMEM;
    }
    int nt = bn_threads_for(n_threads, rows * cols, rows * kc);
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
#pragma omp for schedule(static)
        for (int64_t u = 0; u < rows * kc; u++) {
            int64_t r = u / kc, j0 = (u % kc) * BN_RUN;
            LN(rms_sumsq)(x + r * cols + j0, bn_min64(BN_RUN, cols - j0), part + u);
        }
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; r++) {
            double ss = 0;
            for (int64_t k = 0; k < kc; k++) ss += part[r * kc + k];
            invrms[r] = bn_invstd(ss / dcols, eps);
        }
#pragma omp for schedule(static)
        for (int64_t u = 0; u < rows * kc; u++) {
            int64_t r = u / kc, j0 = (u % kc) * BN_RUN;
            LN(rms_seg_apply)(x + r * cols + j0, y + r * cols + j0, bn_min64(BN_RUN, cols - j0),
                              invrms[r], w + j0, weight ? weight + j0 : NULL);
        }
    }
    free(part);
    free(w);
    return 0;
}

/* {sum dy*w*x} of a row segment, and pw[j] += dy*x*s (dweight's partials). */
BN_CLONES static void LN(rms_seg_sums)(const T *BN_RESTRICT dy, const T *BN_RESTRICT x,
                                       const T *BN_RESTRICT w, int64_t n, double s,
                                       double *BN_RESTRICT pw, double *out)
{
    double a[BN_LANES] = {0}, t = 0;
    int64_t nv = n - n % BN_LANES, i;
    for (i = 0; i < nv; i += BN_LANES)
        for (int l = 0; l < BN_LANES; l++) {
            double gx = (double)dy[i + l] * (double)x[i + l];
            a[l] += gx * (double)w[i + l];
            pw[i + l] += gx * s;
        }
    for (; i < n; i++) {
        double gx = (double)dy[i] * (double)x[i];
        t += gx * (double)w[i];
        pw[i] += gx * s;
    }
    for (int l = 0; l < BN_LANES; l++) t += a[l];
    *out = t;
}

/* dx = (dy*w + x*bk) * s over a row segment; in double when s or bk leave T's range */
BN_CLONES static void LN(rms_seg_dx)(const T *dy, const T *x, T *dx, int64_t n,
                                     const T *BN_RESTRICT w, const double *wd, double bk,
                                     double s)
{
    if (LN(overflows)(s) || LN(overflows)(bk)) {
        for (int64_t j = 0; j < n; j++)
            dx[j] = (T)(((double)dy[j] * (wd ? wd[j] : 1.0) + (double)x[j] * bk) * s);
        return;
    }
    T b = (T)bk, st = (T)s;
    for (int64_t j = 0; j < n; j++) dx[j] = (dy[j] * w[j] + x[j] * b) * st;
}

int LN(bn_rms_norm_backward)(const T *dy, const T *x, T *dx, int64_t rows, int64_t cols,
                             const double *invrms, const double *weight, double *dweight,
                             int n_threads)
{
    if (LN(bad_norm_args)(rows, cols, x, dx, dy, invrms, invrms, n_threads) ||
        BN_MISSING(dy, rows * cols) || BN_MISSING(dweight, cols))
        return BN_EINVAL;
    T *w = LN(ln_params)(weight, NULL, cols);
    if (!w) return BN_ENOMEM;
    double dcols = (double)cols;
    /* fixed blocks of rows (a function of the shape only), each with its
     * per-column partials of dweight, merged in block order; long rows in
     * chunks of BN_RUN whose row sums are added in chunk order */
    int64_t kc = cols <= BN_LN_ROW_MAX ? 1 : bn_cdiv(cols, BN_RUN);
    int64_t ck = cols <= BN_LN_ROW_MAX ? bn_max64(cols, 1) : BN_RUN;
    int64_t nb = bn_max64(1, bn_min64(bn_min64(bn_cdiv(rows, 8), BN_LN_MAX_BLOCKS),
                                      BN_LN_SCRATCH / (8 * bn_max64(1, cols))));
    int64_t per = bn_cdiv(bn_max64(rows, 1), nb);
    nb = bn_cdiv(bn_max64(rows, 1), per);
    double *part = (double *)calloc((size_t)(nb * cols + rows * kc) + 1, sizeof(double));
    if (!part) {
        free(w);
        return BN_ENOMEM;
    }
    double *rs = part + nb * cols;
    int nt = bn_threads_for(n_threads, rows * cols, nb * kc);
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
#pragma omp for schedule(static)
        for (int64_t u = 0; u < nb * kc; u++) {
            int64_t blk = u / kc, j0 = (u % kc) * ck, len = bn_min64(ck, cols - j0);
            for (int64_t r = blk * per; r < bn_min64(rows, (blk + 1) * per); r++)
                LN(rms_seg_sums)(dy + r * cols + j0, x + r * cols + j0, w + j0, len, invrms[r],
                                 part + blk * cols + j0, rs + r * kc + u % kc);
        }
#pragma omp for schedule(static)
        for (int64_t u = 0; u < rows * kc; u++) {
            int64_t r = u / kc, j0 = (u % kc) * ck, len = bn_min64(ck, cols - j0);
            double s = invrms[r], t = 0;
            for (int64_t k = 0; k < kc; k++) t += rs[r * kc + k];
            /* dx = s*(g - x * s^2 * mean(g*x)), g = dy*w */
            LN(rms_seg_dx)(dy + r * cols + j0, x + r * cols + j0, dx + r * cols + j0, len, w + j0,
                           weight ? weight + j0 : NULL, -s * s * t / dcols, s);
        }
#pragma omp for schedule(static)
        for (int64_t j = 0; j < cols; j++) {
            double sw = 0;
            for (int64_t blk = 0; blk < nb; blk++) sw += part[blk * cols + j];
            dweight[j] = sw;
        }
    }
    free(part);
    free(w);
    return 0;
}

#undef LN_SPLIT
#undef LN
