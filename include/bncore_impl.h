/* bncore_impl.h -- implementation of bncore.h; included once, through
 * bncore.h with BNCORE_IMPLEMENTATION defined. The dtype-generic kernels live
 * in bncore_template.h, instantiated below for float and double. */
#ifndef BNCORE_IMPL_H
#define BNCORE_IMPL_H

#include <float.h>
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

/* Run-time SIMD dispatch, on GCC and Clang for x86-64 only: elsewhere, or
 * with BNCORE_NO_DISPATCH defined (setup.py: BNCORE_NO_DISPATCH=1), every
 * kernel is plain portable C, compiled for the baseline. */
#if defined(__GNUC__) && defined(__x86_64__) && !defined(BNCORE_NO_DISPATCH) && \
    !defined(__SANITIZE_ADDRESS__)
#define BN_DISPATCH 1
#else
#define BN_DISPATCH 0
#endif

/* Non-temporal stores write a large output straight to memory, without first
 * reading each line in (1.3x on a large copy here). GCC has no portable
 * non-temporal store, so those loops are compiled for AVX-512 and for AVX2 and
 * one is chosen at run time (bn_cpu_nt: 2, 1, or 0 for plain stores). */
#if BN_DISPATCH
#define BN_NT 1
#include <immintrin.h>
#define BN_NT_TARGET __attribute__((target("avx2,fma")))
#define BN_NT512_TARGET __attribute__((target("avx512f,avx2,fma")))
static int bn_cpu_nt(void)
{
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma")) return 0;
    return __builtin_cpu_supports("avx512f") ? 2 : 1;
}
#else
#define BN_NT 0
static int bn_cpu_nt(void) { return 0; }
#endif

/* Hot inner loops are compiled for AVX-512 and AVX2 besides the baseline and
 * picked at load time, since a wheel cannot assume the build machine's ISA
 * (GCC on Linux: target_clones needs ifunc). */
#if BN_DISPATCH && !defined(__clang__) && defined(__linux__)
#define BN_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define BN_CLONES_NAMES "x86-64-v4 (AVX-512), x86-64-v3 (AVX2+FMA), baseline"
#else
#define BN_CLONES
#define BN_CLONES_NAMES "baseline only"
#endif

/* Tunables; those in #ifndef may be set with -D when timing with benchmarks/c/bench.c. */
#define BN_RUN 4096                /* NCHW: elements per work unit (L1-sized, re-read once);
                                    * shorter planes are grouped, up to this many elements */
#ifndef BN_TILE_BYTES
#define BN_TILE_BYTES (512 << 10)  /* row layout: bytes per rows x columns unit */
#endif
#define BN_MAX_COLS 2048           /* row layout: columns per unit (whole rows up to this:
                                    * short row segments defeat the hardware prefetcher) */
#ifndef BN_SPLIT_COLS
#define BN_SPLIT_COLS 1024         /* ... longer rows in tiles of equal width up to this (2048:
                                    * 1.1x the time at 4096 channels; 1536 rows stay whole) */
#endif
#ifndef BN_MIN_RUN
#define BN_MIN_RUN 1024            /* inner runs shorter than this use the row layout */
#endif
#ifndef BN_MIN_SEG
#define BN_MIN_SEG 16              /* ... in segments of whole planes from this length on */
#endif
#ifndef BN_SEG_COLS
#define BN_SEG_COLS 1024           /* ... and up to this many columns per unit */
#endif
#define BN_SEG_MAXN (BN_SEG_COLS / BN_MIN_SEG)  /* segments per unit, at most */
#ifndef BN_COEF_BYTES
#define BN_COEF_BYTES 2048         /* row layout, elementwise passes: bytes of each per-column
                                    * coefficient array per sweep: 6 of 8 KB (2048 floats) left L1
                                    * (forward 0.8x, backward 0.9x at 4096 channels;
                                    * 4 KB: 5% slower) */
#endif
#define BN_FOLD_COLS 64            /* channels-last: fold rows of fewer channels up to this width */
#ifndef BN_GROUP_BYTES
#define BN_GROUP_BYTES (2 << 20)   /* bytes per round, still in L2/L3 for the 2nd pass
                                    * (8 MB rounds: 10-25% slower at 1 thread here) */
#endif
#define BN_STREAM_BYTES (16 << 20)  /* outputs this large are written with non-temporal stores */
#define BN_MIN_PARALLEL 65536      /* below this many elements one thread beats a fork/join */
#define BN_LANES 32                /* independent double accumulators per run */
#define BN_LANES_TAIL 8            /* ... per block of a run's rest, and per segment (one
                                    * AVX-512 vector of doubles) */
#define BN_SHIFT_LEN 16            /* run_moments: values averaged for the shift */
#define BN_SHIFT_ROWS 8            /* tile_moments: rows averaged for the shift */
#define BN_STRIP 512               /* tile kernels: columns per sweep (accumulators in L1) */

/* A fixed decomposition of one tensor into work units. Reductions write one
 * partial per (unit, channel) and merge them in a fixed order, so the result
 * does not depend on which thread ran which unit. Units are ordered by
 * channel (NCHW) or column tile (channels-last), so a round of whole channels
 * is a contiguous range of units. */
typedef struct {
    bn_shape s;
    int rows;            /* 1: row layout (channels-last, or short inner runs) */
    int64_t seg;         /* row layout: values per partial column, inner (segments of
                          * whole planes) or 1 (columns: channels-last, tiny planes) */
    int64_t kruns;       /* NCHW: runs per (n, c) plane */
    int64_t nb;          /* NCHW: planes (n) per unit, for planes shorter than BN_RUN */
    int64_t nnb;         /* NCHW: blocks of nb planes */
    int64_t rb_rows;     /* channels-last: rows per unit */
    int64_t nrb;         /* channels-last: row blocks */
    int64_t fold;        /* channels-last with few channels: rows folded into one wide row */
    int64_t mrows;       /* channels-last: rows of the folded matrix (outer / fold) */
    int64_t width;       /* channels-last: its columns (fold * channels * inner) */
    int64_t cols;        /* channels-last: columns per unit */
    int64_t ntiles;      /* channels-last: column tiles */
    int64_t nunits;
    int64_t nslots;      /* partial slots: one per unit (NCHW), per (row block, column) */
    int64_t round;       /* channels (NCHW) or tiles (channels-last) per round */
    int64_t nrounds;
    int stream;          /* outputs written with non-temporal stores: bn_cpu_nt() or 0 */
} bn_plan;

static int64_t bn_cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
static int64_t bn_max64(int64_t a, int64_t b) { return a > b ? a : b; }
static int64_t bn_min64(int64_t a, int64_t b) { return a < b ? a : b; }

static bn_plan bn_make_plan(bn_shape s, size_t elsize)
{
    bn_plan p;
    memset(&p, 0, sizeof p);
    p.s = s;
    /* short inner runs (channels-last has inner == 1) are better read as
     * rows: row o holds C*inner values, column j belongs to channel (j / inner) % C.
     * Runs of BN_MIN_SEG values and more are read as segments of whole planes
     * (one partial per plane column), shorter ones column by column (one partial
     * per column): a strided run of a few cache lines per plane defeats the
     * prefetcher, and per-column partials cost more than short planes' tails.
     * inner == 0 stays on the run layout, whose rounds still visit every channel
     * (rows of width 0 would have no tile, so no round to write the results in) */
    p.rows = s.inner > 0 && s.inner < BN_MIN_RUN;
    p.seg = s.inner >= BN_MIN_SEG ? s.inner : 1;
    p.stream = s.outer * s.channels * s.inner * (int64_t)elsize >= BN_STREAM_BYTES ? bn_cpu_nt() : 0;
    if (!p.rows) {
        int64_t per_channel = s.outer * s.inner * (int64_t)elsize;
        p.kruns = bn_cdiv(s.inner, BN_RUN);
        p.nb = bn_max64(1, bn_min64(s.outer, BN_RUN / bn_max64(1, s.inner)));
        p.nnb = bn_cdiv(s.outer, p.nb);
        p.nunits = s.channels * p.nnb * p.kruns;
        p.nslots = p.nunits;
        p.round = bn_max64(1, BN_GROUP_BYTES / bn_max64(1, per_channel));
        p.nrounds = bn_cdiv(s.channels, p.round);
    } else {
        int64_t row = s.channels * s.inner;
        /* a row of 3 values does not fill a vector: view k rows as one row
         * (k the largest divisor of outer with k * row <= BN_FOLD_COLS) */
        p.fold = 1;
        for (int64_t k = BN_FOLD_COLS / bn_max64(1, row); k > 1; k--)
            if (s.outer % k == 0) { p.fold = k; break; }
        p.mrows = s.outer / p.fold;
        p.width = row * p.fold;
        /* tiles hold whole channels, so a round finishes the channels it reads */
        int64_t maxc = p.seg > 1 ? BN_SEG_COLS
                       : p.width > BN_MAX_COLS ? BN_SPLIT_COLS : BN_MAX_COLS;
        p.cols = bn_max64(1, bn_min64(p.width, bn_max64(1, maxc / s.inner) * s.inner));
        p.ntiles = bn_cdiv(p.width, p.cols);
        /* tiles of equal width (3072 columns: 3 x 1024, not 2048 + 1024) */
        if (p.seg == 1 && p.ntiles > 1) {
            p.cols = bn_cdiv(p.width / s.inner, p.ntiles) * s.inner;
            p.ntiles = bn_cdiv(p.width, p.cols);  /* no empty last tile */
        }
        p.rb_rows = bn_max64(1, BN_TILE_BYTES / (p.cols * (int64_t)elsize));
        p.nrb = bn_cdiv(p.mrows, p.rb_rows);
        p.nunits = p.ntiles * p.nrb;
        p.nslots = p.nrb * (p.width / p.seg);
        p.round = bn_max64(1, BN_GROUP_BYTES / bn_max64(1, p.mrows * p.cols * (int64_t)elsize));
        p.nrounds = bn_cdiv(p.ntiles, p.round);
    }
    return p;
}

/* Units and channels of round r: [*u0, *u1) and [*c0, *c1). */
static void bn_round(const bn_plan *p, int64_t r, int64_t *u0, int64_t *u1,
                     int64_t *c0, int64_t *c1)
{
    if (!p->rows) {
        int64_t per = p->nnb * p->kruns;
        *c0 = r * p->round;
        *c1 = bn_min64(p->s.channels, *c0 + p->round);
        *u0 = *c0 * per;
        *u1 = *c1 * per;
    } else {
        int64_t t0 = r * p->round, t1 = bn_min64(p->ntiles, t0 + p->round);
        *u0 = t0 * p->nrb;
        *u1 = t1 * p->nrb;
        *c0 = t0 * p->cols / p->s.inner;  /* folded plans have a single tile: [0, C) */
        *c1 = bn_min64(p->s.channels, t1 * p->cols / p->s.inner);
    }
}

/* NCHW unit u: *np runs of *len elements, the first at *off and the others
 * C*inner apart (the same run of consecutive planes), in channel *c. */
static void bn_run_of(const bn_plan *p, int64_t u, int64_t *off, int64_t *len, int64_t *np,
                      int64_t *c)
{
    int64_t per = p->nnb * p->kruns, r = u % per, n = r / p->kruns * p->nb, k = r % p->kruns;
    *c = u / per;
    *off = (n * p->s.channels + *c) * p->s.inner + k * BN_RUN;
    *len = bn_min64(BN_RUN, p->s.inner - k * BN_RUN);
    *np = bn_min64(p->nb, p->s.outer - n);
}

/* Channels-last unit u: rows [*r0, *r0 + *nr) x columns [*c0, *c0 + *nc). */
static void bn_tile_of(const bn_plan *p, int64_t u, int64_t *r0, int64_t *nr,
                       int64_t *c0, int64_t *nc)
{
    int64_t t = u / p->nrb, rb = u % p->nrb;
    *r0 = rb * p->rb_rows;
    *nr = bn_min64(p->rb_rows, p->mrows - *r0);
    *c0 = t * p->cols;
    *nc = bn_min64(p->cols, p->width - *c0);
}

/* Channels of columns [c0, c0 + nc): ch[j], counted up without a division
 * per column (a tile of a few rows would spend most of its time dividing). */
static void bn_channels_of(const bn_plan *p, int64_t c0, int64_t nc, int64_t *ch)
{
    int64_t c = (c0 / p->s.inner) % p->s.channels, l = c0 % p->s.inner;
    for (int64_t j = 0; j < nc; j++) {
        ch[j] = c;
        if (++l == p->s.inner) {
            l = 0;
            if (++c == p->s.channels) c = 0;
        }
    }
}

/* Count of the partial in slot j (NCHW) or row block j (channels-last). */
static double bn_slot_count(const bn_plan *p, int64_t j)
{
    if (!p->rows)
        return (double)(bn_min64(BN_RUN, p->s.inner - (j % p->kruns) * BN_RUN) *
                        bn_min64(p->nb, p->s.outer - (j % (p->nnb * p->kruns)) / p->kruns * p->nb));
    return (double)bn_min64(p->rb_rows, p->mrows - j * p->rb_rows);
}

/* 1/sqrt(var + eps), taken as 0 where var + eps == 0 (eps = 0 and a constant
 * channel), as PyTorch's CPU kernel does: xhat is then 0, the limit as eps -> 0,
 * rather than 0 * inf = NaN. NaN stays NaN. */
static double bn_invstd(double var, double eps)
{
    return var + eps == 0 ? 0.0 : 1.0 / sqrt(var + eps);
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

/* Merges the partials of channels [lo, hi) in a fixed order, whatever the
 * thread count: Chan's formula on (mean, M2) partials when moments is set
 * (o0 = mean, o1 = M2), plain sums otherwise. NCHW partials of a channel are
 * contiguous; row-layout partials are stored row block by row block, so they
 * are merged row block by row block with channels innermost (contiguous). */
static void bn_merge(const bn_plan *p, const double *part, int64_t lo, int64_t hi,
                     int moments, double *o0, double *o1)
{
    if (!p->rows) {
        int64_t per = p->nnb * p->kruns;
        for (int64_t c = lo; c < hi; c++) {
            double n = 0, a = 0, q = 0;
            for (int64_t j = c * per; j < (c + 1) * per; j++) {
                if (moments) {
                    bn_chan(&n, &a, &q, bn_slot_count(p, j), part[2 * j], part[2 * j + 1]);
                } else {
                    a += part[2 * j];
                    q += part[2 * j + 1];
                }
            }
            o0[c] = a;
            o1[c] = q;
        }
        return;
    }
    int64_t ci = p->s.inner / p->seg, sw = p->width / p->seg;
    double n = 0;
    for (int64_t c = lo; c < hi; c++) o0[c] = o1[c] = 0;
    for (int64_t rb = 0; rb < p->nrb; rb++) {
        double nb = bn_slot_count(p, rb) * (double)p->seg;
        for (int64_t i = 0; i < p->fold; i++)
            for (int64_t l = 0; l < ci; l++) {
                const double *s = part + 2 * (rb * sw + i * p->s.channels * ci + l);
                if (moments) {  /* bn_chan, with the count shared by all channels */
                    double f = nb / (n + nb);
                    for (int64_t c = lo; c < hi; c++) {
                        double d = s[2 * c * ci] - o0[c];
                        o0[c] += d * f;
                        o1[c] += s[2 * c * ci + 1] + d * d * n * f;
                    }
                    n += nb;
                } else {
                    for (int64_t c = lo; c < hi; c++) {
                        o0[c] += s[2 * c * ci];
                        o1[c] += s[2 * c * ci + 1];
                    }
                }
            }
    }
}

/* Chunk t of nt of the range [lo, hi), for merging channels in parallel. */
static void bn_chunk(int64_t lo, int64_t hi, int64_t t, int64_t nt, int64_t *a, int64_t *b)
{
    int64_t len = hi - lo, q = len / nt, r = len % nt;
    *a = lo + t * q + (t < r ? t : r);
    *b = *a + q + (t < r);
}

/* Threads for `work` elements in `units` independent pieces: one below
 * BN_MIN_PARALLEL elements, where a fork/join costs more than it saves. */
static int bn_threads_for(int n_threads, int64_t work, int64_t units)
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

static int bn_threads(int n_threads, const bn_plan *p)
{
    return bn_threads_for(n_threads, p->s.outer * p->s.channels * p->s.inner, p->nunits);
}

int bn_default_threads(void)
{
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

/* ---- argument checks: each public function calls these first and returns
 * BN_EINVAL before it writes anything ------------------------------------- */

/* A NULL pointer where n > 0 values are to be read or written. */
#define BN_MISSING(p, n) ((p) == NULL && (n) > 0)

/* Negative sizes, or a tensor whose byte size does not fit int64. */
static int bn_bad_shape(bn_shape s, size_t elsize)
{
    int64_t lim = INT64_MAX / (int64_t)elsize;
    if (s.outer < 0 || s.channels < 0 || s.inner < 0) return 1;
    if (s.channels > 0 && s.outer > lim / s.channels) return 1;
    int64_t oc = s.outer * s.channels;
    return oc > 0 && s.inner > lim / oc;
}

/* Elements of s; 0 for a shape bn_bad_shape rejects (no overflow to reach). */
static int64_t bn_numel(bn_shape s)
{
    return bn_bad_shape(s, 1) ? 0 : s.outer * s.channels * s.inner;
}

/* eps: finite and >= 0 (NaN fails both comparisons). */
static int bn_bad_eps(double eps) { return !(eps >= 0 && eps <= DBL_MAX); }

/* A known activation, with slope (read only for leaky ReLU) finite and >= 0.
 * Sets *slope to 0 for the others: the kernels run ReLU as slope 0. */
static int bn_bad_act(bn_act act, double *slope)
{
    if (act != BN_ACT_NONE && act != BN_ACT_RELU && act != BN_ACT_LEAKY_RELU) return 1;
    if (act != BN_ACT_LEAKY_RELU) *slope = 0;
    return !(*slope >= 0 && *slope <= DBL_MAX);
}

/* Outputs may alias an input exactly, never partly: n elements of elsize
 * bytes at a and at b overlap without starting at the same address. */
static int bn_partial_overlap(const void *a, const void *b, int64_t n, size_t elsize)
{
    uintptr_t pa = (uintptr_t)a, pb = (uintptr_t)b, len = (uintptr_t)n * elsize;
    if (!a || !b || n <= 0 || pa == pb) return 0;
    return pa < pb + len && pb < pa + len;
}

int bn_merge_stats(int64_t k, int64_t channels, const double *count,
                   const double *mean, const double *m2,
                   double *out_count, double *out_mean, double *out_m2)
{
    if (k < 0 || channels < 0 || (k > 0 && channels > INT64_MAX / k) || !out_count ||
        BN_MISSING(count, k) || BN_MISSING(mean, k * channels) || BN_MISSING(m2, k * channels) ||
        BN_MISSING(out_mean, channels) || BN_MISSING(out_m2, channels))
        return BN_EINVAL;
    for (int64_t j = 0; j < k; j++)
        if (!(count[j] >= 0 && count[j] <= DBL_MAX)) return BN_EINVAL;
    /* bn_chan, the one merge formula, part by part for each channel (k is the
     * number of processes or ghost batches: the strided reads cost nothing) */
    double n = 0;
    for (int64_t c = 0; c < channels; c++) {
        double a = 0, q = 0;
        n = 0;
        for (int64_t j = 0; j < k; j++)
            bn_chan(&n, &a, &q, count[j], mean[j * channels + c], m2[j * channels + c]);
        out_mean[c] = a;
        out_m2[c] = q;
    }
    if (channels == 0)
        for (int64_t j = 0; j < k; j++) n += count[j];
    *out_count = n;
    return 0;
}

int bn_update_running(int64_t channels, const double *mean, const double *var,
                      double count, double momentum, double *running_mean,
                      double *running_var)
{
    if (channels < 0 || BN_MISSING(mean, channels) || BN_MISSING(var, channels) ||
        BN_MISSING(running_mean, channels) || BN_MISSING(running_var, channels) ||
        !(count >= 0 && count <= DBL_MAX) || !(momentum >= 0 && momentum <= 1))
        return BN_EINVAL;
    double unbias = count > 1 ? count / (count - 1) : 1.0;
    for (int64_t c = 0; c < channels; c++) {
        running_mean[c] = (1 - momentum) * running_mean[c] + momentum * mean[c];
        running_var[c] = (1 - momentum) * running_var[c] + momentum * var[c] * unbias;
    }
    return 0;
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

/* ---- masked statistics: a fixed decomposition into (row block, channel,
 * inner chunk) units of about BN_MASK_BLOCK elements per row block (all
 * channels), so a thread's consecutive units share a block in cache. */
#define BN_MASK_BLOCK 65536

typedef struct {
    bn_shape s;
    int64_t rb;       /* outer rows per block */
    int64_t nblocks;  /* row blocks */
    int64_t ic;       /* inner values per chunk */
    int64_t kin;      /* chunks per inner run */
    int64_t nunits;   /* nblocks * channels * kin */
} bn_mask_plan;

static bn_mask_plan bn_make_mask_plan(bn_shape s)
{
    bn_mask_plan p;
    int64_t row = bn_max64(1, s.channels * s.inner);
    p.s = s;
    p.rb = bn_max64(1, BN_MASK_BLOCK / row);
    p.nblocks = bn_cdiv(s.outer, p.rb);
    p.ic = bn_max64(1, bn_min64(s.inner, BN_MASK_BLOCK));
    p.kin = s.inner > 0 ? bn_cdiv(s.inner, p.ic) : 1;
    p.nunits = p.nblocks * s.channels * p.kin;
    return p;
}

/* Unit u: rows [*o0, *o1) of channel *c, inner values [*i0, *i1). */
static void bn_mask_unit(const bn_mask_plan *p, int64_t u, int64_t *o0, int64_t *o1,
                         int64_t *c, int64_t *i0, int64_t *i1)
{
    int64_t k = u % p->kin, rc = u / p->kin;
    *c = rc % p->s.channels;
    *o0 = rc / p->s.channels * p->rb;
    *o1 = bn_min64(p->s.outer, *o0 + p->rb);
    *i0 = k * p->ic;
    *i1 = bn_min64(p->s.inner, *i0 + p->ic);
}

/* The templates' names: FN(name) is name_f32 or name_f64. */
#define BN_CAT2(a, b) a##_##b
#define BN_CAT(a, b) BN_CAT2(a, b)
#define FN(name) BN_CAT(name, SFX)

#define T float
#define SFX f32
#include "bncore_template.h"
#include "bncore_norms_template.h"
#undef T
#undef SFX

#define T double
#define SFX f64
#include "bncore_template.h"
#include "bncore_norms_template.h"
#undef T
#undef SFX
#undef FN
#undef BN_CAT
#undef BN_CAT2

#endif /* BNCORE_IMPL_H */
