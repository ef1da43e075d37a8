"""Synchronized batch normalization across processes over MPI (mpi4py).

Data-parallel training splits each batch across ranks; ``SyncBatchNorm``
normalizes every shard with the statistics of the whole batch, so the result
equals single-process ``BatchNorm`` on the concatenated batch.

Per training step and layer: forward makes one collective on a buffer of
``2*C + 4`` float64 per rank (count, error flag, dtype code, mean, M2);
backward makes one collective on ``2*C + 1`` float64 (error flag, sum(dy),
sum(dy * (x - mean))). Every rank checks the exchanged error flags before
using the data, so bad input on one rank makes every rank raise instead of
leaving the others blocked in the next collective.

``reduction="allgather"`` (default): each rank receives every rank's buffer
and merges them in rank order, so statistics, running statistics and
parameter gradients are bitwise identical on every rank, as the MPI standard
guarantees nothing about the order inside a reduction. Bytes received grow
with the number of ranks P.
``reduction="allreduce"``: a reduction with Chan's merge as an MPI operation
(forward) and MPI_SUM (backward); bytes per rank do not grow with P. MPICH and
Open MPI return the same bits on every rank, but the MPI standard only
recommends it. See docs/SYNC_BN.md for the costs.

Gradient convention: after ``backward`` every rank holds the *global*
``grad_weight`` and ``grad_bias`` (the sums over the whole batch, equal to
single-process ``BatchNorm``). Exclude them from a sum all-reduce of the other
gradients (averaging them is harmless: the values are already equal).
"""
from __future__ import annotations

from typing import Any

import numpy as np

try:
    from mpi4py import MPI
except ImportError as exc:  # pragma: no cover - exercised only without mpi4py
    raise ImportError(
        "bncore.distributed needs mpi4py and an MPI library: "
        "pip install 'bncore[mpi]'") from exc

from . import _checks as chk
from . import _kernels as _k
from .functional import (batch_norm_backward_elemt, batch_norm_backward_reduce, batch_norm_elemt,
                         batch_norm_stats, merge_stats, update_running)
from ._typing import Array
from .layers import BatchNorm
from .layers.batch_norm import _Record

__all__ = ["SyncBatchNorm", "convert_sync_batchnorm"]

# Forward buffer layout: [count, n_bad, dtype_min, dtype_max, mean (C), m2 (C)]
_HEAD = 4
_DTYPE_CODES = {np.dtype(np.float16): 1, np.dtype(np.float32): 2,
                np.dtype(np.float64): 3}


def _chan_reduce(inbuf: Any, inoutbuf: Any, datatype: Any) -> None:
    # inoutbuf = inbuf (lower ranks) merged with inoutbuf. A record is one
    # contiguous MPI element, so MPI never hands over part of one. Runs once
    # per reduction round: straight to the merge kernel, no re-validation.
    width = datatype.Get_extent()[1] // 8
    a = np.frombuffer(inbuf, dtype=np.float64).reshape(-1, width)
    b = np.frombuffer(inoutbuf, dtype=np.float64).reshape(-1, width)
    c = (width - _HEAD) // 2
    for ra, rb in zip(a, b):
        pair = np.stack([ra, rb])
        count = _k.merge_stats(
            np.ascontiguousarray(pair[:, :1]),
            np.ascontiguousarray(pair[:, _HEAD:_HEAD + c]),
            np.ascontiguousarray(pair[:, _HEAD + c:]),
            rb[_HEAD:_HEAD + c], rb[_HEAD + c:], np.empty(c))
        rb[:_HEAD] = (count, ra[1] + rb[1], min(ra[2], rb[2]),
                      max(ra[3], rb[3]))


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


def _check_comm(comm: Any, reduction: str) -> Any:
    if comm is None:
        comm = MPI.COMM_WORLD
    if not isinstance(comm, MPI.Intracomm):
        chk.refuse("comm", f"expected an mpi4py MPI.Intracomm, got {type(comm).__name__}",
                   TypeError)
    chk.choice(reduction, "reduction", {"allgather": "every rank merges every buffer",
                                        "allreduce": "a Chan-merge reduction"})
    return comm


class SyncBatchNorm(BatchNorm):
    """``BatchNorm`` whose batch statistics span every rank of ``comm``.

    Same constructor and behaviour as ``bncore.BatchNorm`` plus ``comm`` (an
    mpi4py intracommunicator, default ``MPI.COMM_WORLD``) and ``reduction``
    (``"allgather"`` or ``"allreduce"``, see the module docstring). Every rank
    of ``comm`` must call ``forward`` and ``backward`` together, with the same
    channel count and dtype; a rank may hold zero samples. Running statistics
    are updated identically on every rank, and ``grad_weight``/``grad_bias``
    are the global sums on every rank. In eval mode with running statistics
    the forward is local; backward still sums the parameter gradients.

    Parameters
    ----------
    num_features : int
        C, the number of channels (the same on every rank).
    comm : mpi4py.MPI.Intracomm, optional
        The ranks that share the batch; default ``MPI.COMM_WORLD``.
    reduction : {'allgather', 'allreduce'}, default 'allgather'
        How the statistics are exchanged (see the module docstring).
    **kwargs
        `bncore.BatchNorm`'s other arguments, except ``activation``.

    Raises
    ------
    TypeError
        If ``comm`` is not an intracommunicator, or as `bncore.BatchNorm`.
    ValueError
        If ``reduction`` is neither, ``activation`` is given, or as
        `bncore.BatchNorm`.

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
    """

    def __init__(self, num_features: int, *, comm: Any = None, reduction: str = "allgather",
                 **kwargs: Any):
        comm = _check_comm(comm, reduction)
        if kwargs.get("activation") is not None:
            chk.refuse("activation", "SyncBatchNorm does not fuse an activation; apply it "
                                     "after the layer")
        super().__init__(num_features, **kwargs)
        self.comm = comm
        self.reduction = reduction

    def __repr__(self) -> str:
        # BatchNorm's repr already names the class
        return (super().__repr__()[:-1] + f", ranks={self.comm.Get_size()}, "
                f"reduction={self.reduction!r})")

    # -- collectives -------------------------------------------------------

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

    def _exchange_stats(self, count: int, mean: Any, m2: Any, bad: bool, code: int
                        ) -> tuple[Any, Any, list[int] | None, bool]:
        c = self.num_features
        send = np.empty(_HEAD + 2 * c)
        send[:_HEAD] = (count, bad, code, code)
        send[_HEAD:_HEAD + c] = mean
        send[_HEAD + c:] = m2
        if self.reduction == "allgather":
            recv = np.empty((self.comm.Get_size(), send.size))
            self.comm.Allgather(send, recv)
            head = recv[:, :_HEAD]
            bad_ranks = np.flatnonzero(head[:, 1]).tolist()
            n_bad, lo, hi = len(bad_ranks), head[:, 2].min(), head[:, 3].max()
            merged = None
            if n_bad == 0 and lo == hi:
                # Fixed rank order: every rank computes the same bits.
                merged = merge_stats(head[:, 0],
                                            recv[:, _HEAD:_HEAD + c],
                                            recv[:, _HEAD + c:])
        else:
            recv = np.empty_like(send)
            rtype = _record_type(send.size)
            self.comm.Allreduce([send, 1, rtype], [recv, 1, rtype],
                                op=_chan_op())
            bad_ranks, n_bad, lo, hi = None, recv[1], recv[2], recv[3]
            merged = (int(recv[0]), recv[_HEAD:_HEAD + c],
                      recv[_HEAD + c:].copy())
        return merged, n_bad, bad_ranks, lo != hi

    def _exchange_grads(self, sum_dy: Any, sum_dy_xmu: Any, bad: bool
                        ) -> tuple[Any, Any, Any, list[int] | None]:
        c = self.num_features
        send = np.empty(1 + 2 * c)
        send[0] = bad
        send[1:1 + c] = sum_dy
        send[1 + c:] = sum_dy_xmu
        if self.reduction == "allgather":
            recv = np.empty((self.comm.Get_size(), send.size))
            self.comm.Allgather(send, recv)
            bad_ranks = np.flatnonzero(recv[:, 0]).tolist()
            total = recv.sum(axis=0)  # row by row, in rank order
        else:
            total = np.empty_like(send)
            self.comm.Allreduce(send, total, op=MPI.SUM)
            bad_ranks = None
        return total[1:1 + c], total[1 + c:], total[0], bad_ranks

    # -- forward / backward ------------------------------------------------

    def _same_width(self) -> None:
        # Ranks with different channel counts would exchange buffers of
        # different sizes: every rank checks first, so every rank raises.
        c = self.num_features
        widths = np.empty(2, np.int64)
        self.comm.Allreduce(np.array([c, -c], np.int64), widths, op=MPI.MAX)
        if widths[0] != -widths[1]:
            raise ValueError(f"num_features: expected the same channel count on every rank, "
                             f"got {c} here and counts from {-widths[1]} to {widths[0]} "
                             f"across ranks")

    def _forward(self, x: Any, out: Any, n_threads: Any) -> tuple[Array, _Record]:
        if not self.training and self.track_running_stats:
            # Running statistics: nothing to exchange.
            return super()._forward(x, out, n_threads)
        c = self.num_features
        self._same_width()
        error: Exception | None = None
        try:
            x = self._input(x, out)
            _check_out(out, x)
            chk.n_threads(n_threads)
            count, mean, m2 = batch_norm_stats(x, axis=self.axis, n_threads=n_threads)
            code = _DTYPE_CODES[x.dtype]
        except (TypeError, ValueError) as exc:
            error = exc
            count, mean, m2, code = 0, np.zeros(c), np.zeros(c), 0
        merged, n_bad, bad_ranks, mixed = self._exchange_stats(
            count, mean, m2, error is not None, code)
        self._raise_if_bad(n_bad, bad_ranks, error, "forward")
        if mixed:
            raise TypeError("x: expected the same dtype on every rank, got "
                            f"{x.dtype} here and another dtype elsewhere")
        total, mean, m2 = merged
        if total < 2:
            raise ValueError("x: expected more than 1 value per channel over "
                             f"all ranks when training, got {total}")
        var = m2 / total
        invstd = _k.invstd(var, self.eps)
        y = batch_norm_elemt(x, mean, invstd, self.weight, self.bias, axis=self.axis, out=out,
                             n_threads=n_threads)
        if self.training and self.track_running_stats:
            n = int(self.num_batches_tracked) + 1
            factor = 1.0 / n if self.momentum is None else self.momentum
            update_running(self.running_mean, self.running_var, mean, var, total, factor)
            self.num_batches_tracked[...] = n
        return y, _Record(x, mean, invstd, True, extra=total)

    def _backward(self, dy: Any, r: Any, out: Any, n_threads: Any) -> tuple[Array, Any, Any]:
        """dx of the most recent forward; grad_weight and grad_bias are the
        global sums on every rank (one collective)."""
        c = self.num_features
        self._same_width()
        error: Exception | None = None
        try:
            sum_dy, sum_dy_xmu = batch_norm_backward_reduce(
                dy, r.x, r.mean, axis=self.axis, n_threads=n_threads)
            _check_out(out, r.x)
        except (TypeError, ValueError) as exc:
            error = exc
            sum_dy, sum_dy_xmu = np.zeros(c), np.zeros(c)
        sum_dy, sum_dy_xmu, n_bad, bad_ranks = self._exchange_grads(
            sum_dy, sum_dy_xmu, error is not None)
        self._raise_if_bad(n_bad, bad_ranks, error, "backward")
        if r.training:
            sum_dy_dx, sum_dy_xmu_dx, total = sum_dy, sum_dy_xmu, r.extra
        else:  # constant statistics: dx = dy * weight * invstd
            sum_dy_xmu_dx = sum_dy_dx = np.zeros(c)
            total = 1
        dx = batch_norm_backward_elemt(
            dy, r.x, r.mean, r.invstd, self.weight, sum_dy_dx, sum_dy_xmu_dx, total,
            axis=self.axis, out=out, n_threads=n_threads)
        return dx, sum_dy_xmu * r.invstd, sum_dy

    @classmethod
    def from_batchnorm(cls, layer: BatchNorm, comm: Any = None,
                       reduction: str = "allgather") -> SyncBatchNorm:
        """A SyncBatchNorm sharing ``layer``'s parameter and running arrays.

        Parameters
        ----------
        layer : bncore.BatchNorm
            A layer without a fused activation; its settings and training
            mode carry over and its arrays are shared, not copied.
        comm : mpi4py.MPI.Intracomm, optional
            Default ``MPI.COMM_WORLD``.
        reduction : {'allgather', 'allreduce'}, default 'allgather'
            How the statistics are exchanged.

        Returns
        -------
        SyncBatchNorm

        Raises
        ------
        TypeError
            If ``comm`` is not an intracommunicator.
        ValueError
            If the layer fuses an activation or ``reduction`` is neither.

        Examples
        --------
        >>> from bncore.distributed import SyncBatchNorm
        >>> bn = bncore.BatchNorm(2)
        >>> SyncBatchNorm.from_batchnorm(bn).weight is bn.weight
        True
        """
        if getattr(layer, "activation", None) is not None:
            chk.refuse("layer", f"SyncBatchNorm does not fuse an activation; got a BatchNorm "
                                f"with activation={layer.activation!r}")
        sync = cls.__new__(cls)
        comm = _check_comm(comm, reduction)
        sync.__dict__.update(layer.__dict__)  # same arrays, same settings
        sync.comm = comm
        sync.reduction = reduction
        sync._saved = None
        return sync


def convert_sync_batchnorm(layers: Any, comm: Any = None, *,
                           reduction: str = "allgather") -> Any:
    """Replace every ``BatchNorm`` in ``layers`` by a ``SyncBatchNorm``.

    The new layers share the old ones' weight, bias and running arrays (an
    optimizer holding them keeps working) and their training mode.

    Parameters
    ----------
    layers : layer, list, tuple or dict
        A layer, or a container of them (nested containers are converted
        recursively).
    comm : mpi4py.MPI.Intracomm, optional
        Default ``MPI.COMM_WORLD``.
    reduction : {'allgather', 'allreduce'}, default 'allgather'
        How the statistics are exchanged.

    Returns
    -------
    layer, list, tuple or dict
        A new container of the same kind; anything that is not a
        ``BatchNorm`` is kept as is.

    Raises
    ------
    TypeError
        If ``comm`` is not an intracommunicator.
    ValueError
        If a ``BatchNorm`` fuses an activation or ``reduction`` is neither.

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
        return SyncBatchNorm.from_batchnorm(layers, comm, reduction)
    if isinstance(layers, (list, tuple)):
        return type(layers)(convert_sync_batchnorm(item, comm,
                                                   reduction=reduction)
                            for item in layers)
    if isinstance(layers, dict):
        return {key: convert_sync_batchnorm(item, comm, reduction=reduction)
                for key, item in layers.items()}
    return layers
