/* The C test programs' harness: raw files in and out of DIR (written and read
 * by tests/test_c_api.py) and a CHECK that reports a failing call. Include
 * after defining BN_IO_PROG, the program's name for its messages; set `dir`
 * from argv before the first get or put. */
#ifndef BN_IO_H
#define BN_IO_H

#include <stdio.h>
#include <stdlib.h>

static const char *dir;

static void *get(const char *name, size_t bytes)
{
    char path[4096];
    void *buf = malloc(bytes ? bytes : 1);
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "rb");
    if (!buf || !f || fread(buf, 1, bytes, f) != bytes) {
        fprintf(stderr, BN_IO_PROG ": cannot read %s\n", path);
        exit(1);
    }
    fclose(f);
    return buf;
}

static void put(const char *name, const void *buf, size_t bytes)
{
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "wb");
    if (!f || fwrite(buf, 1, bytes, f) != bytes) {
        fprintf(stderr, BN_IO_PROG ": cannot write %s\n", path);
        exit(1);
    }
    fclose(f);
}

#define CHECK(call)                                                           \
    do {                                                                      \
        int err_ = (call);                                                    \
        if (err_) {                                                           \
            fprintf(stderr, BN_IO_PROG ": %s returned %d\n", #call, err_);    \
            return 1;                                                         \
        }                                                                     \
    } while (0)

#endif
