"""Build and runtime configuration (show_config)."""
import platform

import numpy as np

from . import _checks as chk
from . import _kernels
from ._version import __version__

_LEVELS = ("baseline", "AVX2+FMA (x86-64-v3)", "AVX-512 (x86-64-v4)")


def config():
    """The build and runtime configuration as a dict."""
    info = dict(line.split(": ", 1) for line in _kernels.build_info().splitlines())
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


def show_config(mode="stdout"):
    """Print the configuration (mode='stdout') or return it (mode='dicts')."""
    info = config()
    if mode == "dicts":
        return info
    if mode != "stdout":
        chk.choice(mode, "mode", {"stdout": "print", "dicts": "return a dict"})
    width = max(map(len, info))
    for k, v in info.items():
        print(f"{k:>{width}}: {v}")
