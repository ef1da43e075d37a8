"""Layers with PyTorch's behaviour and state_dict keys."""
import numbers

import numpy as np

from . import _checks as chk
from .functional import (_train, batch_norm_backward, batch_norm_eval, batch_norm_train,
                         _invstd_of)

__all__ = ["BatchNorm"]


class BatchNorm:
    """Batch normalization over channel axis `axis`, like torch.nn.BatchNorm{1,2,3}d.

    forward(x) normalizes with the batch statistics in training mode (and
    updates the running statistics) and with the running statistics in eval
    mode; backward(dy) returns dx for the most recent forward call and sets
    grad_weight / grad_bias. momentum=None is the cumulative moving average;
    track_running_stats=False uses batch statistics in eval mode too.
    virtual_batch_size (ghost batch norm): in training mode each slice of that
    many samples along axis 0 is normalized with its own statistics.
    activation (None, 'relu', ('leaky_relu', slope)) is fused into forward and
    backward; running_var_unbiased=False keeps the biased running variance
    (Keras, ONNX). freeze() returns the eval-mode layer as a FrozenBatchNorm.

    skip_nonfinite_update=True leaves running_mean, running_var and
    num_batches_tracked untouched on a training step whose batch mean or
    variance is NaN or inf in any channel (see batch_norm_train); the step's
    output is still returned. Off by default, as in PyTorch.
    """

    def __init__(self, num_features, *, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, axis=1, dtype=np.float32, virtual_batch_size=None,
                 activation=None, running_var_unbiased=True, skip_nonfinite_update=False):
        if (isinstance(num_features, bool) or not isinstance(num_features, numbers.Integral)
                or num_features < 1):
            raise ValueError(f"num_features: expected a positive int, got {num_features!r}")
        try:
            dt = np.dtype(dtype)
        except TypeError:
            dt = None
        if dt is None or dt not in chk.FLOAT_DTYPES:
            raise TypeError(f"dtype: expected float16, float32 or float64, "
                            f"got {dt if dt is not None else repr(dtype)}")
        dtype = dt
        self.num_features = int(num_features)
        self.eps = chk.real(eps, "eps", 0.0)
        self.momentum = None if momentum is None else chk.real(momentum, "momentum", 0.0, 1.0)
        self.affine = bool(affine)
        self.track_running_stats = bool(track_running_stats)
        self.axis = axis
        self.dtype = dtype
        chk.activation(activation)
        self.activation = activation
        self.running_var_unbiased = bool(running_var_unbiased)
        self.skip_nonfinite_update = bool(skip_nonfinite_update)
        C = self.num_features
        self.weight = np.ones(C, dtype) if affine else None
        self.bias = np.zeros(C, dtype) if affine else None
        if self.track_running_stats:
            self.running_mean = np.zeros(C, dtype)
            self.running_var = np.ones(C, dtype)
            self.num_batches_tracked = np.array(0, dtype=np.int64)
        else:
            self.running_mean = self.running_var = self.num_batches_tracked = None
        self.training = True
        self.grad_weight = self.grad_bias = None
        self._saved = self._saved_y = None
        if virtual_batch_size is not None and (
                isinstance(virtual_batch_size, bool) or
                not isinstance(virtual_batch_size, numbers.Integral) or virtual_batch_size < 1):
            raise ValueError(f"virtual_batch_size: expected None or a positive int, got "
                             f"{virtual_batch_size!r}")
        self.virtual_batch_size = virtual_batch_size
        self._ghost = None

    def __repr__(self):
        act = "" if self.activation is None else f", activation={self.activation!r}"
        return (f"{type(self).__name__}({self.num_features}, eps={self.eps}, "
                f"momentum={self.momentum}, affine={self.affine}, "
                f"track_running_stats={self.track_running_stats}, axis={self.axis}{act})")

    def train(self, mode=True):
        self.training = bool(mode)
        return self

    def eval(self):
        return self.train(False)

    def reset_running_stats(self):
        if self.track_running_stats:
            self.running_mean[...] = 0
            self.running_var[...] = 1
            self.num_batches_tracked[...] = 0

    def __call__(self, x, **kwargs):
        return self.forward(x, **kwargs)

    def _check_input(self, x):
        x = chk.tensor(x, "x")
        ax = chk.channel_axis(self.axis, x.ndim)
        if x.shape[ax] != self.num_features:
            raise ValueError(f"x: expected {self.num_features} channels on axis {self.axis}, "
                             f"got shape {x.shape}")
        return x

    def _check_out(self, x, out):
        if out is not None and isinstance(out, np.ndarray) and np.may_share_memory(out, x):
            raise ValueError("out: expected an array separate from x (a layer keeps x for "
                             "backward; use the functional API or InPlaceABN to normalize in "
                             "place), got one sharing memory with x")

    def forward(self, x, *, out=None, n_threads=None):
        x = self._check_input(x)
        self._check_out(x, out)
        common = dict(axis=self.axis, eps=self.eps, out=out, activation=self.activation,
                      n_threads=n_threads)
        self._ghost = None
        if self.training or not self.track_running_stats:
            if self.training and self.virtual_batch_size is not None:
                common["virtual_batch_size"] = self._ghost = self.virtual_batch_size
            update = self.training and self.track_running_stats
            if update:
                n = int(self.num_batches_tracked) + 1
                factor = 1.0 / n if self.momentum is None else self.momentum
                y, mean, invstd, updated = _train(
                    x, self.weight, self.bias, self.axis, self.eps, self.running_mean,
                    self.running_var, factor, out, self.activation, n_threads, self._ghost,
                    self.skip_nonfinite_update, self.running_var_unbiased)
                if updated:
                    self.num_batches_tracked[...] = n
            else:
                y, mean, invstd = batch_norm_train(x, self.weight, self.bias, **common)
            self._saved = (x, mean, invstd, True)
        else:
            y = batch_norm_eval(x, self.running_mean, self.running_var, self.weight, self.bias,
                                **common)
            invstd = _invstd_of(self.running_var, self.eps)
            self._saved = (x, self.running_mean.astype(np.float64), invstd, False)
        # the activation's mask source, kept only when there is one
        self._saved_y = y if self.activation is not None else None
        return y

    def backward(self, dy, *, out=None, n_threads=None):
        """dx of the most recent forward; sets grad_weight and grad_bias."""
        if self._saved is None:
            raise RuntimeError("backward: no forward call to differentiate; call forward first")
        x, mean, invstd, training = self._saved
        dx, dw, db = batch_norm_backward(dy, x, mean, invstd, self.weight, axis=self.axis,
                                         training=training, out=out, activation=self.activation,
                                         y=self._saved_y, n_threads=n_threads,
                                         virtual_batch_size=self._ghost)
        if self.affine:
            self.grad_weight = dw.astype(self.weight.dtype)
            self.grad_bias = db.astype(self.bias.dtype)
        return dx

    def freeze(self):
        """A FrozenBatchNorm with copies of this layer's eval-mode parameters."""
        from .inference import FrozenBatchNorm
        if not self.track_running_stats:
            raise ValueError("freeze: the layer has no running statistics to freeze "
                             "(track_running_stats=False)")
        return FrozenBatchNorm.from_state_dict(
            self.state_dict(), eps=self.eps, axis=self.axis, activation=self.activation,
            dtype=self.dtype)

    def _state_names(self):
        names = ["weight", "bias"] if self.affine else []
        if self.track_running_stats:
            names += ["running_mean", "running_var", "num_batches_tracked"]
        return names

    def state_dict(self):
        """Copies of the parameters and buffers under PyTorch's keys."""
        return {k: np.array(getattr(self, k)) for k in self._state_names()}

    def load_state_dict(self, state, strict=True):
        """Loads arrays (or anything np.asarray takes, e.g. CPU torch tensors).

        Everything is checked before anything is assigned."""
        names = self._state_names()
        missing = [k for k in names if k not in state]
        unexpected = [k for k in state if k not in names]
        if strict and (missing or unexpected):
            raise KeyError(f"state: missing keys {missing}, unexpected keys {unexpected}")
        staged = {}
        for k in names:
            if k not in state:
                continue
            v = np.asarray(state[k])
            want = getattr(self, k)
            if v.shape != want.shape:
                raise ValueError(f"state[{k!r}]: expected shape {want.shape}, got {v.shape}")
            if k == "num_batches_tracked" and v.dtype.kind not in "iu":
                raise TypeError(f"state[{k!r}]: expected an integer, got dtype {v.dtype}")
            if k != "num_batches_tracked" and v.dtype.kind != "f":
                raise TypeError(f"state[{k!r}]: expected a floating-point array, got dtype {v.dtype}")
            staged[k] = v
        for k, v in staged.items():
            getattr(self, k)[...] = v
