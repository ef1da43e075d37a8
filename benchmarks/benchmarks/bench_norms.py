"""Layer norm and group norm (asv): bncore's own speed.

Layer norm: rows of 768, 1024 and 4096 features, batch x sequence 8 x 512.
Group norm: 32 groups on ResNet-50 activations. Each class runs over
shape x n_threads; ``time_*`` allocate a fresh output, ``time_*_out`` write
into a preallocated ``out=``. PyTorch as a peer: ``benchmarks/norms.py``.
"""
import bncore

from . import common
from .common import EPS, GN_SHAPES, GROUPS, LN_SHAPES, THREADS


class _Norm:
    kind = None
    param_names = ["shape", "n_threads"]
    timeout = 180

    def setup(self, shape, n_threads):
        self.d = common.norm_data(self.kind, shape)
        self.out = common.filled_like(self.d["x"])
        self.nf = self.d["x"].shape[-1] if self.kind == "layer" else GROUPS


class LayerNorm(_Norm):
    kind = "layer"
    params = [LN_SHAPES, THREADS]

    def _forward(self, out, n_threads):
        d = self.d
        bncore.layer_norm(d["x"], self.nf, d["weight"], d["bias"], EPS, out=out,
                          n_threads=n_threads)

    def _backward(self, out, n_threads):
        d = self.d
        bncore.layer_norm_backward(d["dy"], d["x"], self.nf, d["mean"], d["invstd"],
                                   d["weight"], out=out, n_threads=n_threads)

    def time_forward(self, shape, n_threads):
        self._forward(None, n_threads)

    def time_forward_out(self, shape, n_threads):
        self._forward(self.out, n_threads)

    def time_backward(self, shape, n_threads):
        self._backward(None, n_threads)

    def time_backward_out(self, shape, n_threads):
        self._backward(self.out, n_threads)

    def peakmem_forward(self, shape, n_threads):
        self._forward(None, n_threads)


class GroupNorm(LayerNorm):
    kind = "group"
    params = [GN_SHAPES, THREADS]

    def _forward(self, out, n_threads):
        d = self.d
        bncore.group_norm(d["x"], GROUPS, d["weight"], d["bias"], EPS, out=out,
                          n_threads=n_threads)

    def _backward(self, out, n_threads):
        d = self.d
        bncore.group_norm_backward(d["dy"], d["x"], GROUPS, d["mean"], d["invstd"],
                                   d["weight"], out=out, n_threads=n_threads)
