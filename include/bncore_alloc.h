/* bncore_alloc.h -- the output cache of the Python extension, included by
 * bncore/_kernels.pyx only: NOT part of the C API (bncore.h does not include
 * it, and it needs Python and NumPy). It lives here so that the include path
 * and the source distribution carry it with the other headers.
 *
 * A NumPy memory handler (PyDataMem_Handler, NumPy >= 1.22) that bncore
 * installs only around the allocation of its own large output arrays. Such
 * an array remembers the handler and frees through it; a freed buffer,
 * already faulted in, is kept in a small bounded cache and handed to
 * the next bncore output of a fitting size. A fresh multi-MB output
 * otherwise costs a page fault (and the kernel zeroing a page) per 4 KiB or
 * 2 MiB: about as long as the batch-norm pass that writes it.
 *
 * The caller gets an ordinary ndarray that owns its memory; nothing else
 * changes. Arrays of other libraries never use this handler (NumPy's handler
 * is per context and is restored right after the allocation).
 *
 * Bound: at most bn_cache.max_bytes (default 256 MiB) in at most
 * BN_CACHE_SLOTS buffers, each at least BN_CACHE_MIN bytes; outputs smaller
 * than that are plain np.empty. BNCORE_OUTPUT_CACHE=0 (or off/false/no) in
 * the environment turns it off, BNCORE_OUTPUT_CACHE=<MiB> sets the bound;
 * bncore._kernels.output_cache(enabled=False) turns it off at run time and
 * releases what it holds.
 *
 * Thread safety: every operation takes bn_cache.lock (a PyThread lock), so
 * buffers may be allocated and freed from any thread; the first use (which
 * makes the lock) runs under the GIL, as every NumPy allocation does. Fork: a child process drops the parent's cached buffers at
 * its first use (their pages are shared copy-on-write, so reusing them would
 * fault again) and makes a new lock. */
#ifndef BNCORE_ALLOC_H
#define BNCORE_ALLOC_H

#include <Python.h>
#include <pythread.h>
#include <numpy/arrayobject.h>
#include <stdlib.h>
#include <string.h>
#if defined(__linux__)
#include <sys/mman.h>
#include <unistd.h>
#define BN_HAVE_PID 1
#endif

#define BN_CACHE_MIN ((size_t)4 << 20)        /* smaller outputs: NumPy's own allocator */
#define BN_CACHE_DEFAULT ((size_t)256 << 20)  /* default bound on held bytes */
#define BN_CACHE_SLOTS 16                     /* most buffers held at once */
/* The capacity is kept in a header of 16 bytes before the data: data
 * addresses are then 16 mod 4096, as those of NumPy's own large arrays (glibc
 * maps them with a 16-byte header). An output placed a few cache lines after
 * its input modulo 4 KiB runs ~1.4x slower (loads wait on earlier stores to
 * the same 4 KiB offset: 4K aliasing), so matching NumPy's offset keeps a
 * cached output exactly as fast as np.empty_like(x). */
#define BN_CACHE_HEAD 16
#define BN_CACHE_ALIGN ((size_t)2 << 20)      /* large buffers on huge-page boundaries */

typedef struct {
    char *base[BN_CACHE_SLOTS];    /* held buffers, oldest first */
    size_t cap[BN_CACHE_SLOTS];    /* their data capacities */
    int n;                         /* buffers held */
    size_t held;                   /* bytes held */
    size_t max_bytes;
    int enabled, initialized;
    long pid;                      /* process that owns the entries */
    PyThread_type_lock lock;
    unsigned long long hits, misses, released, forks;
} bn_cache_state;

static bn_cache_state bn_cache;

/* ---- raw buffers: a header holding the capacity, then the data ---------- */

static void *bn_raw_alloc(size_t cap, int zero)
{
    char *base = NULL;
    if (cap > (size_t)-1 - BN_CACHE_ALIGN) return NULL;
    if (cap >= BN_CACHE_MIN) {
#ifdef _WIN32
        if (!(base = (char *)malloc(cap + BN_CACHE_HEAD))) return NULL;
#else
        if (posix_memalign((void **)&base, BN_CACHE_ALIGN, cap + BN_CACHE_HEAD)) return NULL;
#endif
#if defined(__linux__) && defined(MADV_HUGEPAGE)
        /* as NumPy's default allocator does for arrays of 4 MiB and more:
         * 512x fewer faults where transparent huge pages are `madvise` */
        madvise(base, cap + BN_CACHE_HEAD, MADV_HUGEPAGE);
#endif
        if (zero) memset(base + BN_CACHE_HEAD, 0, cap);
    } else {
        base = (char *)(zero ? calloc(1, cap + BN_CACHE_HEAD) : malloc(cap + BN_CACHE_HEAD));
        if (!base) return NULL;
    }
    memcpy(base, &cap, sizeof cap);
    return base + BN_CACHE_HEAD;
}

static size_t bn_raw_cap(void *p)
{
    size_t cap;
    memcpy(&cap, (char *)p - BN_CACHE_HEAD, sizeof cap);
    return cap;
}

/* ---- the cache (callers hold bn_cache.lock) ------------------------------ */

static void bn_cache_drop(int i)
{
    bn_cache.held -= bn_cache.cap[i];
    memmove(bn_cache.base + i, bn_cache.base + i + 1, sizeof(char *) * (size_t)(bn_cache.n - i - 1));
    memmove(bn_cache.cap + i, bn_cache.cap + i + 1, sizeof(size_t) * (size_t)(bn_cache.n - i - 1));
    bn_cache.n--;
}

/* Frees the oldest buffers until `need` more bytes and one more buffer fit. */
static void bn_cache_shrink(size_t need)
{
    while (bn_cache.n > 0 &&
           (bn_cache.n == BN_CACHE_SLOTS || bn_cache.held + need > bn_cache.max_bytes)) {
        free(bn_cache.base[0]);
        bn_cache.released++;
        bn_cache_drop(0);
    }
}

static long bn_getpid(void)
{
#ifdef BN_HAVE_PID
    return (long)getpid();
#else
    return 0;
#endif
}

/* Locks the cache, initializing it on first use and dropping a parent's
 * entries in a forked child. 0 when no lock could be made (then no caching). */
static int bn_cache_lock(void)
{
    long pid = bn_getpid();
    if (!bn_cache.initialized || bn_cache.pid != pid) {
        /* first use, or a forked child: with the GIL held no other thread of
         * this process is inside the cache (a parent's lock may look held) */
        if (!bn_cache.initialized) {
            const char *env = getenv("BNCORE_OUTPUT_CACHE");
            bn_cache.enabled = 1;
            bn_cache.max_bytes = BN_CACHE_DEFAULT;
            if (env && *env) {
                char *end;
                long long mib = strtoll(env, &end, 10);
                if (*end == 0 && mib >= 0)
                    bn_cache.max_bytes = (size_t)mib << 20, bn_cache.enabled = mib > 0;
                else if (!strcmp(env, "off") || !strcmp(env, "false") || !strcmp(env, "no"))
                    bn_cache.enabled = 0;
            }
        } else {
            bn_cache.forks++;
        }
        bn_cache.lock = PyThread_allocate_lock();  /* a parent's lock is left as it was */
        bn_cache.pid = pid;
        bn_cache.initialized = 1;
        if (bn_cache.lock) {
            PyThread_acquire_lock(bn_cache.lock, WAIT_LOCK);
            while (bn_cache.n > 0) {
                free(bn_cache.base[0]);
                bn_cache_drop(0);
            }
            return 1;
        }
    }
    if (!bn_cache.lock) return 0;
    PyThread_acquire_lock(bn_cache.lock, WAIT_LOCK);
    return 1;
}

/* ---- the NumPy handler --------------------------------------------------- */

/* Best fit among held buffers of capacity in [size, size + size/4]. */
static void *bn_handler_malloc(void *ctx, size_t size)
{
    (void)ctx;
    if (size >= BN_CACHE_MIN && bn_cache_lock()) {
        int best = -1;
        for (int i = bn_cache.n - 1; i >= 0; i--)
            if (bn_cache.cap[i] >= size && bn_cache.cap[i] - size <= size / 4 &&
                (best < 0 || bn_cache.cap[i] < bn_cache.cap[best]))
                best = i;
        char *p = NULL;
        if (best >= 0) {
            p = bn_cache.base[best] + BN_CACHE_HEAD;
            bn_cache_drop(best);
            bn_cache.hits++;
        } else {
            bn_cache.misses++;
        }
        PyThread_release_lock(bn_cache.lock);
        if (p) return p;
    }
    return bn_raw_alloc(size, 0);
}

static void *bn_handler_calloc(void *ctx, size_t nelem, size_t elsize)
{
    (void)ctx;
    if (elsize && nelem > (size_t)-1 / elsize) return NULL;
    return bn_raw_alloc(nelem * elsize, 1);
}

static void *bn_handler_realloc(void *ctx, void *ptr, size_t new_size)
{
    (void)ctx;
    if (!ptr) return bn_raw_alloc(new_size, 0);
    size_t cap = bn_raw_cap(ptr);
    if (new_size <= cap) return ptr;
    char *q = (char *)bn_raw_alloc(new_size, 0);
    if (!q) return NULL;
    memcpy(q, ptr, cap);
    free((char *)ptr - BN_CACHE_HEAD);
    return q;
}

static void bn_handler_free(void *ctx, void *ptr, size_t size)
{
    (void)ctx;
    (void)size;  /* the header has the capacity (a reused buffer may be larger) */
    if (!ptr) return;
    char *base = (char *)ptr - BN_CACHE_HEAD;
    size_t cap = bn_raw_cap(ptr);
    if (cap >= BN_CACHE_MIN && bn_cache_lock()) {
        int keep = bn_cache.enabled && cap <= bn_cache.max_bytes;
        if (keep) {
            bn_cache_shrink(cap);
            bn_cache.base[bn_cache.n] = base;
            bn_cache.cap[bn_cache.n] = cap;
            bn_cache.n++;
            bn_cache.held += cap;
        }
        PyThread_release_lock(bn_cache.lock);
        if (keep) return;
    }
    free(base);
}

static PyDataMem_Handler bn_output_handler = {
    "bncore_output_cache",
    1,
    {NULL, bn_handler_malloc, bn_handler_calloc, bn_handler_realloc, bn_handler_free},
};

static PyObject *bn_handler_capsule;  /* lives as long as the process */

/* ---- entry points for _kernels.pyx --------------------------------------- */

/* np.empty(shape, dtype), through the cache when enabled and the array has
 * BN_CACHE_MIN bytes or more. New reference, or NULL with an exception. */
static PyObject *bn_out_empty(PyObject *shape, PyObject *dtype)
{
    PyArray_Descr *descr = NULL;
    PyArray_Dims dims = {NULL, 0};
    if (!PyArray_DescrConverter(dtype, &descr)) return NULL;
    if (!PyArray_IntpConverter(shape, &dims)) {
        Py_DECREF(descr);
        return NULL;
    }
    /* big enough to cache (an overflowing or negative shape: NumPy raises) */
    size_t nbytes = (size_t)PyDataType_ELSIZE(descr);
    int big = 1;
    for (int i = 0; i < dims.len; i++) {
        if (dims.ptr[i] < 0 || (dims.ptr[i] > 0 && nbytes > (size_t)-1 / (size_t)dims.ptr[i]))
            big = 0;
        else
            nbytes *= (size_t)dims.ptr[i];
    }
    big = big && nbytes >= BN_CACHE_MIN;
    if (big && bn_cache_lock()) {
        big = bn_cache.enabled;
        PyThread_release_lock(bn_cache.lock);
    } else {
        big = 0;
    }
    PyObject *old = NULL;
    if (big) {
        if (!bn_handler_capsule)
            bn_handler_capsule = PyCapsule_New(&bn_output_handler, "mem_handler", NULL);
        old = bn_handler_capsule ? PyDataMem_SetHandler(bn_handler_capsule) : NULL;
        if (!old) PyErr_Clear();  /* no cache this time: a plain array */
    }
    PyObject *arr = PyArray_Empty(dims.len, dims.ptr, descr, 0);  /* steals descr */
    if (old) {
        PyObject *type, *value, *tb;
        PyErr_Fetch(&type, &value, &tb);
        PyObject *ours = PyDataMem_SetHandler(old);
        if (ours) Py_DECREF(ours);
        else PyErr_Clear();
        Py_DECREF(old);
        PyErr_Restore(type, value, tb);
    }
    PyDimMem_FREE(dims.ptr);
    return arr;
}

/* State and counters as a dict; enabled (bool) and max_bytes (int >= 0)
 * change them when not None. Disabling, or lowering max_bytes, frees the
 * buffers that no longer fit. */
static PyObject *bn_out_cache(PyObject *enabled, PyObject *max_bytes)
{
    int en = -1;
    long long mb = -1;
    if (enabled != Py_None) {
        if (!PyBool_Check(enabled)) {
            PyErr_Format(PyExc_TypeError, "enabled: expected True, False or None, got %R",
                         enabled);
            return NULL;
        }
        en = enabled == Py_True;
    }
    if (max_bytes != Py_None) {
        mb = PyLong_Check(max_bytes) && !PyBool_Check(max_bytes) ? PyLong_AsLongLong(max_bytes) : -1;
        if (mb < 0) {
            PyErr_Clear();
            PyErr_Format(PyExc_ValueError,
                         "max_bytes: expected an int >= 0 (bytes) or None, got %R", max_bytes);
            return NULL;
        }
    }
    if (!bn_cache_lock()) return PyErr_NoMemory();
    if (en >= 0) bn_cache.enabled = en;
    if (mb >= 0) bn_cache.max_bytes = (size_t)mb;
    /* disabled: hold nothing; else at most max_bytes */
    while (bn_cache.n > 0 && (!bn_cache.enabled || bn_cache.held > bn_cache.max_bytes)) {
        free(bn_cache.base[0]);
        bn_cache.released++;
        bn_cache_drop(0);
    }
    bn_cache_state st = bn_cache;
    PyThread_release_lock(bn_cache.lock);
    return Py_BuildValue("{s:O,s:K,s:K,s:i,s:K,s:i,s:K,s:K,s:K,s:K}",
                         "enabled", st.enabled ? Py_True : Py_False,
                         "max_bytes", (unsigned long long)st.max_bytes,
                         "min_bytes", (unsigned long long)BN_CACHE_MIN,
                         "max_buffers", BN_CACHE_SLOTS,
                         "held_bytes", (unsigned long long)st.held,
                         "held_buffers", st.n,
                         "hits", st.hits, "misses", st.misses,
                         "released", st.released, "forks", st.forks);
}

#endif /* BNCORE_ALLOC_H */
