"""The output cache (include/bncore_alloc.h): fresh bncore outputs of 4 MiB and more
reuse recently freed output buffers. Reused buffers must never alias a live
array, whoever frees them (other threads, a forked child); the cache holds at
most max_bytes; turning it off frees what it holds and restores plain
allocation."""
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

from bncore import _kernels as K

try:  # where NumPy keeps it (NumPy >= 1.22); the tests that need it skip without
    from numpy._core.multiarray import get_handler_name
except ImportError:  # NumPy 1.x
    from numpy.core.multiarray import get_handler_name

MIB = 1 << 20
HANDLER = "bncore_output_cache"


@pytest.fixture(autouse=True)
def fresh_cache():
    """Each test starts with an empty, enabled cache of the default bound."""
    state = K.output_cache()
    K.output_cache(enabled=False)
    K.output_cache(enabled=True, max_bytes=256 * MIB)
    yield
    K.output_cache(enabled=False)
    K.output_cache(enabled=state["enabled"], max_bytes=state["max_bytes"])


def _range(a):
    return a.ctypes.data, a.ctypes.data + a.nbytes


def _disjoint(arrays):
    spans = sorted(_range(a) for a in arrays)
    return all(hi <= lo2 for (_, hi), (lo2, _) in zip(spans, spans[1:]))


def test_outputs_are_plain_arrays_and_the_handler_is_restored():
    for shape, dtype in (((2048, 1024), np.float32), ((3, 5), np.float64), ((0, 7), "f4"),
                         (4 * MIB // 8, None), (np.int64(9), np.float32)):
        a = K.empty_output(shape, dtype)
        want = np.empty(shape, dtype)
        assert type(a) is np.ndarray and a.shape == want.shape and a.dtype == want.dtype
        assert a.flags.c_contiguous and a.flags.owndata and a.flags.writeable
        assert get_handler_name(a) == (HANDLER if a.nbytes >= 4 * MIB else "default_allocator")
        assert get_handler_name() == "default_allocator"  # this context's handler: unchanged
    with pytest.raises(ValueError):
        K.empty_output((-1, 3), np.float32)
    with pytest.raises(TypeError):
        K.empty_output((3,), "not a dtype")
    assert get_handler_name() == "default_allocator"


def test_a_freed_buffer_is_reused_by_a_fitting_output_only():
    a = K.empty_output((8 * MIB // 4,), np.float32)
    p = a.ctypes.data
    del a
    s = K.output_cache()
    assert s["held_buffers"] == 1 and s["held_bytes"] == 8 * MIB
    b = K.empty_output((7 * MIB // 4,), np.float32)  # within 25% of the held buffer: reused
    assert b.ctypes.data == p and K.output_cache()["hits"] == s["hits"] + 1
    b[...] = 1.5
    assert np.all(b == 1.5)
    del b
    c = K.empty_output((5 * MIB // 4,), np.float32)  # 8 MiB for 5 MiB wastes too much: new
    assert c.ctypes.data != p and K.output_cache()["held_buffers"] == 1


def test_reused_buffers_never_alias_live_arrays():
    rng = np.random.default_rng(0)
    live = {}
    for step in range(300):
        if live and rng.random() < 0.45:
            del live[rng.choice(sorted(live))]
        else:
            n = int(rng.choice([4, 5, 6, 8])) * MIB // 8
            a = K.empty_output((n,), np.float64)
            a[[0, n // 2, -1]] = step  # a marker per array: overwritten if memory is shared
            live[step] = a
        assert _disjoint(live.values())
        for k, a in live.items():
            assert a[0] == a[a.size // 2] == a[-1] == k
    assert K.output_cache()["hits"] > 50


def test_buffers_freed_and_allocated_by_other_threads():
    arrays = [K.empty_output((5 * MIB // 4,), np.float32) for _ in range(12)]
    errors = []

    def worker(mine, seed):
        try:
            rng = np.random.default_rng(seed)
            mine.clear()  # frees the main thread's arrays from this thread
            for i in range(40):
                a = K.empty_output((int(rng.integers(4, 7)) * MIB // 4,), np.float32)
                a[...] = seed * 1000 + i
                mine.append(a)
                if len(mine) > 3:
                    b = mine.pop(int(rng.integers(0, len(mine))))
                    assert np.all(b == b[0])
        except Exception as e:  # reported by the main thread
            errors.append(e)

    lists = [arrays[i::4] for i in range(4)]
    del arrays
    threads = [threading.Thread(target=worker, args=(lists[i], i)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    alive = [a for m in lists for a in m]
    assert _disjoint(alive)
    assert all(np.all(a == a[0]) for a in alive)
    s = K.output_cache()
    assert s["held_bytes"] <= s["max_bytes"] and s["held_buffers"] <= s["max_buffers"]


def test_held_memory_is_bounded():
    released = K.output_cache(max_bytes=20 * MIB)["released"]
    arrays = [K.empty_output((8 * MIB,), np.uint8) for _ in range(5)]
    del arrays
    s = K.output_cache()  # the 3rd, 4th and 5th freed push out the oldest
    assert s["held_bytes"] == 16 * MIB and s["held_buffers"] == 2
    assert s["released"] == released + 3
    # a buffer larger than the bound is freed, never held
    big = K.empty_output((24 * MIB,), np.uint8)
    del big
    assert K.output_cache()["held_bytes"] == 16 * MIB
    # at most max_buffers buffers, whatever max_bytes allows
    K.output_cache(max_bytes=1 << 40)
    arrays = [K.empty_output((4 * MIB,), np.uint8) for _ in range(40)]
    del arrays
    s = K.output_cache()
    assert s["held_buffers"] == s["max_buffers"] and s["held_bytes"] == s["max_buffers"] * 4 * MIB
    # lowering the bound frees the oldest buffers at once
    assert K.output_cache(max_bytes=10 * MIB)["held_bytes"] == 8 * MIB


def test_turning_it_off_frees_everything_and_allocates_plainly():
    a = K.empty_output((6 * MIB,), np.uint8)
    b = K.empty_output((6 * MIB,), np.uint8)
    del a
    assert K.output_cache()["held_buffers"] == 1
    s = K.output_cache(enabled=False)
    assert not s["enabled"] and s["held_bytes"] == 0 and s["held_buffers"] == 0
    c = K.empty_output((6 * MIB,), np.uint8)
    assert get_handler_name(c) == "default_allocator"
    del b  # allocated through the cache while on: freed for real now
    assert K.output_cache()["held_buffers"] == 0
    assert K.output_cache(enabled=True)["enabled"]
    with pytest.raises(TypeError, match="enabled"):
        K.output_cache(enabled=1)
    with pytest.raises(ValueError, match="max_bytes"):
        K.output_cache(max_bytes=-1)
    with pytest.raises(ValueError, match="max_bytes"):
        K.output_cache(max_bytes=1.5)


@pytest.mark.parametrize("env, enabled, max_bytes", [("0", False, 0), ("off", False, 256 * MIB),
                                                     ("64", True, 64 * MIB)])
def test_environment_variable(env, enabled, max_bytes):
    code = ("import numpy as np; from bncore import _kernels as K; "
            "a = K.empty_output((8 << 20,), np.uint8); del a; s = K.output_cache(); "
            "print(s['enabled'], s['max_bytes'], s['held_bytes'])")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       cwd=root, env=dict(os.environ, BNCORE_OUTPUT_CACHE=env))
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [str(enabled), str(max_bytes), str(8 * MIB if enabled else 0)]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_drops_the_parents_buffers():
    keep = K.empty_output((6 * MIB,), np.uint8)
    keep[...] = 7
    gone = K.empty_output((6 * MIB,), np.uint8)
    del gone
    assert K.output_cache()["held_buffers"] == 1
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report, never return into pytest
        ok = 0
        try:
            a = K.empty_output((6 * MIB,), np.uint8)  # first use: the parent's entry is dropped
            s = K.output_cache()
            a[...] = 3
            del a
            b = K.empty_output((6 * MIB,), np.uint8)  # the child's own buffer, reused
            s2 = K.output_cache()
            ok = (s["forks"] == 1 and s["held_buffers"] == 0 and s2["hits"] == s["hits"] + 1
                  and np.all(keep == 7) and not np.shares_memory(b, keep))
        finally:
            os.write(w, b"1" if ok else b"0")
            os._exit(0)
    os.close(w)
    got = os.read(r, 1)
    os.close(r)
    os.waitpid(pid, 0)
    assert got == b"1"
    # the parent is unaffected: its buffer is still there and reused
    s = K.output_cache()
    assert s["forks"] == 0 and s["held_buffers"] == 1
    a = K.empty_output((6 * MIB,), np.uint8)
    assert K.output_cache()["hits"] == s["hits"] + 1 and np.all(keep == 7)
    del a


def test_resizing_an_output_keeps_its_data():
    """ndarray.resize reallocates through the array's handler (ours)."""
    a = K.empty_output((5 * MIB,), np.uint8)
    a[...] = np.arange(a.size, dtype=np.uint64) % 251
    a.resize((9 * MIB,), refcheck=False)  # grows: a new buffer, the data copied
    assert np.array_equal(a[:5 * MIB], np.arange(5 * MIB, dtype=np.uint64) % 251)
    a[5 * MIB:] = 1
    a.resize((6 * MIB,), refcheck=False)  # shrinks in place
    assert np.array_equal(a[:5 * MIB], np.arange(5 * MIB, dtype=np.uint64) % 251)
    assert np.all(a[5 * MIB:] == 1)
    del a
    s = K.output_cache()  # freed with its capacity: held, and reused by a fitting output
    assert s["held_buffers"] == 1 and s["held_bytes"] == 9 * MIB
    b = K.empty_output((8 * MIB,), np.uint8)
    assert K.output_cache()["hits"] == s["hits"] + 1
    del b
