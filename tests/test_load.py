"""Inference under concurrent load: 8 Python threads issue thousands of
mixed-shape batch_norm_eval and FrozenBatchNorm calls at once (OpenMP teams
inside Python threads). Every result must equal the serial run bit for bit,
memory must not grow over the run, and nothing may deadlock."""
import gc
import itertools
import os
import threading
import tracemalloc

import numpy as np
import pytest

import bncore

N_WORKERS = 8
N_CALLS = 3000

# (shape, axis, dtype, activation, n_threads); both sides of the 64K-element
# threshold, so some calls fork OpenMP teams from every Python thread
CASES = [
    ((1, 64, 56, 56), 1, np.float32, None, None),
    ((1, 64, 56, 56), 1, np.float32, "relu", 1),
    ((1, 56, 56, 64), -1, np.float32, None, 2),
    ((2, 128, 14, 14), 1, np.float32, ("leaky_relu", 0.1), None),
    ((8, 512, 7, 7), 1, np.float32, "relu", None),
    ((1, 32, 28, 28), 1, np.float64, None, 1),
    ((16, 256), 1, np.float32, None, None),
    ((300, 256), -1, np.float64, "relu", 2),
    ((4, 3, 40, 40), 1, np.float16, None, None),
    ((3, 24, 9, 11), 1, np.float32, None, 1),
]


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _make_calls(rng):
    """Per case: an input and two equivalent callables (functional eval, frozen layer)."""
    calls = []
    for shape, axis, dtype, act, nt in CASES:
        C = shape[axis]
        x = (rng.standard_normal(shape) * 2 + 0.5).astype(dtype)
        w, b = rng.uniform(-1.5, 1.5, C), rng.standard_normal(C)
        rm, rv = rng.standard_normal(C), rng.uniform(0.5, 2, C)
        frozen = bncore.FrozenBatchNorm.from_state_dict(
            {"weight": w, "bias": b, "running_mean": rm, "running_var": rv},
            axis=axis, activation=act, dtype=dtype)
        # the frozen layer's stored (dtype-rounded) parameters: the same computation
        a = (frozen.running_mean, frozen.running_var, frozen.weight, frozen.bias)
        calls.append(lambda x=x, a=a, kw=dict(axis=axis, activation=act, n_threads=nt):
                     bncore.batch_norm_eval(x, *a, **kw))
        calls.append(lambda x=x, f=frozen, nt=nt: f(x, n_threads=nt))
        y = frozen(x)
        dy = np.ones_like(x)
        calls.append(lambda dy=dy, y=y, f=frozen, nt=nt: f.backward(dy, y=y, n_threads=nt))
    return calls


def _hammer(calls, expected, order, timeout=120):
    """Runs calls[order[k]] for every k on N_WORKERS daemon threads (a deadlock
    fails the test instead of hanging it). Returns the mismatching call indices."""
    counter = itertools.count()
    bad, errors = [], []

    def worker():
        try:
            while (k := next(counter)) < len(order):
                i = order[k]
                if not np.array_equal(calls[i](), expected[i]):
                    bad.append(i)
        except Exception as e:  # noqa: BLE001 -- reported by the test
            errors.append(e)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(N_WORKERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    assert not any(t.is_alive() for t in threads), "deadlock: workers still running"
    assert not errors, errors[0]
    return bad


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux /proc for RSS")
def test_concurrent_inference_matches_serial_without_leaks(rng):
    calls = _make_calls(rng)
    expected = [f() for f in calls]  # the serial run
    for i in range(0, len(calls), 3):  # functional and frozen agree exactly
        np.testing.assert_array_equal(expected[i], expected[i + 1])
    order = rng.integers(0, len(calls), N_CALLS)

    # warm-up: thread pools, allocator arenas, OpenMP teams of every worker
    assert _hammer(calls, expected, order[:N_CALLS // 4]) == []
    gc.collect()
    rss0 = _rss_bytes()
    tracemalloc.start()
    try:
        traced0 = tracemalloc.get_traced_memory()[0]
        bad = _hammer(calls, expected, order)
        gc.collect()
        traced1 = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    rss1 = _rss_bytes()
    assert bad == [], f"{len(bad)} of {N_CALLS} results differ from the serial run"
    # Python/NumPy allocations: nothing retained (a leaked C-length vector per
    # call would be ~1 MB over the run)
    assert traced1 - traced0 < 64 * 1024, traced1 - traced0
    # whole process: a leaked output or kernel scratch per call would be >> 32 MB
    assert rss1 - rss0 < 32 * 2**20, (rss1 - rss0) / 2**20
