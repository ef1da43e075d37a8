"""Batch normalization layers: BatchNorm (PyTorch's behaviour and state_dict
keys), BatchRenorm, RecurrentBatchNorm, InPlaceABN and FrozenBatchNorm."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from .. import _checks as chk
from .._typing import Activation, Array, FloatArray
from .. import _kernels as _k
from ..folding import eval_coefficients
from ..functional import (batch_norm_backward, batch_norm_backward_from_output,
                          batch_norm_elemt, batch_norm_eval, batch_norm_train, train)
from ..renorm import batch_renorm_backward, batch_renorm_train
from .base import Module

__all__ = ["BatchNorm", "BatchRenorm", "RecurrentBatchNorm", "InPlaceABN", "FrozenBatchNorm"]


class _Record:
    """What backward needs of one forward call."""
    __slots__ = ("x", "mean", "invstd", "training", "ghost", "y", "extra", "mask")

    def __init__(self, x: Any, mean: Any, invstd: Any, training: bool, ghost: int | None = None,
                 y: Any = None, extra: Any = None, mask: Any = None):
        self.x, self.mean, self.invstd, self.training = x, mean, invstd, training
        self.ghost, self.y, self.extra = ghost, y, extra
        self.mask = mask  # the validated boolean mask of x's shape, or None


class BatchNorm(Module):
    """Batch normalization over channel axis ``axis``, like ``torch.nn.BatchNorm{1,2,3}d``.

    ``forward(x)`` normalizes with the batch statistics in training mode (and
    updates the running statistics) and with the running statistics in eval
    mode; ``backward(dy)`` returns dx for the most recent forward call and
    sets ``grad_weight`` / ``grad_bias``. ``freeze()`` returns the eval-mode
    layer as a `FrozenBatchNorm`. Parameters and buffers are NumPy arrays of
    the layer's dtype under PyTorch's names (``weight``, ``bias``,
    ``running_mean``, ``running_var``, ``num_batches_tracked``).

    ``forward(x, mask=...)`` or ``forward(x, lengths=...)`` normalizes a
    padded batch with the statistics of its unmasked values (see
    `batch_norm_train`); the record keeps the mask, so ``backward`` gives
    padded entries no gradient. An empty training batch returns an empty
    output and leaves the running statistics untouched (the step still
    counts in ``num_batches_tracked``, as in PyTorch).

    Parameters
    ----------
    num_features : int
        C, the number of channels (positive).
    eps : float, default 1e-5
        Finite, ``>= 0``; added to the variance inside the square root.
    momentum : float or None, default 0.1
        In ``[0, 1]``: the running statistics' update rate. None is the
        cumulative moving average (rate ``1 / num_batches_tracked``).
    affine : bool, default True
        Whether the layer has ``weight`` (ones) and ``bias`` (zeros).
    track_running_stats : bool, default True
        Whether the layer keeps running statistics; False uses batch
        statistics in eval mode too.
    axis : int, default 1
        The channel axis of the input (-1 for channels last).
    dtype : float16, float32 or float64, default float32
        The dtype of the parameters and buffers.
    virtual_batch_size : int, optional
        Ghost batch norm: in training mode each slice of that many samples
        along axis 0 is normalized with its own statistics.
    activation : None, 'relu', 'leaky_relu' or ('leaky_relu', slope), optional
        Fused into forward and backward.
    running_var_unbiased : bool, default True
        False keeps the biased running variance (Keras, ONNX).
    skip_nonfinite_update : bool, default False
        True leaves ``running_mean``, ``running_var`` and
        ``num_batches_tracked`` untouched on a training step whose batch mean
        or variance is NaN or inf in any channel (see `batch_norm_train`);
        the step's output is still returned. Off by default, as in PyTorch.

    Raises
    ------
    TypeError
        If ``dtype`` is not float16, float32 or float64.
    ValueError
        If ``num_features``, ``eps``, ``momentum``, ``activation`` or
        ``virtual_batch_size`` is out of range.

    See Also
    --------
    batch_norm_train, batch_norm_eval, batch_norm_backward : The operations.

    Examples
    --------
    >>> bn = bncore.BatchNorm(2, dtype=np.float64)
    >>> x = np.array([[1.0, 2.0], [3.0, 6.0]])
    >>> np.round(bn(x), 4)
    array([[-1., -1.],
           [ 1.,  1.]])
    >>> bn.running_mean, bn.running_var, int(bn.num_batches_tracked)
    (array([0.2, 0.4]), array([1.1, 1.7]), 1)
    >>> dx = bn.backward(np.ones_like(x))
    >>> bn.grad_bias
    array([2., 2.])
    >>> np.round(bn.eval()(x), 4)
    array([[0.7628, 1.2271],
           [2.6697, 4.295 ]])
    """

    # arrays, or None when track_running_stats is False (checked where used)
    running_mean: Any
    running_var: Any
    num_batches_tracked: Any

    def __init__(self, num_features: int, *, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, axis: int = 1,
                 dtype: Any = np.float32, virtual_batch_size: int | None = None,
                 activation: Activation = None, running_var_unbiased: bool = True,
                 skip_nonfinite_update: bool = False):
        self._setup(dtype, eps)
        self.num_features = C = chk.positive_int(num_features, "num_features")
        self.momentum = None if momentum is None else chk.real(momentum, "momentum", 0.0, 1.0)
        self.affine = bool(affine)
        self.track_running_stats = bool(track_running_stats)
        self.axis = axis
        self.activation = chk.activation(activation)
        self.running_var_unbiased = bool(running_var_unbiased)
        self.skip_nonfinite_update = bool(skip_nonfinite_update)
        self.virtual_batch_size = (None if virtual_batch_size is None else
                                   chk.positive_int(virtual_batch_size, "virtual_batch_size"))
        dtype = self.dtype
        self.weight = np.ones(C, dtype) if affine else None
        self.bias = np.zeros(C, dtype) if affine else None
        if self.track_running_stats:
            self.running_mean = np.zeros(C, dtype)
            self.running_var = np.ones(C, dtype)
            self.num_batches_tracked = np.array(0, dtype=np.int64)
        else:
            self.running_mean = self.running_var = self.num_batches_tracked = None

    def __repr__(self) -> str:
        act = "" if self.activation is None else f", activation={self.activation!r}"
        return (f"{type(self).__name__}({self.num_features}, eps={self.eps}, "
                f"momentum={self.momentum}, affine={self.affine}, "
                f"track_running_stats={self.track_running_stats}, axis={self.axis}{act})")

    def reset_running_stats(self) -> None:
        """Reset the running statistics: mean 0, variance 1, count 0.

        Nothing happens without running statistics
        (``track_running_stats=False``).

        Returns
        -------
        None

        Examples
        --------
        >>> bn = bncore.BatchNorm(2)
        >>> _ = bn(np.array([[1.0, 2.0], [3.0, 6.0]], np.float32))
        >>> bn.reset_running_stats()
        >>> bn.running_mean, int(bn.num_batches_tracked)
        (array([0., 0.], dtype=float32), 0)
        """
        if self.track_running_stats:
            self.running_mean[...] = 0
            self.running_var[...] = 1
            self.num_batches_tracked[...] = 0

    def _input(self, x: Any, out: Any) -> Any:
        """x checked to have this layer's channels, and out separate from it."""
        L = chk.Layout(x, self.axis).channels(self.num_features)
        chk.separate_from_input(out, L.x)
        return L.x

    _forward_options: tuple[str, ...] = ("mask", "lengths")

    def _forward(self, x: Any, out: Any, n_threads: Any, mask: Any = None,
                 lengths: Any = None) -> tuple[Array, _Record]:
        x = self._input(x, out)
        # the mask, checked and materialized once (x.size bytes), for both passes
        pad = (None if mask is None and lengths is None
               else chk.padding(mask, lengths, x, self.axis).view(bool))
        if self.training or not self.track_running_stats:
            ghost = self.virtual_batch_size if self.training else None
            if self.training and self.track_running_stats:
                n = int(self.num_batches_tracked) + 1
                factor = 1.0 / n if self.momentum is None else self.momentum
                y, mean, invstd, updated = train(
                    x, self.weight, self.bias, self.axis, self.eps, self.running_mean,
                    self.running_var, factor, out, self.activation, n_threads, ghost,
                    self.skip_nonfinite_update, self.running_var_unbiased, pad)
                if updated:
                    self.num_batches_tracked[...] = n
            else:
                y, mean, invstd = batch_norm_train(
                    x, self.weight, self.bias, axis=self.axis, eps=self.eps, out=out,
                    activation=self.activation, n_threads=n_threads, virtual_batch_size=ghost,
                    mask=pad)
            record = _Record(x, mean, invstd, True, ghost, mask=pad)
        else:
            y = batch_norm_eval(x, self.running_mean, self.running_var, self.weight, self.bias,
                                axis=self.axis, eps=self.eps, out=out,
                                activation=self.activation, n_threads=n_threads)
            # eval mode: padded entries get the same affine map as the others (the
            # masked training output's rule); the mask only limits the gradients
            record = _Record(x, self.running_mean.astype(np.float64),
                             _k.invstd(self.running_var, self.eps), False, mask=pad)
        # the activation's mask source, kept only when there is one
        record.y = y if self.activation is not None else None
        return y, record

    def _backward(self, dy: Any, r: Any, out: Any, n_threads: Any) -> tuple[Array, Any, Any]:
        return batch_norm_backward(dy, r.x, r.mean, r.invstd, self.weight, axis=self.axis,
                                   training=r.training, out=out, activation=self.activation,
                                   y=r.y, n_threads=n_threads, virtual_batch_size=r.ghost,
                                   mask=r.mask)

    def freeze(self) -> FrozenBatchNorm:
        """A FrozenBatchNorm with copies of this layer's eval-mode parameters.

        Returns
        -------
        FrozenBatchNorm
            With this layer's weight, bias, running statistics, eps, axis,
            activation and dtype.

        Raises
        ------
        ValueError
            If the layer has no running statistics
            (``track_running_stats=False``).

        Examples
        --------
        >>> bn = bncore.BatchNorm(2, dtype=np.float64)
        >>> x = np.array([[1.0, 2.0], [3.0, 6.0]])
        >>> _ = bn(x)
        >>> np.array_equal(bn.freeze()(x), bn.eval()(x))
        True
        """
        if not self.track_running_stats:
            chk.refuse("freeze", "the layer has no running statistics to freeze "
                                 "(track_running_stats=False)")
        return FrozenBatchNorm.from_state_dict(
            self.state_dict(), eps=self.eps, axis=self.axis, activation=self.activation,
            dtype=self.dtype)

    def _state_names(self) -> list[str]:
        names = ["weight", "bias"] if self.affine else []
        if self.track_running_stats:
            names += ["running_mean", "running_var", "num_batches_tracked"]
        return names


class BatchRenorm(BatchNorm):
    """Batch Renormalization layer (eval mode: the moving statistics).

    rmax and dmax follow the paper's schedule over training steps (forward
    calls in training mode, counted by num_batches_tracked): rmax=1, dmax=0
    (plain batch norm) for `warmup_steps`, then linear relaxation to `rmax`
    over `rmax_ramp_steps` and to `dmax` over `dmax_ramp_steps`. The defaults
    are the paper's (5000 steps, rmax=3 at 40k steps, dmax=5 at 25k); pass
    warmup_steps=0, rmax_ramp_steps=0, dmax_ramp_steps=0 for fixed limits.
    momentum (default 0.01) is the moving statistics' update rate; None is the
    cumulative average as in BatchNorm.

    Parameters
    ----------
    num_features : int
        C, the number of channels (positive).
    eps : float, default 1e-5
        Finite, ``>= 0``; added to the variances inside the square roots.
    momentum : float or None, default 0.01
        In ``[0, 1]``, or None for the cumulative average.
    affine : bool, default True
        Whether the layer has ``weight`` and ``bias``.
    axis : int, default 1
        The channel axis of the input.
    dtype : float16, float32 or float64, default float32
        The dtype of the parameters and buffers.
    rmax : float, default 3.0
        ``>= 1``: the final bound on r.
    dmax : float, default 5.0
        ``>= 0``: the final bound on d.
    warmup_steps : int, default 5000
        Training steps of plain batch norm (rmax=1, dmax=0), ``>= 0``.
    rmax_ramp_steps, dmax_ramp_steps : int, default 35000 and 20000
        Steps of linear relaxation after the warm-up, ``>= 0``.
    virtual_batch_size : int, optional
        Ghost batches: in training mode each slice of that many samples along
        axis 0 is renormalized with its own statistics, r and d (see
        `batch_renorm_train`).

    Raises
    ------
    TypeError
        If ``dtype`` is not supported.
    ValueError
        If a number is out of range.

    See Also
    --------
    batch_renorm_train, batch_renorm_backward : The operations.

    Examples
    --------
    >>> brn = bncore.BatchRenorm(2, dtype=np.float64, warmup_steps=0, rmax_ramp_steps=0,
    ...                          dmax_ramp_steps=0, momentum=0.1)
    >>> x = np.array([[1.0, 2.0], [3.0, 6.0]])
    >>> np.round(brn(x), 4)  # running mean 0, variance 1: r and d undo the normalization
    array([[1., 2.],
           [3., 6.]])
    >>> brn.running_mean
    array([0.2, 0.4])

    Over ghost batches of 2 samples:

    >>> brn = bncore.BatchRenorm(1, dtype=np.float64, warmup_steps=0, rmax_ramp_steps=0,
    ...                          dmax_ramp_steps=0, virtual_batch_size=2)
    >>> y = brn(np.array([[1.0], [3.0], [10.0], [14.0]]))
    >>> brn.running_mean  # toward the ghost batches' average mean, 7
    array([0.07])
    """

    def __init__(self, num_features: int, *, eps: float = 1e-5, momentum: float | None = 0.01,
                 affine: bool = True, axis: int = 1, dtype: Any = np.float32,
                 rmax: float = 3.0, dmax: float = 5.0, warmup_steps: int = 5000,
                 rmax_ramp_steps: int = 35000, dmax_ramp_steps: int = 20000,
                 virtual_batch_size: int | None = None):
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine,
                         track_running_stats=True, axis=axis, dtype=dtype,
                         virtual_batch_size=virtual_batch_size)
        self.rmax = chk.real(rmax, "rmax", 1.0)
        self.dmax = chk.real(dmax, "dmax", 0.0)
        self.warmup_steps = chk.integer(warmup_steps, "warmup_steps")
        self.rmax_ramp_steps = chk.integer(rmax_ramp_steps, "rmax_ramp_steps")
        self.dmax_ramp_steps = chk.integer(dmax_ramp_steps, "dmax_ramp_steps")

    def __repr__(self) -> str:
        ghost = ("" if self.virtual_batch_size is None
                 else f", virtual_batch_size={self.virtual_batch_size}")
        return (f"BatchRenorm({self.num_features}, eps={self.eps}, momentum={self.momentum}, "
                f"rmax={self.rmax}, dmax={self.dmax}, warmup_steps={self.warmup_steps}, "
                f"axis={self.axis}{ghost})")

    def limits(self, step: int | None = None) -> tuple[float, float]:
        """(rmax, dmax) in force at training step ``step`` (default: the next one).

        Parameters
        ----------
        step : int, optional
            A training step (0 is the first); default ``num_batches_tracked``.

        Returns
        -------
        rmax, dmax : float
            1 and 0 during the warm-up, then relaxed linearly to the
            layer's ``rmax`` and ``dmax``.

        Examples
        --------
        >>> brn = bncore.BatchRenorm(2, warmup_steps=10, rmax_ramp_steps=20,
        ...                          dmax_ramp_steps=10)
        >>> brn.limits(0), brn.limits(20), brn.limits(100)
        ((1.0, 0.0), (2.0, 5.0), (3.0, 5.0))
        """
        step = int(self.num_batches_tracked) if step is None else step
        if step < self.warmup_steps:
            return 1.0, 0.0

        def ramp(target: float, start: float, length: int) -> float:
            frac = 1.0 if length == 0 else min(1.0, (step - self.warmup_steps) / length)
            return start + (target - start) * frac

        return (ramp(self.rmax, 1.0, self.rmax_ramp_steps),
                ramp(self.dmax, 0.0, self.dmax_ramp_steps))

    _forward_options = ()  # no masked renormalization (yet)

    def _forward(self, x: Any, out: Any, n_threads: Any) -> tuple[Array, _Record]:  # type: ignore[override]
        if not self.training:
            return super()._forward(x, out, n_threads)
        x = self._input(x, out)
        n = int(self.num_batches_tracked) + 1
        rmax, dmax = self.limits()
        y, mean, invstd, r, d = batch_renorm_train(
            x, self.running_mean, self.running_var, self.weight, self.bias, axis=self.axis,
            eps=self.eps, rmax=rmax, dmax=dmax,
            momentum=1.0 / n if self.momentum is None else self.momentum,
            out=out, n_threads=n_threads, virtual_batch_size=self.virtual_batch_size)
        self.num_batches_tracked[...] = n
        return y, _Record(x, mean, invstd, True, self.virtual_batch_size, extra=(r, d))

    def _backward(self, dy: Any, rec: Any, out: Any, n_threads: Any) -> tuple[Array, Any, Any]:
        if rec.extra is None:
            return super()._backward(dy, rec, out, n_threads)
        r, d = rec.extra
        return batch_renorm_backward(dy, rec.x, rec.mean, rec.invstd, r, d, self.weight,
                                     axis=self.axis, out=out, n_threads=n_threads,
                                     virtual_batch_size=rec.ghost)


class InPlaceABN(BatchNorm):
    """Batch norm + activation whose forward overwrites its input x with y.

    In the spirit of Inplace-ABN (Rota Bulo et al., 2018): the backward
    rebuilds the normalized input from y (batch_norm_backward_from_output), so
    a training step keeps one activation buffer per layer instead of two.
    activation is None or ('leaky_relu', slope > 0) (default slope 0.01);
    other arguments as BatchNorm. x must be a writable ndarray; forward
    returns x (filled with y) and the caller must not need x afterwards.

    Parameters
    ----------
    num_features : int
        C, the number of channels (positive).
    activation : None or ('leaky_relu', slope), default ('leaky_relu', 0.01)
        An invertible activation (slope > 0).
    min_abs_weight : float, optional
        The backward's bound on ``abs(weight)`` (see
        `batch_norm_backward_from_output`).
    **kwargs
        `BatchNorm`'s other arguments, except ``virtual_batch_size``.

    Raises
    ------
    ValueError
        If ``activation`` is not invertible (e.g. 'relu'),
        ``virtual_batch_size`` is given, or as `BatchNorm`.
    TypeError
        As `BatchNorm`.

    Examples
    --------
    >>> abn = bncore.InPlaceABN(2, dtype=np.float64)
    >>> bn = bncore.BatchNorm(2, dtype=np.float64, activation=("leaky_relu", 0.01))
    >>> x = np.array([[1.0, 2.0], [3.0, 6.0]])
    >>> y_bn = bn(x.copy())  # bn keeps its input for backward; abn overwrites x
    >>> y = abn(x)
    >>> y is x, np.round(x, 4)
    (True, array([[-0.01, -0.01],
           [ 1.  ,  1.  ]]))
    >>> dy = np.array([[1.0, 0.0], [2.0, 1.0]])
    >>> np.allclose(abn.backward(dy), bn.backward(dy))
    True
    """

    def __init__(self, num_features: int, *, activation: Activation = ("leaky_relu", 0.01),
                 min_abs_weight: float | None = None, **kwargs: Any):
        chk.invertible(activation)
        if kwargs.get("virtual_batch_size") is not None:
            chk.refuse("virtual_batch_size", "not supported by InPlaceABN (its backward "
                                             "rebuilds x from one set of batch statistics)")
        super().__init__(num_features, activation=activation, **kwargs)
        self.min_abs_weight = (None if min_abs_weight is None else
                               chk.real(min_abs_weight, "min_abs_weight", 0.0))

    def _input(self, x: Any, out: Any) -> Any:
        chk.writable_input(x, "InPlaceABN")
        return chk.Layout(x, self.axis).channels(self.num_features).x

    # forward writes into x: it takes no out=
    def forward(self, x: Array, *, n_threads: int | None = None  # type: ignore[override]
                ) -> Array:
        """Normalize ``x`` in place: x is overwritten with the output.

        Parameters
        ----------
        x : numpy.ndarray
            Writable input of the layer's layout, dtype float16, float32 or
            float64; it receives the output.
        n_threads : int, optional
            The most threads to use. None uses `get_num_threads`
            at the time of the call.

        Returns
        -------
        numpy.ndarray
            ``x``, holding the output.

        Raises
        ------
        ValueError
            If x is not a writable ndarray, its shape does not fit the layer,
            or ``n_threads`` is invalid.
        TypeError
            If x has an unsupported dtype.

        Examples
        --------
        >>> abn = bncore.InPlaceABN(1, activation=None, dtype=np.float64)
        >>> x = np.array([[1.0], [3.0]])
        >>> abn.forward(x) is x, np.round(x, 4)
        (True, array([[-1.],
               [ 1.]]))
        """
        y, record = self._observed_forward(x, x, n_threads)
        self._saved = record
        return y

    _forward_options = ()

    def _forward(self, x: Any, out: Any, n_threads: Any) -> tuple[Array, _Record]:  # type: ignore[override]
        y, record = super()._forward(x, out, n_threads)
        record.x, record.y = None, y  # x is gone: y is all backward has
        return y, record

    def _backward(self, dy: Any, r: Any, out: Any, n_threads: Any) -> tuple[Array, Any, Any]:
        return batch_norm_backward_from_output(
            dy, r.y, r.invstd, self.weight, self.bias, axis=self.axis, training=r.training,
            activation=self.activation, out=out, min_abs_weight=self.min_abs_weight,
            n_threads=n_threads)


class RecurrentBatchNorm(Module):
    """Per-time-step batch normalization of (N, C) features with shared gamma/beta
    (Cooijmans et al. 2016, "Recurrent Batch Normalization", arXiv:1603.09025).

    forward(x, t) normalizes one step x (N, C) at step t; forward(x) with x
    (T, N, C) a whole sequence (steps t..t+T-1, t defaulting to 0). Each step t
    has its own running statistics (slot t, shape (max_steps, C)) and is
    normalized with its own batch statistics in training. In eval mode step t
    uses slot min(t, trained_steps - 1): steps beyond those seen in training
    take the statistics of the last trained step, as the paper does
    (`trained_steps`, part of the state dict, counts the slots training has
    reached). gamma (weight) starts at 0.1, which the paper recommends.
    backward(dy, t) / backward(dy) (a sequence) return dx of those steps'
    forward calls and ADD the parameter gradients to grad_weight / grad_bias,
    as backpropagation through time does; a forward at step 0 starts a new
    sequence (it forgets the saved steps and zeroes the gradients), and
    zero_grad() zeroes them explicitly. Only what a pending backward needs is
    kept: training steps until their backward, and in eval mode the latest
    max(max_steps, EVAL_HISTORY = 64) steps, enough for backpropagation
    through an eval-mode sequence while an endless stream stays bounded.

    Parameters
    ----------
    num_features : int
        C, the number of features (positive).
    max_steps : int
        The number of per-step running-statistics slots (positive); steps
        past it share the last slot.
    eps : float, default 1e-5
        Finite, ``>= 0``; added to the variance inside the square root.
    momentum : float, default 0.1
        In ``[0, 1]``: the running statistics' update rate.
    affine : bool, default True
        Whether the layer has ``weight`` (gamma) and ``bias`` (beta).
    gamma_init : float, default 0.1
        The initial value of every gamma (finite).
    dtype : float16, float32 or float64, default float32
        The dtype of the parameters and buffers.

    Raises
    ------
    TypeError
        If ``dtype`` is not supported.
    ValueError
        If a number is out of range.

    Examples
    --------
    >>> rbn = bncore.RecurrentBatchNorm(2, max_steps=3, dtype=np.float64)
    >>> seq = np.array([[[1.0, 2.0], [3.0, 6.0]],
    ...                 [[0.0, 0.0], [2.0, 4.0]]])  # (T=2, N=2, C=2)
    >>> np.round(rbn(seq), 4)  # gamma 0.1
    array([[[-0.1, -0.1],
            [ 0.1,  0.1]],
    <BLANKLINE>
           [[-0.1, -0.1],
            [ 0.1,  0.1]]])
    >>> rbn.running_mean[:2], int(rbn.trained_steps)
    (array([[0.2, 0.4],
           [0.1, 0.2]]), 2)
    >>> dx = rbn.backward(np.ones_like(seq))
    >>> rbn.grad_bias
    array([4., 4.])
    """

    EVAL_HISTORY = 64

    def __init__(self, num_features: int, max_steps: int, *, eps: float = 1e-5,
                 momentum: float = 0.1, affine: bool = True, gamma_init: float = 0.1,
                 dtype: Any = np.float32):
        self._setup(dtype, eps)
        self.num_features = C = chk.positive_int(num_features, "num_features")
        self.max_steps = S = chk.positive_int(max_steps, "max_steps")
        self.momentum = chk.real(momentum, "momentum", 0.0, 1.0)
        self.affine = bool(affine)
        gamma_init = chk.real(gamma_init, "gamma_init")
        self.weight = np.full(C, gamma_init, self.dtype) if affine else None
        self.bias = np.zeros(C, self.dtype) if affine else None
        self.running_mean = np.zeros((S, C), self.dtype)
        self.running_var = np.ones((S, C), self.dtype)
        self.trained_steps = np.array(0, dtype=np.int64)
        self._steps: dict[int, _Record] = {}
        self.zero_grad()

    def __repr__(self) -> str:
        return (f"RecurrentBatchNorm({self.num_features}, max_steps={self.max_steps}, "
                f"eps={self.eps}, momentum={self.momentum}, affine={self.affine})")

    def _state_names(self) -> list[str]:
        return super()._state_names() + ["running_mean", "running_var", "trained_steps"]

    def _assign(self, staged: dict[str, Any]) -> None:
        if "trained_steps" in staged:
            chk.count_in(staged["trained_steps"], "trained_steps", self.max_steps)
        super()._assign(staged)

    def zero_grad(self) -> None:
        """Set grad_weight and grad_bias to zeros (backward adds to them).

        Returns
        -------
        None

        Examples
        --------
        >>> rbn = bncore.RecurrentBatchNorm(2, max_steps=1)
        >>> rbn.zero_grad()
        >>> rbn.grad_weight
        array([0., 0.], dtype=float32)
        """
        if self.affine:
            self.grad_weight = np.zeros(self.num_features, self.dtype)
            self.grad_bias = np.zeros(self.num_features, self.dtype)

    def reset_running_stats(self) -> None:
        """Reset every slot's running statistics (mean 0, variance 1) and
        ``trained_steps`` (0).

        Returns
        -------
        None

        Examples
        --------
        >>> rbn = bncore.RecurrentBatchNorm(2, max_steps=2)
        >>> _ = rbn(np.array([[1.0, 2.0], [3.0, 6.0]], np.float32), 0)
        >>> rbn.reset_running_stats()
        >>> int(rbn.trained_steps), rbn.running_mean[0]
        (0, array([0., 0.], dtype=float32))
        """
        self.running_mean[...] = 0
        self.running_var[...] = 1
        self.trained_steps[...] = 0

    def slot(self, t: int) -> int:
        """Index of the running statistics used at step t.

        In training mode ``min(t, max_steps - 1)``; in eval mode, steps past
        the trained ones use the last trained slot.

        Parameters
        ----------
        t : int
            A time step (``>= 0``).

        Returns
        -------
        int
            The slot: a row of ``running_mean`` and ``running_var``.

        Examples
        --------
        >>> rbn = bncore.RecurrentBatchNorm(2, max_steps=5)
        >>> _ = rbn(np.ones((2, 4, 2), np.float32) * np.arange(4.0)[:, None])  # steps 0, 1
        >>> rbn.slot(3), rbn.eval().slot(3)
        (3, 1)
        """
        last = self.max_steps if self.training else max(int(self.trained_steps), 1)
        return min(t, last - 1)

    def __call__(self, x: Any, t: int | None = None, **kwargs: Any) -> Array:
        """Call `forward`: ``layer(x, t)`` is ``layer.forward(x, t)``.

        Parameters
        ----------
        x : array_like
            One step (N, C) or a sequence (T, N, C).
        t : int, optional
            The (first) time step; required for a single step.
        **kwargs
            `forward`'s keyword arguments (``out``, ``n_threads``).

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
        >>> rbn = bncore.RecurrentBatchNorm(2, max_steps=2)
        >>> rbn(np.array([[1.0, 2.0], [3.0, 6.0]], np.float32), 0).shape
        (2, 2)
        """
        return self.forward(x, t, **kwargs)

    def forward(self, x: Any, t: int | None = None, *,  # type: ignore[override]  # no mask
                out: Array | None = None, n_threads: int | None = None) -> Array:
        """Normalize one step (N, C) at step t, or a sequence (T, N, C) from step t.

        In training mode each step uses its batch statistics and updates its
        slot's running statistics; a forward at step 0 starts a new sequence
        (the saved steps are forgotten and the gradients zeroed).

        Parameters
        ----------
        x : array_like
            One step (N, C) or a sequence (T, N, C), dtype float16, float32
            or float64; N > 1 in training mode.
        t : int, optional
            The (first) time step, ``>= 0``; required for a single step,
            default 0 for a sequence.
        out : numpy.ndarray, optional
            Writable array of x's shape and dtype that receives the output;
            it must not overlap x.
        n_threads : int, optional
            The most threads to use. None uses `get_num_threads`
            at the time of the call.

        Returns
        -------
        numpy.ndarray
            x's shape and dtype (``out`` when given).

        Raises
        ------
        TypeError
            If x or ``out`` has an unsupported type or dtype.
        ValueError
            If x's shape does not fit, ``t`` is missing for a single step or
            negative, a training step has one sample, ``out`` overlaps x, or
            ``n_threads`` is invalid.

        Examples
        --------
        >>> rbn = bncore.RecurrentBatchNorm(1, max_steps=4, gamma_init=1.0, dtype=np.float64)
        >>> rbn.forward(np.array([[1.0], [3.0]]), 0)
        array([[-0.999995],
               [ 0.999995]])
        """
        x, t = chk.steps(x, "x", self.num_features, t)
        chk.separate_from_input(out, x)
        chk.n_threads(n_threads)
        if self.training and x.shape[-2] < 2:
            chk.refuse("x", f"expected more than 1 sample per step when training, got shape "
                            f"{x.shape}")
        if out is not None:
            out = chk.output(out, x, x.dtype, ())[1]
        seq = x if x.ndim == 3 else x[None]
        y = np.empty_like(seq) if out is None else (out if x.ndim == 3 else out[None])
        steps = {}
        for i in range(seq.shape[0]):
            steps[t + i] = self._step(seq[i], t + i, y[i], n_threads)
        # everything ran: now the record changes
        if t == 0:
            self._steps = {}
            self.zero_grad()
        self._steps.update(steps)
        if not self.training:  # an endless stream keeps a bounded number of them
            for s in sorted(self._steps)[:-max(self.max_steps, self.EVAL_HISTORY)]:
                del self._steps[s]
        if self.training:
            reached = min(t + seq.shape[0], self.max_steps)
            self.trained_steps[...] = max(int(self.trained_steps), reached)
        return y if x.ndim == 3 else y[0]

    def _step(self, x: Any, t: int, out: Any, n_threads: Any) -> _Record:
        s = self.slot(t)
        rm, rv = self.running_mean[s], self.running_var[s]
        if self.training:
            _, mean, invstd = batch_norm_train(
                x, self.weight, self.bias, eps=self.eps, running_mean=rm, running_var=rv,
                momentum=self.momentum, out=out, n_threads=n_threads)
        else:
            batch_norm_eval(x, rm, rv, self.weight, self.bias, eps=self.eps, out=out,
                            n_threads=n_threads)
            mean, invstd = rm.astype(np.float64), _k.invstd(rv, self.eps)
        return _Record(x, mean, invstd, self.training)

    def backward(self, dy: Any, t: int | None = None, *, out: Array | None = None,
                 n_threads: int | None = None) -> Array:
        """dx of step t (dy (N, C)) or of the sequence starting at t (dy (T, N, C)).

        Adds the parameter gradients to grad_weight and grad_bias
        (backpropagation through time); a training step's record is consumed.

        Parameters
        ----------
        dy : array_like
            Gradient of the output of step t (N, C), or of steps t, t+1, ...
            (T, N, C); the shape and dtype of those steps' inputs.
        t : int, optional
            The (first) time step; required for a single step, default 0 for
            a sequence.
        out : numpy.ndarray, optional
            Writable array of dy's shape and dtype that receives ``dx``.
        n_threads : int, optional
            The most threads to use. None uses `get_num_threads`
            at the time of the call.

        Returns
        -------
        numpy.ndarray
            ``dx``, dy's shape and dtype (``out`` when given).

        Raises
        ------
        RuntimeError
            If a step has no saved forward (or its backward already ran).
        TypeError
            If dy has an unsupported dtype.
        ValueError
            If dy's shape or dtype differs from the steps' inputs, or ``t``
            is missing for a single step.

        Examples
        --------
        >>> rbn = bncore.RecurrentBatchNorm(1, max_steps=4, dtype=np.float64)
        >>> y0 = rbn(np.array([[1.0], [3.0]]), 0)
        >>> y1 = rbn(np.array([[2.0], [2.5]]), 1)
        >>> dx1 = rbn.backward(np.array([[1.0], [0.0]]), 1)
        >>> dx0 = rbn.backward(np.array([[0.0], [1.0]]), 0)
        >>> rbn.grad_bias  # summed over both steps
        array([2.])
        """
        dy, t = chk.steps(dy, "dy", self.num_features, t)
        steps = range(t, t + (dy.shape[0] if dy.ndim == 3 else 1))
        missing = [s for s in steps if s not in self._steps]
        if missing:
            raise RuntimeError(f"backward: no forward call saved for step(s) {missing}; call "
                               f"forward for them first (a forward at step 0 starts over)")
        chk.step_grads(dy, self._steps, t)
        chk.n_threads(n_threads)
        seq = dy if dy.ndim == 3 else dy[None]
        dx = np.empty_like(dy) if out is None else chk.output(out, dy, dy.dtype, ())[1]
        dxs = dx if dy.ndim == 3 else dx[None]
        for i in reversed(range(seq.shape[0])):  # the order of backpropagation through time
            r = self._steps[t + i]
            _, dw, db = batch_norm_backward(seq[i], r.x, r.mean, r.invstd, self.weight,
                                            training=r.training, out=dxs[i],
                                            n_threads=n_threads)
            self._set_grads(dw, db, accumulate=True)
            if r.training:
                del self._steps[t + i]  # consumed: nothing pending for this step
        return dx


class FrozenBatchNorm(Module):
    """Batch norm with fixed parameters, like torchvision's FrozenBatchNorm2d.

    y = act((x - running_mean) * scale + bias), scale = weight / sqrt(running_var + eps),
    with eps inside the square root (torchvision's convention since 0.8 and
    detectron2's: default 1e-5; checkpoints from code that used no eps load
    with eps=0). The coefficients are computed once, when the parameters are
    set, and a call is one fused pass over x, bitwise the same as
    batch_norm_eval. Keeping running_mean as the center (instead of the folded
    x * scale + shift) costs nothing in a memory-bound pass and keeps float32
    exact when ``|mean| >> std``; `scale` and `shift` give the folded form.

    Parameters are read-only arrays: change them with load_state_dict, which
    recomputes the coefficients. Calls keep no state, so one instance serves
    any number of threads at once. backward(dy, y=...) is dx = dy * scale
    (times the activation's derivative, taken from the output y); nothing is
    trained.

    Parameters
    ----------
    num_features : int
        C, the number of channels (positive).
    eps : float, default 1e-5
        Finite, ``>= 0``; added to ``running_var`` inside the square root.
    axis : int, default 1
        The channel axis of the input.
    activation : None, 'relu', 'leaky_relu' or ('leaky_relu', slope), optional
        Fused into the call.
    dtype : float16, float32 or float64, default float32
        The dtype of the parameters.

    Raises
    ------
    TypeError
        If ``dtype`` is not supported.
    ValueError
        If ``num_features``, ``eps`` or ``activation`` is out of range.

    Examples
    --------
    >>> state = {"weight": np.array([1.0, 2.0]), "bias": np.array([0.0, 1.0]),
    ...          "running_mean": np.array([1.0, 2.0]), "running_var": np.array([4.0, 16.0])}
    >>> frozen = bncore.FrozenBatchNorm.from_state_dict(state, eps=0.0)
    >>> frozen(np.array([[3.0, 6.0]]))
    array([[1., 3.]])
    >>> frozen.scale, frozen.shift
    (array([0.5, 0.5]), array([-0.5,  0. ]))
    """

    training = False

    def __init__(self, num_features: int, *, eps: float = 1e-5, axis: int = 1,
                 activation: Activation = None, dtype: Any = np.float32):
        self._setup(dtype, eps)
        self.training = False
        self.num_features = C = chk.positive_int(num_features, "num_features")
        self.axis = axis
        self.activation = chk.activation(activation)
        d = self.dtype
        self._set(np.ones(C, d), np.zeros(C, d), np.zeros(C, d), np.ones(C, d))

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any], *, eps: float = 1e-5, axis: int = 1,
                        activation: Activation = None, dtype: Any = None) -> FrozenBatchNorm:
        """From PyTorch-style keys (weight, bias, running_mean, running_var).

        ``num_batches_tracked`` is ignored; weight and bias may be absent (a
        layer with ``affine=False``: 1 and 0), running_var too (1).

        Parameters
        ----------
        state : mapping of str to array_like
            A ``BatchNorm`` state dict (bncore's or a CPU PyTorch one).
        eps : float, default 1e-5
            Finite, ``>= 0``.
        axis : int, default 1
            The channel axis of the input.
        activation : None, 'relu', 'leaky_relu' or ('leaky_relu', slope), optional
            Fused into the call.
        dtype : float16, float32 or float64, optional
            Default: running_mean's floating dtype, else float32.

        Returns
        -------
        FrozenBatchNorm

        Raises
        ------
        KeyError
            If ``running_mean`` is missing or a key is unexpected.
        TypeError
            If ``state`` is not a mapping, or an array or ``dtype`` is not
            supported.
        ValueError
            If a shape does not match or ``running_var + eps`` is negative.

        Examples
        --------
        >>> bn = bncore.BatchNorm(2)
        >>> frozen = bncore.FrozenBatchNorm.from_state_dict(bn.state_dict())
        >>> frozen
        FrozenBatchNorm(2, eps=1e-05, axis=1)
        """
        chk.state_keys(state, ("running_mean",), False, optional=(
            "weight", "bias", "running_var", "num_batches_tracked"))
        if "running_mean" not in state:
            chk.refuse("state", "missing key 'running_mean'", KeyError)
        rm = chk.float_vector(state["running_mean"], "state['running_mean']")
        if dtype is None:
            dtype = np.asarray(state["running_mean"]).dtype
            dtype = dtype if dtype in chk.FLOAT_DTYPES else np.float32
        layer = cls(rm.shape[0], eps=eps, axis=axis, activation=activation, dtype=dtype)
        layer.load_state_dict(state, strict=False)
        return layer

    def _state_names(self) -> list[str]:
        return ["weight", "bias", "running_mean", "running_var"]

    def _set(self, w: Any, b: Any, rm: Any, rv: Any) -> None:
        params = []
        for a, name in zip((w, b, rm, rv), self._state_names()):
            a = chk.vector(a, self.num_features, name, required=True).astype(self.dtype)
            a.flags.writeable = False
            params.append(a)
        # coefficients from the stored (rounded) parameters, as batch_norm_eval's
        w, b, rm, rv = (a.astype(np.float64) for a in params)
        center, scale, shift = eval_coefficients(rm, rv, w, b, self.eps)
        # everything is validated: now assign
        self.weight, self.bias, self.running_mean, self.running_var = params
        self._invstd, self._w64 = _k.invstd(rv, self.eps), w
        self._center, self._scale, self._shift = center, scale, shift

    def load_state_dict(self, state: Mapping[str, Any], strict: bool = True) -> None:
        """Sets any of weight, bias, running_mean, running_var; recomputes the
        coefficients.

        Checked fully before anything changes.

        Parameters
        ----------
        state : mapping of str to array_like
            Entries under those keys (``num_batches_tracked`` is accepted and
            ignored).
        strict : bool, default True
            Whether all four keys are required; otherwise missing keys keep
            their values.

        Returns
        -------
        None

        Raises
        ------
        KeyError
            If keys are missing (strict) or unexpected.
        TypeError
            If ``state`` is not a mapping or an entry is not floating point.
        ValueError
            If a shape does not match or ``running_var + eps`` is negative.

        Examples
        --------
        >>> frozen = bncore.FrozenBatchNorm(2, dtype=np.float64)
        >>> frozen.load_state_dict({"running_var": np.array([4.0, 4.0])}, strict=False)
        >>> np.round(frozen.scale, 4)
        array([0.5, 0.5])
        """
        names = self._state_names()
        chk.state_keys(state, names, strict, optional=("num_batches_tracked",))
        self._set(*(state.get(k, getattr(self, k)) for k in names))

    @property
    def scale(self) -> FloatArray:
        """Folded per-channel scale (float64): weight / sqrt(running_var + eps)."""
        return self._scale.copy()

    @property
    def shift(self) -> FloatArray:
        """Folded per-channel shift (float64): bias - running_mean * scale."""
        return self._shift - self._center * self._scale

    def __repr__(self) -> str:
        act = "" if self.activation is None else f", activation={self.activation!r}"
        return f"FrozenBatchNorm({self.num_features}, eps={self.eps}, axis={self.axis}{act})"

    def train(self, mode: bool = True) -> FrozenBatchNorm:
        """Refuse training mode: ``train(False)`` (and `eval`) return the layer.

        Parameters
        ----------
        mode : bool, default True
            Must be False.

        Returns
        -------
        FrozenBatchNorm
            The layer itself.

        Raises
        ------
        ValueError
            If ``mode`` is true.

        Examples
        --------
        >>> bncore.FrozenBatchNorm(2).train(False).training
        False
        """
        if mode:
            chk.refuse("mode", "a FrozenBatchNorm has no training mode (use BatchNorm)")
        return self

    def forward(self, x: Any, *, out: Array | None = None,  # type: ignore[override]
                n_threads: int | None = None) -> Array:
        """``act((x - running_mean) * scale + bias)`` in one pass; keeps no state.

        Parameters
        ----------
        x : array_like
            Input with C channels on ``axis``, dtype float16, float32 or
            float64.
        out : numpy.ndarray, optional
            Writable array of x's shape and dtype that receives the output
            (``out=x`` works in place).
        n_threads : int, optional
            The most threads to use. None uses `get_num_threads`
            at the time of the call.

        Returns
        -------
        numpy.ndarray
            x's shape and dtype (``out`` when given).

        Raises
        ------
        TypeError
            If x or ``out`` has an unsupported type or dtype.
        ValueError
            If x's channels do not match, or ``n_threads`` is invalid.

        Examples
        --------
        >>> frozen = bncore.FrozenBatchNorm(2, dtype=np.float64)
        >>> np.round(frozen.forward(np.array([[3.0, -6.0]])), 4)
        array([[ 3., -6.]])
        """
        # stateless: nothing is recorded, so calls may run in parallel
        y = _k.elemt(x, self._center, self._invstd, self._w64, self._shift, self.axis, out,
                     self.activation, n_threads)
        if y is None:
            L = chk.Layout(x, self.axis).channels(self.num_features)
            y = batch_norm_elemt(L.x, self._center, self._invstd, self._w64, self._shift,
                                 axis=self.axis, out=out, activation=self.activation,
                                 n_threads=n_threads)
        return y

    def backward(self, dy: Any, *, y: Any = None, out: Array | None = None,
                 n_threads: int | None = None) -> Array:
        """``dx = act'(y) * dy * scale``.

        Parameters
        ----------
        dy : array_like
            Gradient of the output, dtype float16, float32 or float64.
        y : array_like, optional
            The forward's output, needed only with an activation (its mask).
        out : numpy.ndarray, optional
            Writable array of dy's shape and dtype that receives ``dx``.
        n_threads : int, optional
            The most threads to use. None uses `get_num_threads`
            at the time of the call.

        Returns
        -------
        numpy.ndarray
            ``dx``, dy's shape and dtype (``out`` when given).

        Raises
        ------
        TypeError
            If an array has an unsupported type or dtype.
        ValueError
            If dy's channels do not match, ``y`` is missing with an
            activation, or ``n_threads`` is invalid.

        Examples
        --------
        >>> frozen = bncore.FrozenBatchNorm.from_state_dict(
        ...     {"running_mean": np.zeros(2), "running_var": np.array([4.0, 16.0])}, eps=0.0)
        >>> frozen.backward(np.ones((1, 2)))
        array([[0.5 , 0.25]])
        """
        L = chk.Layout(dy, self.axis, "dy").channels(self.num_features, "dy")
        code, slope = chk.activation_code(self.activation)
        y = chk.mask_source(y, L.x, self.activation if code else None)
        nt = chk.threads(n_threads)
        buf, final = chk.output(out, L.x, L.cd, (L.x, y))
        _k.backward_apply(L.flat(L.x), None, L.flat(y), buf.reshape(-1), L.shape, self._center,
                          self._scale, None, None, code, slope, nt)
        return chk.finish(buf, final, L.x.dtype)
