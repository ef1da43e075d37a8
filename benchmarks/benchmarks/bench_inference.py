"""Inference services: frozen batch norm, fused batch norm + ReLU (training
forward and backward, against the same work done in two passes), in-place ABN
(time and peak memory of a step) and folding into dense and conv weights.

Seeded data from common.py; shapes are logical N,C[,H,W], channels first.
"""
import numpy as np

import bncore

from . import common

SHAPES = ["1x64x56x56", "32x64x56x56", "32x256x14x14", "256x4096"]
THREADS = [1, 2]


def _data(shape):
    return common.data(shape, common.layout_of(shape), "float32")


class FrozenBatchNorm:
    """FrozenBatchNorm (coefficients precomputed) against batch_norm_eval."""
    params = [SHAPES, THREADS]
    param_names = ["shape", "n_threads"]

    def setup(self, shape, n_threads):
        d = self.d = _data(shape)
        self.frozen = bncore.FrozenBatchNorm.from_state_dict(
            {k: d[k] for k in ("weight", "bias", "running_mean", "running_var")})
        self.out = np.zeros_like(d["x"])

    def time_frozen(self, shape, n_threads):
        self.frozen(self.d["x"], n_threads=n_threads)

    def time_frozen_out(self, shape, n_threads):
        self.frozen(self.d["x"], out=self.out, n_threads=n_threads)

    def time_eval_functional(self, shape, n_threads):
        d = self.d
        bncore.batch_norm_eval(d["x"], d["running_mean"], d["running_var"], d["weight"],
                               d["bias"], n_threads=n_threads)


class FusedReLU:
    """Batch norm + ReLU in one pass (activation='relu') and in two."""
    params = [SHAPES, THREADS]
    param_names = ["shape", "n_threads"]

    def setup(self, shape, n_threads):
        d = self.d = _data(shape)
        self.out = np.zeros_like(d["x"])
        self.y, self.mean, self.invstd = bncore.batch_norm_train(d["x"], d["weight"], d["bias"],
                                                                 activation="relu")

    def time_train_fused(self, shape, n_threads):
        d = self.d
        bncore.batch_norm_train(d["x"], d["weight"], d["bias"], activation="relu", out=self.out,
                                n_threads=n_threads)

    def time_train_then_relu(self, shape, n_threads):
        d = self.d
        y, _, _ = bncore.batch_norm_train(d["x"], d["weight"], d["bias"], out=self.out,
                                          n_threads=n_threads)
        np.maximum(y, 0, out=y)

    def time_backward_fused(self, shape, n_threads):
        d = self.d
        bncore.batch_norm_backward(d["dy"], d["x"], self.mean, self.invstd, d["weight"],
                                   activation="relu", y=self.y, out=self.out,
                                   n_threads=n_threads)

    def time_backward_mask_then_bn(self, shape, n_threads):
        d = self.d
        g = np.multiply(d["dy"], self.y > 0, out=self.out)
        bncore.batch_norm_backward(g, d["x"], self.mean, self.invstd, d["weight"], out=g,
                                   n_threads=n_threads)


class InPlaceABN:
    """A training step (forward + backward) of BN + leaky ReLU, in place or not."""
    params = [["32x64x56x56", "256x4096"], ["BatchNorm", "InPlaceABN"]]
    param_names = ["shape", "layer"]

    def setup(self, shape, layer):
        d = self.d = _data(shape)
        self.layer = getattr(bncore, layer)(d["x"].shape[1], activation=("leaky_relu", 0.01))
        self.x = np.empty_like(d["x"])

    def _step(self):
        np.copyto(self.x, self.d["x"])  # in place overwrites its input
        self.layer(self.x)
        self.layer.backward(self.d["dy"])

    def time_step(self, shape, layer):
        self._step()

    def peakmem_step(self, shape, layer):
        self._step()


class Folding:
    """fold_batch_norm and folding into the preceding / following layer."""
    params = [["conv 256x256x3x3", "conv 64x3x7x7", "dense 4096x4096"],
              ["layer_bn", "bn_layer"]]
    param_names = ["layer", "order"]

    def setup(self, layer, order):
        kind, dims = layer.split()
        shape = tuple(int(d) for d in dims.split("x"))
        rng = np.random.default_rng(0)
        self.W = rng.standard_normal(shape, dtype=np.float32)
        self.b = rng.standard_normal(shape[0], dtype=np.float32)
        C = shape[0] if order == "layer_bn" else shape[1]
        self.stats = (rng.standard_normal(C), rng.uniform(0.5, 2, C), rng.uniform(0.5, 1.5, C),
                      rng.standard_normal(C))
        self.fold = bncore.fold_into_conv if kind == "conv" else bncore.fold_into_linear
        self.order = order

    def time_fold(self, layer, order):
        scale, shift = bncore.fold_batch_norm(*self.stats)
        self.fold(self.W, self.b, scale, shift, order=self.order)
