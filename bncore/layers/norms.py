"""Layer, group and instance normalization layers, like torch.nn's."""
from __future__ import annotations

from typing import Any

import numpy as np

from .. import _checks as chk
from .._typing import Array
from .. import _kernels as _k
from ..functional import batch_norm_backward, batch_norm_eval
from ..norms import (group_norm_backward, group_norm_train, instance_norm_backward,
                     instance_norm_train, layer_norm_backward, layer_norm_train,
                     rms_norm_backward, rms_norm_train)
from .base import Module

__all__ = ["LayerNorm", "GroupNorm", "InstanceNorm", "RMSNorm"]


class LayerNorm(Module):
    """Layer normalization over the trailing dims, like torch.nn.LayerNorm.

    weight (ones) and bias (zeros) have shape normalized_shape; training and
    eval mode behave the same. backward(dy) returns dx of the most recent
    forward and sets grad_weight / grad_bias.

    Parameters
    ----------
    normalized_shape : int or tuple of int
        The trailing dims of the input to normalize over.
    eps : float, default 1e-5
        Finite, ``>= 0``; added to the variance inside the square root.
    elementwise_affine : bool, default True
        Whether the layer has ``weight`` (and ``bias``).
    bias : bool, default True
        Whether an affine layer has ``bias``.
    dtype : float16, float32 or float64, default float32
        The dtype of the parameters.

    Raises
    ------
    TypeError
        If ``normalized_shape`` or ``dtype`` is not supported.
    ValueError
        If ``normalized_shape`` has a negative entry or ``eps`` is out of
        range.

    See Also
    --------
    layer_norm_train, layer_norm_backward : The operations.

    Examples
    --------
    >>> ln = bncore.LayerNorm(2, eps=0.0, dtype=np.float64)
    >>> x = np.array([[1.0, 3.0], [2.0, 6.0]])
    >>> ln(x)
    array([[-1.,  1.],
           [-1.,  1.]])
    >>> dx = ln.backward(np.ones_like(x))
    >>> ln.grad_weight, ln.grad_bias
    (array([-2.,  2.]), array([2., 2.]))
    """

    def __init__(self, normalized_shape: int | tuple[int, ...], *, eps: float = 1e-5,
                 elementwise_affine: bool = True, bias: bool = True, dtype: Any = np.float32):
        self._setup(dtype, eps)
        self.normalized_shape = chk.normalized_shape(normalized_shape)
        self.elementwise_affine = affine = bool(elementwise_affine)
        self.weight = np.ones(self.normalized_shape, self.dtype) if affine else None
        self.bias = np.zeros(self.normalized_shape, self.dtype) if affine and bias else None

    def __repr__(self) -> str:
        return (f"LayerNorm({self.normalized_shape}, eps={self.eps}, "
                f"elementwise_affine={self.elementwise_affine}, bias={self.bias is not None})")

    def _forward(self, x: Any, out: Any, n_threads: Any) -> tuple[Array, Any]:
        x = chk.tensor(x, "x", 1)
        chk.separate_from_input(out, x)
        y, mean, invstd = layer_norm_train(x, self.normalized_shape, self.weight, self.bias,
                                           self.eps, out=out, n_threads=n_threads)
        return y, (x, mean, invstd)

    def _backward(self, dy: Any, record: Any, out: Any, n_threads: Any) -> tuple[Array, Any, Any]:
        x, mean, invstd = record
        return layer_norm_backward(dy, x, self.normalized_shape, mean, invstd, self.weight,
                                   out=out, n_threads=n_threads)


class GroupNorm(Module):
    """Group normalization of (N, C, \\*) input, like torch.nn.GroupNorm, or
    of channels-last input with ``axis=-1``.

    num_groups groups of num_channels/num_groups channels, per-channel weight
    (ones) and bias (zeros) when affine; training and eval mode behave the
    same. ``forward(x, mask=...)`` / ``forward(x, lengths=...)`` takes each
    group's statistics over its unmasked values (see `group_norm_train`).

    Parameters
    ----------
    num_groups : int
        A positive divisor of ``num_channels``.
    num_channels : int
        C, the number of channels (positive).
    eps : float, default 1e-5
        Finite, ``>= 0``; added to the variance inside the square root.
    affine : bool, default True
        Whether the layer has ``weight`` and ``bias``.
    axis : int or tuple of int, default 1
        The channel axis of the input (not 0): -1 for channels last, or a
        tuple of adjacent axes whose product is ``num_channels`` (see
        `group_norm_train`). Checked against each input.
    dtype : float16, float32 or float64, default float32
        The dtype of the parameters.

    Raises
    ------
    TypeError
        If ``dtype`` is not supported.
    ValueError
        If ``num_groups`` does not divide ``num_channels`` or ``eps`` is out
        of range.

    See Also
    --------
    group_norm_train, group_norm_backward : The operations.

    Examples
    --------
    >>> gn = bncore.GroupNorm(2, 4, dtype=np.float64)
    >>> y = gn(np.arange(8.0).reshape(1, 4, 2))
    >>> np.round(y.reshape(2, 4), 4)
    array([[-1.3416, -0.4472,  0.4472,  1.3416],
           [-1.3416, -0.4472,  0.4472,  1.3416]])
    >>> gn_last = bncore.GroupNorm(2, 4, axis=-1, dtype=np.float64)  # (N, L, C)
    >>> y_last = gn_last(np.arange(8.0).reshape(1, 4, 2).transpose(0, 2, 1))
    >>> np.array_equal(y_last, y.transpose(0, 2, 1))
    True
    """

    def __init__(self, num_groups: int, num_channels: int, *, eps: float = 1e-5,
                 affine: bool = True, axis: int | tuple[int, ...] = 1,
                 dtype: Any = np.float32):
        self._setup(dtype, eps)
        self.num_channels = C = chk.positive_int(num_channels, "num_channels")
        self.num_groups = chk.divisor(num_groups, C, "num_groups", "num_channels")
        self.axis = axis
        self.affine = bool(affine)
        self.weight = np.ones(C, self.dtype) if affine else None
        self.bias = np.zeros(C, self.dtype) if affine else None

    def __repr__(self) -> str:
        return (f"GroupNorm({self.num_groups}, {self.num_channels}, eps={self.eps}, "
                f"affine={self.affine}, axis={self.axis})")

    _forward_options = ("mask", "lengths")

    def _forward(self, x: Any, out: Any, n_threads: Any, mask: Any = None,
                 lengths: Any = None) -> tuple[Array, Any]:
        L = chk.per_sample(chk.Layout(x, self.axis)).channels(self.num_channels)
        x = L.x
        chk.separate_from_input(out, x)
        pad = None if mask is None and lengths is None else chk.padding(mask, lengths, x, L.axis)
        pad = None if pad is None else pad.view(bool)
        y, mean, invstd = group_norm_train(x, self.num_groups, self.weight, self.bias, self.eps,
                                           axis=L.axis, out=out, n_threads=n_threads,
                                           mask=pad)
        return y, (x, mean, invstd, L.axis, pad)

    def _backward(self, dy: Any, record: Any, out: Any, n_threads: Any) -> tuple[Array, Any, Any]:
        x, mean, invstd, axis, pad = record
        return group_norm_backward(dy, x, self.num_groups, mean, invstd, self.weight,
                                   axis=axis, out=out, n_threads=n_threads, mask=pad)


class InstanceNorm(Module):
    """Instance normalization of (N, C, \\*) input, like torch.nn.InstanceNorm{1,2,3}d
    (affine=False and track_running_stats=False by default), or of
    channels-last input with ``axis=-1``.

    Training mode, or no running statistics: each instance's own statistics
    (running statistics, when tracked, updated with the batch average of each
    instance's mean and unbiased variance, as PyTorch does). Eval mode with
    tracked statistics: the running statistics. momentum=None means 0
    (running statistics stay put), as in PyTorch. ``forward(x, mask=...)`` /
    ``forward(x, lengths=...)`` takes each instance's statistics over its
    unmasked values (see `instance_norm_train`).

    Parameters
    ----------
    num_features : int
        C, the number of channels (positive).
    eps : float, default 1e-5
        Finite, ``>= 0``; added to the variance inside the square root.
    momentum : float or None, default 0.1
        In ``[0, 1]``: the running statistics' update rate (None: 0).
    affine : bool, default False
        Whether the layer has ``weight`` and ``bias``.
    track_running_stats : bool, default False
        Whether the layer keeps running statistics.
    axis : int or tuple of int, default 1
        The channel axis of the input (not 0): -1 for channels last, or a
        tuple of adjacent axes whose product is ``num_features``. Checked
        against each input.
    dtype : float16, float32 or float64, default float32
        The dtype of the parameters and buffers.

    Raises
    ------
    TypeError
        If ``dtype`` is not supported.
    ValueError
        If ``num_features``, ``eps`` or ``momentum`` is out of range.

    See Also
    --------
    instance_norm_train, instance_norm_backward : The operations.

    Examples
    --------
    >>> inorm = bncore.InstanceNorm(2, eps=0.0, track_running_stats=True, dtype=np.float64)
    >>> x = np.array([[[1.0, 3.0], [2.0, 6.0]]])  # (N=1, C=2, L=2)
    >>> inorm(x)
    array([[[-1.,  1.],
            [-1.,  1.]]])
    >>> inorm.running_mean, inorm.running_var
    (array([0.2, 0.4]), array([1.1, 1.7]))
    >>> bncore.InstanceNorm(2, eps=0.0, axis=-1, dtype=np.float64)(x.transpose(0, 2, 1))
    array([[[-1., -1.],
            [ 1.,  1.]]])
    """

    # arrays, or None when track_running_stats is False (checked where used)
    running_mean: Any
    running_var: Any
    num_batches_tracked: Any

    def __init__(self, num_features: int, *, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = False, track_running_stats: bool = False,
                 axis: int | tuple[int, ...] = 1, dtype: Any = np.float32):
        self._setup(dtype, eps)
        self.num_features = C = chk.positive_int(num_features, "num_features")
        self.axis = axis
        self.momentum = None if momentum is None else chk.real(momentum, "momentum", 0.0, 1.0)
        self.affine = bool(affine)
        self.track_running_stats = bool(track_running_stats)
        self.weight = np.ones(C, self.dtype) if affine else None
        self.bias = np.zeros(C, self.dtype) if affine else None
        if self.track_running_stats:
            self.running_mean = np.zeros(C, self.dtype)
            self.running_var = np.ones(C, self.dtype)
            self.num_batches_tracked = np.array(0, dtype=np.int64)
        else:
            self.running_mean = self.running_var = self.num_batches_tracked = None

    def __repr__(self) -> str:
        return (f"InstanceNorm({self.num_features}, eps={self.eps}, momentum={self.momentum}, "
                f"affine={self.affine}, track_running_stats={self.track_running_stats}, "
                f"axis={self.axis})")

    def _state_names(self) -> list[str]:
        names = ["weight", "bias"] if self.affine else []
        if self.track_running_stats:
            names += ["running_mean", "running_var", "num_batches_tracked"]
        return names

    _forward_options = ("mask", "lengths")

    def _forward(self, x: Any, out: Any, n_threads: Any, mask: Any = None,
                 lengths: Any = None) -> tuple[Array, Any]:
        L = chk.per_sample(chk.Layout(x, self.axis)).channels(self.num_features)
        x, axis = L.x, L.axis
        chk.separate_from_input(out, x)
        pad = None if mask is None and lengths is None else chk.padding(mask, lengths, x, axis)
        pad = None if pad is None else pad.view(bool)
        if self.training or not self.track_running_stats:
            update = self.training and self.track_running_stats
            y, mean, invstd = instance_norm_train(
                x, self.weight, self.bias, eps=self.eps,
                running_mean=self.running_mean if update else None,
                running_var=self.running_var if update else None,
                momentum=0.0 if self.momentum is None else self.momentum,
                axis=axis, out=out, n_threads=n_threads, mask=pad)
            return y, (x, mean, invstd, True, axis, pad)
        y = batch_norm_eval(x, self.running_mean, self.running_var, self.weight, self.bias,
                            axis=axis, eps=self.eps, out=out, n_threads=n_threads)
        return y, (x, self.running_mean.astype(np.float64),
                   _k.invstd(self.running_var, self.eps), False, axis, pad)

    def _backward(self, dy: Any, record: Any, out: Any, n_threads: Any) -> tuple[Array, Any, Any]:
        x, mean, invstd, per_instance, axis, pad = record
        if per_instance:
            return instance_norm_backward(dy, x, mean, invstd, self.weight, axis=axis, out=out,
                                          n_threads=n_threads, mask=pad)
        return batch_norm_backward(dy, x, mean, invstd, self.weight, axis=axis, training=False,
                                   out=out, n_threads=n_threads, mask=pad)


class RMSNorm(Module):
    """RMS normalization over the trailing dims, like torch.nn.RMSNorm.

    ``y = x / sqrt(mean(x**2) + eps) * weight`` per row of
    ``prod(normalized_shape)`` trailing values; weight (ones) has shape
    normalized_shape and there is no bias. Training and eval mode behave the
    same. backward(dy) returns dx of the most recent forward and sets
    grad_weight.

    Parameters
    ----------
    normalized_shape : int or tuple of int
        The trailing dims of the input to normalize over.
    eps : float, optional
        Finite, ``>= 0``; added to the mean square inside the square root.
        None means the input dtype's machine epsilon, as in PyTorch.
    elementwise_affine : bool, default True
        Whether the layer has ``weight``.
    dtype : float16, float32 or float64, default float32
        The dtype of the parameters.

    Raises
    ------
    TypeError
        If ``normalized_shape`` or ``dtype`` is not supported.
    ValueError
        If ``normalized_shape`` has a negative entry or ``eps`` is out of
        range.

    See Also
    --------
    rms_norm_train, rms_norm_backward : The operations.

    Examples
    --------
    >>> rms = bncore.RMSNorm(2, eps=0.0, dtype=np.float64)
    >>> x = np.array([[1.0, -1.0], [3.0, 4.0]])
    >>> np.round(rms(x), 4)
    array([[ 1.    , -1.    ],
           [ 0.8485,  1.1314]])
    >>> dx = rms.backward(np.ones_like(x))
    >>> np.round(rms.grad_weight, 4)
    array([1.8485, 0.1314])
    """

    eps: float | None  # type: ignore[assignment]  # None: the input dtype's epsilon

    def __init__(self, normalized_shape: int | tuple[int, ...], *, eps: float | None = None,
                 elementwise_affine: bool = True, dtype: Any = np.float32):
        self._setup(dtype, 0.0 if eps is None else eps)
        if eps is None:
            self.eps = None
        self.normalized_shape = chk.normalized_shape(normalized_shape)
        self.elementwise_affine = affine = bool(elementwise_affine)
        self.weight = np.ones(self.normalized_shape, self.dtype) if affine else None
        self.bias = None

    def __repr__(self) -> str:
        return (f"RMSNorm({self.normalized_shape}, eps={self.eps}, "
                f"elementwise_affine={self.elementwise_affine})")

    def _forward(self, x: Any, out: Any, n_threads: Any) -> tuple[Array, Any]:
        x = chk.tensor(x, "x", 1)
        chk.separate_from_input(out, x)
        y, invrms = rms_norm_train(x, self.normalized_shape, self.weight, eps=self.eps, out=out,
                                   n_threads=n_threads)
        return y, (x, invrms)

    def _backward(self, dy: Any, record: Any, out: Any, n_threads: Any) -> tuple[Array, Any, Any]:
        x, invrms = record
        dx, dw = rms_norm_backward(dy, x, self.normalized_shape, invrms, self.weight, out=out,
                                   n_threads=n_threads)
        return dx, dw, None
