"""How many threads a call with n_threads=None uses, in real deployments.

OpenMP's own setting (``omp_set_num_threads``, which ``OMP_NUM_THREADS`` and
threadpoolctl's libgomp controller use) belongs to the thread that set it:
a limit set in a server's main thread does not reach its worker threads.
bncore therefore also keeps one process-wide limit, read by every call from
any thread: ``set_num_threads`` sets it, threadpoolctl sets it through the
controller registered here, and at import it defaults to the container's CPU
quota (cgroup v2 ``cpu.max`` or v1 ``cpu.cfs_quota_us``), as scikit-learn's
effective-thread count does, unless ``OMP_NUM_THREADS`` is set. A call then
uses min(limit, OpenMP's maximum in the calling thread); an explicit
``n_threads`` always wins.
"""
from __future__ import annotations

import math
import os
from typing import Any

from . import _checks as chk
from . import _kernels as _k

__all__ = ["get_num_threads", "set_num_threads"]


def get_num_threads() -> int:
    """The number of threads a call with ``n_threads=None`` uses from this thread.

    Returns
    -------
    int
        OpenMP's current maximum in the calling thread, capped by the
        process-wide limit (``set_num_threads``, threadpoolctl, the CPU
        quota).

    Examples
    --------
    >>> import bncore
    >>> bncore.get_num_threads() >= 1
    True
    """
    n = _k.threads(None)
    return n if n > 0 else _k.default_threads()


def set_num_threads(n: int | None) -> int | None:
    """Limit the threads of every call with ``n_threads=None``, from any thread.

    Parameters
    ----------
    n : int or None
        The most threads a call may use (>= 1); ``None`` removes the limit
        (OpenMP's setting in the calling thread alone then decides), and so
        does a value at or above the count a new thread gets by default.

    Returns
    -------
    int or None
        The previous limit (``None`` when there was none).

    Raises
    ------
    ValueError
        If `n` is not None or a positive int.

    Examples
    --------
    >>> import bncore
    >>> old = bncore.set_num_threads(1)
    >>> bncore.get_num_threads()
    1
    >>> _ = bncore.set_num_threads(old)
    """
    new = 0 if n is None else chk.positive_int(n, "n")
    old = _k.thread_limit()
    _k.set_thread_limit(new)
    return old or None


def cgroup_cpus(root: str = "/sys/fs/cgroup") -> int | None:
    """The CPU quota of this process's container in whole CPUs, or None."""
    def read(*parts: str) -> list[Any] | None:
        try:
            with open(os.path.join(root, *parts)) as f:
                return f.read().split()
        except OSError:
            return None

    v2 = read("cpu.max")  # "max 100000" or "150000 100000"
    quota, period = (v2 if v2 and len(v2) == 2 else
                     ((read("cpu", "cpu.cfs_quota_us") or [None])[0],
                      (read("cpu", "cpu.cfs_period_us") or [None])[0]))
    try:
        q, p = int(quota), int(period)
    except (TypeError, ValueError):  # "max", missing: no quota
        return None
    return max(1, math.ceil(q / p)) if q > 0 and p > 0 else None


def _default_limit() -> None:
    if "OMP_NUM_THREADS" not in os.environ:
        cpus = cgroup_cpus()
        if cpus is not None and cpus < _k.default_threads():
            _k.set_thread_limit(cpus)


def _register_threadpoolctl() -> None:
    try:
        import threadpoolctl
    except ImportError:
        return

    class BncoreController(threadpoolctl.LibController):
        """threadpoolctl's handle on bncore's process-wide limit."""
        user_api = "bncore"
        internal_api = "bncore"
        filename_prefixes = ("_kernels",)

        def get_num_threads(self):
            get = getattr(self.dynlib, "bncore_get_num_threads", None)
            return None if get is None else get()

        def set_num_threads(self, num_threads):
            set_ = getattr(self.dynlib, "bncore_set_num_threads", None)
            if set_ is not None:
                set_(num_threads)

        def get_version(self):
            from ._version import __version__
            return __version__ if hasattr(self.dynlib, "bncore_get_num_threads") else None

    if not any(getattr(c, "user_api", None) == "bncore" for c in threadpoolctl._ALL_CONTROLLERS):
        threadpoolctl.register(BncoreController)


_default_limit()
_register_threadpoolctl()
