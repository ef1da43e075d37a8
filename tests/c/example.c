/* Eval-mode batch norm of an NCHW float32 buffer from C, without Python.
 *
 *   cc -O2 -fopenmp -I include example.c -o example -lm
 *   ./example params.bin input.bin output.bin N C H W
 *
 * params.bin: 4*C doubles, weight, bias, running_mean, running_var (PyTorch's
 * names; e.g. np.concatenate([sd[k].double().numpy() for k in ("weight",
 * "bias", "running_mean", "running_var")]).tofile("params.bin")).
 * input.bin / output.bin: N*C*H*W float32, C-contiguous NCHW. */
#define BNCORE_IMPLEMENTATION /* in exactly one .c file of the program */
#include "bncore.h"

#include <stdio.h>
#include <stdlib.h>

static void *load(const char *path, size_t bytes)
{
    void *buf = malloc(bytes);
    FILE *f = fopen(path, "rb");
    if (!buf || !f || fread(buf, 1, bytes, f) != bytes) {
        fprintf(stderr, "cannot read %zu bytes from %s\n", bytes, path);
        exit(1);
    }
    fclose(f);
    return buf;
}

int main(int argc, char **argv)
{
    if (argc != 8) {
        fprintf(stderr, "usage: %s params.bin input.bin output.bin N C H W\n", argv[0]);
        return 2;
    }
    int64_t n = atoll(argv[4]), c = atoll(argv[5]), hw = atoll(argv[6]) * atoll(argv[7]);
    size_t count = (size_t)(n * c * hw);
    double *p = (double *)load(argv[1], 4 * (size_t)c * sizeof(double));
    const double *weight = p, *bias = p + c, *mean = p + 2 * c, *var = p + 3 * c;
    float *x = (float *)load(argv[2], count * sizeof(float));
    float *y = (float *)malloc(count * sizeof(float));

    bn_shape s = {n, c, hw}; /* NCHW: outer = N, channels = C, inner = H*W */
    /* y = (x - mean) / sqrt(var + eps) * weight + bias; 0 threads = OpenMP's default */
    int err = bn_eval_f32(x, y, s, mean, var, weight, bias, 1e-5, BN_ACT_NONE, 0.0, 0);
    if (err) {
        fprintf(stderr, "bn_eval_f32 failed: %d\n", err);
        return 1;
    }

    FILE *f = fopen(argv[3], "wb");
    if (!f || fwrite(y, sizeof(float), count, f) != count) return 1;
    fclose(f);
    free(p);
    free(x);
    free(y);
    return 0;
}
