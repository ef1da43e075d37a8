"""The one layer base class.

A layer validates everything, then changes state: `forward` calls the
subclass's `_forward(x, out, n_threads, **options)`, which checks its arguments before
any running statistic moves and returns (y, record); only then is the record
(what `backward` needs) stored. `backward` calls `_backward(dy, record,
out, n_threads) -> (dx, dweight, dbias)` and only then sets grad_weight and
grad_bias. `options` are the extra forward arguments a layer declares in
`_forward_options` (``mask``, ``lengths``: padded batches), passed only when
given; a layer without them refuses them here, by name. State dicts use
PyTorch's keys and are checked whole (keys, shapes, dtypes, count ranges)
before anything is assigned.

Input observers: a layer's ``_observers`` (a tuple, empty by default) holds
callables ``observer(layer, x) -> done``, called with the input before each
forward runs; each returns a callable ``done()`` that is called only once
that forward has succeeded (a refused call runs none). This is how
`bncore.precise.collect_population_stats` sees the input of every batch
norm layer (also InPlaceABN's, which the forward overwrites).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from .. import _checks as chk
from .._typing import Array

__all__ = ["Module"]

_M = TypeVar("_M", bound="Module")


class Module:
    """Base of bncore's layers: train/eval, __call__, state_dict, gradients."""

    training = True
    weight: Array | None = None
    bias: Array | None = None
    grad_weight: Array | None = None
    grad_bias: Array | None = None
    _saved: Any = None
    _observers: tuple[Any, ...] = ()  # see the module docstring
    # extra forward arguments the layer's _forward takes (see the module docstring)
    _forward_options: tuple[str, ...] = ()
    dtype: np.dtype[Any]
    eps: float

    if TYPE_CHECKING:  # what each layer defines (see the module docstring)
        def _forward(self, x: Any, out: Any, n_threads: Any) -> tuple[Array, Any]: ...
        def _backward(self, dy: Any, record: Any, out: Any, n_threads: Any
                      ) -> tuple[Array, Any, Any]: ...

    def _setup(self, dtype: Any, eps: Any) -> None:
        self.dtype = chk.dtype(dtype)
        self.eps = chk.real(eps, "eps", 0.0)
        self.training = True
        self.grad_weight = self.grad_bias = None
        self._saved = None

    def train(self: _M, mode: bool = True) -> _M:
        """Set training mode (``mode=True``) or eval mode, as PyTorch's.

        Parameters
        ----------
        mode : bool, default True
            True for training mode (batch statistics, running statistics
            updated), False for eval mode.

        Returns
        -------
        Module
            The layer itself.

        Raises
        ------
        ValueError
            ``FrozenBatchNorm.train(True)``: a frozen layer has no training
            mode.

        Examples
        --------
        >>> bn = bncore.BatchNorm(2).train(False)
        >>> bn.training
        False
        """
        self.training = bool(mode)
        return self

    def eval(self: _M) -> _M:
        """Set eval mode: ``train(False)``.

        Returns
        -------
        Module
            The layer itself.

        Examples
        --------
        >>> bncore.BatchNorm(2).eval().training
        False
        """
        return self.train(False)

    def __call__(self, *args: Any, **kwargs: Any) -> Array:
        """Call `forward`: ``layer(x)`` is ``layer.forward(x)``.

        Parameters
        ----------
        *args, **kwargs
            `forward`'s arguments.

        Returns
        -------
        numpy.ndarray
            `forward`'s output.

        Raises
        ------
        TypeError, ValueError
            As `forward`.

        Examples
        --------
        >>> bn = bncore.BatchNorm(2, dtype=np.float64)
        >>> bn(np.array([[1.0, 2.0], [3.0, 6.0]])).shape
        (2, 2)
        """
        return self.forward(*args, **kwargs)

    def forward(self, x: Any, *, mask: Any = None, lengths: Any = None,
                out: Array | None = None, n_threads: int | None = None) -> Array:
        """Normalize ``x``; keep what `backward` needs.

        The arguments are checked before any state changes: a refused call
        leaves the running statistics and the saved record as they were.

        Parameters
        ----------
        x : array_like
            Input of the layer's layout, dtype float16, float32 or float64.
        mask : array_like of bool, optional
            Layers with masked statistics (`BatchNorm`, `GroupNorm`,
            `InstanceNorm`): True where a value counts, broadcastable to x.
            Padded entries enter no statistic and get no gradient (see
            `batch_norm_train`); the record keeps the mask for `backward`.
            Other layers refuse it.
        lengths : array_like of int, optional
            Instead of ``mask``, for padded sequences: the length of each
            sample along the one axis that is neither axis 0 nor the channel
            axis (``(N, C, T)`` or channels-last ``(N, T, C)``).
        out : numpy.ndarray, optional
            Writable array of x's shape and dtype that receives the output;
            it must not overlap ``x`` (the layer keeps x for its backward).
        n_threads : int, optional
            The most threads to use. None uses `get_num_threads`
            at the time of the call.

        Returns
        -------
        numpy.ndarray
            The output, x's shape and dtype (``out`` when given).

        Raises
        ------
        TypeError
            If x, ``mask``, ``lengths`` or ``out`` has an unsupported type or
            dtype.
        ValueError
            If x's shape does not fit the layer, ``out`` overlaps x, the mask
            does not fit x (or the layer takes none), or ``n_threads`` is
            invalid.

        Examples
        --------
        >>> ln = bncore.LayerNorm(2, dtype=np.float64)
        >>> ln.forward(np.array([[1.0, 3.0]]))
        array([[-0.99999...,  0.99999...]])
        """
        options = {}
        for name, v in (("mask", mask), ("lengths", lengths)):
            if v is not None:
                if name not in self._forward_options:
                    chk.refuse(name, f"{type(self).__name__} does not take a {name} (only "
                                     f"layers with masked statistics do), got an array")
                options[name] = v
        y, record = self._observed_forward(x, out, n_threads, options)
        self._saved = record
        return y

    def _observed_forward(self, x: Any, out: Any, n_threads: Any,
                          options: dict[str, Any] | None = None) -> tuple[Array, Any]:
        """`_forward`, shown to the input observers (see the module docstring)."""
        options = options or {}
        pending = [observe(self, x, **options) for observe in self._observers]
        y, record = self._forward(x, out, n_threads, **options)
        for done in pending:
            done()
        return y, record

    def backward(self, dy: Any, *, out: Array | None = None, n_threads: int | None = None
                 ) -> Array:
        """dx of the most recent forward; sets grad_weight and grad_bias.

        Parameters
        ----------
        dy : array_like
            Gradient of the loss with respect to the most recent forward's
            output (its shape and dtype).
        out : numpy.ndarray, optional
            Writable array of dy's shape and dtype that receives ``dx``.
        n_threads : int, optional
            The most threads to use. None uses `get_num_threads`
            at the time of the call.

        Returns
        -------
        numpy.ndarray
            ``dx``, the gradient with respect to the forward's input.

        Raises
        ------
        RuntimeError
            If no forward was called.
        TypeError
            If dy has an unsupported type or dtype.
        ValueError
            If dy's shape or dtype differs from the forward's output.

        Examples
        --------
        >>> ln = bncore.LayerNorm(2, dtype=np.float64)
        >>> y = ln(np.array([[1.0, 3.0]]))
        >>> dx = ln.backward(np.array([[1.0, 0.0]]))
        >>> np.round(ln.grad_weight, 4), ln.grad_bias
        (array([-1.,  0.]), array([1., 0.]))
        """
        dx, dw, db = self._backward(dy, self._record(), out, n_threads)
        self._set_grads(dw, db)
        return dx

    def _record(self) -> Any:
        if self._saved is None:
            raise RuntimeError("backward: no forward call to differentiate; call forward first")
        return self._saved

    def _set_grads(self, dw: Any, db: Any, accumulate: bool = False) -> None:
        for name, g in (("weight", dw), ("bias", db)):
            p = getattr(self, name)
            if p is None:
                continue
            g = np.asarray(g).astype(p.dtype).reshape(p.shape)
            if accumulate:
                getattr(self, "grad_" + name)[...] += g
            else:
                setattr(self, "grad_" + name, g)

    # ---- state -------------------------------------------------------------------------

    def _state_names(self) -> list[str]:
        return [k for k in ("weight", "bias") if getattr(self, k) is not None]

    def state_dict(self) -> dict[str, Array]:
        """Copies of the parameters and buffers under PyTorch's keys.

        Returns
        -------
        dict of str to numpy.ndarray
            ``weight`` and ``bias`` (when affine) and the layer's buffers
            (``running_mean``, ``running_var``, ``num_batches_tracked``, ...),
            as copies.

        Examples
        --------
        >>> sorted(bncore.BatchNorm(2).state_dict())
        ['bias', 'num_batches_tracked', 'running_mean', 'running_var', 'weight']
        """
        return {k: np.array(getattr(self, k)) for k in self._state_names()}

    def load_state_dict(self, state: Mapping[str, Any], strict: bool = True) -> None:
        """Loads arrays (or anything np.asarray takes, e.g. CPU torch tensors).

        Everything is checked before anything is assigned.

        Parameters
        ----------
        state : mapping of str to array_like
            Entries under the keys of `state_dict` (PyTorch's keys).
        strict : bool, default True
            Whether the keys must match exactly; otherwise missing keys keep
            their values and unexpected keys raise.

        Returns
        -------
        None

        Raises
        ------
        TypeError
            If ``state`` is not a mapping or an entry has the wrong kind of
            dtype.
        KeyError
            If keys are missing (strict) or unexpected.
        ValueError
            If an entry's shape differs or a count is out of range.

        Examples
        --------
        >>> bn = bncore.BatchNorm(2)
        >>> bn.load_state_dict({**bn.state_dict(), "running_mean": np.array([1.0, 2.0])})
        >>> bn.running_mean
        array([1., 2.], dtype=float32)
        """
        names = self._state_names()
        chk.state_keys(state, names, strict)
        staged = {k: chk.state_entry(k, state[k], getattr(self, k)) for k in names if k in state}
        self._assign(staged)

    def _assign(self, staged: dict[str, Any]) -> None:
        for k, v in staged.items():
            getattr(self, k)[...] = v
