"""Synchronized batch normalization across processes: over MPI (mpi4py) or any
allgather the caller already runs (``torch.distributed``, a custom transport).

Data-parallel training splits each batch across ranks; ``SyncBatchNorm``
normalizes every shard with the statistics of the whole batch, so the result
equals single-process ``BatchNorm`` on the concatenated batch (in rank order).
It runs the same parts pipeline as ghost batch norm and batch renormalization
(bncore/_parts.py), so ``virtual_batch_size`` and ``renorm=True`` compose with
it: statistics per part (the whole batch, or ghost batches of the
concatenated batch), exchanged and merged part by part, then plain or
renormalized, then the running update over the parts.

Per training step and layer: forward makes one collective on ``K * (3*C +
3)`` float64 per rank for K parts (error flag, dtype code, and per channel
count, mean, M2: a count per channel, as masked shards count their own);
backward makes one collective on ``2*K*C + 1`` float64 (error flag, sum(dy),
sum(dy * (x - mean)) per part). Ghost batches add a small collective of 2
float64 per rank (channel count and sample count: where each rank's samples
lie in the concatenated batch); without them that check is an
``MPI_Allreduce`` of 2 int64 (MPI) or the same 2-value allgather (callable).
Every rank checks the exchanged error flags before using the data, so bad
input on one rank makes every rank raise instead of leaving the others
blocked in the next collective.

``reduction="allgather"`` (default, and the only mode of an ``allgather``
callable): each rank receives every rank's buffer and merges them in rank
order, so statistics, running statistics and parameter gradients are bitwise
identical on every rank, as the MPI standard guarantees nothing about the
order inside a reduction. Bytes received grow with the number of ranks P.
``reduction="allreduce"`` (MPI only): a reduction with Chan's merge as an MPI
operation (forward) and MPI_SUM (backward); bytes per rank do not grow with
P. MPICH and Open MPI return the same bits on every rank, but the MPI
standard only recommends it. See docs/SYNC_BN.md for the costs.

Gradient convention: after ``backward`` every rank holds the *global*
``grad_weight`` and ``grad_bias`` (the sums over the whole batch, equal to
single-process ``BatchNorm``). Exclude them from a sum all-reduce of the other
gradients (averaging them is harmless: the values are already equal).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

try:
    from mpi4py import MPI
except ImportError:  # pragma: no cover - exercised only without mpi4py
    MPI = None  # type: ignore[assignment]  # the allgather-callable path needs no MPI

from . import _checks as chk
from . import _kernels as _k
from . import _partition, _parts
from .functional import _update_present, merge_stats, update_running
from ._typing import Array
from .layers import BatchNorm, BatchRenorm
from .layers.batch_norm import _Record

__all__ = ["SyncBatchNorm", "convert_sync_batchnorm", "torch_allgather"]

# Forward record layout, one per part: [n_bad, dtype_min, dtype_max, count (C), mean (C),
# m2 (C)]: a count per channel, as masked shards count each channel's own values
_HEAD = 3
_DTYPE_CODES = {np.dtype(np.float16): 1, np.dtype(np.float32): 2,
                np.dtype(np.float64): 3}


def _chan_reduce(inbuf: Any, inoutbuf: Any, datatype: Any) -> None:
    # inoutbuf = inbuf (lower ranks) merged with inoutbuf, record by record
    # (one record per part). A record is one contiguous MPI element, so MPI
    # never hands over part of one. Runs once per reduction round: straight
    # to the merge kernel, no re-validation.
    width = datatype.Get_extent()[1] // 8
    a = np.frombuffer(inbuf, dtype=np.float64).reshape(-1, width)
    b = np.frombuffer(inoutbuf, dtype=np.float64).reshape(-1, width)
    c = (width - _HEAD) // 3
    for ra, rb in zip(a, b):
        pair = np.stack([ra, rb])
        _k.merge_stats(np.ascontiguousarray(pair[:, _HEAD:_HEAD + c]),
                       np.ascontiguousarray(pair[:, _HEAD + c:_HEAD + 2 * c]),
                       np.ascontiguousarray(pair[:, _HEAD + 2 * c:]),
                       rb[_HEAD + c:_HEAD + 2 * c], rb[_HEAD + 2 * c:], rb[_HEAD:_HEAD + c])
        rb[:_HEAD] = (ra[0] + rb[0], min(ra[1], rb[1]), max(ra[2], rb[2]))


_CHAN_OP: Any = None
_RECORD_TYPES: dict[int, Any] = {}


def _chan_op() -> Any:
    global _CHAN_OP
    if _CHAN_OP is None:
        # Not commutative bitwise; ask MPI to keep rank order.
        _CHAN_OP = MPI.Op.Create(_chan_reduce, commute=False)
    return _CHAN_OP


def _record_type(width: int) -> Any:
    # One record = one MPI element, so a reduction never splits it.
    if width not in _RECORD_TYPES:
        _RECORD_TYPES[width] = MPI.DOUBLE.Create_contiguous(width).Commit()
    return _RECORD_TYPES[width]


def _check_out(out: Any, x: Any) -> None:
    # Checked before the exchange, so a bad `out` fails on every rank too.
    if out is not None:
        chk.output(out, x, chk.compute_dtype(x.dtype), (x,))


def _check_comm(comm: Any, reduction: str, allgather: Any = None) -> Any:
    if allgather is not None:
        chk.allgather_callable(allgather, comm, reduction)
        return None
    if MPI is None:
        raise ImportError("bncore.distributed.SyncBatchNorm needs mpi4py and an MPI library "
                          "for comm= (pip install 'bncore[mpi]'), or an allgather callable "
                          "(allgather=, e.g. bncore.distributed.torch_allgather())")
    if comm is None:
        comm = MPI.COMM_WORLD
    if not isinstance(comm, MPI.Intracomm):
        chk.refuse("comm", f"expected an mpi4py MPI.Intracomm, got {type(comm).__name__}",
                   TypeError)
    chk.choice(reduction, "reduction", {"allgather": "every rank merges every buffer",
                                        "allreduce": "a Chan-merge reduction"})
    return comm


class _Parts:
    """What a training forward leaves for backward: the parts and their
    per-part counts, r and d (None without renorm)."""
    __slots__ = ("plan", "counts", "r", "d")

    def __init__(self, plan: Any, counts: Any, r: Any, d: Any):
        self.plan, self.counts, self.r, self.d = plan, counts, r, d  # counts (K, C)


class SyncBatchNorm(BatchNorm):
    """``BatchNorm`` whose batch statistics span every rank of a process group.

    Same constructor and behaviour as ``bncore.BatchNorm`` plus the transport
    (``comm``, an mpi4py intracommunicator, default ``MPI.COMM_WORLD``, with
    ``reduction``; or ``allgather``, any callable that gathers an array from
    every rank) and batch renormalization (``renorm=True``). Every rank must
    call ``forward`` and ``backward`` together, with the same channel count
    and dtype; a rank may hold zero samples. The output, dx, running
    statistics and ``grad_weight``/``grad_bias`` (global sums, on every rank)
    equal single-process ``BatchNorm`` (or ``BatchRenorm``) on the batch
    concatenated in rank order. In eval mode with running statistics the
    forward is local; backward still sums the parameter gradients.

    Parameters
    ----------
    num_features : int
        C, the number of channels (the same on every rank).
    comm : mpi4py.MPI.Intracomm, optional
        The ranks that share the batch; default ``MPI.COMM_WORLD``. Not
        with ``allgather``.
    reduction : {'allgather', 'allreduce'}, default 'allgather'
        How the statistics are exchanged over MPI (see the module
        docstring); 'allgather' only with an ``allgather`` callable.
    allgather : callable, optional
        ``allgather(local) -> gathered`` instead of MPI: called by every rank
        at the same point with a C-contiguous float64 ``numpy.ndarray``
        ``local`` (the same shape on every rank), it returns an array of
        shape ``(world_size, *local.shape)`` whose row ``i`` is rank ``i``'s
        ``local``, rows in rank order, the same on every rank (float64, or
        losslessly convertible to it). It must not keep or modify ``local``.
        The result is checked (type, shape, this rank's row when ``rank`` is
        known) before anything changes. `torch_allgather` makes one from a
        ``torch.distributed`` process group.
    rank : int, optional
        This process's row in ``allgather``'s result; needed with
        ``virtual_batch_size`` (ghost batches lie over the shards in rank
        order). Default: the callable's ``rank`` attribute when it has one
        (`torch_allgather`'s does). MPI takes it from ``comm``.
    renorm : bool, default False
        Batch renormalization (Ioffe 2017, as `bncore.BatchRenorm`) with the
        synchronized statistics: needs running statistics. ``momentum``
        keeps `bncore.BatchNorm`'s default 0.1 (`bncore.BatchRenorm`'s is
        0.01): pass the one you train with.
    rmax, dmax : float, default 3.0 and 5.0
        With ``renorm``: the final bounds on r (``>= 1``) and d (``>= 0``).
    warmup_steps, rmax_ramp_steps, dmax_ramp_steps : int, default 0
        With ``renorm``: `bncore.BatchRenorm`'s schedule (0, 0, 0: the
        bounds hold from the first step).
    **kwargs
        `bncore.BatchNorm`'s other arguments, except ``activation``.
        ``virtual_batch_size=v``: ghost batches of v samples of the
        *concatenated* batch (samples ``[g*v, (g+1)*v)`` in rank order), so
        the result equals single-process ghost batch norm on it and a ghost
        batch may span ranks.

    Raises
    ------
    TypeError
        If ``comm`` is not an intracommunicator, ``allgather`` is not
        callable, or as `bncore.BatchNorm`.
    ValueError
        If ``reduction`` is invalid, both ``comm`` and ``allgather`` are
        given, ``activation`` is given, ``renorm`` lacks running statistics,
        ``rank`` is missing with ghost batches over a callable, a number is
        out of range, or as `bncore.BatchNorm`.
    ImportError
        If ``allgather`` is not given and mpi4py is missing.

    Examples
    --------
    Run by every rank (``mpiexec -n P python script.py``); with one rank it
    equals ``BatchNorm``:

    >>> from bncore.distributed import SyncBatchNorm
    >>> sbn = SyncBatchNorm(2, dtype=np.float64)
    >>> x = np.array([[1.0, 2.0], [3.0, 6.0]])
    >>> np.array_equal(sbn(x), bncore.BatchNorm(2, dtype=np.float64)(x))
    True
    >>> dx = sbn.backward(np.ones_like(x))
    >>> sbn.grad_bias  # the sum over every rank's batch
    array([2., 2.])

    Any allgather works; one process's is ``local[None]``. Here with ghost
    batches and batch renormalization:

    >>> sbn = SyncBatchNorm(2, dtype=np.float64, allgather=lambda a: a[None], rank=0,
    ...                     virtual_batch_size=2, renorm=True, rmax=1.0, dmax=0.0)
    >>> x = np.array([[1.0, 2.0], [3.0, 6.0], [0.0, 1.0], [4.0, 1.0]])
    >>> np.array_equal(sbn(x), bncore.BatchNorm(2, dtype=np.float64,
    ...                                         virtual_batch_size=2)(x))
    True
    """

    def __init__(self, num_features: int, *, comm: Any = None, reduction: str = "allgather",
                 allgather: Callable[[np.ndarray], Any] | None = None, rank: int | None = None,
                 renorm: bool = False, rmax: float = 3.0, dmax: float = 5.0,
                 warmup_steps: int = 0, rmax_ramp_steps: int = 0, dmax_ramp_steps: int = 0,
                 **kwargs: Any):
        comm = _check_comm(comm, reduction, allgather)
        rank = chk.allgather_rank(allgather, rank, kwargs.get("virtual_batch_size"))
        if kwargs.get("activation") is not None:
            chk.refuse("activation", "SyncBatchNorm does not fuse an activation; apply it "
                                     "after the layer")
        if renorm and not kwargs.get("track_running_stats", True):
            chk.refuse("renorm", "batch renormalization needs running statistics "
                                 "(track_running_stats=False)")
        limits = (chk.real(rmax, "rmax", 1.0), chk.real(dmax, "dmax", 0.0),
                  chk.integer(warmup_steps, "warmup_steps"),
                  chk.integer(rmax_ramp_steps, "rmax_ramp_steps"),
                  chk.integer(dmax_ramp_steps, "dmax_ramp_steps"))
        super().__init__(num_features, **kwargs)
        self.comm, self.reduction, self.allgather, self.rank = comm, reduction, allgather, rank
        self.renorm = bool(renorm)
        (self.rmax, self.dmax, self.warmup_steps, self.rmax_ramp_steps,
         self.dmax_ramp_steps) = limits

    def __repr__(self) -> str:
        # BatchNorm's repr already names the class
        if self.allgather is None:
            where = f"ranks={self.comm.Get_size()}, reduction={self.reduction!r}"
        else:
            where = f"allgather={getattr(self.allgather, '__name__', type(self.allgather).__name__)}"
        extra = "" if self.virtual_batch_size is None else \
            f", virtual_batch_size={self.virtual_batch_size}"
        if self.renorm:
            extra += f", renorm=True, rmax={self.rmax}, dmax={self.dmax}"
        return super().__repr__()[:-1] + f", {where}{extra})"

    def limits(self, step: int | None = None) -> tuple[float, float]:
        """(rmax, dmax) in force at training step ``step``, as `bncore.BatchRenorm`'s.

        Parameters
        ----------
        step : int, optional
            A training step (0 is the first); default ``num_batches_tracked``.

        Returns
        -------
        rmax, dmax : float
            1 and 0 during the warm-up, then relaxed linearly to the
            layer's ``rmax`` and ``dmax`` (used only with ``renorm=True``).

        Raises
        ------
        TypeError
            If the layer has no running statistics and ``step`` is None.

        Examples
        --------
        >>> from bncore.distributed import SyncBatchNorm
        >>> SyncBatchNorm(2, allgather=lambda a: a[None], renorm=True, rmax=2.0,
        ...               warmup_steps=10, rmax_ramp_steps=10).limits(15)
        (1.5, 5.0)
        """
        return BatchRenorm.limits(self, step)  # type: ignore[arg-type]

    # -- collectives -------------------------------------------------------

    def _my_rank(self) -> int:
        return self.comm.Get_rank() if self.allgather is None else self.rank

    def _gather(self, send: Any) -> Any:
        """(world_size, *send.shape) float64: every rank's send, in rank order."""
        if self.allgather is None:
            recv = np.empty((self.comm.Get_size(), *send.shape))
            self.comm.Allgather(send, recv)
            return recv
        return chk.gathered(self.allgather(send.copy()), send, self.rank)

    def _raise_if_bad(self, n_bad: Any, bad_ranks: list[int] | None,
                      local_error: Exception | None, what: str) -> None:
        if n_bad == 0:
            return
        if local_error is not None:
            raise local_error
        where = (f"rank(s) {bad_ranks}" if bad_ranks is not None
                 else f"{int(n_bad)} rank(s)")
        raise ValueError(f"SyncBatchNorm.{what}: {where} of the communicator "
                         "rejected their input (see the error on that rank)")

    def _exchange_stats(self, counts: Any, mean: Any, m2: Any, bad: bool, code: int
                        ) -> tuple[Any, Any, list[int] | None, bool]:
        """Every rank's per-part (count, mean, M2), each (K, C), merged part by
        part with Chan's formula in rank order (counts per channel)."""
        K, c = mean.shape
        send = np.empty((K, _HEAD + 3 * c))
        send[:, :_HEAD] = (bad, code, code)
        send[:, _HEAD:_HEAD + c] = counts
        send[:, _HEAD + c:_HEAD + 2 * c] = mean
        send[:, _HEAD + 2 * c:] = m2
        if self.reduction == "allgather":
            recv = self._gather(send)
            head = recv[:, 0, :_HEAD]
            bad_ranks = np.flatnonzero(head[:, 0]).tolist()
            n_bad, lo, hi = len(bad_ranks), head[:, 1].min(), head[:, 2].max()
            merged = None
            if n_bad == 0 and lo == hi:
                # Fixed rank order: every rank computes the same bits.
                parts = [merge_stats(recv[:, g, _HEAD:_HEAD + c],
                                     recv[:, g, _HEAD + c:_HEAD + 2 * c],
                                     recv[:, g, _HEAD + 2 * c:]) for g in range(K)]
                merged = tuple(np.stack([q[i] for q in parts]) for i in range(3))
        else:
            recv = np.empty_like(send)
            rtype = _record_type(send.shape[1])
            self.comm.Allreduce([send, K, rtype], [recv, K, rtype], op=_chan_op())
            bad_ranks, n_bad, lo, hi = None, recv[0, 0], recv[0, 1], recv[0, 2]
            merged = (recv[:, _HEAD:_HEAD + c].copy(), recv[:, _HEAD + c:_HEAD + 2 * c].copy(),
                      recv[:, _HEAD + 2 * c:].copy())
        return merged, n_bad, bad_ranks, lo != hi

    def _exchange_grads(self, sum_dy: Any, sum_dy_xmu: Any, bad: bool
                        ) -> tuple[Any, Any, Any, list[int] | None]:
        """Every rank's per-part (K, C) gradient sums, summed in rank order."""
        K, c = sum_dy.shape
        send = np.empty(1 + 2 * K * c)
        send[0] = bad
        send[1:1 + K * c] = sum_dy.reshape(-1)
        send[1 + K * c:] = sum_dy_xmu.reshape(-1)
        if self.reduction == "allgather":
            recv = self._gather(send)
            bad_ranks = np.flatnonzero(recv[:, 0]).tolist()
            total = recv.sum(axis=0)  # row by row, in rank order
        else:
            total = np.empty_like(send)
            self.comm.Allreduce(send, total, op=MPI.SUM)
            bad_ranks = None
        return (total[1:1 + K * c].reshape(K, c), total[1 + K * c:].reshape(K, c), total[0],
                bad_ranks)

    def _same_width(self, n_samples: int = 0, sizes: bool = False) -> Any:
        """Every rank's channel count checked equal (ranks with different
        counts would exchange buffers of different sizes: every rank checks
        first, so every rank raises); with ``sizes``, every rank's sample
        count, in rank order."""
        c = self.num_features
        if self.allgather is None and not sizes:
            widths = np.empty(2, np.int64)
            self.comm.Allreduce(np.array([c, -c], np.int64), widths, op=MPI.MAX)
            hi, lo = widths[0], -widths[1]
            got = None
        else:
            got = self._gather(np.array([c, n_samples], np.float64))
            hi, lo = got[:, 0].max(), got[:, 0].min()
        if hi != lo:
            raise ValueError(f"num_features: expected the same channel count on every rank, "
                             f"got {c} here and counts from {int(lo)} to {int(hi)} "
                             f"across ranks")
        return None if got is None else got[:, 1]

    # -- forward / backward ------------------------------------------------

    def _forward(self, x: Any, out: Any, n_threads: Any, mask: Any = None,
                 lengths: Any = None) -> tuple[Array, _Record]:
        if not self.training and self.track_running_stats:
            # Running statistics: nothing to exchange.
            return super()._forward(x, out, n_threads, mask, lengths)
        c = self.num_features
        vbs = self.virtual_batch_size if self.training else None
        n = np.shape(x)[0] if vbs is not None and np.ndim(x) >= 2 else 0
        sizes = self._same_width(n, vbs is not None)
        plan = _partition.plan(sizes, self._my_rank(), vbs)
        error: Exception | None = None
        try:
            x = self._input(x, out)
            _check_out(out, x)
            chk.n_threads(n_threads)
            if vbs is not None:
                chk.ghost_axis(self.axis, x.ndim)
            pad = (None if mask is None and lengths is None
                   else chk.padding(mask, lengths, x, self.axis))
            counts, mean, m2 = _parts.local_stats(x, self.axis, plan, n_threads,
                                                  None if pad is None else pad.view(bool))
            code = _DTYPE_CODES[x.dtype]
        except (TypeError, ValueError) as exc:
            error = exc
            counts, mean, m2, code = (np.zeros((plan.K, c)), np.zeros((plan.K, c)),
                                      np.zeros((plan.K, c)), 0)
        merged, n_bad, bad_ranks, mixed = self._exchange_stats(counts, mean, m2,
                                                               error is not None, code)
        self._raise_if_bad(n_bad, bad_ranks, error, "forward")
        if mixed:
            raise TypeError("x: expected the same dtype on every rank, got "
                            f"{x.dtype} here and another dtype elsewhere")
        total, mean, m2 = merged
        if pad is not None:  # a channel may have no value (then left as it is), not one
            chk.masked_counts(total, "channel over all ranks" if vbs is None
                              else "channel of a ghost batch over all ranks")
        elif (total < 2).any():
            g = int(np.argmin(total.min(axis=1)))
            where = "" if vbs is None else f" in ghost batch {g} (virtual_batch_size={vbs})"
            raise ValueError("x: expected more than 1 value per channel over "
                             f"all ranks{where} when training, got {int(total[g].min())}")
        limits = self.limits() if self.renorm else None
        var, invstd, r, d = _partition.coefficients(total, mean, m2, self.eps, limits,
                                                self.running_mean, self.running_var)
        cd = chk.compute_dtype(x.dtype)
        buf, final = chk.output(out, x, cd, (x,))
        _parts.apply(chk.contiguous(x, cd), plan, mean, invstd, r, d, self.weight, self.bias,
                     self.axis, buf, None, n_threads)
        y = chk.finish(buf, final, x.dtype)
        if self.training and self.track_running_stats:
            skip = self.skip_nonfinite_update and not (np.isfinite(mean).all()
                                                       and np.isfinite(var).all())
            if not skip:
                nb = int(self.num_batches_tracked) + 1
                factor = 1.0 / nb if self.momentum is None else self.momentum
                if pad is None:
                    update_running(self.running_mean, self.running_var, mean, var,
                                   total[:, 0] if self.running_var_unbiased else 1.0, factor)
                else:  # each channel from the parts where it has values
                    _update_present(self.running_mean, self.running_var, mean, var, total,
                                    factor, self.running_var_unbiased)
                self.num_batches_tracked[...] = nb
        return y, _Record(x, mean, invstd, True, vbs, extra=_Parts(plan, total, r, d),
                          mask=None if pad is None else pad.view(bool))

    def _backward(self, dy: Any, rec: Any, out: Any, n_threads: Any) -> tuple[Array, Any, Any]:
        """dx of the most recent forward; grad_weight and grad_bias are the
        global sums on every rank (one collective)."""
        c = self.num_features
        self._same_width()
        parts = rec.extra
        if parts is None:  # eval mode: one part, constant statistics
            parts = _Parts(_partition.plan(None, 0, None), np.ones((1, c)), None, None)
            mean, invstd = rec.mean[None], rec.invstd[None]
        else:
            mean, invstd = rec.mean, rec.invstd
        plan, x = parts.plan, rec.x
        cd = chk.compute_dtype(x.dtype)
        error: Exception | None = None
        try:
            dy = chk.like(dy, x, "dy")
            _check_out(out, x)
            chk.n_threads(n_threads)
            dyc, xc = chk.contiguous(dy, cd), chk.contiguous(x, cd)
            sum_dy, sum_dy_xmu = _parts.part_sums(dyc, xc, None, plan, mean, self.axis, None,
                                                  n_threads, rec.mask)
        except (TypeError, ValueError) as exc:
            error = exc
            sum_dy, sum_dy_xmu = np.zeros((plan.K, c)), np.zeros((plan.K, c))
        sum_dy, sum_dy_xmu, n_bad, bad_ranks = self._exchange_grads(
            sum_dy, sum_dy_xmu, error is not None)
        self._raise_if_bad(n_bad, bad_ranks, error, "backward")
        buf, final = chk.output(out, x, cd, (x, dy))
        zeros = np.zeros((plan.K, c))
        trained = rec.training
        _parts.backward_apply(dyc, xc, None, plan, mean, invstd, parts.r, self.weight,
                              sum_dy if trained else zeros, sum_dy_xmu if trained else zeros,
                              parts.counts, self.axis, buf, None, n_threads,
                              None if rec.mask is None else rec.mask.view(np.uint8))
        dweight, dbias = _parts.param_grads(invstd, parts.r, parts.d, sum_dy, sum_dy_xmu)
        return chk.finish(buf, final, x.dtype), dweight, dbias

    @classmethod
    def from_batchnorm(cls, layer: BatchNorm, comm: Any = None,
                       reduction: str = "allgather", *,
                       allgather: Callable[[np.ndarray], Any] | None = None,
                       rank: int | None = None) -> SyncBatchNorm:
        """A SyncBatchNorm sharing ``layer``'s parameter and running arrays.

        A `bncore.BatchRenorm` becomes a synchronized renormalization with
        its bounds and schedule; ghost batches carry over.

        Parameters
        ----------
        layer : bncore.BatchNorm
            A layer without a fused activation; its settings and training
            mode carry over and its arrays are shared, not copied.
        comm : mpi4py.MPI.Intracomm, optional
            Default ``MPI.COMM_WORLD`` (without ``allgather``).
        reduction : {'allgather', 'allreduce'}, default 'allgather'
            How the statistics are exchanged.
        allgather : callable, optional
            An allgather callable instead of MPI (see `SyncBatchNorm`).
        rank : int, optional
            This process's row in ``allgather``'s result (see `SyncBatchNorm`).

        Returns
        -------
        SyncBatchNorm

        Raises
        ------
        TypeError
            If ``comm`` is not an intracommunicator or ``allgather`` is not
            callable.
        ValueError
            If the layer fuses an activation, or the transport arguments
            are invalid.
        ImportError
            If ``allgather`` is not given and mpi4py is missing.

        Examples
        --------
        >>> from bncore.distributed import SyncBatchNorm
        >>> bn = bncore.BatchNorm(2)
        >>> SyncBatchNorm.from_batchnorm(bn).weight is bn.weight
        True
        >>> brn = bncore.BatchRenorm(2)
        >>> SyncBatchNorm.from_batchnorm(brn, allgather=lambda a: a[None]).renorm
        True
        """
        if getattr(layer, "activation", None) is not None:
            chk.refuse("layer", f"SyncBatchNorm does not fuse an activation; got a BatchNorm "
                                f"with activation={layer.activation!r}")
        comm = _check_comm(comm, reduction, allgather)
        rank = chk.allgather_rank(allgather, rank, layer.virtual_batch_size)
        sync = cls.__new__(cls)
        sync.__dict__.update(dict(rmax=3.0, dmax=5.0, warmup_steps=0, rmax_ramp_steps=0,
                                  dmax_ramp_steps=0))
        sync.__dict__.update(layer.__dict__)  # same arrays, same settings
        sync.renorm = isinstance(layer, BatchRenorm)
        sync.comm, sync.reduction, sync.allgather, sync.rank = comm, reduction, allgather, rank
        sync._saved = None
        return sync


def convert_sync_batchnorm(layers: Any, comm: Any = None, *, reduction: str = "allgather",
                           allgather: Callable[[np.ndarray], Any] | None = None,
                           rank: int | None = None) -> Any:
    """Replace every ``BatchNorm`` in ``layers`` by a ``SyncBatchNorm``.

    The new layers share the old ones' weight, bias and running arrays (an
    optimizer holding them keeps working) and their training mode; a
    ``BatchRenorm`` becomes a synchronized renormalization.

    Parameters
    ----------
    layers : layer, list, tuple or dict
        A layer, or a container of them (nested containers are converted
        recursively).
    comm : mpi4py.MPI.Intracomm, optional
        Default ``MPI.COMM_WORLD`` (without ``allgather``).
    reduction : {'allgather', 'allreduce'}, default 'allgather'
        How the statistics are exchanged.
    allgather : callable, optional
        An allgather callable instead of MPI (see `SyncBatchNorm`).
    rank : int, optional
        This process's row in ``allgather``'s result (see `SyncBatchNorm`).

    Returns
    -------
    layer, list, tuple or dict
        A new container of the same kind; anything that is not a
        ``BatchNorm`` is kept as is.

    Raises
    ------
    TypeError
        If ``comm`` is not an intracommunicator or ``allgather`` is not
        callable.
    ValueError
        If a ``BatchNorm`` fuses an activation or the transport arguments are
        invalid.
    ImportError
        If ``allgather`` is not given and mpi4py is missing.

    Examples
    --------
    >>> from bncore.distributed import SyncBatchNorm, convert_sync_batchnorm
    >>> layers = convert_sync_batchnorm({"bn": bncore.BatchNorm(2), "ln": bncore.LayerNorm(2)})
    >>> type(layers["bn"]).__name__, type(layers["ln"]).__name__
    ('SyncBatchNorm', 'LayerNorm')
    """
    if isinstance(layers, SyncBatchNorm):
        return layers
    if isinstance(layers, BatchNorm):
        return SyncBatchNorm.from_batchnorm(layers, comm, reduction, allgather=allgather,
                                            rank=rank)
    if isinstance(layers, (list, tuple, dict)):
        def convert(item: Any) -> Any:
            return convert_sync_batchnorm(item, comm, reduction=reduction,
                                          allgather=allgather, rank=rank)
        if isinstance(layers, dict):
            return {key: convert(item) for key, item in layers.items()}
        return type(layers)(convert(item) for item in layers)
    return layers


def torch_allgather(group: Any = None) -> Callable[[np.ndarray], np.ndarray]:
    """An ``allgather`` callable for `SyncBatchNorm` over ``torch.distributed``.

    Each call sends this rank's float64 array as a CPU tensor through
    ``torch.distributed.all_gather`` on ``group`` and returns the stacked
    results, shape ``(world_size, *local.shape)`` in the group's rank order;
    it works with the gloo backend (CPU tensors), where PyTorch's own
    ``SyncBatchNorm`` refuses CPU input. The callable's ``rank`` and
    ``world_size`` attributes are this process's rank in ``group`` and the
    group's size.

    Parameters
    ----------
    group : torch.distributed.ProcessGroup, optional
        The ranks that share the batch; default the whole (default) group.
        ``torch.distributed`` must be initialized (``init_process_group``).

    Returns
    -------
    callable
        ``allgather(local: numpy.ndarray) -> numpy.ndarray``, with ``rank``
        and ``world_size`` attributes.

    Raises
    ------
    ImportError
        If PyTorch is not installed.
    RuntimeError
        If ``torch.distributed`` is unavailable or not initialized.

    Examples
    --------
    >>> import torch.distributed as dist  # doctest: +SKIP
    >>> dist.init_process_group("gloo", init_method="tcp://127.0.0.1:29500",
    ...                         rank=rank, world_size=world_size)  # doctest: +SKIP
    >>> from bncore.distributed import SyncBatchNorm, torch_allgather
    >>> bn = SyncBatchNorm(64, allgather=torch_allgather())  # doctest: +SKIP
    """
    try:
        import torch
        import torch.distributed as dist
    except ImportError as exc:  # pragma: no cover - exercised only without torch
        raise ImportError("bncore.distributed.torch_allgather needs PyTorch") from exc
    chk.torch_group_ready(dist)
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)

    def allgather(local: np.ndarray) -> np.ndarray:
        flat = torch.from_numpy(np.array(local, np.float64).reshape(-1))
        rows = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(rows, flat, group=group)
        return torch.stack(rows).numpy().reshape((world, *np.shape(local)))

    allgather.rank = rank  # type: ignore[attr-defined]
    allgather.world_size = world  # type: ignore[attr-defined]
    return allgather
