"""Thread counts in real deployments: container CPU quotas and limits that
reach a server's worker threads (libgomp's own setting is per thread)."""
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import bncore
from bncore import _threads


def _in_worker(f):
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(f).result()


@pytest.fixture
def no_limit():
    old = bncore.set_num_threads(None)
    yield
    bncore.set_num_threads(old)


def test_set_num_threads_reaches_worker_threads(no_limit):
    assert bncore.set_num_threads(1) is None
    assert _in_worker(bncore.get_num_threads) == 1
    assert bncore.get_num_threads() == 1
    assert bncore.set_num_threads(None) == 1
    assert _in_worker(bncore.get_num_threads) == bncore._kernels.default_threads()


def test_threadpoolctl_limit_reaches_worker_threads(no_limit):
    threadpoolctl = pytest.importorskip("threadpoolctl")
    assert "bncore" in {i["user_api"] for i in threadpoolctl.threadpool_info()}
    with threadpoolctl.threadpool_limits(1):
        assert _in_worker(bncore.get_num_threads) == 1
        # and a call from the worker still gives the reference answer
        x = np.random.default_rng(0).standard_normal((64, 8, 300)).astype(np.float32)
        y = _in_worker(lambda: bncore.batch_norm_train(x)[0])
        np.testing.assert_array_equal(y, bncore.batch_norm_train(x, n_threads=1)[0])
    with threadpoolctl.threadpool_limits(1, user_api="bncore"):
        assert _in_worker(bncore.get_num_threads) == 1


@pytest.mark.parametrize("n", [0, -1, 1.5, True, "2"])
def test_set_num_threads_refuses_bad_values(n, no_limit):
    with pytest.raises(ValueError, match="^n: expected a positive int"):
        bncore.set_num_threads(n)
    assert bncore._kernels.thread_limit() == 0


@pytest.mark.parametrize("files,want", [
    ({"cpu.max": "150000 100000\n"}, 2),
    ({"cpu.max": "50000 100000\n"}, 1),
    ({"cpu.max": "max 100000\n"}, None),
    ({"cpu/cpu.cfs_quota_us": "300000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 3),
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
    ({}, None),
])
def test_cgroup_quota(tmp_path, files, want):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text)
    assert _threads.cgroup_cpus(str(tmp_path)) == want


def test_quota_becomes_the_default_limit(monkeypatch, no_limit):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(_threads, "cgroup_cpus", lambda: 1)
    monkeypatch.setattr(bncore._kernels, "default_threads", lambda: 4)
    _threads._default_limit()
    assert bncore._kernels.thread_limit() == 1
    # OMP_NUM_THREADS set: the user's explicit choice wins, no quota limit
    bncore.set_num_threads(None)
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    _threads._default_limit()
    assert bncore._kernels.thread_limit() == 0
