"""Exact population statistics for batch norm layers ("precise BN").

Running statistics are a moving average of per-batch statistics taken while
the weights moved. PyTorch's ``swa_utils.update_bn`` and Detectron's
PreciseBN re-estimate them with fixed weights, but still as an average of
per-batch means and per-batch variances; the variance of the whole stream
also contains the spread of the batch means, which that average leaves out
(by ``Var(batch means)``, about ``var / batch_size`` in i.i.d. data).

`PopulationStats` keeps the exact (count, mean, M2) of every value it has
seen, per channel: each batch's statistics come from `batch_norm_stats` and
are merged with `merge_stats` (Chan's merge, float64), so the result is the
statistics of the concatenated stream, not an average of batches; shards of
several MPI ranks merge exactly with `PopulationStats.allreduce`.
`collect_population_stats` (a context manager) and `precise_batch_norm`
record the input statistics of every batch norm layer of a network while
its training-mode forwards run over a data stream, and write the exact
population statistics into the layers at the end.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, MutableMapping
from typing import Any

import numpy as np

from . import _checks as chk
from ._typing import ArrayLike, Float64Array
from .functional import batch_norm_stats, masked_stats, merge_stats, update_running
from .layers import BatchNorm

__all__ = ["PopulationStats", "collect_population_stats", "precise_batch_norm"]

_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


class PopulationStats:
    """Exact per-channel statistics (count, mean, M2) of a stream of batches.

    ``update(x)`` adds a batch; ``merge(other)`` adds another accumulator's
    values; ``allreduce(comm)`` merges the accumulators of every MPI rank.
    The statistics are those of the concatenation of everything added, in
    float64, accurate in float32 when ``|mean| >> std`` (deviations, never
    ``E[x^2] - E[x]^2``). `write_to` puts them into a layer's running
    statistics, `state_dict` and `write_to_state_dict` into a state dict.

    Parameters
    ----------
    num_features : int
        C, the number of channels (positive).
    axis : int or tuple of int, default 1
        The channel axis of the batches (-1 for channels last; a tuple of
        adjacent axes whose product is C, as the layers take).

    Raises
    ------
    TypeError
        If ``axis`` is not an int or a tuple.
    ValueError
        If ``num_features`` is not a positive int.

    See Also
    --------
    collect_population_stats : Statistics of every batch norm layer of a net.
    batch_norm_stats, merge_stats : The two operations it is built from.

    Notes
    -----
    ``mean``, ``var`` and ``biased_var`` raise ValueError while nothing has
    been recorded (count 0). ``var`` is ``M2 / (count - 1)`` (``M2 / count``
    for a count of 1, the library's running-update rule).

    Examples
    --------
    >>> stats = bncore.PopulationStats(2)
    >>> _ = stats.update(np.array([[1.0, 10.0], [3.0, 10.0]]))
    >>> _ = stats.update(np.array([[5.0, 20.0], [7.0, 20.0]]))
    >>> stats.count, stats.mean, stats.biased_var
    (4, array([ 4., 15.]), array([ 5., 25.]))
    >>> stats.var  # the spread of the batch means is in it
    array([ 6.66666667, 33.33333333])
    """

    def __init__(self, num_features: int, *, axis: int = 1):
        self.num_features = C = chk.positive_int(num_features, "num_features")
        # the axis itself is checked against each batch (Layout), as the layers do
        if not isinstance(axis, (int, np.integer, tuple)) or isinstance(axis, (bool, np.bool_)):
            chk.refuse("axis", f"expected an int or a tuple of adjacent ints, got "
                               f"{type(axis).__name__}", TypeError)
        self.axis = axis
        self._count = np.zeros(C)  # per channel: masked batches count each channel's own
        self._mean = np.zeros(C)
        self._m2 = np.zeros(C)

    def __repr__(self) -> str:
        return f"PopulationStats({self.num_features}, axis={self.axis}, count={self.count})"

    # ---- accumulation ------------------------------------------------------------------

    def _absorb(self, count: Any, mean: Any, m2: Any) -> None:
        """Merge checked statistics (count (a number or (C,)), mean (C,), M2 (C,))
        into these."""
        counts = np.stack([self._count, np.broadcast_to(np.asarray(count, np.float64),
                                                        self._count.shape)])
        self._count, self._mean, self._m2 = merge_stats(
            counts, np.stack([self._mean, mean]), np.stack([self._m2, m2]))

    def update(self, x: ArrayLike, *, mask: ArrayLike | None = None,
               lengths: ArrayLike | None = None,
               n_threads: int | None = None) -> PopulationStats:
        """Add a batch: its values join the statistics, channel by channel.

        Parameters
        ----------
        x : array_like
            A batch with C channels on ``axis``, dtype float16, float32 or
            float64, ``ndim >= 2``; a batch with no samples adds nothing.
        mask : array_like of bool, optional
            Broadcastable to x: only the values where it is True count (a
            padded batch; see `bncore.batch_norm_train`).
        lengths : array_like of int, optional
            Per-sample lengths of a padded sequence batch, instead of mask.
        n_threads : int, optional
            The most threads to use. None uses `get_num_threads` at the time
            of the call.

        Returns
        -------
        PopulationStats
            The accumulator itself.

        Raises
        ------
        TypeError
            If x has an unsupported dtype.
        ValueError
            If x has another number of channels on ``axis`` or ``ndim < 2``,
            or ``n_threads`` is invalid; nothing is added.

        Examples
        --------
        >>> stats = bncore.PopulationStats(3, axis=-1)
        >>> stats.update(np.ones((2, 4, 4, 3), np.float32)).count
        32
        """
        L = chk.Layout(x, self.axis).channels(self.num_features)
        self._absorb(*_batch_stats(L, mask, lengths, n_threads))
        return self

    def merge(self, other: PopulationStats) -> PopulationStats:
        """Add the values another accumulator has seen (``other`` is unchanged).

        Parameters
        ----------
        other : PopulationStats
            Statistics of the same number of channels.

        Returns
        -------
        PopulationStats
            The accumulator itself.

        Raises
        ------
        TypeError
            If ``other`` is not a PopulationStats.
        ValueError
            If ``other`` has another number of channels.

        Examples
        --------
        >>> x = np.arange(12.0).reshape(6, 2)
        >>> a = bncore.PopulationStats(2).update(x[:1])
        >>> b = bncore.PopulationStats(2).update(x[1:])
        >>> np.allclose(a.merge(b).biased_var, x.var(axis=0))
        True
        """
        chk.population_other(other, PopulationStats, self.num_features)
        self._absorb(other._count, other._mean, other._m2)
        return self

    def allreduce(self, comm: Any) -> PopulationStats:
        """Merge the statistics of every rank of an MPI communicator, on every rank.

        Each rank's (count, mean, M2) is gathered and merged in rank order,
        so every rank ends with the same bits: the statistics of all ranks'
        values together. Ranks with no values, or uneven numbers, are exact.
        A collective call: every rank must make it.

        Parameters
        ----------
        comm : mpi4py.MPI.Comm
            The communicator (its ``allgather``).

        Returns
        -------
        PopulationStats
            The accumulator itself, now holding every rank's values.

        Raises
        ------
        TypeError
            If ``comm`` has no ``allgather``.
        ValueError
            If the ranks' statistics have different numbers of channels (on
            every rank; nothing changes).

        Examples
        --------
        >>> from mpi4py import MPI
        >>> stats = bncore.PopulationStats(1).update(np.array([[1.0], [3.0]]))
        >>> stats.allreduce(MPI.COMM_SELF).mean
        array([2.])
        """
        chk.communicator(comm)
        parts = comm.allgather((self.num_features, self._count, self._mean, self._m2))
        self._count, self._mean, self._m2 = _merge_gathered(parts)
        return self

    # ---- results -----------------------------------------------------------------------

    @property
    def count(self) -> Any:
        """The number of values per channel recorded so far: an int, or a
        float64 array (C,) when masked batches counted channels differently."""
        c = self._count
        return int(c[0]) if (c == c[0]).all() else c.copy()

    @property
    def mean(self) -> Float64Array:
        """The per-channel mean (float64 copy)."""
        chk.population_nonempty(self._count)
        return self._mean.copy()

    @property
    def biased_var(self) -> Float64Array:
        """The per-channel population variance ``M2 / count`` (float64)."""
        return self._moments(unbiased=False)[1]

    @property
    def var(self) -> Float64Array:
        """The per-channel unbiased variance ``M2 / (count - 1)`` (float64)."""
        return self._moments(unbiased=True)[1]

    def _moments(self, unbiased: bool) -> tuple[Float64Array, Float64Array]:
        # the library's one running-update rule, with momentum 1 from zeros,
        # gives the mean and the (Bessel-corrected) variance
        chk.population_nonempty(self._count)
        mean, var = np.zeros(self.num_features), np.zeros(self.num_features)
        update_running(mean, var, self._mean, self._m2 / self._count,
                       self._count[None] if unbiased else 1, 1.0)
        return mean, var

    def write_to(self, layer: Any) -> None:
        """Set a layer's running statistics to these population statistics.

        ``running_var`` gets the unbiased variance, or the biased one where
        the layer has ``running_var_unbiased=False`` (Keras and ONNX
        conventions); values are cast to the layer's dtype.
        ``num_batches_tracked`` is left as it is.

        Parameters
        ----------
        layer : BatchNorm, its subclasses, SyncBatchNorm or FrozenBatchNorm
            A layer with running statistics of C channels.

        Returns
        -------
        None

        Raises
        ------
        TypeError
            If the layer has no running statistics.
        ValueError
            If its width differs or nothing was recorded; the layer is
            unchanged.

        Examples
        --------
        >>> bn = bncore.BatchNorm(2, dtype=np.float64)
        >>> stats = bncore.PopulationStats(2).update(np.array([[1.0, 2.0], [3.0, 6.0]]))
        >>> stats.write_to(bn)
        >>> bn.running_mean, bn.running_var
        (array([2., 4.]), array([2., 8.]))
        """
        chk.running_target(layer, self.num_features)
        mean, var = self._moments(getattr(layer, "running_var_unbiased", True))
        layer.load_state_dict({"running_mean": mean, "running_var": var}, strict=False)

    def state_dict(self, prefix: str = "", *, unbiased: bool = True) -> dict[str, Float64Array]:
        """The statistics as running-statistics entries of a state dict.

        Parameters
        ----------
        prefix : str, default ''
            Put before the keys (a layer's name in a network's state dict,
            e.g. ``'layer1.bn.'``).
        unbiased : bool, default True
            Whether ``running_var`` is unbiased (PyTorch) or biased (Keras,
            ONNX, Flax).

        Returns
        -------
        dict of str to numpy.ndarray
            float64 ``prefix + 'running_mean'`` and ``prefix + 'running_var'``.

        Raises
        ------
        ValueError
            If nothing was recorded.

        Examples
        --------
        >>> stats = bncore.PopulationStats(1).update(np.array([[1.0], [3.0]]))
        >>> stats.state_dict("bn1.")
        {'bn1.running_mean': array([2.]), 'bn1.running_var': array([2.])}
        """
        mean, var = self._moments(bool(unbiased))
        return {f"{prefix}running_mean": mean, f"{prefix}running_var": var}

    def write_to_state_dict(self, state: MutableMapping[str, Any], prefix: str = "", *,
                            unbiased: bool = True) -> None:
        """Overwrite the running statistics in a state dict (NumPy or torch).

        Each entry keeps its type and dtype: a NumPy array is replaced by one
        of its dtype, a torch tensor by ``tensor.new_tensor`` (its dtype and
        device).

        Parameters
        ----------
        state : mutable mapping of str to array
            A state dict holding ``prefix + 'running_mean'`` and
            ``prefix + 'running_var'`` (C floats each).
        prefix : str, default ''
            The layer's key prefix.
        unbiased : bool, default True
            Whether ``running_var`` is unbiased (PyTorch) or biased.

        Returns
        -------
        None

        Raises
        ------
        KeyError
            If an entry is missing.
        TypeError
            If ``state`` is not a mutable mapping or an entry is not floating
            point.
        ValueError
            If an entry's shape is not ``(C,)`` or nothing was recorded;
            ``state`` is unchanged.

        Examples
        --------
        >>> state = bncore.BatchNorm(1).state_dict()
        >>> stats = bncore.PopulationStats(1).update(np.array([[1.0], [3.0]]))
        >>> stats.write_to_state_dict(state)
        >>> state["running_mean"], state["running_var"]
        (array([2.], dtype=float32), array([2.], dtype=float32))
        """
        keys = (f"{prefix}running_mean", f"{prefix}running_var")
        chk.state_targets(state, keys, self.num_features)
        values = self._moments(bool(unbiased))
        for k, v in zip(keys, values):
            cur = state[k]
            state[k] = v.astype(cur.dtype) if isinstance(cur, np.ndarray) else cur.new_tensor(v)


def _merge_gathered(parts: list[Any]) -> tuple[Any, Float64Array, Float64Array]:
    """Rank order merge of gathered (width, count, mean, M2) tuples, every rank alike."""
    chk.gathered_widths([p[0] for p in parts])
    return merge_stats([p[1] for p in parts], np.stack([p[2] for p in parts]),
                       np.stack([p[3] for p in parts]))


def _batch_stats(L: Any, mask: Any, lengths: Any, n_threads: Any) -> tuple[Any, Any, Any]:
    """(count, mean, M2) of a checked batch, over its unmasked values when a
    mask or lengths is given."""
    if mask is None and lengths is None:
        return batch_norm_stats(L.x, axis=L.axis, n_threads=n_threads)
    pad = chk.padding(mask, lengths, L.x, L.axis).view(bool)
    return masked_stats(L.x, pad, axis=L.axis, n_threads=n_threads)


def _observer(stats: PopulationStats) -> Callable[[Any, Any], Callable[[], None]]:
    """An input observer (see layers/base.py) recording a layer's inputs into stats.

    Before the forward: the batch's statistics and a copy of the running
    buffers. Once the forward succeeded: the statistics are merged and the
    buffers put back, so collecting leaves the running statistics as they were.
    """
    def observe(layer: Any, x: Any, mask: Any = None, lengths: Any = None
                ) -> Callable[[], None]:
        L = chk.Layout(x, layer.axis).channels(layer.num_features)
        part = _batch_stats(L, mask, lengths, None)
        saved = {k: np.array(getattr(layer, k)) for k in _BUFFERS}

        def done() -> None:
            stats._absorb(*part)
            layer.load_state_dict(saved, strict=False)
        return done
    return observe


@contextlib.contextmanager
def collect_population_stats(layers: Any, *, comm: Any = None
                             ) -> Iterator[list[PopulationStats]]:
    """Record the exact input statistics of batch norm layers; write them at the end.

    Inside the ``with`` block, run the network's forwards over a data stream
    (weights fixed). The layers are put in training mode (so each batch is
    normalized with its own statistics, as in training) and every forward of
    a listed layer adds its input to that layer's `PopulationStats`; the
    running statistics and ``num_batches_tracked`` are put back after each
    forward. When the block ends, every layer's ``running_mean`` and
    ``running_var`` become the population statistics of all its inputs
    (`PopulationStats.write_to`) and its mode is restored. If an exception
    escapes the block, every layer is restored as it was and nothing is
    written. With ``comm``, each layer's statistics are merged over the ranks
    first (exactly, in rank order); an exception on one rank makes every rank
    restore its layers and raise.

    Parameters
    ----------
    layers : BatchNorm or iterable of BatchNorm
        Layers of the BatchNorm family (BatchNorm, BatchRenorm, InPlaceABN,
        SyncBatchNorm) with running statistics, each once.
    comm : mpi4py.MPI.Comm, optional
        Data-parallel ranks whose streams together make the population.

    Yields
    ------
    list of PopulationStats
        One per layer, in order (after the block: the merged statistics).

    Raises
    ------
    TypeError
        If a layer is not of the BatchNorm family or ``comm`` has no
        ``allgather``.
    ValueError
        If a layer has no running statistics or is listed twice (before the
        block runs), or a layer saw no input (at the end; nothing is
        written).
    RuntimeError
        With ``comm``, if another rank raised inside the block.

    See Also
    --------
    precise_batch_norm : The same, for a sequence of batches and a forward
        function.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> bn = bncore.BatchNorm(3, dtype=np.float64)
    >>> data = [rng.normal(5.0, 2.0, (8, 3)) for _ in range(4)]
    >>> with bncore.collect_population_stats([bn]) as (stats,):
    ...     for x in data:
    ...         _ = bn(x)
    >>> whole = np.concatenate(data)
    >>> np.allclose(bn.running_mean, whole.mean(0))
    True
    >>> np.allclose(bn.running_var, whole.var(0, ddof=1))
    True
    >>> int(bn.num_batches_tracked), stats.count
    (0, 32)
    """
    seq = chk.population_layers(layers, BatchNorm)
    if comm is not None:
        chk.communicator(comm)
    stats = [PopulationStats(layer.num_features, axis=layer.axis) for layer in seq]
    saved = [(layer.training, {k: np.array(getattr(layer, k)) for k in _BUFFERS},
              "_observers" in vars(layer)) for layer in seq]
    observers = [_observer(s) for s in stats]

    def restore(write: bool) -> None:
        for layer, obs, (mode, state, own), s in zip(seq, observers, saved, stats):
            left = tuple(o for o in layer._observers if o is not obs)
            if left or own:
                layer._observers = left
            else:
                del layer._observers
            layer.load_state_dict(state, strict=False)
            if write:
                s.write_to(layer)
            layer.train(mode)

    for layer, obs in zip(seq, observers):
        layer._observers = layer._observers + (obs,)
        layer.train(True)
    try:
        yield stats
    except BaseException:
        try:
            if comm is not None:  # let the other ranks know, so none blocks or writes
                comm.allgather((True, None))
        finally:
            restore(write=False)
        raise
    try:
        if comm is not None:
            parts = comm.allgather((False, [(s.num_features, s._count, s._mean, s._m2)
                                            for s in stats]))
            chk.gathered_failures([p[0] for p in parts])
            chk.gathered_widths([len(p[1]) for p in parts], "lists of layers")
            for i, s in enumerate(stats):
                s._count, s._mean, s._m2 = _merge_gathered([p[1][i] for p in parts])
        for i, s in enumerate(stats):
            chk.population_nonempty(s.count, f"layers[{i}]", "no forward of this layer ran "
                                    "inside the block")
    except BaseException:
        restore(write=False)
        raise
    restore(write=True)


def precise_batch_norm(layers: Any, batches: Iterable[Any], forward: Callable[[Any], Any], *,
                       comm: Any = None) -> list[PopulationStats]:
    """Set batch norm layers' running statistics to their exact population statistics.

    Calls ``forward(batch)`` for every batch (the network's forward pass,
    whose output is ignored) inside `collect_population_stats`: each listed
    layer's running statistics become the mean and unbiased variance of all
    its inputs over the stream (float64, then cast). Unlike averaging
    per-batch statistics (``torch.optim.swa_utils.update_bn``), the variance
    includes the spread of the batch means.

    Parameters
    ----------
    layers : BatchNorm or iterable of BatchNorm
        The network's batch norm layers (see `collect_population_stats`).
    batches : iterable
        The data stream; each item is passed to ``forward``.
    forward : callable
        ``forward(batch)`` runs the network on a batch.
    comm : mpi4py.MPI.Comm, optional
        Merge the statistics over these data-parallel ranks.

    Returns
    -------
    list of PopulationStats
        Each layer's statistics, in order.

    Raises
    ------
    TypeError, ValueError, RuntimeError
        As `collect_population_stats`; the layers are left as they were.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> bn1, bn2 = bncore.BatchNorm(4), bncore.BatchNorm(4)
    >>> w = rng.standard_normal((4, 4)).astype(np.float32)
    >>> data = [rng.normal(3.0, 1.0, (16, 4)).astype(np.float32) for _ in range(5)]
    >>> stats = bncore.precise_batch_norm([bn1, bn2], data, lambda x: bn2(bn1(x) @ w))
    >>> [s.count for s in stats]
    [80, 80]
    >>> np.allclose(bn1.running_var, np.concatenate(data).var(0, ddof=1))
    True
    """
    if not callable(forward):
        chk.refuse("forward", f"expected a callable, got {type(forward).__name__}", TypeError)
    with collect_population_stats(layers, comm=comm) as stats:
        for batch in batches:
            forward(batch)
    return stats
