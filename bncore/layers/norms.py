"""Layer, group and instance normalization layers, like torch.nn's."""
import numpy as np

from .. import _checks as chk
from .. import _kernels as _k
from ..functional import batch_norm_backward, batch_norm_eval
from ..norms import (group_norm_backward, group_norm_train, instance_norm_backward,
                     instance_norm_train, layer_norm_backward, layer_norm_train)
from .base import Module

__all__ = ["LayerNorm", "GroupNorm", "InstanceNorm"]


class LayerNorm(Module):
    """Layer normalization over the trailing dims, like torch.nn.LayerNorm.

    weight (ones) and bias (zeros) have shape normalized_shape; training and
    eval mode behave the same. backward(dy) returns dx of the most recent
    forward and sets grad_weight / grad_bias.
    """

    def __init__(self, normalized_shape, *, eps=1e-5, elementwise_affine=True, bias=True,
                 dtype=np.float32):
        self._setup(dtype, eps)
        self.normalized_shape = chk.normalized_shape(normalized_shape)
        self.elementwise_affine = affine = bool(elementwise_affine)
        self.weight = np.ones(self.normalized_shape, self.dtype) if affine else None
        self.bias = np.zeros(self.normalized_shape, self.dtype) if affine and bias else None

    def __repr__(self):
        return (f"LayerNorm({self.normalized_shape}, eps={self.eps}, "
                f"elementwise_affine={self.elementwise_affine}, bias={self.bias is not None})")

    def _forward(self, x, out, n_threads):
        x = chk.tensor(x, "x", 1)
        chk.separate_from_input(out, x)
        y, mean, invstd = layer_norm_train(x, self.normalized_shape, self.weight, self.bias,
                                           self.eps, out=out, n_threads=n_threads)
        return y, (x, mean, invstd)

    def _backward(self, dy, record, out, n_threads):
        x, mean, invstd = record
        return layer_norm_backward(dy, x, self.normalized_shape, mean, invstd, self.weight,
                                   out=out, n_threads=n_threads)


class GroupNorm(Module):
    """Group normalization of (N, C, *) input, like torch.nn.GroupNorm:
    num_groups groups of num_channels/num_groups channels, per-channel weight
    (ones) and bias (zeros) when affine."""

    def __init__(self, num_groups, num_channels, *, eps=1e-5, affine=True, dtype=np.float32):
        self._setup(dtype, eps)
        self.num_channels = C = chk.positive_int(num_channels, "num_channels")
        self.num_groups = chk.divisor(num_groups, C, "num_groups", "num_channels")
        self.affine = bool(affine)
        self.weight = np.ones(C, self.dtype) if affine else None
        self.bias = np.zeros(C, self.dtype) if affine else None

    def __repr__(self):
        return (f"GroupNorm({self.num_groups}, {self.num_channels}, eps={self.eps}, "
                f"affine={self.affine})")

    def _forward(self, x, out, n_threads):
        x = chk.Layout(x, 1).channels(self.num_channels).x
        chk.separate_from_input(out, x)
        y, mean, invstd = group_norm_train(x, self.num_groups, self.weight, self.bias, self.eps,
                                           out=out, n_threads=n_threads)
        return y, (x, mean, invstd)

    def _backward(self, dy, record, out, n_threads):
        x, mean, invstd = record
        return group_norm_backward(dy, x, self.num_groups, mean, invstd, self.weight, out=out,
                                   n_threads=n_threads)


class InstanceNorm(Module):
    """Instance normalization of (N, C, *) input, like torch.nn.InstanceNorm{1,2,3}d
    (affine=False and track_running_stats=False by default).

    Training mode, or no running statistics: each instance's own statistics
    (running statistics, when tracked, updated with the batch average of each
    instance's mean and unbiased variance, as PyTorch does). Eval mode with
    tracked statistics: the running statistics. momentum=None means 0
    (running statistics stay put), as in PyTorch.
    """

    def __init__(self, num_features, *, eps=1e-5, momentum=0.1, affine=False,
                 track_running_stats=False, dtype=np.float32):
        self._setup(dtype, eps)
        self.num_features = C = chk.positive_int(num_features, "num_features")
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

    def __repr__(self):
        return (f"InstanceNorm({self.num_features}, eps={self.eps}, momentum={self.momentum}, "
                f"affine={self.affine}, track_running_stats={self.track_running_stats})")

    def _state_names(self):
        names = ["weight", "bias"] if self.affine else []
        if self.track_running_stats:
            names += ["running_mean", "running_var", "num_batches_tracked"]
        return names

    def _forward(self, x, out, n_threads):
        x = chk.Layout(x, 1).channels(self.num_features).x
        chk.separate_from_input(out, x)
        if self.training or not self.track_running_stats:
            update = self.training and self.track_running_stats
            y, mean, invstd = instance_norm_train(
                x, self.weight, self.bias, eps=self.eps,
                running_mean=self.running_mean if update else None,
                running_var=self.running_var if update else None,
                momentum=0.0 if self.momentum is None else self.momentum,
                out=out, n_threads=n_threads)
            return y, (x, mean, invstd, True)
        y = batch_norm_eval(x, self.running_mean, self.running_var, self.weight, self.bias,
                            eps=self.eps, out=out, n_threads=n_threads)
        return y, (x, self.running_mean.astype(np.float64),
                   _k.invstd(self.running_var, self.eps), False)

    def _backward(self, dy, record, out, n_threads):
        x, mean, invstd, per_instance = record
        if per_instance:
            return instance_norm_backward(dy, x, mean, invstd, self.weight, out=out,
                                          n_threads=n_threads)
        return batch_norm_backward(dy, x, mean, invstd, self.weight, training=False, out=out,
                                   n_threads=n_threads)
