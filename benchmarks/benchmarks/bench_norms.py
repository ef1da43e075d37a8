"""Layer norm and group norm against PyTorch (asv).

Layer norm: rows of 768, 1024 and 4096 features, batch x sequence 8 x 512.
Group norm: 32 groups on ResNet-50 activations. Each class runs over
shape x n_threads; ``time_bncore`` allocates a fresh output, ``time_bncore_out``
writes into a preallocated ``out=``, ``time_torch`` is the PyTorch peer
(skipped when torch is missing), all on the same seeded float32 inputs.
"""
from bncore import bench_norms as bn

THREADS = [1, 2]
LN = ["x".join(map(str, s)) for s in bn.LN_SHAPES]
GN = ["x".join(map(str, s)) for s in bn.GN_SHAPES]


def _torch(n_threads):
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(n_threads)
    return torch


class _Norm:
    op = None
    param_names = ["shape", "n_threads"]
    timeout = 180

    def setup(self, shape, n_threads):
        case = bn.make_case(self.op, tuple(int(d) for d in shape.split("x")))
        self.f = bn.impls(case, n_threads, _torch(n_threads))
        for f in self.f.values():
            f()  # warm-up, and every page of the output touched

    def time_bncore(self, shape, n_threads):
        self.f["bncore"]()

    def time_bncore_out(self, shape, n_threads):
        self.f["bncore_out"]()

    def time_torch(self, shape, n_threads):
        if "torch" not in self.f:
            raise NotImplementedError("torch is not installed")
        self.f["torch"]()

    def peakmem_bncore(self, shape, n_threads):
        self.f["bncore"]()


class LayerNormForward(_Norm):
    op = "layer_norm"
    params = [LN, THREADS]


class LayerNormBackward(_Norm):
    op = "layer_norm_backward"
    params = [LN, THREADS]


class GroupNormForward(_Norm):
    op = "group_norm"
    params = [GN, THREADS]


class GroupNormBackward(_Norm):
    op = "group_norm_backward"
    params = [GN, THREADS]
