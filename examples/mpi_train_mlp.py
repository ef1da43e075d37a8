"""Data-parallel training of a small MLP with SyncBatchNorm over MPI.

    mpiexec -n 2 python examples/mpi_train_mlp.py --compare

Each global batch of the scikit-learn digits data (bundled with scikit-learn,
nothing is downloaded) is split across the ranks, unevenly when it does not
divide. SyncBatchNorm normalizes with the statistics of the whole global
batch, the Linear gradients are summed with one all-reduce, and so every rank
follows the same trajectory as one process training on the whole batch.
``--compare`` makes rank 0 also run that single-process training (plain
``bncore.BatchNorm``, same initialization, same batches) and report both.
"""
import argparse
import time

import numpy as np
from mpi4py import MPI
from sklearn.datasets import load_digits

import bncore
from bncore.distributed import SyncBatchNorm


class Linear:
    def __init__(self, rng, n_in, n_out, dtype):
        self.weight = (rng.standard_normal((n_in, n_out))
                       * np.sqrt(2.0 / n_in)).astype(dtype)
        self.bias = np.zeros(n_out, dtype=dtype)

    def forward(self, x):
        self.x = x
        return x @ self.weight + self.bias

    def backward(self, dy):
        self.grad_weight = self.x.T @ dy
        self.grad_bias = dy.sum(axis=0)
        return dy @ self.weight.T


class ReLU:
    def forward(self, x):
        self.mask = x > 0
        return x * self.mask

    def backward(self, dy):
        return dy * self.mask


class MLP:
    """Linear-BN-ReLU, Linear-BN-ReLU, Linear; ``comm=None`` means one process."""

    def __init__(self, sizes, comm, seed=0, dtype=np.float32):
        rng = np.random.default_rng(seed)  # same weights on every rank
        self.layers = []
        for n_in, n_out in zip(sizes[:-2], sizes[1:-1]):
            bn = (bncore.BatchNorm(n_out, dtype=dtype) if comm is None
                  else SyncBatchNorm(n_out, dtype=dtype, comm=comm))
            self.layers += [Linear(rng, n_in, n_out, dtype), bn, ReLU()]
        self.layers.append(Linear(rng, sizes[-2], sizes[-1], dtype))

    def forward(self, x):
        for layer in self.layers:
            x = layer.forward(x)
        return x

    def backward(self, dy):
        for layer in reversed(self.layers):
            dy = layer.backward(dy)

    def train(self, mode=True):
        for layer in self.layers:
            if isinstance(layer, bncore.BatchNorm):
                layer.train(mode)

    def params(self):
        """(parameter, gradient name, needs a cross-rank sum) triples."""
        for layer in self.layers:
            if isinstance(layer, Linear):
                yield layer, "weight", True
                yield layer, "bias", True
            elif isinstance(layer, bncore.BatchNorm):
                # SyncBatchNorm's gradients are already global sums.
                yield layer, "weight", False
                yield layer, "bias", False


def softmax_xent_grad(logits, labels, global_batch):
    """Gradient of the mean cross-entropy over the *global* batch."""
    z = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    p[np.arange(len(labels)), labels] -= 1.0
    return p / global_batch


def train(comm, x_train, y_train, x_test, y_test, args):
    rank = 0 if comm is None else comm.Get_rank()
    size = 1 if comm is None else comm.Get_size()
    model = MLP([x_train.shape[1], 128, 64, 10], comm, seed=args.seed)
    velocity = {}
    order_rng = np.random.default_rng(args.seed + 1)  # same batches everywhere
    for epoch in range(args.epochs):
        model.train()
        order = order_rng.permutation(len(x_train))
        for start in range(0, len(order), args.batch):
            batch = order[start:start + args.batch]
            mine = np.array_split(batch, size)[rank]  # uneven shards are fine
            logits = model.forward(x_train[mine])
            model.backward(softmax_xent_grad(logits, y_train[mine],
                                             len(batch)))
            params = list(model.params())
            if comm is not None:
                # One all-reduce sums every Linear gradient across ranks.
                summed = [(p, "grad_" + n) for p, n, s in params if s]
                flat = np.concatenate([getattr(p, g).ravel()
                                       for p, g in summed])
                comm.Allreduce(MPI.IN_PLACE, flat, op=MPI.SUM)
                ends = np.cumsum([getattr(p, g).size for p, g in summed])
                for (p, g), part in zip(summed, np.split(flat, ends[:-1])):
                    setattr(p, g, part.reshape(getattr(p, g).shape))
            for p, name, _ in params:
                if getattr(p, name) is None:
                    continue
                key = (id(p), name)
                v = velocity.get(key, 0.0)
                v = args.momentum * v + getattr(p, "grad_" + name)
                velocity[key] = v
                getattr(p, name)[...] -= args.lr * v
    model.train(False)
    mine = np.array_split(np.arange(len(x_test)), size)[rank]
    correct = np.array([(model.forward(x_test[mine]).argmax(axis=1)
                         == y_test[mine]).sum()], dtype=np.int64)
    if comm is not None:
        comm.Allreduce(MPI.IN_PLACE, correct, op=MPI.SUM)
    return correct[0] / len(x_test), model


def load_data(dtype=np.float32):
    digits = load_digits()
    x = (digits.data / 16.0).astype(dtype)
    y = digits.target
    perm = np.random.default_rng(0).permutation(len(x))
    x, y = x[perm], y[perm]
    n_test = len(x) // 5
    return x[n_test:], y[n_test:], x[:n_test], y[:n_test]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch", type=int, default=64,
                        help="global batch size, split across the ranks")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compare", action="store_true",
                        help="rank 0 also trains in one process and compares")
    args = parser.parse_args()
    comm = MPI.COMM_WORLD
    data = load_data()

    t0 = time.perf_counter()
    acc, model = train(comm, *data, args)
    seconds = time.perf_counter() - t0
    if comm.Get_rank() == 0:
        print(f"{comm.Get_size()} rank(s), global batch {args.batch}, "
              f"{args.epochs} epochs: test accuracy {acc:.4f} "
              f"({seconds:.2f} s)", flush=True)
    if not args.compare:
        return
    failed = 0
    if comm.Get_rank() == 0:
        acc1, single = train(None, *data, args)
        diff = max(float(np.abs(getattr(a, n) - getattr(b, n)).max())
                   for (a, n, _), (b, _, _) in zip(model.params(),
                                                   single.params())
                   if getattr(a, n) is not None)
        print(f"single process, same global batch: test accuracy "
              f"{acc1:.4f}; largest parameter difference {diff:.2e}",
              flush=True)
        failed = int(abs(acc - acc1) > 1.0 / len(data[3]))
    if comm.bcast(failed, root=0):
        raise SystemExit("accuracy differs from the single-process run")


if __name__ == "__main__":
    main()
