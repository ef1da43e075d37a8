"""Results do not depend on the thread count; concurrent callers get serial results."""
import threading

import numpy as np
import pytest

import bncore

threadpoolctl = pytest.importorskip("threadpoolctl")


def _run_all(x, dy, axis, **kw):
    y, m, inv = bncore.batch_norm_train(x, axis=axis, **kw)
    dx, dw, db = bncore.batch_norm_backward(dy, x, m, inv, axis=axis, **kw)
    ye = bncore.batch_norm_eval(x, m, 1 / inv.astype(np.float64) ** 2, axis=axis, **kw)
    return y, m, inv, dx, dw, db, ye


@pytest.mark.parametrize("shape,axis", [((16, 8, 40, 40), 1), ((16, 40, 40, 8), -1),
                                        ((4096, 64), 1), ((2, 3, 200, 200), 1)])
def test_thread_count_invariance(rng, shape, axis):
    x = (rng.standard_normal(shape) + 50).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    with threadpoolctl.threadpool_limits(1, user_api="openmp"):
        one = _run_all(x, dy, axis)
    with threadpoolctl.threadpool_limits(2, user_api="openmp"):
        two = _run_all(x, dy, axis)
    explicit = _run_all(x, dy, axis, n_threads=3)
    for a, b, c in zip(one, two, explicit):
        # fixed blocking and merge order: identical, not merely close
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)


def test_concurrent_python_threads_match_serial(rng):
    cases = [(rng.standard_normal(s).astype(np.float32), rng.standard_normal(s).astype(np.float32), ax)
             for s, ax in [((8, 16, 30, 30), 1), ((8, 30, 30, 16), -1), ((2048, 32), 1),
                           ((4, 3, 7, 7), 1)]]
    serial = [_run_all(x, dy, ax) for x, dy, ax in cases]
    errors = []

    def worker(k):
        try:
            for rep in range(5):
                i = (k + rep) % len(cases)
                got = _run_all(*cases[i])
                for a, b in zip(got, serial[i]):
                    np.testing.assert_array_equal(a, b)
        except Exception as e:  # noqa: BLE001 -- reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    assert not errors, errors[0]
