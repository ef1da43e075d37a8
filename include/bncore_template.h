/* bncore_template.h -- the dtype-generic kernels, included by bncore_impl.h
 * once per element type with T (float or double) and SFX (f32 or f64).
 * Sums are taken in double: exact enough for any float32 input, and the
 * squares of |x| ~ 1e30 do not overflow. */

#define BN_CAT2(a, b) a##_##b
#define BN_CAT(a, b) BN_CAT2(a, b)
#define FN(name) BN_CAT(name, SFX)

/* Activation derivative taken from the output: y > 0 <=> v > 0 for slope >= 0
 * (BN_ACT_RELU runs with slope 0). */
#define BN_GRAD(g, yv, act, slope) \
    ((act) == BN_ACT_NONE ? (g) : ((yv) > 0 ? (g) : (g) * (slope)))

/* Mean and M2 of a contiguous run, exact two-pass: the run is L1-resident
 * for the second pass. out = {mean, M2}. */
BN_CLONES static void FN(run_moments)(const T *BN_RESTRICT x, int64_t n, double *out)
{
    double acc[BN_LANES] = {0}, d1[BN_LANES] = {0}, d2[BN_LANES] = {0};
    int64_t nv = n - n % BN_LANES, i;
    double tot = 0, s1 = 0, s2 = 0;
    for (i = 0; i < nv; i += BN_LANES)
        for (int j = 0; j < BN_LANES; j++) acc[j] += x[i + j];
    for (; i < n; i++) tot += x[i];
    for (int j = 0; j < BN_LANES; j++) tot += acc[j];
    double m = tot / (double)n;
    for (i = 0; i < nv; i += BN_LANES)
        for (int j = 0; j < BN_LANES; j++) {
            double d = (double)x[i + j] - m;
            d1[j] += d;
            d2[j] += d * d;
        }
    for (; i < n; i++) {
        double d = (double)x[i] - m;
        s1 += d;
        s2 += d * d;
    }
    for (int j = 0; j < BN_LANES; j++) {
        s1 += d1[j];
        s2 += d2[j];
    }
    out[0] = m + s1 / (double)n;      /* s1 ~ 0 corrects the rounding of m */
    out[1] = s2 - s1 * s1 / (double)n;
}

/* Per-column mean and M2 of an nr x nc tile with leading dimension ld;
 * out[2*j], out[2*j+1] for column j. Vectorized across columns. */
BN_CLONES static void FN(tile_moments)(const T *BN_RESTRICT x, int64_t nr, int64_t nc,
                                       int64_t ld, double *out)
{
    double m[BN_MAX_COLS] = {0}, d1[BN_MAX_COLS] = {0}, d2[BN_MAX_COLS] = {0};
    for (int64_t r = 0; r < nr; r++) {
        const T *row = x + r * ld;
        for (int64_t j = 0; j < nc; j++) m[j] += row[j];
    }
    for (int64_t j = 0; j < nc; j++) m[j] /= (double)nr;
    for (int64_t r = 0; r < nr; r++) {
        const T *row = x + r * ld;
        for (int64_t j = 0; j < nc; j++) {
            double d = (double)row[j] - m[j];
            d1[j] += d;
            d2[j] += d * d;
        }
    }
    for (int64_t j = 0; j < nc; j++) {
        out[2 * j] = m[j] + d1[j] / (double)nr;
        out[2 * j + 1] = d2[j] - d1[j] * d1[j] / (double)nr;
    }
}

/* y = act((x - m) * a + b) over a contiguous run. */
BN_CLONES static void FN(run_apply)(const T *x, T *y, int64_t n, T m, T a, T b,
                                    bn_act act, T slope)
{
    if (act == BN_ACT_NONE)
        for (int64_t i = 0; i < n; i++) y[i] = (x[i] - m) * a + b;
    else
        for (int64_t i = 0; i < n; i++) {
            T v = (x[i] - m) * a + b;
            y[i] = v < 0 ? v * slope : v;
        }
}

/* Per-column y = act((x - m[j]) * a[j] + b[j]) over an nr x nc tile. */
BN_CLONES static void FN(tile_apply)(const T *x, T *y, int64_t nr, int64_t nc, int64_t ld,
                                     const T *BN_RESTRICT m, const T *BN_RESTRICT a,
                                     const T *BN_RESTRICT b, bn_act act, T slope)
{
    for (int64_t r = 0; r < nr; r++) {
        const T *xr = x + r * ld;
        T *yr = y + r * ld;
        if (act == BN_ACT_NONE)
            for (int64_t j = 0; j < nc; j++) yr[j] = (xr[j] - m[j]) * a[j] + b[j];
        else
            for (int64_t j = 0; j < nc; j++) {
                T v = (xr[j] - m[j]) * a[j] + b[j];
                yr[j] = v < 0 ? v * slope : v;
            }
    }
}

/* out = {sum g, sum g * (x - m)}, g = dy * act'(y), over a contiguous run. */
BN_CLONES static void FN(run_dot)(const T *BN_RESTRICT dy, const T *BN_RESTRICT x,
                                  const T *BN_RESTRICT y, int64_t n, double m,
                                  bn_act act, double slope, double *out)
{
    double a1[BN_LANES] = {0}, a2[BN_LANES] = {0};
    int64_t nv = n - n % BN_LANES, i;
    double s1 = 0, s2 = 0;
    if (act == BN_ACT_NONE) {
        for (i = 0; i < nv; i += BN_LANES)
            for (int j = 0; j < BN_LANES; j++) {
                double g = dy[i + j];
                a1[j] += g;
                a2[j] += g * ((double)x[i + j] - m);
            }
    } else {
        for (i = 0; i < nv; i += BN_LANES)
            for (int j = 0; j < BN_LANES; j++) {
                double g = y[i + j] > 0 ? (double)dy[i + j] : dy[i + j] * slope;
                a1[j] += g;
                a2[j] += g * ((double)x[i + j] - m);
            }
    }
    for (; i < n; i++) {
        double g = BN_GRAD((double)dy[i], y[i], act, slope);
        s1 += g;
        s2 += g * ((double)x[i] - m);
    }
    for (int j = 0; j < BN_LANES; j++) {
        s1 += a1[j];
        s2 += a2[j];
    }
    out[0] = s1;
    out[1] = s2;
}

/* Per-column {sum g, sum g * (x - m[j])} over an nr x nc tile. */
BN_CLONES static void FN(tile_dot)(const T *BN_RESTRICT dy, const T *BN_RESTRICT x,
                                   const T *BN_RESTRICT y, int64_t nr, int64_t nc,
                                   int64_t ld, const double *BN_RESTRICT m,
                                   bn_act act, double slope, double *out)
{
    double a1[BN_MAX_COLS] = {0}, a2[BN_MAX_COLS] = {0};
    for (int64_t r = 0; r < nr; r++) {
        const T *dr = dy + r * ld, *xr = x + r * ld, *yr = y ? y + r * ld : NULL;
        if (act == BN_ACT_NONE)
            for (int64_t j = 0; j < nc; j++) {
                double g = dr[j];
                a1[j] += g;
                a2[j] += g * ((double)xr[j] - m[j]);
            }
        else
            for (int64_t j = 0; j < nc; j++) {
                double g = yr[j] > 0 ? (double)dr[j] : dr[j] * slope;
                a1[j] += g;
                a2[j] += g * ((double)xr[j] - m[j]);
            }
    }
    for (int64_t j = 0; j < nc; j++) {
        out[2 * j] = a1[j];
        out[2 * j + 1] = a2[j];
    }
}

/* dx = a*g + b*(x - m) + c over a contiguous run (x unused when it is NULL). */
BN_CLONES static void FN(run_dx)(const T *dy, const T *x, const T *y, T *dx, int64_t n,
                                 T m, T a, T b, T c, bn_act act, T slope)
{
    if (!x)
        for (int64_t i = 0; i < n; i++) dx[i] = BN_GRAD(dy[i], y[i], act, slope) * a;
    else if (act == BN_ACT_NONE)
        for (int64_t i = 0; i < n; i++) dx[i] = dy[i] * a + (x[i] - m) * b + c;
    else
        for (int64_t i = 0; i < n; i++) {
            T g = y[i] > 0 ? dy[i] : dy[i] * slope;
            dx[i] = g * a + (x[i] - m) * b + c;
        }
}

/* Per-column dx over an nr x nc tile. */
BN_CLONES static void FN(tile_dx)(const T *dy, const T *x, const T *y, T *dx, int64_t nr,
                                  int64_t nc, int64_t ld, const T *BN_RESTRICT m,
                                  const T *BN_RESTRICT a, const T *BN_RESTRICT b,
                                  const T *BN_RESTRICT c, bn_act act, T slope)
{
    for (int64_t r = 0; r < nr; r++) {
        const T *dr = dy + r * ld, *xr = x ? x + r * ld : NULL, *yr = y ? y + r * ld : NULL;
        T *o = dx + r * ld;
        if (!xr)
            for (int64_t j = 0; j < nc; j++) o[j] = BN_GRAD(dr[j], yr[j], act, slope) * a[j];
        else if (act == BN_ACT_NONE)
            for (int64_t j = 0; j < nc; j++) o[j] = dr[j] * a[j] + (xr[j] - m[j]) * b[j] + c[j];
        else
            for (int64_t j = 0; j < nc; j++) {
                T g = yr[j] > 0 ? dr[j] : dr[j] * slope;
                o[j] = g * a[j] + (xr[j] - m[j]) * b[j] + c[j];
            }
    }
}

/* ---- per-unit dispatch on the layout ------------------------------------- */

static void FN(unit_moments)(const bn_plan *p, const T *x, int64_t u, double *part)
{
    if (!p->rows) {
        int64_t off, len, c;
        bn_run_of(p, u, &off, &len, &c);
        FN(run_moments)(x + off, len, part + 2 * u);
    } else {
        int64_t r0, nr, c0, nc;
        bn_tile_of(p, u, &r0, &nr, &c0, &nc);
        FN(tile_moments)(x + r0 * p->s.channels + c0, nr, nc, p->s.channels,
                         part + 2 * ((u % p->nrb) * p->s.channels + c0));
    }
}

static void FN(unit_dot)(const bn_plan *p, const T *dy, const T *x, const T *y,
                         const double *mean, bn_act act, double slope, int64_t u,
                         double *part)
{
    if (!p->rows) {
        int64_t off, len, c;
        bn_run_of(p, u, &off, &len, &c);
        FN(run_dot)(dy + off, x + off, y ? y + off : NULL, len, mean[c], act, slope,
                    part + 2 * u);
    } else {
        int64_t r0, nr, c0, nc, o;
        bn_tile_of(p, u, &r0, &nr, &c0, &nc);
        o = r0 * p->s.channels + c0;
        FN(tile_dot)(dy + o, x + o, y ? y + o : NULL, nr, nc, p->s.channels, mean + c0,
                     act, slope, part + 2 * ((u % p->nrb) * p->s.channels + c0));
    }
}

/* Elementwise pass of unit u: forward (dy == NULL: y = act((x-m)*a + b)) or
 * backward (dx = a*g + b*(x-m) + c). Coefficients are double[C], rounded to T
 * per unit. */
static void FN(unit_elementwise)(const bn_plan *p, const T *dy, const T *x, const T *y,
                                 T *out, const double *m, const double *a,
                                 const double *b, const double *c, bn_act act,
                                 double slope, int64_t u)
{
    if (!p->rows) {
        int64_t off, len, ch;
        bn_run_of(p, u, &off, &len, &ch);
        if (!dy)
            FN(run_apply)(x + off, out + off, len, (T)m[ch], (T)a[ch], (T)b[ch], act, (T)slope);
        else
            FN(run_dx)(dy + off, x && b ? x + off : NULL, y ? y + off : NULL, out + off, len,
                       b ? (T)m[ch] : 0, (T)a[ch], b ? (T)b[ch] : 0, b ? (T)c[ch] : 0,
                       act, (T)slope);
    } else {
        T tm[BN_MAX_COLS], ta[BN_MAX_COLS], tb[BN_MAX_COLS], tc[BN_MAX_COLS];
        int64_t r0, nr, c0, nc, o;
        bn_tile_of(p, u, &r0, &nr, &c0, &nc);
        o = r0 * p->s.channels + c0;
        for (int64_t j = 0; j < nc; j++) {
            tm[j] = m ? (T)m[c0 + j] : 0;
            ta[j] = (T)a[c0 + j];
            tb[j] = b ? (T)b[c0 + j] : 0;
            tc[j] = c ? (T)c[c0 + j] : 0;
        }
        if (!dy)
            FN(tile_apply)(x + o, out + o, nr, nc, p->s.channels, tm, ta, tb, act, (T)slope);
        else
            FN(tile_dx)(dy + o, x && b ? x + o : NULL, y ? y + o : NULL, out + o, nr, nc,
                        p->s.channels, tm, ta, tb, tc, act, (T)slope);
    }
}

/* ---- public entry points --------------------------------------------------- */

int FN(bn_stats)(const T *x, bn_shape s, double *mean, double *m2, int n_threads)
{
    bn_plan p = bn_make_plan(s, sizeof(T));
    double *part = (double *)malloc(sizeof(double) * 2 * (size_t)bn_max64(1, p.nslots));
    if (!part) return BN_ENOMEM;
    int nt = bn_threads(n_threads, &p);
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
#pragma omp for schedule(static)
        for (int64_t u = 0; u < p.nunits; u++) FN(unit_moments)(&p, x, u, part);
#pragma omp for schedule(static)
        for (int64_t c = 0; c < s.channels; c++) bn_channel_moments(&p, part, c, mean + c, m2 + c);
    }
    free(part);
    return 0;
}

void FN(bn_apply)(const T *x, T *y, bn_shape s, const double *center, const double *scale,
                  const double *shift, bn_act act, double slope, int n_threads)
{
    bn_plan p = bn_make_plan(s, sizeof(T));
    int nt = bn_threads(n_threads, &p);
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
    for (int64_t u = 0; u < p.nunits; u++)
        FN(unit_elementwise)(&p, NULL, x, NULL, y, center, scale, shift, NULL, act, slope, u);
}

int FN(bn_train)(const T *x, T *y, bn_shape s, const double *weight, const double *bias,
                 double eps, double *save_mean, double *save_invstd, double *batch_var,
                 bn_act act, double slope, int n_threads)
{
    bn_plan p = bn_make_plan(s, sizeof(T));
    double *part = (double *)malloc(sizeof(double) * (2 * (size_t)p.nslots + 2 * (size_t)s.channels + 1));
    if (!part) return BN_ENOMEM;
    double *scale = part + 2 * p.nslots, *shift = scale + s.channels;
    double count = (double)(s.outer * s.inner);
    int nt = bn_threads(n_threads, &p);
#pragma omp parallel num_threads(nt) if (nt > 1)
    for (int64_t r = 0; r < p.nrounds; r++) {
        int64_t u0, u1, c0, c1;
        bn_round(&p, r, &u0, &u1, &c0, &c1);
#pragma omp for schedule(static)
        for (int64_t u = u0; u < u1; u++) FN(unit_moments)(&p, x, u, part);
#pragma omp for schedule(static)
        for (int64_t c = c0; c < c1; c++) {
            double mean, m2;
            bn_channel_moments(&p, part, c, &mean, &m2);
            double var = m2 / count, invstd = 1.0 / sqrt(var + eps);
            save_mean[c] = mean;
            save_invstd[c] = invstd;
            if (batch_var) batch_var[c] = var;
            scale[c] = (weight ? weight[c] : 1.0) * invstd;
            shift[c] = bias ? bias[c] : 0.0;
        }
        /* the same static schedule hands each thread the units it just reduced */
#pragma omp for schedule(static)
        for (int64_t u = u0; u < u1; u++)
            FN(unit_elementwise)(&p, NULL, x, NULL, y, save_mean, scale, shift, NULL, act, slope, u);
    }
    free(part);
    return 0;
}

int FN(bn_backward_reduce)(const T *dy, const T *x, const T *y, bn_shape s, const double *mean,
                           bn_act act, double slope, double *sum_dy, double *sum_dy_xmu,
                           int n_threads)
{
    bn_plan p = bn_make_plan(s, sizeof(T));
    double *part = (double *)malloc(sizeof(double) * 2 * (size_t)bn_max64(1, p.nslots));
    if (!part) return BN_ENOMEM;
    int nt = bn_threads(n_threads, &p);
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
#pragma omp for schedule(static)
        for (int64_t u = 0; u < p.nunits; u++)
            FN(unit_dot)(&p, dy, x, y, mean, act, slope, u, part);
#pragma omp for schedule(static)
        for (int64_t c = 0; c < s.channels; c++)
            bn_channel_sums(&p, part, c, sum_dy + c, sum_dy_xmu + c);
    }
    free(part);
    return 0;
}

void FN(bn_backward_apply)(const T *dy, const T *x, const T *y, T *dx, bn_shape s,
                           const double *mean, const double *a, const double *b,
                           const double *c0, bn_act act, double slope, int n_threads)
{
    bn_plan p = bn_make_plan(s, sizeof(T));
    int nt = bn_threads(n_threads, &p);
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
    for (int64_t u = 0; u < p.nunits; u++)
        FN(unit_elementwise)(&p, dy, x, y, dx, mean, a, b, c0, act, slope, u);
}

int FN(bn_backward)(const T *dy, const T *x, const T *y, T *dx, bn_shape s, const double *mean,
                    const double *invstd, const double *weight, int training, double *dweight,
                    double *dbias, bn_act act, double slope, int n_threads)
{
    bn_plan p = bn_make_plan(s, sizeof(T));
    double *part = (double *)malloc(sizeof(double) * (2 * (size_t)p.nslots + 3 * (size_t)s.channels + 1));
    if (!part) return BN_ENOMEM;
    double *ca = part + 2 * p.nslots, *cb = ca + s.channels, *cc = cb + s.channels;
    double count = (double)(s.outer * s.inner);
    int nt = bn_threads(n_threads, &p);
#pragma omp parallel num_threads(nt) if (nt > 1)
    for (int64_t r = 0; r < p.nrounds; r++) {
        int64_t u0, u1, c0, c1;
        bn_round(&p, r, &u0, &u1, &c0, &c1);
#pragma omp for schedule(static)
        for (int64_t u = u0; u < u1; u++) FN(unit_dot)(&p, dy, x, y, mean, act, slope, u, part);
#pragma omp for schedule(static)
        for (int64_t c = c0; c < c1; c++) {
            double sg, sgx;
            bn_channel_sums(&p, part, c, &sg, &sgx);
            double k = (weight ? weight[c] : 1.0) * invstd[c];
            dbias[c] = sg;
            dweight[c] = sgx * invstd[c];
            /* dx = k*(g - mean(g) - xhat*mean(g*xhat)), xhat = (x-mean)*invstd */
            ca[c] = k;
            cb[c] = training ? -k * invstd[c] * invstd[c] * sgx / count : 0.0;
            cc[c] = training ? -k * sg / count : 0.0;
        }
#pragma omp for schedule(static)
        for (int64_t u = u0; u < u1; u++)
            FN(unit_elementwise)(&p, dy, x, y, dx, mean, ca, training ? cb : NULL, cc, act,
                                 slope, u);
    }
    free(part);
    return 0;
}

#undef FN
#undef BN_CAT
#undef BN_CAT2
#undef BN_GRAD
