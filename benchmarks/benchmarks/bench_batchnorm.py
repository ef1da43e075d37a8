"""Batch normalization kernels: training and eval forward, backward, in place.

Every class runs over dtype x layout x shape x n_threads (see common.py);
``time_*`` allocate a fresh output, ``time_*_out`` write into a preallocated
``out=``, ``peakmem_*`` twins record the process's peak memory.
"""
import numpy as np

import bncore

from . import common
from .common import DTYPES, EPS, LAYOUTS, SHAPES, THREADS


class _Grid:
    params = [DTYPES, LAYOUTS, SHAPES, THREADS]
    param_names = ["dtype", "layout", "shape", "n_threads"]
    timeout = 180

    def setup(self, dtype, layout, shape, n_threads):
        self.d = common.data(shape, layout, dtype)
        self.kw = {"axis": self.d["axis"], "n_threads": n_threads}


class TrainForward(_Grid):
    """batch_norm_train with running-statistics update."""

    def setup(self, *params):
        super().setup(*params)
        d = self.d
        self.rm, self.rv = d["running_mean"].copy(), d["running_var"].copy()
        self.out = common.filled_like(d["x"])

    def _call(self, out):
        d = self.d
        bncore.batch_norm_train(d["x"], d["weight"], d["bias"], eps=EPS, running_mean=self.rm,
                                running_var=self.rv, out=out, **self.kw)

    def time_train(self, *params):
        self._call(None)

    def time_train_out(self, *params):
        self._call(self.out)

    def peakmem_train(self, *params):
        self._call(None)


class EvalForward(_Grid):
    """batch_norm_eval with given running statistics."""

    def setup(self, *params):
        super().setup(*params)
        self.out = common.filled_like(self.d["x"])

    def _call(self, out):
        d = self.d
        bncore.batch_norm_eval(d["x"], d["running_mean"], d["running_var"], d["weight_eval"],
                               d["bias"], eps=EPS, out=out, **self.kw)

    def time_eval(self, *params):
        self._call(None)

    def time_eval_out(self, *params):
        self._call(self.out)


class Backward(_Grid):
    """batch_norm_backward, training (through the batch statistics) and eval."""

    def setup(self, *params):
        super().setup(*params)
        self.out = common.filled_like(self.d["dy"])

    def _call(self, out, training):
        d = self.d
        bncore.batch_norm_backward(d["dy"], d["x"], d["save_mean"], d["save_invstd"],
                                   d["weight_bwd"], training=training, out=out, **self.kw)

    def time_backward(self, *params):
        self._call(None, True)

    def time_backward_out(self, *params):
        self._call(self.out, True)

    def time_backward_eval(self, *params):
        self._call(None, False)

    def time_backward_eval_out(self, *params):
        self._call(self.out, False)

    def peakmem_backward(self, *params):
        self._call(None, True)


class InPlace(_Grid):
    """out=x for the forwards, out=dy for the backward: no full-size temporary."""

    def setup(self, *params):
        super().setup(*params)
        d = self.d
        self.x, self.dy = d["x"].copy(), d["dy"].copy()
        self.rm, self.rv = d["running_mean"].copy(), d["running_var"].copy()

    def _train(self):
        d = self.d
        bncore.batch_norm_train(self.x, d["weight"], d["bias"], eps=EPS, running_mean=self.rm,
                                running_var=self.rv, out=self.x, **self.kw)

    def _backward(self, training):
        d = self.d
        bncore.batch_norm_backward(self.dy, d["x"], d["save_mean"], d["save_invstd"],
                                   d["weight_bwd"], training=training, out=self.dy, **self.kw)

    def time_train_inplace(self, *params):
        self._train()

    def time_eval_inplace(self, *params):
        d = self.d
        bncore.batch_norm_eval(self.x, d["running_mean"], d["running_var"], d["weight_eval"],
                               d["bias"], eps=EPS, out=self.x, **self.kw)

    def time_backward_inplace(self, *params):
        self._backward(True)

    def time_backward_eval_inplace(self, *params):
        self._backward(False)

    def peakmem_train_inplace(self, *params):
        self._train()

    def peakmem_backward_inplace(self, *params):
        self._backward(True)


class Accuracy:
    """float32 statistics where |mean| >> std (mean 1e4, std 0.5-2) against float64."""

    params = [LAYOUTS, ["32x64x56x56", "8x512x7x7", "8192x1024", "64x256"], THREADS]
    param_names = ["layout", "shape", "n_threads"]
    unit = "relative error"
    timeout = 180

    def setup(self, layout, shape, n_threads):
        self.d = common.data(shape, layout, "float32", offset=1e4)
        self.kw = {"axis": self.d["axis"], "n_threads": n_threads}

    def track_var_relerr_float32(self, *params):
        """max over channels of |var - var64| / var64, var from the running variance."""
        d = self.d
        c = d["var64"].size
        rm, rv = np.zeros(c), np.zeros(c)  # float64 running arrays keep the kernel's precision
        bncore.batch_norm_train(d["x"], running_mean=rm, running_var=rv, momentum=1.0, **self.kw)
        n = d["count"]
        var = rv * (n - 1) / n  # running_var holds the unbiased variance
        return float(np.max(np.abs(var - d["var64"]) / d["var64"]))

    def track_mean_relerr_float32(self, *params):
        """max over channels of |mean - mean64| / |mean64| from save_mean."""
        d = self.d
        _, mean, _ = bncore.batch_norm_train(d["x"], **self.kw)
        return float(np.max(np.abs(mean - d["mean64"]) / np.abs(d["mean64"])))
