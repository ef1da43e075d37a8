/* bncore_template.h -- the dtype-generic kernels, included by bncore_impl.h
 * once per element type with T (float or double) and SFX (f32 or f64);
 * FN(name), defined there, is name_SFX.
 * Sums are taken in double: exact enough for any float32 input, and the
 * squares of |x| ~ 1e30 (or 1e-30) neither overflow nor underflow. */

/* Activation derivative taken from the output: y > 0 <=> v > 0 for slope >= 0
 * (BN_ACT_RELU runs with slope 0). This macro and BN_PRE serve the scalar
 * tails; the vector loops write v * (c ? one : slope) with opaque constants
 * (BN_OPAQUE). With a literal 1, GCC folds v * 1 and turns the select back
 * into `c ? v * slope : v`, a multiply it may not speculate under the default
 * -ftrapping-math: the loop stays scalar with a branch, ~15x slower on mixed
 * signs. A second mask in the same loop compares with an opaque zero, or jump
 * threading merges both selects into one branch again. v * one is exact. */
#define BN_OPAQUE(type, name, value) \
    volatile type name##_v = (value); \
    type name = name##_v
#define BN_GRAD(g, yv, act, slope) \
    ((act) == BN_ACT_NONE ? (g) : ((yv) > 0 ? (g) : (g) * (slope)))
/* The value the backward centers: x, except that negative outputs are scaled
 * by xneg. xneg is 1 normally (an exact no-op) and 1/slope when x is the
 * leaky-ReLU output itself (in-place ABN: x = act^-1(y)). */
#define BN_PRE(xv, yv, act, xneg) \
    ((act) == BN_ACT_NONE || (yv) > 0 ? (xv) : (xv) * (xneg))

/* Mean and M2 of np runs of n values (stride apart) in one pass: deviations
 * from a shift k (the mean of the first few values) summed in double over
 * BN_LANES independent lanes. M2 = sum d^2 - (sum d)^2 / n loses about
 * log2((mean - k)^2 / var) bits of double; k is a mean of BN_SHIFT_LEN
 * samples, so (mean - k)^2 / var <= n / BN_SHIFT_LEN (Samuelson) even for an
 * adversarial run: ~1e-14 relative at worst. out = {mean, M2}.
 * A run's rest after the BN_LANES blocks goes to the first lanes in blocks of
 * BN_LANES_TAIL, and its last few values to lanes of their own: the rest stays
 * vectorized and no scalar chain runs through all np runs. */
BN_CLONES static void FN(run_moments)(const T *BN_RESTRICT x, int64_t n, int64_t np,
                                      int64_t stride, double *out)
{
    double a1[BN_LANES] = {0}, a2[BN_LANES] = {0}, t1[BN_LANES_TAIL] = {0},
           t2[BN_LANES_TAIL] = {0};
    int64_t h = bn_min64(n, BN_SHIFT_LEN), nv = n - n % BN_LANES;
    int64_t nt = n - n % BN_LANES_TAIL, i;
    double k = 0, s1 = 0, s2 = 0, total = (double)(n * np);
    for (i = 0; i < h; i++) k += x[i];
    k /= (double)bn_max64(h, 1);
    for (int64_t q = 0; q < np; q++, x += stride) {
        for (i = 0; i < nv; i += BN_LANES)
            for (int j = 0; j < BN_LANES; j++) {
                double d = (double)x[i + j] - k;
                a1[j] += d;
                a2[j] += d * d;
            }
        for (; i < nt; i += BN_LANES_TAIL)
            for (int j = 0; j < BN_LANES_TAIL; j++) {
                double d = (double)x[i + j] - k;
                a1[j] += d;
                a2[j] += d * d;
            }
        for (; i < n; i++) {
            double d = (double)x[i] - k;
            t1[i - nt] += d;
            t2[i - nt] += d * d;
        }
    }
    for (int j = 0; j < BN_LANES; j++) {
        s1 += a1[j];
        s2 += a2[j];
    }
    for (int j = 0; j < BN_LANES_TAIL; j++) {
        s1 += t1[j];
        s2 += t2[j];
    }
    out[0] = k + s1 / total;
    out[1] = s2 - s1 * s1 / total;
}

/* Per-column mean and M2 of an nr x nc tile with leading dimension ld;
 * out[2*j], out[2*j+1] for column j. One pass, as run_moments, with a
 * per-column shift (the mean of the first BN_SHIFT_ROWS rows); strips of
 * BN_STRIP columns keep the accumulators in L1, and four rows per sweep load
 * and store them once per four rows. */
BN_CLONES static void FN(tile_moments)(const T *BN_RESTRICT x, int64_t nr, int64_t nc,
                                       int64_t ld, double *BN_RESTRICT out)
{
    double k[BN_STRIP], s1[BN_STRIP], s2[BN_STRIP];
    /* a few rows: the first row is shift enough ((mean - k)^2 / var <= nr) */
    int64_t h = nr <= 64 ? 1 : BN_SHIFT_ROWS;
    for (int64_t j0 = 0; j0 < nc; j0 += BN_STRIP) {
        int64_t w = bn_min64(BN_STRIP, nc - j0), r = 0;
        const T *xs = x + j0;
        for (int64_t j = 0; j < w; j++) k[j] = s1[j] = s2[j] = 0;
        for (int64_t i = 0; i < h; i++)
            for (int64_t j = 0; j < w; j++) k[j] += xs[i * ld + j];
        for (int64_t j = 0; j < w; j++) k[j] /= (double)h;
        for (; r + 4 <= nr; r += 4) {
            const T *a = xs + r * ld, *b = a + ld, *c = b + ld, *d = c + ld;
            for (int64_t j = 0; j < w; j++) {
                double e0 = (double)a[j] - k[j], e1 = (double)b[j] - k[j];
                double e2 = (double)c[j] - k[j], e3 = (double)d[j] - k[j];
                s1[j] += (e0 + e1) + (e2 + e3);
                s2[j] += (e0 * e0 + e1 * e1) + (e2 * e2 + e3 * e3);
            }
        }
        for (; r < nr; r++)
            for (int64_t j = 0; j < w; j++) {
                double e = (double)xs[r * ld + j] - k[j];
                s1[j] += e;
                s2[j] += e * e;
            }
        for (int64_t j = 0; j < w; j++) {
            out[2 * (j0 + j)] = k[j] + s1[j] / (double)nr;
            out[2 * (j0 + j) + 1] = s2[j] - s1[j] * s1[j] / (double)nr;
        }
    }
}

/* y = act((x - m) * a + b) over n values. The mean is split as m + ml (ml
 * its rounding residue): x - m is exact for x near m, so float32 output keeps
 * full precision even when |mean| >> std. `one` is an opaque 1 (BN_OPAQUE). */
static inline void FN(apply1)(const T *x, T *y, int64_t n, T m, T ml, T a, T b, bn_act act,
                              T slope, T one)
{
    if (act == BN_ACT_NONE)
        for (int64_t i = 0; i < n; i++) y[i] = ((x[i] - m) - ml) * a + b;
    else
        for (int64_t i = 0; i < n; i++) {
            T v = ((x[i] - m) - ml) * a + b;
            y[i] = v * (v < 0 ? slope : one);
        }
}

/* apply1 over np runs of n values, stride apart. */
BN_CLONES static void FN(runs_apply)(const T *x, T *y, int64_t n, int64_t np, int64_t stride,
                                     T m, T ml, T a, T b, bn_act act, T slope)
{
    BN_OPAQUE(T, one, 1);
    for (int64_t q = 0; q < np; q++, x += stride, y += stride)
        FN(apply1)(x, y, n, m, ml, a, b, act, slope, one);
}

/* One contiguous run. */
static void FN(run_apply)(const T *x, T *y, int64_t n, T m, T ml, T a, T b, bn_act act, T slope)
{
    FN(runs_apply)(x, y, n, 1, 0, m, ml, a, b, act, slope);
}

/* Per-column y = act((x - m[j]) * a[j] + b[j]) over an nr x nc tile. */
BN_CLONES static void FN(tile_apply)(const T *x, T *y, int64_t nr, int64_t nc, int64_t ld,
                                     const T *BN_RESTRICT m, const T *BN_RESTRICT ml,
                                     const T *BN_RESTRICT a, const T *BN_RESTRICT b,
                                     bn_act act, T slope)
{
    BN_OPAQUE(T, one, 1);
    /* in blocks of BN_COEF_BYTES per coefficient array, all rows at a time,
     * so the coefficients stay in L1 beside the row data */
    for (int64_t j0 = 0, bw = BN_COEF_BYTES / (int64_t)sizeof(T); j0 < nc; j0 += bw) {
        int64_t w = bn_min64(bw, nc - j0);
        for (int64_t r = 0; r < nr; r++) {
            const T *xr = x + r * ld + j0;
            T *o = y + r * ld + j0;
            const T *mb = m + j0, *lb = ml + j0, *ab = a + j0, *bb = b + j0;
            if (act == BN_ACT_NONE)
                for (int64_t j = 0; j < w; j++) o[j] = ((xr[j] - mb[j]) - lb[j]) * ab[j] + bb[j];
            else
                for (int64_t j = 0; j < w; j++) {
                    T v = ((xr[j] - mb[j]) - lb[j]) * ab[j] + bb[j];
                    o[j] = v * (v < 0 ? slope : one);
                }
        }
    }
}

/* out = {sum g, sum g * (x - m)}, g = dy * act'(y), over np runs of n
 * values, stride apart; lanes as in run_moments. */
BN_CLONES static void FN(run_dot)(const T *BN_RESTRICT dy, const T *BN_RESTRICT x,
                                  const T *BN_RESTRICT y, int64_t n, int64_t np,
                                  int64_t stride, double m,
                                  bn_act act, double slope, double xneg, double *out)
{
    double a1[BN_LANES] = {0}, a2[BN_LANES] = {0}, t1[BN_LANES_TAIL] = {0},
           t2[BN_LANES_TAIL] = {0};
    BN_OPAQUE(double, one, 1);
    BN_OPAQUE(T, zero, 0);
    int64_t nv = n - n % BN_LANES, nt = n - n % BN_LANES_TAIL, i;
    double s1 = 0, s2 = 0;
    for (int64_t q = 0; q < np; q++, dy += stride, x += stride, y = y ? y + stride : NULL) {
        if (act == BN_ACT_NONE) {
            for (i = 0; i < nv; i += BN_LANES)
                for (int j = 0; j < BN_LANES; j++) {
                    double g = dy[i + j];
                    a1[j] += g;
                    a2[j] += g * ((double)x[i + j] - m);
                }
            for (; i < nt; i += BN_LANES_TAIL)
                for (int j = 0; j < BN_LANES_TAIL; j++) {
                    double g = dy[i + j];
                    a1[j] += g;
                    a2[j] += g * ((double)x[i + j] - m);
                }
        } else {
            for (i = 0; i < nv; i += BN_LANES)
                for (int j = 0; j < BN_LANES; j++) {
                    double g = dy[i + j] * (y[i + j] > 0 ? one : slope);
                    double xv = x[i + j] * (y[i + j] > zero ? one : xneg);
                    a1[j] += g;
                    a2[j] += g * (xv - m);
                }
            for (; i < nt; i += BN_LANES_TAIL)
                for (int j = 0; j < BN_LANES_TAIL; j++) {
                    double g = dy[i + j] * (y[i + j] > 0 ? one : slope);
                    double xv = x[i + j] * (y[i + j] > zero ? one : xneg);
                    a1[j] += g;
                    a2[j] += g * (xv - m);
                }
        }
        for (; i < n; i++) {
            double g = BN_GRAD((double)dy[i], y[i], act, slope);
            t1[i - nt] += g;
            t2[i - nt] += g * (BN_PRE((double)x[i], y[i], act, xneg) - m);
        }
    }
    for (int j = 0; j < BN_LANES; j++) {
        s1 += a1[j];
        s2 += a2[j];
    }
    for (int j = 0; j < BN_LANES_TAIL; j++) {
        s1 += t1[j];
        s2 += t2[j];
    }
    out[0] = s1;
    out[1] = s2;
}

/* Per-column {sum g, sum g * (x - m[j])} over an nr x nc tile, in strips of
 * BN_STRIP columns and two rows per sweep, as tile_moments. dx != NULL (eval
 * mode, act NONE, dx apart from dy and x): also dx = dy * ka[j], as tile_dx,
 * in the same sweep, so dy is read once. */
BN_CLONES static void FN(tile_dot)(const T *BN_RESTRICT dy, const T *BN_RESTRICT x,
                                   const T *BN_RESTRICT y, int64_t nr, int64_t nc,
                                   int64_t ld, const double *BN_RESTRICT m,
                                   bn_act act, double slope, double xneg, double *BN_RESTRICT out,
                                   T *BN_RESTRICT dx, const T *BN_RESTRICT ka)
{
    double a1[BN_STRIP], a2[BN_STRIP];
    BN_OPAQUE(double, one, 1);
    BN_OPAQUE(T, zero, 0);
    for (int64_t j0 = 0; j0 < nc; j0 += BN_STRIP) {
        int64_t w = bn_min64(BN_STRIP, nc - j0), r = 0;
        const double *ms = m + j0;
        for (int64_t j = 0; j < w; j++) a1[j] = a2[j] = 0;
        if (dx) {
            const T *ks = ka + j0;
            for (; r + 2 <= nr; r += 2) {
                const T *d0 = dy + r * ld + j0, *x0 = x + r * ld + j0;
                const T *d1 = d0 + ld, *x1 = x0 + ld;
                T *o0 = dx + r * ld + j0, *o1 = o0 + ld;
                for (int64_t j = 0; j < w; j++) {
                    double g0 = d0[j], g1 = d1[j];
                    a1[j] += g0 + g1;
                    a2[j] += g0 * ((double)x0[j] - ms[j]) + g1 * ((double)x1[j] - ms[j]);
                    o0[j] = d0[j] * ks[j];
                    o1[j] = d1[j] * ks[j];
                }
            }
            for (; r < nr; r++) {
                const T *dr = dy + r * ld + j0, *xr = x + r * ld + j0;
                T *o = dx + r * ld + j0;
                for (int64_t j = 0; j < w; j++) {
                    double g = dr[j];
                    a1[j] += g;
                    a2[j] += g * ((double)xr[j] - ms[j]);
                    o[j] = dr[j] * ks[j];
                }
            }
        }
        if (act == BN_ACT_NONE)
            for (; r + 2 <= nr; r += 2) {
                const T *d0 = dy + r * ld + j0, *x0 = x + r * ld + j0;
                const T *d1 = d0 + ld, *x1 = x0 + ld;
                for (int64_t j = 0; j < w; j++) {
                    double g0 = d0[j], g1 = d1[j];
                    a1[j] += g0 + g1;
                    a2[j] += g0 * ((double)x0[j] - ms[j]) + g1 * ((double)x1[j] - ms[j]);
                }
            }
        for (; r < nr; r++) {
            const T *dr = dy + r * ld + j0, *xr = x + r * ld + j0;
            const T *yr = y ? y + r * ld + j0 : NULL;
            if (act == BN_ACT_NONE)
                for (int64_t j = 0; j < w; j++) {
                    double g = dr[j];
                    a1[j] += g;
                    a2[j] += g * ((double)xr[j] - ms[j]);
                }
            else
                for (int64_t j = 0; j < w; j++) {
                    double g = dr[j] * (yr[j] > 0 ? one : slope);
                    double xv = xr[j] * (yr[j] > zero ? one : xneg);
                    a1[j] += g;
                    a2[j] += g * (xv - ms[j]);
                }
        }
        for (int64_t j = 0; j < w; j++) {
            out[2 * (j0 + j)] = a1[j];
            out[2 * (j0 + j) + 1] = a2[j];
        }
    }
}

/* dx = (a*g + b*(x - m) + c) * k over n values; x == NULL: dx = a*g. `one`
 * and `zero` are opaque (BN_OPAQUE). */
static inline void FN(dx1)(const T *dy, const T *x, const T *y, T *dx, int64_t n, T m, T ml,
                           T a, T b, T c, T k, bn_act act, T slope, T xneg, T one, T zero)
{
    if (!x && act == BN_ACT_NONE)
        for (int64_t i = 0; i < n; i++) dx[i] = dy[i] * a;
    else if (!x)
        for (int64_t i = 0; i < n; i++) dx[i] = dy[i] * (y[i] > 0 ? one : slope) * a;
    else if (act == BN_ACT_NONE)
        for (int64_t i = 0; i < n; i++) dx[i] = (dy[i] * a + ((x[i] - m) - ml) * b + c) * k;
    else
        for (int64_t i = 0; i < n; i++) {
            T g = dy[i] * (y[i] > 0 ? one : slope), xv = x[i] * (y[i] > zero ? one : xneg);
            dx[i] = (g * a + ((xv - m) - ml) * b + c) * k;
        }
}

/* dx1 over np runs of n values, stride apart. */
BN_CLONES static void FN(runs_dx)(const T *dy, const T *x, const T *y, T *dx, int64_t n,
                                  int64_t np, int64_t stride, T m, T ml, T a, T b, T c, T k,
                                  bn_act act, T slope, T xneg)
{
    BN_OPAQUE(T, one, 1);
    BN_OPAQUE(T, zero, 0);
    for (int64_t q = 0; q < np; q++, dy += stride, dx += stride, x = x ? x + stride : NULL,
                 y = y ? y + stride : NULL)
        FN(dx1)(dy, x, y, dx, n, m, ml, a, b, c, k, act, slope, xneg, one, zero);
}

/* One contiguous run. */
static void FN(run_dx)(const T *dy, const T *x, const T *y, T *dx, int64_t n, T m, T ml, T a,
                       T b, T c, T k, bn_act act, T slope, T xneg)
{
    FN(runs_dx)(dy, x, y, dx, n, 1, 0, m, ml, a, b, c, k, act, slope, xneg);
}

/* Per-column dx over an nr x nc tile. */
BN_CLONES static void FN(tile_dx)(const T *dy, const T *x, const T *y, T *dx, int64_t nr,
                                  int64_t nc, int64_t ld, const T *BN_RESTRICT m0,
                                  const T *BN_RESTRICT ml0, const T *BN_RESTRICT a0,
                                  const T *BN_RESTRICT b0, const T *BN_RESTRICT c0,
                                  const T *BN_RESTRICT k0, bn_act act, T slope, T xneg)
{
    BN_OPAQUE(T, one, 1);
    BN_OPAQUE(T, zero, 0);
    /* column blocks as in tile_apply: six coefficient arrays */
    for (int64_t j0 = 0, bw = BN_COEF_BYTES / (int64_t)sizeof(T); j0 < nc; j0 += bw)
    for (int64_t r = 0, w = bn_min64(bw, nc - j0); r < nr; r++) {
        const T *dr = dy + r * ld + j0, *xr = x ? x + r * ld + j0 : NULL;
        const T *yr = y ? y + r * ld + j0 : NULL;
        const T *m = m0 + j0, *ml = ml0 + j0, *a = a0 + j0, *b = b0 + j0, *c = c0 + j0,
                *k = k0 + j0;
        T *o = dx + r * ld + j0;
        int64_t nc = w;
        if (!xr && act == BN_ACT_NONE)
            for (int64_t j = 0; j < nc; j++) o[j] = dr[j] * a[j];
        else if (!xr)
            for (int64_t j = 0; j < nc; j++) o[j] = dr[j] * (yr[j] > 0 ? one : slope) * a[j];
        else if (act == BN_ACT_NONE)
            for (int64_t j = 0; j < nc; j++)
                o[j] = (dr[j] * a[j] + ((xr[j] - m[j]) - ml[j]) * b[j] + c[j]) * k[j];
        else
            for (int64_t j = 0; j < nc; j++) {
                T g = dr[j] * (yr[j] > 0 ? one : slope), xv = xr[j] * (yr[j] > zero ? one : xneg);
                o[j] = (g * a[j] + ((xv - m[j]) - ml[j]) * b[j] + c[j]) * k[j];
            }
    }
}

/* ---- segment layout: short NCHW planes, read in memory order -------------
 * An nr x (ns * n) tile of rows ld apart, each row ns segments of n values
 * (one plane of one channel each). Visiting segments row by row keeps the
 * reads sequential, which strided runs of a few cache lines are not; sums go
 * to BN_LANES_TAIL lanes per segment column, the last n % BN_LANES_TAIL values
 * of each segment to its first lanes. */

/* Per segment column s: out[2s], out[2s+1] = mean, M2 of its nr * n values,
 * deviations from a shift (the mean of the first few values of row 0) as in
 * run_moments. */
BN_CLONES static void FN(seg_moments)(const T *BN_RESTRICT x, int64_t nr, int64_t ns, int64_t n,
                                      int64_t ld, double *BN_RESTRICT out)
{
    enum { L = BN_LANES_TAIL };
    double acc[2 * L * BN_SEG_MAXN], k[BN_SEG_MAXN];
    int64_t h = bn_min64(n, BN_SHIFT_LEN), nt = n - n % L;
    double total = (double)(nr * n);
    for (int64_t q = 0; q < ns; q++) {
        double kq = 0;
        for (int64_t i = 0; i < h; i++) kq += x[q * n + i];
        k[q] = kq / (double)h;
    }
    memset(acc, 0, sizeof(double) * 2 * L * (size_t)ns);
    for (int64_t r = 0; r < nr; r++)
        for (int64_t q = 0; q < ns; q++) {
            const T *xs = x + r * ld + q * n;
            double *a = acc + 2 * L * q, kq = k[q];
            int64_t i = 0;
            for (; i < nt; i += L)
                for (int j = 0; j < L; j++) {
                    double d = (double)xs[i + j] - kq;
                    a[j] += d;
                    a[L + j] += d * d;
                }
            for (int64_t j = 0; j < n - i; j++) {
                double d = (double)xs[i + j] - kq;
                a[j] += d;
                a[L + j] += d * d;
            }
        }
    for (int64_t q = 0; q < ns; q++) {
        double s1 = 0, s2 = 0, *a = acc + 2 * L * q;
        for (int j = 0; j < L; j++) {
            s1 += a[j];
            s2 += a[L + j];
        }
        out[2 * q] = k[q] + s1 / total;
        out[2 * q + 1] = s2 - s1 * s1 / total;
    }
}

/* Per segment column s: {sum g, sum g * (x - m[s])}. */
BN_CLONES static void FN(seg_dot)(const T *BN_RESTRICT dy, const T *BN_RESTRICT x,
                                  const T *BN_RESTRICT y, int64_t nr, int64_t ns, int64_t n,
                                  int64_t ld, const double *BN_RESTRICT m, bn_act act,
                                  double slope, double xneg, double *BN_RESTRICT out)
{
    enum { L = BN_LANES_TAIL };
    double acc[2 * L * BN_SEG_MAXN];
    BN_OPAQUE(double, one, 1);
    BN_OPAQUE(T, zero, 0);
    int64_t nt = n - n % L;
    memset(acc, 0, sizeof(double) * 2 * L * (size_t)ns);
    for (int64_t r = 0; r < nr; r++)
        for (int64_t q = 0; q < ns; q++) {
            int64_t o = r * ld + q * n, i = 0;
            const T *ds = dy + o, *xs = x + o, *ys = y ? y + o : NULL;
            double *a = acc + 2 * L * q, mq = m[q];
            if (act == BN_ACT_NONE) {
                for (; i < nt; i += L)
                    for (int j = 0; j < L; j++) {
                        double gj = ds[i + j];
                        a[j] += gj;
                        a[L + j] += gj * ((double)xs[i + j] - mq);
                    }
            } else {
                for (; i < nt; i += L)
                    for (int j = 0; j < L; j++) {
                        double gj = ds[i + j] * (ys[i + j] > 0 ? one : slope);
                        double xv = xs[i + j] * (ys[i + j] > zero ? one : xneg);
                        a[j] += gj;
                        a[L + j] += gj * (xv - mq);
                    }
            }
            for (int64_t j = 0; j < n - i; j++) {
                double gj = BN_GRAD((double)ds[i + j], ys[i + j], act, slope);
                a[j] += gj;
                a[L + j] += gj * (BN_PRE((double)xs[i + j], ys[i + j], act, xneg) - mq);
            }
        }
    for (int64_t q = 0; q < ns; q++) {
        double s1 = 0, s2 = 0, *a = acc + 2 * L * q;
        for (int j = 0; j < L; j++) {
            s1 += a[j];
            s2 += a[L + j];
        }
        out[2 * q] = s1;
        out[2 * q + 1] = s2;
    }
}

/* apply1 with the coefficients of each segment column. */
BN_CLONES static void FN(seg_apply)(const T *x, T *y, int64_t nr, int64_t ns, int64_t n,
                                    int64_t ld, const T *BN_RESTRICT m, const T *BN_RESTRICT ml,
                                    const T *BN_RESTRICT a, const T *BN_RESTRICT b, bn_act act,
                                    T slope)
{
    BN_OPAQUE(T, one, 1);
    for (int64_t r = 0; r < nr; r++)
        for (int64_t q = 0; q < ns; q++)
            FN(apply1)(x + r * ld + q * n, y + r * ld + q * n, n, m[q], ml[q], a[q], b[q], act,
                       slope, one);
}

/* dx1 with the coefficients of each segment column. */
BN_CLONES static void FN(seg_dx)(const T *dy, const T *x, const T *y, T *dx, int64_t nr,
                                 int64_t ns, int64_t n, int64_t ld, const T *BN_RESTRICT m,
                                 const T *BN_RESTRICT ml, const T *BN_RESTRICT a,
                                 const T *BN_RESTRICT b, const T *BN_RESTRICT c,
                                 const T *BN_RESTRICT k, bn_act act, T slope, T xneg)
{
    BN_OPAQUE(T, one, 1);
    BN_OPAQUE(T, zero, 0);
    for (int64_t r = 0; r < nr; r++)
        for (int64_t q = 0; q < ns; q++) {
            int64_t o = r * ld + q * n;
            FN(dx1)(dy + o, x ? x + o : NULL, y ? y + o : NULL, dx + o, n, m[q], ml[q], a[q],
                    b[q], c[q], k[q], act, slope, xneg, one, zero);
        }
}

#if BN_NT
/* The elementwise passes without an activation, for outputs of BN_STREAM_BYTES
 * and more: the same arithmetic as run_apply/run_dx and tile_apply/tile_dx,
 * vectors written with non-temporal stores. dy == NULL: forward,
 * o = ((x - m) - ml) * a + b; else dx = (dy*a + ((x - m) - ml)*b + c) * k. */

/* a scalar head or tail also bypasses the cache: a line written partly with
 * plain stores and partly with non-temporal ones costs more than either */
static inline void FN(sstream)(T *p, T v)
{
    if (sizeof(T) == 4) {
        int32_t b;
        memcpy(&b, &v, sizeof b);
        _mm_stream_si32((int *)p, b);
    } else {
        long long b;
        memcpy(&b, &v, sizeof b);
        _mm_stream_si64((long long *)p, b);
    }
}

#define BN_NT_ELEM(i, M, L, A, B, C, K) \
    (dy ? (dy[i] * (A) + ((x[i] - (M)) - (L)) * (B) + (C)) * (K) : ((x[i] - (M)) - (L)) * (A) + (B))

/* The kernels for vectors of W bytes under TARGET, stored with STREAM(p, v):
 * defined once per instruction set (bn_cpu_nt picks one at run time). */
#define BN_NT_KERNELS(W, TARGET, STREAM)                                                       \
typedef T FN(vec##W) __attribute__((vector_size(W)));                                          \
                                                                                               \
TARGET static inline FN(vec##W) FN(vload##W)(const T *p)                                       \
{                                                                                              \
    FN(vec##W) v;                                                                              \
    memcpy(&v, p, sizeof v);                                                                   \
    return v;                                                                                  \
}                                                                                              \
                                                                                               \
TARGET static inline void FN(run_nt##W)(const T *dy, const T *x, T *o, int64_t n, T m, T ml,   \
                                        T a, T b, T c, T k)                                    \
{                                                                                              \
    const int64_t vw = W / (int64_t)sizeof(T);                                                 \
    int64_t i = 0;                                                                             \
    for (; i < n && ((uintptr_t)(o + i) & (W - 1)); i++)                                       \
        FN(sstream)(o + i, BN_NT_ELEM(i, m, ml, a, b, c, k));                                  \
    if (dy)                                                                                    \
        for (; i + vw <= n; i += vw)                                                           \
            STREAM(o + i, (FN(vload##W)(dy + i) * a + ((FN(vload##W)(x + i) - m) - ml) * b +  \
                           c) * k);                                                            \
    else                                                                                       \
        for (; i + vw <= n; i += vw)                                                           \
            STREAM(o + i, ((FN(vload##W)(x + i) - m) - ml) * a + b);                           \
    for (; i < n; i++)                                                                         \
        FN(sstream)(o + i, BN_NT_ELEM(i, m, ml, a, b, c, k));                                  \
}                                                                                              \
                                                                                               \
TARGET static void FN(seg_nt##W)(const T *dy, const T *x, T *o, int64_t nr, int64_t ns,        \
                                 int64_t n, int64_t ld, const T *m, const T *ml, const T *a,   \
                                 const T *b, const T *c, const T *k)                           \
{                                                                                              \
    for (int64_t r = 0; r < nr; r++)                                                           \
        for (int64_t q = 0; q < ns; q++) {                                                     \
            int64_t off = r * ld + q * n;                                                      \
            FN(run_nt##W)(dy ? dy + off : NULL, x + off, o + off, n, m[q], ml[q], a[q], b[q],  \
                          c[q], k[q]);                                                         \
        }                                                                                      \
}                                                                                              \
                                                                                               \
TARGET static void FN(runs_nt##W)(const T *dy, const T *x, T *o, int64_t n, int64_t np,        \
                                  int64_t stride, T m, T ml, T a, T b, T c, T k)               \
{                                                                                              \
    for (int64_t q = 0; q < np; q++, x += stride, o += stride, dy = dy ? dy + stride : NULL)   \
        FN(run_nt##W)(dy, x, o, n, m, ml, a, b, c, k);                                         \
}                                                                                              \
                                                                                               \
TARGET static void FN(tile_nt##W)(const T *dy, const T *x, T *o, int64_t nr, int64_t nc,       \
                                  int64_t ld, const T *m, const T *ml, const T *a,             \
                                  const T *b, const T *c, const T *k)                          \
{                                                                                              \
    const int64_t vw = W / (int64_t)sizeof(T);                                                 \
    for (int64_t r = 0; r < nr; r++, x += ld, o += ld, dy = dy ? dy + ld : NULL) {             \
        int64_t j = 0;                                                                         \
        for (; j < nc && ((uintptr_t)(o + j) & (W - 1)); j++)                                  \
            FN(sstream)(o + j, BN_NT_ELEM(j, m[j], ml[j], a[j], b[j], c[j], k[j]));            \
        if (dy)                                                                                \
            for (; j + vw <= nc; j += vw)                                                      \
                STREAM(o + j, (FN(vload##W)(dy + j) * FN(vload##W)(a + j) +                    \
                               ((FN(vload##W)(x + j) - FN(vload##W)(m + j)) -                  \
                                FN(vload##W)(ml + j)) * FN(vload##W)(b + j) +                  \
                               FN(vload##W)(c + j)) * FN(vload##W)(k + j));                    \
        else                                                                                   \
            for (; j + vw <= nc; j += vw)                                                      \
                STREAM(o + j, ((FN(vload##W)(x + j) - FN(vload##W)(m + j)) -                   \
                               FN(vload##W)(ml + j)) * FN(vload##W)(a + j) +                   \
                              FN(vload##W)(b + j));                                            \
        for (; j < nc; j++)                                                                    \
            FN(sstream)(o + j, BN_NT_ELEM(j, m[j], ml[j], a[j], b[j], c[j], k[j]));            \
    }                                                                                          \
}

#define BN_STREAM32(p, v) (sizeof(T) == 4 ? _mm256_stream_ps((float *)(p), (__m256)(v)) \
                                          : _mm256_stream_pd((double *)(p), (__m256d)(v)))
#define BN_STREAM64(p, v) (sizeof(T) == 4 ? _mm512_stream_ps((float *)(p), (__m512)(v)) \
                                          : _mm512_stream_pd((double *)(p), (__m512d)(v)))
BN_NT_KERNELS(32, BN_NT_TARGET, BN_STREAM32)
BN_NT_KERNELS(64, BN_NT512_TARGET, BN_STREAM64)
#undef BN_STREAM32
#undef BN_STREAM64
#undef BN_NT_KERNELS
#undef BN_NT_ELEM
#endif

/* The backward coefficients a, b, c (double) as T: (a*g + b*(x-m) + c) is
 * evaluated as (g*(a/k) + (x-m)*(b/k) + c/k) * k with k = a. In training
 * b = -a*invstd^2*sum(g*(x-m))/n ~ a/std, and b alone leaves float's range
 * when std does (it underflows to 0 at |x| ~ 1e30, overflows at std ~ 1e-20);
 * b/a ~ 1/std and c/a ~ mean(g) do not. */
static int FN(overflows)(double v);
static int FN(dx_coefs)(const double *a, const double *b, const double *c, int64_t ch,
                        T *ta, T *tb, T *tc, T *tk)
{
    double k = b && a[ch] != 0 && isfinite(a[ch]) ? a[ch] : 1.0;
    *ta = (T)(a[ch] / k);
    *tb = b ? (T)(b[ch] / k) : 0;
    *tc = b && c ? (T)(c[ch] / k) : 0;
    *tk = (T)k;
    return FN(overflows)(a[ch] / k) || (b && FN(overflows)(b[ch] / k)) ||
           (b && c && FN(overflows)(c[ch] / k)) || FN(overflows)(k);
}

/* Whether a finite double coefficient leaves T's range (float32 only: invstd
 * of a channel whose spread is subnormal, with eps = 0, exceeds FLT_MAX).
 * Such channels run through wide_one; all others keep the T loops. */
static int FN(overflows)(double v)
{
    return sizeof(T) == sizeof(float) && fabs(v) > FLT_MAX && fabs(v) <= DBL_MAX;
}

/* Element i of unit_elementwise's output evaluated in double, channel ch's
 * coefficients unrounded: the float64 answer, rounded once to T. */
static void FN(wide_one)(const T *dy, const T *x, const T *y, T *out, int64_t i, int64_t ch,
                         const double *m, const double *a, const double *b, const double *c,
                         bn_act act, double slope, double xneg)
{
    double mc = m ? m[ch] : 0, yv = y ? (double)y[i] : 0, v;
    if (!dy) {
        v = ((double)x[i] - mc) * a[ch] + (b ? b[ch] : 0);
        if (act != BN_ACT_NONE && v < 0) v *= slope;
    } else {
        v = a[ch] * BN_GRAD((double)dy[i], yv, act, slope);
        if (x && b) v += b[ch] * (BN_PRE((double)x[i], yv, act, xneg) - mc) + (c ? c[ch] : 0);
    }
    out[i] = (T)v;
}

/* ---- per-unit dispatch on the layout ------------------------------------- */

static void FN(unit_moments)(const bn_plan *p, const T *x, int64_t u, double *part)
{
    if (!p->rows) {
        int64_t off, len, np, c;
        bn_run_of(p, u, &off, &len, &np, &c);
        FN(run_moments)(x + off, len, np, p->s.channels * p->s.inner, part + 2 * u);
    } else {
        int64_t r0, nr, c0, nc;
        bn_tile_of(p, u, &r0, &nr, &c0, &nc);
        double *out = part + 2 * ((u % p->nrb) * (p->width / p->seg) + c0 / p->seg);
        if (p->seg > 1)
            FN(seg_moments)(x + r0 * p->width + c0, nr, nc / p->seg, p->seg, p->width, out);
        else
            FN(tile_moments)(x + r0 * p->width + c0, nr, nc, p->width, out);
    }
}

/* dx != NULL (eval mode: dx = dy * ka, ka = weight * invstd): also writes the
 * unit's dx where one sweep can (channels-last columns, act NONE, dx apart
 * from dy and x, ka within T's range) and returns 1; 0: dx is left to
 * unit_elementwise. */
static int FN(unit_dot)(const bn_plan *p, const T *dy, const T *x, const T *y,
                        const double *mean, bn_act act, double slope, double xneg,
                        int64_t u, double *part, T *dx, const double *ka)
{
    if (!p->rows) {
        int64_t off, len, np, c;
        bn_run_of(p, u, &off, &len, &np, &c);
        FN(run_dot)(dy + off, x + off, y ? y + off : NULL, len, np, p->s.channels * p->s.inner,
                    mean[c], act, slope, xneg, part + 2 * u);
        return 0;
    } else {
        double mc[BN_MAX_COLS];
        T tk[BN_MAX_COLS], tu;
        int64_t ch[BN_MAX_COLS], r0, nr, c0, nc, o, ns;
        bn_tile_of(p, u, &r0, &nr, &c0, &nc);
        o = r0 * p->width + c0;
        ns = nc / p->seg;  /* partial columns: segments or columns */
        if (p->seg > 1)
            for (int64_t q = 0; q < ns; q++) ch[q] = (c0 / p->seg + q) % p->s.channels;
        else
            bn_channels_of(p, c0, nc, ch);
        for (int64_t j = 0; j < ns; j++) mc[j] = mean[ch[j]];
        double *out = part + 2 * ((u % p->nrb) * (p->width / p->seg) + c0 / p->seg);
        int fuse = dx && p->seg == 1 && act == BN_ACT_NONE && dx != dy && dx != x;
        /* the coefficients as unit_elementwise rounds them (dx_coefs) */
        for (int64_t j = 0; fuse && j < nc; j++)
            fuse = !FN(dx_coefs)(ka, NULL, NULL, ch[j], &tk[j], &tu, &tu, &tu);
        if (p->seg > 1)
            FN(seg_dot)(dy + o, x + o, y ? y + o : NULL, nr, ns, p->seg, p->width, mc, act,
                        slope, xneg, out);
        else
            FN(tile_dot)(dy + o, x + o, y ? y + o : NULL, nr, nc, p->width, mc, act, slope,
                         xneg, out, fuse ? dx + o : NULL, tk);
        return fuse;
    }
}

/* Elementwise pass of unit u: forward (dy == NULL: y = act((x-m)*a + b)) or
 * backward (dx = a*g + b*(x-m) + c, see dx_coefs). Coefficients are double[C], rounded to T
 * per unit. */
static void FN(unit_elementwise)(const bn_plan *p, const T *dy, const T *x, const T *y,
                                 T *out, const double *m, const double *a,
                                 const double *b, const double *c, bn_act act,
                                 double slope, double xneg, int64_t u)
{
    /* non-temporal stores: large outputs without an activation; the backward
     * only with its x term (dx = a*g alone keeps run_dx, where x may be NaN) */
    int nt = p->stream && act == BN_ACT_NONE && (!dy || (x && b));
    if (!p->rows) {
        int64_t off, len, np, ch;
        bn_run_of(p, u, &off, &len, &np, &ch);
        T mh = m ? (T)m[ch] : 0, ml = m ? (T)(m[ch] - (double)mh) : 0;
        T ta, tb, tc = 0, tk = 0;
        int wide;
        if (dy) {
            wide = FN(dx_coefs)(a, b, c, ch, &ta, &tb, &tc, &tk);
        } else {
            ta = (T)a[ch];
            tb = (T)b[ch];
            wide = FN(overflows)(a[ch]);
        }
        if (wide) {
            for (int64_t q = 0; q < np; q++, off += p->s.channels * p->s.inner)
                for (int64_t i = off; i < off + len; i++)
                    FN(wide_one)(dy, x, y, out, i, ch, m, a, b, c, act, slope, xneg);
            return;
        }
        int64_t st = p->s.channels * p->s.inner;
#if BN_NT
        if (nt)
            (p->stream > 1 ? FN(runs_nt64) : FN(runs_nt32))(dy ? dy + off : NULL, x + off,
                                                             out + off, len, np, st, mh, ml, ta,
                                                             tb, tc, tk);
        else
#endif
        if (!dy)
            FN(runs_apply)(x + off, out + off, len, np, st, mh, ml, ta, tb, act, (T)slope);
        else
            FN(runs_dx)(dy + off, x && b ? x + off : NULL, y ? y + off : NULL, out + off, len,
                       np, st, mh, ml, ta, tb, tc, tk, act, (T)slope, (T)xneg);
    } else {
        T tm[BN_MAX_COLS], tl[BN_MAX_COLS], ta[BN_MAX_COLS], tb[BN_MAX_COLS], tc[BN_MAX_COLS],
            tk[BN_MAX_COLS];
        int64_t r0, nr, c0, nc, o;
        bn_tile_of(p, u, &r0, &nr, &c0, &nc);
        o = r0 * p->width + c0;
        /* per channel once, then copied to its run of inner columns (one per
         * segment in the segment layout) */
        int64_t ch = (c0 / p->s.inner) % p->s.channels, l = c0 % p->s.inner;
        int wide = 0;
        int64_t rep = p->seg > 1 ? 1 : p->s.inner, ns = nc / p->seg;
        for (int64_t j = 0; j < ns; l = 0, ch = ch + 1 == p->s.channels ? 0 : ch + 1) {
            T vm = m ? (T)m[ch] : 0, vl = m ? (T)(m[ch] - (double)vm) : 0, va, vb, vc = 0, vk = 0;
            if (dy) {
                wide |= FN(dx_coefs)(a, b, c, ch, &va, &vb, &vc, &vk);
            } else {
                va = (T)a[ch];
                vb = b ? (T)b[ch] : 0;
                wide |= FN(overflows)(a[ch]);
            }
            for (int64_t e = j + bn_min64(rep - l, ns - j); j < e; j++)
                tm[j] = vm, tl[j] = vl, ta[j] = va, tb[j] = vb, tc[j] = vc, tk[j] = vk;
        }
        if (wide) {  /* a channel out of T's range: the whole tile in double */
            for (int64_t r = 0; r < nr; r++) {
                int64_t cj = (c0 / p->s.inner) % p->s.channels, lj = c0 % p->s.inner;
                for (int64_t j = 0; j < nc; j++) {
                    FN(wide_one)(dy, x, y, out, o + r * p->width + j, cj, m, a, b,
                                 c, act, slope, xneg);
                    if (++lj == p->s.inner) lj = 0, cj = cj + 1 == p->s.channels ? 0 : cj + 1;
                }
            }
            return;
        }
        const T *dyo = dy ? dy + o : NULL, *xo = x && (!dy || b) ? x + o : NULL;
        const T *yo = y ? y + o : NULL;
        if (p->seg > 1) {
#if BN_NT
            if (nt)
                (p->stream > 1 ? FN(seg_nt64) : FN(seg_nt32))(dyo, x + o, out + o, nr, ns, p->seg,
                                                              p->width, tm, tl, ta, tb, tc, tk);
            else
#endif
            if (!dy)
                FN(seg_apply)(xo, out + o, nr, ns, p->seg, p->width, tm, tl, ta, tb, act,
                              (T)slope);
            else
                FN(seg_dx)(dyo, xo, yo, out + o, nr, ns, p->seg, p->width, tm, tl, ta, tb, tc,
                           tk, act, (T)slope, (T)xneg);
        } else {
#if BN_NT
            if (nt && nc * (int64_t)sizeof(T) >= 1024)  /* short rows: no gain measured */
                (p->stream > 1 ? FN(tile_nt64) : FN(tile_nt32))(dyo, x + o, out + o, nr, nc,
                                                                p->width, tm, tl, ta, tb, tc, tk);
            else
#endif
            if (!dy)
                FN(tile_apply)(xo, out + o, nr, nc, p->width, tm, tl, ta, tb, act, (T)slope);
            else
                FN(tile_dx)(dyo, xo, yo, out + o, nr, nc, p->width, tm, tl, ta, tb, tc, tk, act,
                            (T)slope, (T)xneg);
        }
    }
#if BN_NT
    if (nt) _mm_sfence();  /* the unit's stores are visible before the barrier */
#else
    (void)nt;
#endif
}

/* ---- public entry points --------------------------------------------------- */

int FN(bn_stats)(const T *x, bn_shape s, double *mean, double *m2, int n_threads)
{
    if (bn_bad_shape(s, sizeof(T)) || BN_MISSING(x, bn_numel(s)) || BN_MISSING(mean, s.channels) ||
        BN_MISSING(m2, s.channels) || n_threads < 0)
        return BN_EINVAL;
    bn_plan p = bn_make_plan(s, sizeof(T));
    double *part = (double *)malloc(sizeof(double) * 2 * (size_t)bn_max64(1, p.nslots));
    if (!part) return BN_ENOMEM;
    int nt = bn_threads(n_threads, &p);
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
#pragma omp for schedule(static)
        for (int64_t u = 0; u < p.nunits; u++) FN(unit_moments)(&p, x, u, part);
#pragma omp for schedule(static)
        for (int64_t t = 0; t < nt; t++) {
            int64_t a, b;
            bn_chunk(0, s.channels, t, nt, &a, &b);
            bn_merge(&p, part, a, b, 1, mean, m2);
        }
    }
    free(part);
    return 0;
}

int FN(bn_apply)(const T *x, T *y, bn_shape s, const double *center, const double *scale,
                 const double *shift, bn_act act, double slope, int n_threads)
{
    if (bn_bad_shape(s, sizeof(T)) || BN_MISSING(x, bn_numel(s)) || BN_MISSING(y, bn_numel(s)) ||
        bn_partial_overlap(x, y, bn_numel(s), sizeof(T)) || BN_MISSING(center, s.channels) ||
        BN_MISSING(scale, s.channels) || BN_MISSING(shift, s.channels) ||
        bn_bad_act(act, &slope) || n_threads < 0)
        return BN_EINVAL;
    bn_plan p = bn_make_plan(s, sizeof(T));
    int nt = bn_threads(n_threads, &p);
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
    for (int64_t u = 0; u < p.nunits; u++)
        FN(unit_elementwise)(&p, NULL, x, NULL, y, center, scale, shift, NULL, act, slope, 1, u);
    return 0;
}

int FN(bn_train)(const T *x, T *y, bn_shape s, const double *weight, const double *bias,
                 double eps, double *save_mean, double *save_invstd, double *batch_var,
                 bn_act act, double slope, int n_threads)
{
    if (bn_bad_shape(s, sizeof(T)) || BN_MISSING(x, bn_numel(s)) || BN_MISSING(y, bn_numel(s)) ||
        bn_partial_overlap(x, y, bn_numel(s), sizeof(T)) || bn_bad_eps(eps) ||
        BN_MISSING(save_mean, s.channels) || BN_MISSING(save_invstd, s.channels) ||
        bn_bad_act(act, &slope) || n_threads < 0)
        return BN_EINVAL;
    bn_plan p = bn_make_plan(s, sizeof(T));
    double *part = (double *)malloc(sizeof(double) * (2 * (size_t)p.nslots + 3 * (size_t)s.channels + 1));
    if (!part) return BN_ENOMEM;
    double *scale = part + 2 * p.nslots, *shift = scale + s.channels, *m2 = shift + s.channels;
    double count = (double)(s.outer * s.inner);
    int nt = bn_threads(n_threads, &p);
#pragma omp parallel num_threads(nt) if (nt > 1)
    for (int64_t r = 0; r < p.nrounds; r++) {
        int64_t u0, u1, c0, c1;
        bn_round(&p, r, &u0, &u1, &c0, &c1);
#pragma omp for schedule(static)
        for (int64_t u = u0; u < u1; u++) FN(unit_moments)(&p, x, u, part);
#pragma omp for schedule(static)
        for (int64_t t = 0; t < nt; t++) {
            int64_t a, b;
            bn_chunk(c0, c1, t, nt, &a, &b);
            bn_merge(&p, part, a, b, 1, save_mean, m2);
            for (int64_t c = a; c < b; c++) {
                double var = m2[c] / count, invstd = bn_invstd(var, eps);
                save_invstd[c] = invstd;
                if (batch_var) batch_var[c] = var;
                scale[c] = (weight ? weight[c] : 1.0) * invstd;
                shift[c] = bias ? bias[c] : 0.0;
            }
        }
        /* the same static schedule hands each thread the units it just reduced */
#pragma omp for schedule(static)
        for (int64_t u = u0; u < u1; u++)
            FN(unit_elementwise)(&p, NULL, x, NULL, y, save_mean, scale, shift, NULL, act, slope,
                                 1, u);
    }
    free(part);
    return 0;
}

int FN(bn_backward_reduce)(const T *dy, const T *x, const T *y, bn_shape s, const double *mean,
                           bn_act act, double slope, double *sum_dy, double *sum_dy_xmu,
                           int n_threads)
{
    if (bn_bad_shape(s, sizeof(T)) || BN_MISSING(dy, bn_numel(s)) || BN_MISSING(x, bn_numel(s)) ||
        (act != BN_ACT_NONE && BN_MISSING(y, bn_numel(s))) || BN_MISSING(mean, s.channels) ||
        BN_MISSING(sum_dy, s.channels) || BN_MISSING(sum_dy_xmu, s.channels) ||
        bn_bad_act(act, &slope) || n_threads < 0)
        return BN_EINVAL;
    bn_plan p = bn_make_plan(s, sizeof(T));
    double *part = (double *)malloc(sizeof(double) * 2 * (size_t)bn_max64(1, p.nslots));
    if (!part) return BN_ENOMEM;
    int nt = bn_threads(n_threads, &p);
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
#pragma omp for schedule(static)
        for (int64_t u = 0; u < p.nunits; u++)
            FN(unit_dot)(&p, dy, x, y, mean, act, slope, 1, u, part, NULL, NULL);
#pragma omp for schedule(static)
        for (int64_t t = 0; t < nt; t++) {
            int64_t a, b;
            bn_chunk(0, s.channels, t, nt, &a, &b);
            bn_merge(&p, part, a, b, 0, sum_dy, sum_dy_xmu);
        }
    }
    free(part);
    return 0;
}

int FN(bn_backward_apply)(const T *dy, const T *x, const T *y, T *dx, bn_shape s,
                          const double *mean, const double *a, const double *b,
                          const double *c0, bn_act act, double slope, int n_threads)
{
    int64_t n = bn_numel(s);
    if (bn_bad_shape(s, sizeof(T)) || BN_MISSING(dy, n) || BN_MISSING(dx, n) ||
        (b && BN_MISSING(x, n)) || (act != BN_ACT_NONE && BN_MISSING(y, n)) ||
        bn_partial_overlap(dx, dy, n, sizeof(T)) || bn_partial_overlap(dx, b ? x : NULL, n, sizeof(T)) ||
        bn_partial_overlap(dx, act != BN_ACT_NONE ? y : NULL, n, sizeof(T)) ||
        BN_MISSING(a, s.channels) || (b && BN_MISSING(mean, s.channels)) ||
        bn_bad_act(act, &slope) || n_threads < 0)
        return BN_EINVAL;
    bn_plan p = bn_make_plan(s, sizeof(T));
    int nt = bn_threads(n_threads, &p);
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
    for (int64_t u = 0; u < p.nunits; u++)
        FN(unit_elementwise)(&p, dy, x, y, dx, mean, a, b, c0, act, slope, 1, u);
    return 0;
}

/* The backward of bn_backward and bn_backward_from_output. from_y: x is the
 * forward output y itself and `mean` is the bias, so the centered value is
 * v = act^-1(y) - bias = w * invstd * (x - mean): the reductions and the
 * x-coefficient are rescaled by r = 1 / (w * invstd) per channel. */
static int FN(backward_impl)(const T *dy, const T *x, const T *y, T *dx, bn_shape s,
                             const double *mean, const double *invstd, const double *weight,
                             int training, double *dweight, double *dbias, bn_act act,
                             double slope, int from_y, int n_threads)
{
    bn_plan p = bn_make_plan(s, sizeof(T));
    double *part = (double *)malloc(sizeof(double) * (2 * (size_t)p.nslots + 3 * (size_t)s.channels + 1));
    if (!part) return BN_ENOMEM;
    double *ca = part + 2 * p.nslots, *cb = ca + s.channels, *cc = cb + s.channels;
    double count = (double)(s.outer * s.inner);
    double xneg = from_y && act == BN_ACT_LEAKY_RELU ? 1.0 / slope : 1.0;
    int nt = bn_threads(n_threads, &p);
    if (!training) {
        /* eval mode: dx = k*g needs no sum, so each unit's sums and its dx are
         * taken in one visit (dy read once from memory); the same partials
         * and merge as below. Units are disjoint, so dx may alias dy or x. */
        for (int64_t c = 0; c < s.channels; c++) {
            ca[c] = (weight ? weight[c] : 1.0) * invstd[c];
            cc[c] = 0.0;
        }
#pragma omp parallel num_threads(nt) if (nt > 1)
        {
#pragma omp for schedule(static)
            for (int64_t u = 0; u < p.nunits; u++) {
                if (!FN(unit_dot)(&p, dy, x, y, mean, act, slope, xneg, u, part, dx, ca))
                    FN(unit_elementwise)(&p, dy, x, y, dx, mean, ca, NULL, cc, act, slope, xneg,
                                         u);
            }
#pragma omp for schedule(static)
            for (int64_t t = 0; t < nt; t++) {
                int64_t a, b;
                bn_chunk(0, s.channels, t, nt, &a, &b);
                bn_merge(&p, part, a, b, 0, dbias, dweight);
                for (int64_t c = a; c < b; c++)
                    dweight[c] = dweight[c] * (from_y ? 1.0 / ca[c] : 1.0) * invstd[c];
            }
        }
        free(part);
        return 0;
    }
#pragma omp parallel num_threads(nt) if (nt > 1)
    for (int64_t r = 0; r < p.nrounds; r++) {
        int64_t u0, u1, c0, c1;
        bn_round(&p, r, &u0, &u1, &c0, &c1);
#pragma omp for schedule(static)
        for (int64_t u = u0; u < u1; u++)
            FN(unit_dot)(&p, dy, x, y, mean, act, slope, xneg, u, part, NULL, NULL);
#pragma omp for schedule(static)
        for (int64_t t = 0; t < nt; t++) {
            int64_t a, b;
            bn_chunk(c0, c1, t, nt, &a, &b);
            bn_merge(&p, part, a, b, 0, dbias, dweight);
            for (int64_t c = a; c < b; c++) {
                double sg = dbias[c], sgx = dweight[c];
                double k = (weight ? weight[c] : 1.0) * invstd[c];
                double rs = from_y ? 1.0 / k : 1.0;
                sgx *= rs;  /* sum g * (x - mean) */
                dweight[c] = sgx * invstd[c];
                /* dx = k*(g - mean(g) - xhat*mean(g*xhat)), xhat = (x-mean)*invstd */
                ca[c] = k;
                cb[c] = -k * invstd[c] * invstd[c] * sgx / count * rs;
                cc[c] = -k * sg / count;
            }
        }
#pragma omp for schedule(static)
        for (int64_t u = u0; u < u1; u++)
            FN(unit_elementwise)(&p, dy, x, y, dx, mean, ca, cb, cc, act, slope, xneg, u);
    }
    free(part);
    return 0;
}

int FN(bn_backward)(const T *dy, const T *x, const T *y, T *dx, bn_shape s, const double *mean,
                    const double *invstd, const double *weight, int training, double *dweight,
                    double *dbias, bn_act act, double slope, int n_threads)
{
    int64_t n = bn_numel(s);
    if (bn_bad_shape(s, sizeof(T)) || BN_MISSING(dy, n) || BN_MISSING(x, n) || BN_MISSING(dx, n) ||
        (act != BN_ACT_NONE && BN_MISSING(y, n)) || bn_partial_overlap(dx, dy, n, sizeof(T)) ||
        bn_partial_overlap(dx, x, n, sizeof(T)) || bn_partial_overlap(dx, y, n, sizeof(T)) ||
        BN_MISSING(mean, s.channels) || BN_MISSING(invstd, s.channels) ||
        BN_MISSING(dweight, s.channels) || BN_MISSING(dbias, s.channels) ||
        bn_bad_act(act, &slope) || n_threads < 0)
        return BN_EINVAL;
    return FN(backward_impl)(dy, x, y, dx, s, mean, invstd, weight, training, dweight, dbias,
                             act, slope, 0, n_threads);
}

int FN(bn_backward_from_output)(const T *dy, const T *y, T *dx, bn_shape s, const double *invstd,
                                const double *weight, const double *bias, int training,
                                double *dweight, double *dbias, bn_act act, double slope,
                                int n_threads)
{
    int64_t n = bn_numel(s);
    if (bn_bad_shape(s, sizeof(T)) || BN_MISSING(dy, n) || BN_MISSING(y, n) || BN_MISSING(dx, n) ||
        bn_partial_overlap(dx, dy, n, sizeof(T)) || bn_partial_overlap(dx, y, n, sizeof(T)) ||
        BN_MISSING(invstd, s.channels) || BN_MISSING(dweight, s.channels) ||
        BN_MISSING(dbias, s.channels) || bn_bad_act(act, &slope) || n_threads < 0)
        return BN_EINVAL;
    if (act == BN_ACT_RELU || (act == BN_ACT_LEAKY_RELU && !(slope > 0)))
        return BN_EINVAL;
    for (int64_t c = 0; c < s.channels; c++) {
        double k = (weight ? weight[c] : 1.0) * invstd[c];
        if (!(k != 0) || !isfinite(1.0 / k)) return BN_EINVAL;
    }
    double *zeros = NULL;
    if (!bias) {
        zeros = (double *)calloc((size_t)bn_max64(1, s.channels), sizeof(double));
        if (!zeros) return BN_ENOMEM;
    }
    int err = FN(backward_impl)(dy, y, y, dx, s, bias ? bias : zeros, invstd, weight, training,
                                dweight, dbias, act, slope, 1, n_threads);
    free(zeros);
    return err;
}

int FN(bn_eval)(const T *x, T *y, bn_shape s, const double *running_mean,
                const double *running_var, const double *weight, const double *bias,
                double eps, bn_act act, double slope, int n_threads)
{
    if (bn_bad_shape(s, sizeof(T)) || BN_MISSING(x, bn_numel(s)) || BN_MISSING(y, bn_numel(s)) ||
        bn_partial_overlap(x, y, bn_numel(s), sizeof(T)) || BN_MISSING(running_mean, s.channels) ||
        BN_MISSING(running_var, s.channels) || bn_bad_eps(eps) || bn_bad_act(act, &slope) ||
        n_threads < 0)
        return BN_EINVAL;
    /* var + eps == 0 is allowed: invstd 0, y = bias, as in training (bn_invstd) */
    for (int64_t c = 0; c < s.channels; c++)
        if (running_var[c] + eps < 0) return BN_EINVAL;
    double *scale = (double *)malloc(sizeof(double) * 2 * (size_t)bn_max64(1, s.channels));
    if (!scale) return BN_ENOMEM;
    double *shift = scale + s.channels;
    for (int64_t c = 0; c < s.channels; c++) {
        /* the same operations as batch_norm_eval in Python: identical results */
        double invstd = bn_invstd(running_var[c], eps);
        scale[c] = weight ? weight[c] * invstd : invstd;
        shift[c] = bias ? bias[c] : 0.0;
    }
    int err = FN(bn_apply)(x, y, s, running_mean, scale, shift, act, slope, n_threads);
    free(scale);
    return err;
}


/* ---- masked statistics (padded batches; bncore.h, "Masked statistics") ----
 * Work units are (row block, channel, inner chunk) triples of a fixed
 * decomposition (bn_mask_plan, independent of the thread count); each unit
 * is reduced by one thread in order and the partials of a channel are merged
 * in unit order, so results are bitwise identical for any thread count. */

/* count, mean and M2 of the unmasked values of unit u: two passes over the
 * unit (in cache), the second summing squared deviations from the first's
 * mean, so float32 input with |mean| >> std stays accurate. Selects, not
 * multiplies: a NaN under a zero mask never enters. Each row's run goes to
 * BN_LANES_TAIL independent lanes (its last few values to the first lanes),
 * so the loops vectorize and the order is fixed. */
BN_CLONES static void FN(masked_unit_moments)(const T *x, const uint8_t *mask,
                                              const bn_mask_plan *p, int64_t u, double *out)
{
    enum { L = BN_LANES_TAIL };
    double an[L] = {0}, as[L] = {0}, aq[L] = {0}, n = 0, s = 0, q = 0;
    int64_t o0, o1, c, i0, i1;
    bn_mask_unit(p, u, &o0, &o1, &c, &i0, &i1);
    int64_t w = i1 - i0, wv = w - w % L, stride = p->s.channels * p->s.inner;
    const T *x0 = x + (o0 * p->s.channels + c) * p->s.inner + i0;
    const uint8_t *m0 = mask + (x0 - x);
    for (int64_t o = o0; o < o1; o++) {
        const T *xr = x0 + (o - o0) * stride;
        const uint8_t *mr = m0 + (o - o0) * stride;
        int64_t i = 0;
        for (; i < wv; i += L)
            for (int j = 0; j < L; j++) {
                an[j] += mr[i + j] ? 1.0 : 0.0;
                as[j] += mr[i + j] ? (double)xr[i + j] : 0.0;
            }
        for (int j = 0; i + j < w; j++) {
            an[j] += mr[i + j] ? 1.0 : 0.0;
            as[j] += mr[i + j] ? (double)xr[i + j] : 0.0;
        }
    }
    for (int j = 0; j < L; j++) {
        n += an[j];
        s += as[j];
    }
    double m = n > 0 ? s / n : 0.0;
    for (int64_t o = o0; o < o1 && n > 0; o++) {
        const T *xr = x0 + (o - o0) * stride;
        const uint8_t *mr = m0 + (o - o0) * stride;
        int64_t i = 0;
        for (; i < wv; i += L)
            for (int j = 0; j < L; j++) {
                double d = (double)xr[i + j] - m;
                aq[j] += mr[i + j] ? d * d : 0.0;
            }
        for (int j = 0; i + j < w; j++) {
            double d = (double)xr[i + j] - m;
            aq[j] += mr[i + j] ? d * d : 0.0;
        }
    }
    for (int j = 0; j < L; j++) q += aq[j];
    out[0] = n;
    out[1] = m;
    out[2] = q;
}

int FN(bn_masked_stats)(const T *x, const uint8_t *mask, bn_shape s, double *count,
                        double *mean, double *m2, int n_threads)
{
    if (bn_bad_shape(s, sizeof(T)) || BN_MISSING(x, bn_numel(s)) ||
        BN_MISSING(mask, bn_numel(s)) || BN_MISSING(count, s.channels) ||
        BN_MISSING(mean, s.channels) || BN_MISSING(m2, s.channels) || n_threads < 0)
        return BN_EINVAL;
    bn_mask_plan p = bn_make_mask_plan(s);
    double *part = (double *)malloc(sizeof(double) * 3 * (size_t)bn_max64(1, p.nunits));
    if (!part) return BN_ENOMEM;
    int nt = bn_threads_for(n_threads, bn_numel(s), p.nunits);
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
#pragma omp for schedule(static)
        for (int64_t u = 0; u < p.nunits; u++) FN(masked_unit_moments)(x, mask, &p, u, part + 3 * u);
#pragma omp for schedule(static)
        for (int64_t t = 0; t < nt; t++) {
            int64_t a, b;
            bn_chunk(0, s.channels, t, nt, &a, &b);
            for (int64_t c = a; c < b; c++) {
                double n = 0, mc = 0, q = 0;
                for (int64_t r = 0; r < p.nblocks; r++)
                    for (int64_t k = 0; k < p.kin; k++) {
                        const double *e = part + 3 * ((r * s.channels + c) * p.kin + k);
                        bn_chan(&n, &mc, &q, e[0], e[1], e[2]);
                    }
                count[c] = n;
                mean[c] = mc;
                m2[c] = q;
            }
        }
    }
    free(part);
    return 0;
}

/* {sum g, sum g * (x - mean[c])} over the unmasked values of unit u,
 * g = dy * act'(y); lanes as in masked_unit_moments. */
BN_CLONES static void FN(masked_unit_dot)(const T *dy, const T *x, const T *y,
                                          const uint8_t *mask, const bn_mask_plan *p,
                                          int64_t u, const double *mean, bn_act act,
                                          double slope, double *out)
{
    enum { L = BN_LANES_TAIL };
    double a1[L] = {0}, a2[L] = {0}, an[L] = {0}, s1 = 0, s2 = 0, n = 0;
    int64_t o0, o1, c, i0, i1;
    bn_mask_unit(p, u, &o0, &o1, &c, &i0, &i1);
    int64_t w = i1 - i0, wv = act == BN_ACT_NONE ? w - w % L : 0;
    int64_t stride = p->s.channels * p->s.inner, base = (o0 * p->s.channels + c) * p->s.inner + i0;
    double m = mean[c];
    for (int64_t o = o0; o < o1; o++) {
        int64_t off = base + (o - o0) * stride, i = 0;
        const T *dr = dy + off, *xr = x + off;
        const uint8_t *mr = mask + off;
        for (; i < wv; i += L)
            for (int j = 0; j < L; j++) {
                double g = dr[i + j];
                an[j] += mr[i + j] ? 1.0 : 0.0;
                a1[j] += mr[i + j] ? g : 0.0;
                a2[j] += mr[i + j] ? g * ((double)xr[i + j] - m) : 0.0;
            }
        for (; i < w; i++) {  /* the tail, and every value with an activation */
            double g = act == BN_ACT_NONE ? (double)dr[i]
                                          : BN_GRAD((double)dr[i], y[off + i], act, slope);
            int j = (int)((i - wv) % L);
            an[j] += mr[i] ? 1.0 : 0.0;
            a1[j] += mr[i] ? g : 0.0;
            a2[j] += mr[i] ? g * ((double)xr[i] - m) : 0.0;
        }
    }
    for (int j = 0; j < L; j++) {
        s1 += a1[j];
        s2 += a2[j];
        n += an[j];
    }
    out[0] = s1;
    out[1] = s2;
    out[2] = n;
}

int FN(bn_masked_backward_reduce)(const T *dy, const T *x, const T *y, const uint8_t *mask,
                                  bn_shape s, const double *mean, bn_act act, double slope,
                                  double *sum_dy, double *sum_dy_xmu, double *count,
                                  int n_threads)
{
    int64_t n = bn_numel(s);
    if (bn_bad_shape(s, sizeof(T)) || BN_MISSING(dy, n) || BN_MISSING(x, n) ||
        BN_MISSING(mask, n) || (act != BN_ACT_NONE && BN_MISSING(y, n)) ||
        BN_MISSING(mean, s.channels) || BN_MISSING(sum_dy, s.channels) ||
        BN_MISSING(sum_dy_xmu, s.channels) || bn_bad_act(act, &slope) || n_threads < 0)
        return BN_EINVAL;
    bn_mask_plan p = bn_make_mask_plan(s);
    double *part = (double *)malloc(sizeof(double) * 3 * (size_t)bn_max64(1, p.nunits));
    if (!part) return BN_ENOMEM;
    int nt = bn_threads_for(n_threads, n, p.nunits);
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
#pragma omp for schedule(static)
        for (int64_t u = 0; u < p.nunits; u++)
            FN(masked_unit_dot)(dy, x, y, mask, &p, u, mean, act, slope, part + 3 * u);
#pragma omp for schedule(static)
        for (int64_t t = 0; t < nt; t++) {
            int64_t a, b;
            bn_chunk(0, s.channels, t, nt, &a, &b);
            for (int64_t c = a; c < b; c++) {
                double s1 = 0, s2 = 0, n1 = 0;
                for (int64_t r = 0; r < p.nblocks; r++)
                    for (int64_t k = 0; k < p.kin; k++) {
                        const double *e = part + 3 * ((r * s.channels + c) * p.kin + k);
                        s1 += e[0];
                        s2 += e[1];
                        n1 += e[2];
                    }
                sum_dy[c] = s1;
                sum_dy_xmu[c] = s2;
                if (count) count[c] = n1;
            }
        }
    }
    free(part);
    return 0;
}

int FN(bn_masked_zero)(T *x, const uint8_t *mask, int64_t n, int n_threads)
{
    if (n < 0 || BN_MISSING(x, n) || BN_MISSING(mask, n) || n_threads < 0) return BN_EINVAL;
    int64_t nb = bn_cdiv(n, BN_MASK_BLOCK);
    int nt = bn_threads_for(n_threads, n, nb);
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
    for (int64_t b = 0; b < nb; b++)
        for (int64_t i = b * BN_MASK_BLOCK; i < bn_min64(n, (b + 1) * BN_MASK_BLOCK); i++)
            if (!mask[i]) x[i] = 0;
    return 0;
}

#undef BN_GRAD
#undef BN_PRE
#undef BN_OPAQUE
