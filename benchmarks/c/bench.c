/* bench.c -- times the C kernels without Python, for tuning the work-unit plan.
 *
 *   cc -O3 -fopenmp -I include benchmarks/c/bench.c -o /tmp/bnbench -lm
 *   /tmp/bnbench [-d f32|f64] [-t threads] [-r rounds] OP LAYOUT N C H W ...
 *
 * OP: train, eval, backward, backward_eval; LAYOUT: nchw or nhwc (channels
 * last: outer = N*H*W, inner = 1). Several OP LAYOUT N C H W groups may
 * follow each other; they are timed interleaved, round by round, and the
 * median and the minimum wall time per call (us) of each are printed, and the
 * median CPU time per call and thread: on a shared machine the minimum and,
 * at one thread, the CPU time are the steadier figures (CPU time also counts
 * OpenMP threads spinning at a barrier). A round repeats the call for
 * at least 5 ms into one output buffer. */
#define BNCORE_IMPLEMENTATION
#include "bncore.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

enum { OP_TRAIN, OP_EVAL, OP_BACKWARD, OP_BACKWARD_EVAL };

typedef struct {
    int op, f64;
    bn_shape s;
    void *x, *dy, *out;
    double *w, *b, *mean, *var, *invstd, *dw, *db;
    double us[64], cpu[64];
} cell;

static double now(clockid_t clock)
{
    struct timespec t;
    clock_gettime(clock, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}

static void call(cell *c, int nt)
{
    bn_shape s = c->s;
    if (c->f64) {
        const double *x = c->x, *dy = c->dy;
        double *o = c->out;
        switch (c->op) {
        case OP_TRAIN: bn_train_f64(x, o, s, c->w, c->b, 1e-5, c->mean, c->invstd, NULL,
                                    BN_ACT_NONE, 0, nt); break;
        case OP_EVAL: bn_eval_f64(x, o, s, c->mean, c->var, c->w, c->b, 1e-5, BN_ACT_NONE, 0,
                                  nt); break;
        default: bn_backward_f64(dy, x, NULL, o, s, c->mean, c->invstd, c->w,
                                 c->op == OP_BACKWARD, c->dw, c->db, BN_ACT_NONE, 0, nt);
        }
    } else {
        const float *x = c->x, *dy = c->dy;
        float *o = c->out;
        switch (c->op) {
        case OP_TRAIN: bn_train_f32(x, o, s, c->w, c->b, 1e-5, c->mean, c->invstd, NULL,
                                    BN_ACT_NONE, 0, nt); break;
        case OP_EVAL: bn_eval_f32(x, o, s, c->mean, c->var, c->w, c->b, 1e-5, BN_ACT_NONE, 0,
                                  nt); break;
        default: bn_backward_f32(dy, x, NULL, o, s, c->mean, c->invstd, c->w,
                                 c->op == OP_BACKWARD, c->dw, c->db, BN_ACT_NONE, 0, nt);
        }
    }
}

static double *param(int64_t n, double lo, double hi)
{
    double *p = malloc(sizeof(double) * (size_t)n);
    for (int64_t i = 0; i < n; i++) p[i] = lo + (hi - lo) * rand() / (double)RAND_MAX;
    return p;
}

static int cmp(const void *a, const void *b)
{
    double d = *(const double *)a - *(const double *)b;
    return (d > 0) - (d < 0);
}

int main(int argc, char **argv)
{
    static const char *ops[] = {"train", "eval", "backward", "backward_eval"};
    int f64 = 0, nt = 1, rounds = 7, ncell = 0, i = 1;
    cell cells[32];
    for (; i + 1 < argc && argv[i][0] == '-'; i += 2) {
        if (!strcmp(argv[i], "-d")) f64 = !strcmp(argv[i + 1], "f64");
        else if (!strcmp(argv[i], "-t")) nt = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "-r")) rounds = atoi(argv[i + 1]);
    }
    if (rounds > 64) rounds = 64;
    for (; i + 5 < argc && ncell < 32; i += 6) {
        cell *c = &cells[ncell++];
        memset(c, 0, sizeof *c);
        c->f64 = f64;
        for (c->op = 0; c->op < 4 && strcmp(argv[i], ops[c->op]); c->op++) {}
        if (c->op == 4) { fprintf(stderr, "unknown op %s\n", argv[i]); return 2; }
        int64_t n = atoll(argv[i + 2]), ch = atoll(argv[i + 3]);
        int64_t hw = atoll(argv[i + 4]) * atoll(argv[i + 5]);
        c->s = strcmp(argv[i + 1], "nhwc") ? (bn_shape){n, ch, hw} : (bn_shape){n * hw, ch, 1};
        size_t el = f64 ? 8 : 4, total = (size_t)(n * ch * hw);
        c->x = malloc(el * total);
        c->dy = malloc(el * total);
        c->out = malloc(el * total);
        for (size_t k = 0; k < total; k++) {
            double v = rand() / (double)RAND_MAX, g = rand() / (double)RAND_MAX - 0.5;
            if (f64) ((double *)c->x)[k] = v, ((double *)c->dy)[k] = g;
            else ((float *)c->x)[k] = (float)v, ((float *)c->dy)[k] = (float)g;
        }
        c->w = param(ch, 0.5, 1.5);
        c->b = param(ch, -1, 1);
        c->mean = param(ch, 0.4, 0.6);
        c->var = param(ch, 0.05, 0.1);
        c->invstd = param(ch, 3, 4);
        c->dw = param(ch, 0, 0);
        c->db = param(ch, 0, 0);
    }
    for (int r = 0; r < rounds; r++)
        for (int k = 0; k < ncell; k++) {
            cell *c = &cells[k];
            int reps = 0;
            call(c, nt);  /* warm */
            double t0 = now(CLOCK_MONOTONIC), p0 = now(CLOCK_PROCESS_CPUTIME_ID), t;
            do {
                call(c, nt);
                reps++;
            } while ((t = now(CLOCK_MONOTONIC) - t0) < 5e-3);
            c->us[r] = 1e6 * t / reps;
            c->cpu[r] = 1e6 * (now(CLOCK_PROCESS_CPUTIME_ID) - p0) / reps / nt;
        }
    for (int k = 0; k < ncell; k++) {
        cell *c = &cells[k];
        qsort(c->us, (size_t)rounds, sizeof(double), cmp);
        qsort(c->cpu, (size_t)rounds, sizeof(double), cmp);
        printf("%-13s %s outer=%-6lld C=%-4lld inner=%-5lld %dt  median %8.2f us  min %8.2f"
               "  cpu %8.2f\n", ops[c->op], f64 ? "f64" : "f32", (long long)c->s.outer,
               (long long)c->s.channels, (long long)c->s.inner, nt, c->us[rounds / 2], c->us[0],
               c->cpu[rounds / 2]);
    }
    return 0;
}
