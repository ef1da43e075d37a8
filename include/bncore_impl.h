/* bncore_impl.h -- implementation of bncore.h; included once, through
 * bncore.h with BNCORE_IMPLEMENTATION defined. The dtype-generic kernels live
 * in bncore_template.h, instantiated below for float and double. */
#ifndef BNCORE_IMPL_H
#define BNCORE_IMPL_H

#include <math.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#ifdef __cplusplus
#define BN_RESTRICT __restrict
#else
#define BN_RESTRICT restrict
#endif

/* Hot inner loops are compiled for AVX-512 and AVX2 besides the baseline and
 * picked at load time, since a wheel cannot assume the build machine's ISA. */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && \
    defined(__linux__) && !defined(BN_NO_CLONES) && !defined(__SANITIZE_ADDRESS__)
#define BN_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define BN_CLONES_NAMES "x86-64-v4 (AVX-512), x86-64-v3 (AVX2+FMA), baseline"
#else
#define BN_CLONES
#define BN_CLONES_NAMES "baseline only"
#endif

#define BN_RUN 4096                /* NCHW: elements per work unit (L1-sized, re-read once) */
#define BN_TILE_BYTES 65536        /* channels-last: bytes per rows x columns unit */
#define BN_MAX_COLS 256            /* channels-last: columns per unit */
#define BN_GROUP_BYTES (8 << 20)   /* channels processed per round: still in cache for the 2nd pass */
#define BN_MIN_PARALLEL 65536      /* below this many elements one thread beats a fork/join */
#define BN_LANES 16                /* independent double accumulators per run */

/* A fixed decomposition of one tensor into work units. Reductions write one
 * partial per (unit, channel) and merge them in a fixed order, so the result
 * does not depend on which thread ran which unit. Units are ordered by
 * channel (NCHW) or column tile (channels-last), so a round of whole channels
 * is a contiguous range of units. */
typedef struct {
    bn_shape s;
    int rows;            /* 1: channels-last (inner == 1), channels innermost */
    int64_t kruns;       /* NCHW: units per (n, c) plane */
    int64_t rb_rows;     /* channels-last: rows per unit */
    int64_t nrb;         /* channels-last: row blocks */
    int64_t cols;        /* channels-last: columns per unit */
    int64_t ntiles;      /* channels-last: column tiles */
    int64_t nunits;
    int64_t nslots;      /* partial slots: one per unit (NCHW), per (row block, channel) */
    int64_t round;       /* channels (NCHW) or tiles (channels-last) per round */
    int64_t nrounds;
} bn_plan;

static int64_t bn_cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
static int64_t bn_max64(int64_t a, int64_t b) { return a > b ? a : b; }
static int64_t bn_min64(int64_t a, int64_t b) { return a < b ? a : b; }

static bn_plan bn_make_plan(bn_shape s, size_t elsize)
{
    bn_plan p;
    memset(&p, 0, sizeof p);
    p.s = s;
    p.rows = s.inner == 1;
    if (!p.rows) {
        int64_t per_channel = s.outer * s.inner * (int64_t)elsize;
        p.kruns = bn_cdiv(s.inner, BN_RUN);
        p.nunits = s.channels * s.outer * p.kruns;
        p.nslots = p.nunits;
        p.round = bn_max64(1, BN_GROUP_BYTES / bn_max64(1, per_channel));
        p.nrounds = bn_cdiv(s.channels, p.round);
    } else {
        p.cols = bn_max64(1, bn_min64(s.channels, BN_MAX_COLS));
        p.ntiles = bn_cdiv(s.channels, p.cols);
        p.rb_rows = bn_max64(1, BN_TILE_BYTES / (p.cols * (int64_t)elsize));
        p.nrb = bn_cdiv(s.outer, p.rb_rows);
        p.nunits = p.ntiles * p.nrb;
        p.nslots = p.nrb * s.channels;
        p.round = bn_max64(1, BN_GROUP_BYTES / bn_max64(1, s.outer * p.cols * (int64_t)elsize));
        p.nrounds = bn_cdiv(p.ntiles, p.round);
    }
    return p;
}

/* Units and channels of round r: [*u0, *u1) and [*c0, *c1). */
static void bn_round(const bn_plan *p, int64_t r, int64_t *u0, int64_t *u1,
                     int64_t *c0, int64_t *c1)
{
    if (!p->rows) {
        int64_t per = p->s.outer * p->kruns;
        *c0 = r * p->round;
        *c1 = bn_min64(p->s.channels, *c0 + p->round);
        *u0 = *c0 * per;
        *u1 = *c1 * per;
    } else {
        int64_t t0 = r * p->round, t1 = bn_min64(p->ntiles, t0 + p->round);
        *u0 = t0 * p->nrb;
        *u1 = t1 * p->nrb;
        *c0 = t0 * p->cols;
        *c1 = bn_min64(p->s.channels, t1 * p->cols);
    }
}

/* NCHW unit u: a run of *len elements at *off, in channel *c. */
static void bn_run_of(const bn_plan *p, int64_t u, int64_t *off, int64_t *len, int64_t *c)
{
    int64_t per = p->s.outer * p->kruns, r = u % per, n = r / p->kruns, k = r % p->kruns;
    *c = u / per;
    *off = (n * p->s.channels + *c) * p->s.inner + k * BN_RUN;
    *len = bn_min64(BN_RUN, p->s.inner - k * BN_RUN);
}

/* Channels-last unit u: rows [*r0, *r0 + *nr) x columns [*c0, *c0 + *nc). */
static void bn_tile_of(const bn_plan *p, int64_t u, int64_t *r0, int64_t *nr,
                       int64_t *c0, int64_t *nc)
{
    int64_t t = u / p->nrb, rb = u % p->nrb;
    *r0 = rb * p->rb_rows;
    *nr = bn_min64(p->rb_rows, p->s.outer - *r0);
    *c0 = t * p->cols;
    *nc = bn_min64(p->cols, p->s.channels - *c0);
}

/* Count of the partial in slot j (NCHW) or row block j (channels-last). */
static double bn_slot_count(const bn_plan *p, int64_t j)
{
    if (!p->rows)
        return (double)bn_min64(BN_RUN, p->s.inner - (j % p->kruns) * BN_RUN);
    return (double)bn_min64(p->rb_rows, p->s.outer - j * p->rb_rows);
}

/* Chan's merge of (nb, mb, m2b) into (*na, *ma, *m2a). */
static void bn_chan(double *na, double *ma, double *m2a, double nb, double mb, double m2b)
{
    double n = *na + nb;
    if (nb == 0) return;
    double d = mb - *ma, f = nb / n;
    *ma += d * f;
    *m2a += m2b + d * d * *na * f;
    *na = n;
}

/* Merge channel c's (mean, M2) partials in a fixed order. */
static void bn_channel_moments(const bn_plan *p, const double *part, int64_t c,
                               double *mean, double *m2)
{
    double n = 0, m = 0, q = 0;
    if (!p->rows) {
        int64_t per = p->s.outer * p->kruns;
        for (int64_t j = c * per; j < (c + 1) * per; j++)
            bn_chan(&n, &m, &q, bn_slot_count(p, j), part[2 * j], part[2 * j + 1]);
    } else {
        for (int64_t rb = 0; rb < p->nrb; rb++) {
            const double *s = part + 2 * (rb * p->s.channels + c);
            bn_chan(&n, &m, &q, bn_slot_count(p, rb), s[0], s[1]);
        }
    }
    *mean = m;
    *m2 = q;
}

/* Plain sums of channel c's two partials, in a fixed order. */
static void bn_channel_sums(const bn_plan *p, const double *part, int64_t c,
                            double *s0, double *s1)
{
    double a = 0, b = 0;
    if (!p->rows) {
        int64_t per = p->s.outer * p->kruns;
        for (int64_t j = c * per; j < (c + 1) * per; j++) {
            a += part[2 * j];
            b += part[2 * j + 1];
        }
    } else {
        for (int64_t rb = 0; rb < p->nrb; rb++) {
            const double *s = part + 2 * (rb * p->s.channels + c);
            a += s[0];
            b += s[1];
        }
    }
    *s0 = a;
    *s1 = b;
}

static int bn_threads(int n_threads, const bn_plan *p)
{
#ifdef _OPENMP
    int64_t work = p->s.outer * p->s.channels * p->s.inner;
    int64_t nt = n_threads > 0 ? n_threads : omp_get_max_threads();
    if (work < BN_MIN_PARALLEL) nt = 1;
    return (int)bn_max64(1, bn_min64(nt, p->nunits));
#else
    (void)n_threads; (void)p;
    return 1;
#endif
}

int bn_default_threads(void)
{
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

void bn_merge_stats(int64_t k, int64_t channels, const double *count,
                    const double *mean, const double *m2,
                    double *out_count, double *out_mean, double *out_m2)
{
    double total = 0;
    for (int64_t j = 0; j < k; j++) total += count[j];
    for (int64_t c = 0; c < channels; c++) {
        double n = 0, m = 0, q = 0;
        for (int64_t j = 0; j < k; j++)
            bn_chan(&n, &m, &q, count[j], mean[j * channels + c], m2[j * channels + c]);
        out_mean[c] = m;
        out_m2[c] = q;
    }
    *out_count = total;
}

void bn_update_running(int64_t channels, const double *mean, const double *var,
                       double count, double momentum, double *running_mean,
                       double *running_var)
{
    double unbias = count > 1 ? count / (count - 1) : 1.0;
    for (int64_t c = 0; c < channels; c++) {
        running_mean[c] = (1 - momentum) * running_mean[c] + momentum * mean[c];
        running_var[c] = (1 - momentum) * running_var[c] + momentum * var[c] * unbias;
    }
}

#define BN_STR2(x) #x
#define BN_STR(x) BN_STR2(x)
const char *bn_build_info(void)
{
    return "compiler: "
#if defined(__clang__)
        "clang " __clang_version__
#elif defined(__GNUC__)
        "gcc " __VERSION__
#else
        "unknown"
#endif
        "\nopenmp: "
#ifdef _OPENMP
        "on (" BN_STR(_OPENMP) ")"
#else
        "off (serial build)"
#endif
        "\nsimd: " BN_CLONES_NAMES
        "\nbaseline:"
#ifdef __SSE2__
        " SSE2"
#endif
#ifdef __AVX2__
        " AVX2"
#endif
#ifdef __AVX512F__
        " AVX512F"
#endif
#ifdef __FMA__
        " FMA"
#endif
#ifdef __SANITIZE_ADDRESS__
        "\nsanitizers: address"
#endif
        ;
}

#define T float
#define SFX f32
#include "bncore_template.h"
#undef T
#undef SFX

#define T double
#define SFX f64
#include "bncore_template.h"
#undef T
#undef SFX

#endif /* BNCORE_IMPL_H */
