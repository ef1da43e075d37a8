"""Build and runtime configuration (show_config)."""
from __future__ import annotations

import platform
from typing import Any, Literal, overload

import numpy as np

from . import _checks as chk
from . import _kernels
from ._version import __version__

_LEVELS = ("baseline", "AVX2+FMA (x86-64-v3)", "AVX-512 (x86-64-v4)")


def config() -> dict[str, Any]:
    """The build and runtime configuration as a dict."""
    info: dict[str, Any] = dict(line.split(": ", 1) for line in _kernels.build_info().splitlines())
    info.update({
        "bncore": __version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "default_threads": _kernels.default_threads(),
        "thread_limit": _kernels.thread_limit() or "none",
        "kernel_isa": _LEVELS[_kernels.cpu_level()] if "baseline only" not in info["simd"]
        else "baseline",
    })
    return info


@overload
def show_config(mode: Literal["dicts"]) -> dict[str, Any]: ...
@overload
def show_config(mode: Literal["stdout"] = ...) -> None: ...
@overload
def show_config(mode: str) -> dict[str, Any] | None: ...


def show_config(mode: str = "stdout") -> dict[str, Any] | None:
    """Print the build and runtime configuration, or return it.

    The configuration: bncore's, NumPy's and Python's versions, the machine,
    the compiler and OpenMP runtime the kernels were built with (SIMD
    levels, flags), the default thread count and the kernel clone in use
    (``kernel_isa``). Include it in bug reports.

    Parameters
    ----------
    mode : {'stdout', 'dicts'}, default 'stdout'
        'stdout' prints one ``key: value`` line per entry; 'dicts' returns
        the entries instead.

    Returns
    -------
    dict or None
        The entries (str keys; str or int values) for ``mode='dicts'``,
        None for ``mode='stdout'``.

    Raises
    ------
    ValueError
        If ``mode`` is neither.

    Examples
    --------
    >>> info = bncore.show_config("dicts")
    >>> info["bncore"] == bncore.__version__, info["default_threads"] >= 1
    (True, True)
    >>> bncore.show_config()  # doctest: +ELLIPSIS
           compiler: ...
             bncore: ...
         kernel_isa: ...
    """
    info = config()
    if mode == "dicts":
        return info
    if mode != "stdout":
        chk.choice(mode, "mode", {"stdout": "print", "dicts": "return a dict"})
    width = max(map(len, info))
    for k, v in info.items():
        print(f"{k:>{width}}: {v}")
    return None
