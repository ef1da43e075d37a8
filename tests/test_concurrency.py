"""Threads: results do not depend on the OpenMP thread count; 8 Python
threads hammering every function with OpenMP on get exactly the serial
results; a process forked after OpenMP has run does not deadlock (bncore runs
serially in a forked child, see RELIABILITY.md)."""
import multiprocessing as mp
import os
import threading
import time

import numpy as np
import pytest

import bncore

THREADS = 8
ROUNDS = int(os.environ.get("BNCORE_THREAD_ROUNDS", "40"))
TIMEOUT = 120


def _cases():
    rng = np.random.default_rng(17)
    cases = []
    # big enough for OpenMP (>= 64K elements) on both layouts, and a tiny one
    for shape, axis in [((8, 16, 24, 24), 1), ((8, 24, 24, 16), -1), ((4096, 32), 1),
                        ((4, 3, 7, 7), 1)]:
        x = (rng.standard_normal(shape) * 2 + 3).astype(np.float32)
        dy = rng.standard_normal(shape).astype(np.float32)
        for a in (x, dy):
            a.flags.writeable = False  # shared by every thread, read only
        cases.append((x, dy, axis))
    return cases


def _all(x, dy, axis, nt):
    """Every function once, and a layer's forward, backward and eval forward."""
    C = x.shape[axis]
    w, b = np.linspace(0.5, 1.5, C), np.linspace(-1, 1, C)
    rm, rv = np.zeros(C, np.float32), np.ones(C, np.float32)
    kw = dict(axis=axis, n_threads=nt)
    y, m, inv = bncore.batch_norm_train(x, w, b, running_mean=rm, running_var=rv,
                                        activation="relu", **kw)
    dx, dw, db = bncore.batch_norm_backward(dy, x, m, inv, w, activation="relu", y=y, **kw)
    ye = bncore.batch_norm_eval(x, rm, rv, w, b, **kw)
    ye2 = bncore.batch_norm_elemt(x, m, inv, w, b, **kw)
    n, sm, m2 = bncore.batch_norm_stats(x, **kw)
    n2, mm, mm2 = bncore.merge_stats([n, n], [sm, sm], [m2, m2])
    sdy, sdx = bncore.batch_norm_backward_reduce(dy, x, m, **kw)
    dx2 = bncore.batch_norm_backward_elemt(dy, x, m, inv, w, sdy, sdx, n, **kw)
    layer = bncore.BatchNorm(C, axis=axis)
    yl = layer(x, n_threads=nt)
    dxl = layer.backward(dy, n_threads=nt)
    layer.eval()
    yle = layer(x, n_threads=nt)
    return [y, m, inv, rm, rv, dx, dw, db, ye, ye2, sm, m2, mm, mm2, sdy, sdx, dx2, yl, dxl, yle,
            layer.running_mean, layer.running_var]


CALLS_PER_ALL = 11  # public calls made by one _all(): 8 functions, 3 layer calls


def _same(a, b):
    return len(a) == len(b) and all(np.array_equal(u, v) for u, v in zip(a, b))


@pytest.mark.parametrize("shape,axis", [((16, 8, 40, 40), 1), ((16, 40, 40, 8), -1),
                                        ((4096, 64), 1), ((2, 3, 200, 200), 1)])
def test_thread_count_invariance(rng, shape, axis):
    threadpoolctl = pytest.importorskip("threadpoolctl")
    x = (rng.standard_normal(shape) + 50).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    with threadpoolctl.threadpool_limits(1, user_api="openmp"):
        one = _all(x, dy, axis, None)
    with threadpoolctl.threadpool_limits(2, user_api="openmp"):
        two = _all(x, dy, axis, None)
    explicit = _all(x, dy, axis, 3)
    for a, b, c in zip(one, two, explicit):
        # fixed blocking and merge order: identical, not merely close
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)


@pytest.mark.parametrize("n_workers", [4, THREADS])
def test_python_threads_get_the_serial_results(n_workers):
    cases = _cases()
    serial = [_all(x, dy, axis, 1) for x, dy, axis in cases]
    errors, done = [], [0] * n_workers
    start = threading.Barrier(n_workers)

    def worker(k):
        try:
            start.wait()
            for r in range(ROUNDS):
                i = (k + r) % len(cases)
                # OpenMP on: two threads per call, and the default (all of them)
                got = _all(*cases[i], 2 if r % 2 else None)
                if not _same(got, serial[i]):
                    errors.append(f"thread {k} round {r}: case {i} differs from serial")
                done[k] += 1
        except Exception as e:  # noqa: BLE001 -- reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(n_workers)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + TIMEOUT
    for t in threads:
        t.join(timeout=max(0.1, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in threads), "threads still running: deadlock?"
    assert not errors, errors[:3]
    assert sum(done) == n_workers * ROUNDS  # n_workers * ROUNDS * CALLS_PER_ALL calls in all


def test_threads_share_one_layer_read_only_in_eval():
    """Eval-mode forward only reads the layer: shared safely."""
    x, _, axis = _cases()[0]
    layer = bncore.BatchNorm(x.shape[axis], axis=axis)
    layer(x)
    layer.eval()
    want = layer(x)
    results = []

    def worker():
        results.extend(np.array_equal(layer(x, n_threads=2), want) for _ in range(ROUNDS))

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    assert len(results) == THREADS * ROUNDS and all(results)


# ---- fork after OpenMP ------------------------------------------------------------------------

def _warm_openmp():
    """Start the OpenMP pool in this process: a parallel region with 2 threads."""
    x = np.ones((8, 16, 32, 32), np.float32)
    bncore.batch_norm_train(x, n_threads=2)
    bncore.batch_norm_train(x)


def _child_work(conn=None):
    """All functions with threads asked for, compared with the parent's results."""
    cases = _cases()
    got = [_all(x, dy, axis, nt) for x, dy, axis in cases for nt in (None, 2)]
    if conn is not None:
        conn.send(got)
        conn.close()
    return got


def test_os_fork_after_openmp_does_not_deadlock():
    _warm_openmp()
    want = [_all(x, dy, axis, 1) for x, dy, axis in _cases() for _ in (None, 2)]
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report through the pipe, never return into pytest
        status = 1
        try:
            got = _child_work()
            status = 0 if all(_same(g, h) for g, h in zip(got, want)) else 2
        finally:
            os.write(w, bytes([status]))
            os._exit(0)
    os.close(w)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if os.waitpid(pid, os.WNOHANG)[0]:
            break
        time.sleep(0.05)
    else:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        pytest.fail("the forked child deadlocked in an OpenMP region")
    status = os.read(r, 1)
    os.close(r)
    assert status == b"\x00", f"child status {status!r} (2: results differ, 1: error)"
    # the parent keeps its threads: a forked child's serial mode is its own
    from bncore import _checks
    assert _checks.threads(None) == 0


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_multiprocessing_after_openmp(method):
    if method not in mp.get_all_start_methods():
        pytest.skip(f"no {method} start method here")
    _warm_openmp()
    want = [_all(x, dy, axis, 1) for x, dy, axis in _cases() for _ in (None, 2)]
    ctx = mp.get_context(method)
    parent, child = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_child_work, args=(child,), daemon=True)
    p.start()
    child.close()
    if not parent.poll(90):
        p.kill()
        p.join()
        pytest.fail(f"the {method} child did not answer in 90 s: deadlock?")
    got = parent.recv()
    p.join(30)
    assert p.exitcode == 0
    assert all(_same(g, h) for g, h in zip(got, want))
