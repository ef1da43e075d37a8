"""The one pipeline behind ghost batches, batch renormalization and synchronized
batch norm, in any combination.

(1) Where the statistics come from: the batch is cut into K *parts* along
    axis 0 (`_partition.plan`: the whole batch, or ghost batches of
    ``virtual_batch_size`` samples of the batch concatenated in rank order,
    of which this process holds *segments*). `local_stats` gives each part's (count, mean, M2)
    from this process's segments; a synchronized layer merges part g of every
    process with `merge_stats` (same order, same bits on every process).
(2) How they normalize: `_partition.coefficients` gives each part's invstd
    (`_kernels.invstd`) and, for batch renormalization, r and d against the
    running statistics; `apply` normalizes each segment with its part's
    coefficients (`batch_norm_elemt`).
(3) The running update: `functional.update_running` over the K parts.

The backward is the same shape: `part_sums` gives each part's sum(dy) and
sum(dy * (x - mean)) from the segments (`batch_norm_backward_reduce`), a
synchronized layer sums part g over the processes, and `backward_apply` runs
`batch_norm_backward_elemt` per segment with weight * r (r and d are
constants in the backward, as in the paper). With one process these
building blocks give batch norm's kernels' bits; with rmax=1 and dmax=0
renorm gives plain batch norm's bits.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from . import _checks as chk
from . import _kernels as _k
from ._partition import Plan
from .functional import (batch_norm_backward_elemt, batch_norm_backward_reduce,
                         batch_norm_elemt, batch_norm_stats, masked_backward_reduce,
                         masked_stats)


def local_stats(x: Any, axis: Any, p: Plan, n_threads: Any, mask: Any = None
                ) -> tuple[Any, Any, Any]:
    """Per part (K, C) count, mean and M2 of this process's segments (zeros
    for parts it holds none of); with ``mask`` (bool, x's shape) over the
    unmasked values only, each channel with its own count."""
    C = chk.Layout(x, axis).C
    counts, means, m2s = np.zeros((p.K, C)), np.zeros((p.K, C)), np.zeros((p.K, C))
    for g, sl in p.segments:
        if mask is None:
            counts[g], means[g], m2s[g] = batch_norm_stats(x[sl], axis=axis,
                                                             n_threads=n_threads)
        else:
            counts[g], means[g], m2s[g] = masked_stats(x[sl], mask[sl], axis=axis,
                                                         n_threads=n_threads)
    return counts, means, m2s


def apply(x: Any, p: Plan, mean: Any, invstd: Any, r: Any, d: Any, weight: Any, bias: Any,
          axis: int, buf: Any, activation: Any, n_threads: Any) -> None:
    """Normalize each segment into ``buf`` (x's shape) with its part's
    coefficients: ``y = weight * (xhat * r + d) + bias``, one affine map per
    channel (scale invstd * r, shift weight * d + bias)."""
    for g, sl in p.segments:
        scale = invstd[g] if r is None else invstd[g] * r[g]
        shift = bias
        if d is not None:
            shift = (d[g] if weight is None else weight * d[g]) + (0.0 if bias is None else bias)
        batch_norm_elemt(x[sl], mean[g], scale, weight, shift, axis=axis, out=buf[sl],
                         activation=activation, n_threads=n_threads)


def part_sums(dy: Any, x: Any, y: Any, p: Plan, mean: Any, axis: Any, activation: Any,
              n_threads: Any, mask: Any = None) -> tuple[Any, Any]:
    """Per part (K, C) sum(dy) and sum(dy * (x - mean)) over this process's
    segments (with ``mask``: its unmasked values), in float64 (zeros for parts
    it holds none of)."""
    C = chk.Layout(x, axis).C
    sum_dy, sum_dy_xmu = np.zeros((p.K, C)), np.zeros((p.K, C))
    for g, sl in p.segments:
        ys = None if y is None else y[sl]
        if mask is None:
            sum_dy[g], sum_dy_xmu[g] = batch_norm_backward_reduce(
                dy[sl], x[sl], mean[g], axis=axis, activation=activation, y=ys,
                n_threads=n_threads)
        else:
            sum_dy[g], sum_dy_xmu[g] = masked_backward_reduce(
                dy[sl], x[sl], mean[g], mask[sl], axis=axis, activation=activation, y=ys,
                n_threads=n_threads)[1:]
    return sum_dy, sum_dy_xmu


def backward_apply(dy: Any, x: Any, y: Any, p: Plan, mean: Any, invstd: Any, r: Any,
                   weight: Any, sum_dy: Any, sum_dy_xmu: Any, counts: Any, axis: Any,
                   buf: Any, activation: Any, n_threads: Any, mask: Any = None) -> None:
    """dx of each segment into ``buf`` (C-contiguous) from its part's global
    sums, with weight * r (r constant). counts: (K,) one per part, or (K, C)
    per channel; with ``mask`` (uint8, x's shape), 0 at the padded entries."""
    for g, sl in p.segments:
        w = weight if r is None else (r[g] if weight is None else weight * r[g])
        batch_norm_backward_elemt(dy[sl], x[sl], mean[g], invstd[g], w, sum_dy[g],
                                    sum_dy_xmu[g], counts[g], axis=axis, out=buf[sl],
                                    activation=activation, y=None if y is None else y[sl],
                                    n_threads=n_threads)
    if mask is not None and buf.size:
        _k.masked_zero(buf.reshape(-1), mask.reshape(-1), chk.threads(n_threads))


def param_grads(invstd: Any, r: Any, d: Any, sum_dy: Any, sum_dy_xmu: Any) -> tuple[Any, Any]:
    """(dweight, dbias) in float64: the sums over the parts of
    ``r * invstd * sum(dy * (x - mean)) + d * sum(dy)`` and of sum(dy), part
    by part in order (as the ghost-batch kernel accumulates them)."""
    dweight, dbias = np.zeros(sum_dy.shape[1]), np.zeros(sum_dy.shape[1])
    for g in range(sum_dy.shape[0]):
        dw = sum_dy_xmu[g] * invstd[g]
        if r is not None:
            dw = r[g] * dw + d[g] * sum_dy[g]
        dweight += dw
        dbias += sum_dy[g]
    return dweight, dbias
