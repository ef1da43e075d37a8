"""Batch normalization for recurrent networks (Cooijmans et al. 2016,
"Recurrent Batch Normalization", arXiv:1603.09025).

Each time step t is normalized with its own batch statistics in training and
with its own running statistics in eval mode, kept for t < max_steps; later
steps share the last slot. gamma (weight) and beta (bias) are shared by all
steps; gamma starts at 0.1, which the paper recommends to keep the
gradient flowing through tanh and sigmoid gates.
"""
import numbers

import numpy as np

from . import _checks as chk
from .functional import batch_norm_backward, batch_norm_eval, batch_norm_train
from .norms import _Module, _not_overlapping, _positive_int

__all__ = ["RecurrentBatchNorm"]


class RecurrentBatchNorm(_Module):
    """Per-time-step batch normalization of (N, C) features with shared gamma/beta.

    forward(x, t) normalizes one step x (N, C) at step t; forward(x) with x
    (T, N, C) a whole sequence (steps t..t+T-1, t defaulting to 0). Running
    statistics have shape (max_steps, C); step t uses slot min(t, max_steps-1).
    backward(dy, t) / backward(dy) (a sequence) return dx of those steps'
    forward calls and ADD the parameter gradients to grad_weight / grad_bias,
    as backpropagation through time does; a forward at step 0 starts a new
    sequence (it forgets the saved steps and zeroes the gradients), and
    zero_grad() zeroes them explicitly.
    """

    def __init__(self, num_features, max_steps, *, eps=1e-5, momentum=0.1, affine=True,
                 gamma_init=0.1, dtype=np.float32):
        self._setup(dtype, eps)
        self.num_features = _positive_int(num_features, "num_features")
        self.max_steps = _positive_int(max_steps, "max_steps")
        self.momentum = chk.real(momentum, "momentum", 0.0, 1.0)
        self.affine = bool(affine)
        C, S = self.num_features, self.max_steps
        gamma_init = chk.real(gamma_init, "gamma_init")
        self.weight = np.full(C, gamma_init, self.dtype) if affine else None
        self.bias = np.zeros(C, self.dtype) if affine else None
        self.running_mean = np.zeros((S, C), self.dtype)
        self.running_var = np.ones((S, C), self.dtype)
        self._steps = {}
        self.zero_grad()

    def __repr__(self):
        return (f"RecurrentBatchNorm({self.num_features}, max_steps={self.max_steps}, "
                f"eps={self.eps}, momentum={self.momentum}, affine={self.affine})")

    def _state_names(self):
        return (["weight", "bias"] if self.affine else []) + ["running_mean", "running_var"]

    def zero_grad(self):
        if self.affine:
            self.grad_weight = np.zeros(self.num_features, self.dtype)
            self.grad_bias = np.zeros(self.num_features, self.dtype)

    def reset_running_stats(self):
        self.running_mean[...] = 0
        self.running_var[...] = 1

    def slot(self, t):
        """Index of the running statistics used at step t."""
        return min(t, self.max_steps - 1)

    def _check(self, x, name, t):
        x = chk.tensor(x, name)
        if x.ndim not in (2, 3) or x.shape[-1] != self.num_features:
            raise ValueError(f"{name}: expected shape (N, {self.num_features}) for one step or "
                             f"(T, N, {self.num_features}) for a sequence, got {x.shape}")
        if t is None:
            if x.ndim == 2:
                raise ValueError(f"t: the time step is required with a single step {name} "
                                 f"of shape {x.shape}")
            t = 0
        if isinstance(t, bool) or not isinstance(t, numbers.Integral) or t < 0:
            raise ValueError(f"t: expected a non-negative int (the time step), got {t!r}")
        return x, int(t)

    def __call__(self, x, t=None, **kwargs):
        return self.forward(x, t, **kwargs)

    def forward(self, x, t=None, *, out=None, n_threads=None):
        x, t = self._check(x, "x", t)
        _not_overlapping(out, x)
        if self.training and x.shape[-2] < 2:
            raise ValueError(f"x: expected more than 1 sample per step when training, got "
                             f"shape {x.shape}")
        if out is not None:
            out = chk.output(out, x, x.dtype, ())[1]  # checked up front
        if t == 0:
            self._steps = {}
            self.zero_grad()
        if x.ndim == 2:
            return self._step(x, t, out, n_threads)
        y = np.empty_like(x) if out is None else out
        for i in range(x.shape[0]):
            self._step(x[i], t + i, y[i], n_threads)
        return y

    def _step(self, x, t, out, n_threads):
        s = self.slot(t)
        if self.training:
            y, mean, invstd = batch_norm_train(
                x, self.weight, self.bias, eps=self.eps, running_mean=self.running_mean[s],
                running_var=self.running_var[s], momentum=self.momentum, out=out,
                n_threads=n_threads)
        else:
            rm, rv = self.running_mean[s], self.running_var[s]
            y = batch_norm_eval(x, rm, rv, self.weight, self.bias, eps=self.eps, out=out,
                                n_threads=n_threads)
            mean, invstd = rm.astype(np.float64), 1.0 / np.sqrt(rv.astype(np.float64) + self.eps)
        self._steps[t] = (x, mean, invstd, self.training)
        return y

    def backward(self, dy, t=None, *, out=None, n_threads=None):
        """dx of step t (dy (N, C)) or of the sequence starting at t (dy (T, N, C));
        adds the parameter gradients to grad_weight and grad_bias."""
        dy, t = self._check(dy, "dy", t)
        steps = range(t, t + (dy.shape[0] if dy.ndim == 3 else 1))
        missing = [s for s in steps if s not in self._steps]
        if missing:
            raise RuntimeError(f"backward: no forward call saved for step(s) {missing}; call "
                               f"forward for them first (a forward at step 0 starts over)")
        for s in steps:
            x = self._steps[s][0]
            if x.shape != dy.shape[-2:] or x.dtype != dy.dtype:
                raise ValueError(f"dy: expected steps of shape {x.shape} and dtype {x.dtype} "
                                 f"(the input of step {s}), got {dy.shape} {dy.dtype}")
        if dy.ndim == 2:
            return self._step_backward(dy, t, out, n_threads)
        dx = np.empty_like(dy) if out is None else chk.output(out, dy, dy.dtype, ())[1]
        for i in reversed(range(dy.shape[0])):  # the order of backpropagation through time
            self._step_backward(dy[i], t + i, dx[i], n_threads)
        return dx

    def _step_backward(self, dy, t, out, n_threads):
        x, mean, invstd, training = self._steps[t]
        dx, dw, db = batch_norm_backward(dy, x, mean, invstd, self.weight, training=training,
                                         out=out, n_threads=n_threads)
        if self.affine:
            self.grad_weight += dw.astype(self.dtype)
            self.grad_bias += db.astype(self.dtype)
        return dx
