"""How a batch splits into parts, and each part's normalization coefficients:
the numeric half of the parts pipeline (bncore/_parts.py), which `functional`
also uses for masked ghost batches.

A batch is cut into K *parts* along axis 0 (one part: the whole batch; ghost
batches: parts of ``virtual_batch_size`` samples). `plan` lays the parts over
the shards of a batch split across processes in rank order: part g is samples
``[g*v, (g+1)*v)`` of the concatenated batch, so a process holds a *segment*
of some parts. `coefficients` turns each part's (count, mean, M2) into its
variance and invstd (`_kernels.invstd`) and, for batch renormalization, r and
d against the running statistics.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from . import _kernels as _k

WHOLE = slice(None)


class Plan:
    """K parts and this process's segments: (part index, slice along axis 0)."""
    __slots__ = ("K", "segments")

    def __init__(self, K: int, segments: list[tuple[int, slice]]):
        self.K, self.segments = K, segments


def plan(sizes: Any, rank: int, vbs: int | None) -> Plan:
    """Parts of the batch made of shards of ``sizes`` samples in rank order
    (``[N], 0`` for one process); ``vbs`` None: one part, the whole batch."""
    if vbs is None:
        return Plan(1, [(0, WHOLE)])
    sizes = [int(s) for s in sizes]
    total, start, n = sum(sizes), sum(sizes[:rank]), sizes[rank]
    K = max(1, -(-total // vbs))
    segments = []
    for g in range(start // vbs, -(-(start + n) // vbs) if n else 0):
        a, b = max(g * vbs, start) - start, min((g + 1) * vbs, start + n) - start
        segments.append((g, slice(a, b)))
    return Plan(K, segments)


def uniform(counts: Any) -> Any:
    """(K, C) counts as (K,) when every channel counts the same (the common
    case, which takes the kernels' one-count path), else unchanged."""
    counts = np.asarray(counts, np.float64)
    if counts.ndim == 2 and counts.shape[1] and (counts == counts[:, :1]).all():
        return counts[:, 0].copy()
    return counts


def coefficients(counts: Any, mean: Any, m2: Any, eps: float, limits: Any = None,
                 running_mean: Any = None, running_var: Any = None) -> tuple[Any, ...]:
    """(var, invstd, r, d) per part (K, C): var = M2 / count, invstd by the
    kernels' rule; r and d are None without ``limits`` = (rmax, dmax)."""
    counts = np.asarray(counts, np.float64)
    counts = np.broadcast_to(counts[:, None] if counts.ndim == 1 else counts, m2.shape)
    # a channel with no value in a part (masked statistics): var 0 and invstd
    # 0, so its output is bias and its gradient 0; r 1 and d 0 under renorm
    empty = counts == 0
    var = np.divide(m2, counts, out=np.zeros_like(m2), where=~empty)
    invstd = np.where(empty, 0.0, _k.invstd(var, eps))
    if limits is None:
        return var, invstd, None, None
    rmax, dmax = limits
    inv_sigma = _k.invstd(np.asarray(running_var, np.float64), eps)
    r = np.where(empty, 1.0, np.clip(np.sqrt(var + eps) * inv_sigma, 1.0 / rmax, rmax))
    d = np.where(empty, 0.0, np.clip((mean - np.asarray(running_mean, np.float64)) * inv_sigma,
                                     -dmax, dmax))
    return var, invstd, r, d
