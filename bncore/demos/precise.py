"""Exact population statistics against moving and averaged batch statistics.

After training, a batch-normalized net is evaluated with running statistics,
and there are three ways to get them:

(a) the momentum running statistics of training (an exponential average of
    batch statistics taken while the weights moved);
(b) PyTorch's ``swa_utils.update_bn`` (and PreciseBN): with the weights
    fixed, reset the running statistics and run the training set through the
    net in training mode with ``momentum=None``, the cumulative average of the
    per-batch means and (unbiased) per-batch variances;
(c) exact population statistics (``bncore.precise_batch_norm``): the same
    pass, but every layer's inputs are merged into one (count, mean, M2), so
    the variance also holds the spread of the batch means that (b) leaves out.

Each is compared with the true population statistics: the mean and unbiased
variance of every batch norm layer's inputs over the whole training set in
one pass (the same batches, training mode), computed in float64 NumPy from
the concatenated inputs. The demo prints each method's test accuracy and its
largest error in the running mean (in units of the standard deviation) and
in the running variance (relative), and draws the per-channel variance
errors. The net is the MNIST demo's sigmoid MLP with BatchNorm, trained
briefly with SGD. Run it with ``python -m bncore demo precise``.
"""

from typing import Any

import numpy as np

from ..precise import precise_batch_norm
from .common import (
    Timer,
    init_weights,
    load_digits,
    make_parser,
    new_figure,
    parse_args,
    progress_bar,
    run_and_report,
    save_figure,
    shuffled_batches,
    single_threaded,
    softmax_cross_entropy,
    style_axes,
)
from .common import format_table as text_table
from .mnist import HIDDEN, MLP

__all__ = ["METHODS", "main", "plot", "population_truth", "run_experiment"]

METHODS = ("(a) momentum running statistics", "(b) average of batch statistics (update_bn)",
           "(c) exact population statistics")


def _pass_batches(n, batch_size):
    """One pass over the training set in order, in batches (the last may be
    smaller; one of a single image joins the previous batch, as batch norm in
    training needs two)."""
    edges = list(range(0, n, batch_size)) + [n]
    if len(edges) > 2 and edges[-1] - edges[-2] < 2:
        del edges[-2]
    return [slice(a, b) for a, b in zip(edges, edges[1:])]


def _state(net):
    return [(norm.running_mean.copy(), norm.running_var.copy()) for norm in net.norms]


def _set_state(net, state):
    for norm, (rm, rv) in zip(net.norms, state):
        norm.running_mean[...] = rm
        norm.running_var[...] = rv


def _accuracy(net, x, labels, state):
    _set_state(net, state)
    net.eval()
    right = float(np.mean(net.forward(x).argmax(axis=1) == labels))
    net.train()
    return right


class _Recorder:
    """Stands in for a batch norm layer: keeps a copy of every input, then calls it."""

    def __init__(self, norm):
        self.norm, self.inputs = norm, []

    def __call__(self, z):
        self.inputs.append(np.array(z, np.float64))
        return self.norm(z)


def population_truth(net, x_train, batch_size):
    """Mean and unbiased variance of every BN layer's inputs over one pass of the
    training set (training mode, the batches of (b) and (c)), in float64 NumPy.

    A float64 copy of ``net`` runs the batches; its layers' inputs are kept and
    concatenated, and their statistics computed with two-pass NumPy.
    """
    weights = [linear.w.astype(np.float64) for linear in net.linears]
    twin = MLP(weights, batch_norm=True, dtype=np.float64)
    for mine, theirs in zip(twin.linears, net.linears):
        if theirs.b is not None and mine.b is not None:
            mine.b[...] = theirs.b
    recorders = []
    for mine, theirs in zip(twin.norms, net.norms):
        mine.weight[...], mine.bias[...] = theirs.weight, theirs.bias
        recorders.append(_Recorder(mine))
    twin.norms = recorders
    x64 = x_train.astype(np.float64)
    for batch in _pass_batches(len(x64), batch_size):
        twin.forward(x64[batch])
    out = []
    for rec in recorders:
        z = np.concatenate(rec.inputs)
        mean = z.mean(axis=0)
        out.append((mean, ((z - mean) ** 2).sum(axis=0) / (len(z) - 1)))
    return out


def run_experiment(digits=None, *, steps=600, lr=1.0, batch_size=60, seed=0, progress=False,
                   dtype=np.float32):
    """Train the BN MLP for ``steps`` SGD steps, then estimate the running statistics
    three ways (``METHODS``) and compare them with `population_truth`.

    Returns a dict: the data set's ``name`` and sizes, the trained ``net``
    (its BN layers left with the exact statistics), ``truth`` (a list of
    (mean, var) per layer) and ``methods``, one dict per method with
    ``label``, ``stats`` (a list of (running_mean, running_var)),
    ``accuracy`` (test), ``mean_error`` (largest ``|running_mean - mean| /
    sqrt(var)``) and ``var_error`` (largest ``|running_var / var - 1|``), and
    ``var_errors`` (each layer's per-channel relative variance errors).
    """
    x_train, y_train, x_test, y_test, name = load_digits(seed=seed) if digits is None else digits
    x_train, x_test = x_train.astype(dtype), x_test.astype(dtype)
    sizes = (x_train.shape[1], *HIDDEN, 10)
    net = MLP(init_weights(sizes, seed), batch_norm=True, dtype=dtype)
    rng = np.random.default_rng(seed)
    batches = shuffled_batches(rng, len(y_train), batch_size)
    with single_threaded():
        bar = progress_bar(steps, "training", progress)
        for _ in range(steps):
            batch = next(batches)
            logits = net.forward(x_train[batch])
            net.backward(softmax_cross_entropy(logits, y_train[batch])[1])
            net.sgd_step(lr)
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        momentum_stats = _state(net)

        # (b) update_bn: reset, then the cumulative average (momentum=None) of a
        # training-mode pass, the layers' own running update
        passes = [x_train[b] for b in _pass_batches(len(x_train), batch_size)]
        momenta = [norm.momentum for norm in net.norms]
        for norm in net.norms:
            norm.reset_running_stats()
            norm.momentum = None
        for x in passes:
            net.forward(x)
        for norm, m in zip(net.norms, momenta):
            norm.momentum = m
        averaged_stats = _state(net)

        # (c) exact population statistics over the same pass
        precise_batch_norm(net.norms, passes, net.forward)
        exact_stats = _state(net)

        truth = population_truth(net, x_train, batch_size)
        methods = []
        for label, state in zip(METHODS, (momentum_stats, averaged_stats, exact_stats)):
            var_errors = [np.abs(rv / v - 1) for (_, rv), (_, v) in zip(state, truth)]
            mean_errors = [np.abs(rm - m) / np.sqrt(v) for (rm, _), (m, v) in zip(state, truth)]
            methods.append({"label": label, "stats": state,
                            "accuracy": _accuracy(net, x_test, y_test, state),
                            "mean_error": float(max(e.max() for e in mean_errors)),
                            "var_error": float(max(e.max() for e in var_errors)),
                            "var_errors": var_errors})
    return {"name": name, "n_train": len(y_train), "n_test": len(y_test), "steps": steps,
            "batch_size": batch_size, "net": net, "truth": truth, "methods": methods}


def format_report(result):
    """The table: each method's test accuracy and largest errors against the truth."""
    rows = [[m["label"], f"{100 * m['accuracy']:.2f}", f"{m['mean_error']:.2e}",
             f"{m['var_error']:.2e}"] for m in result["methods"]]
    table = text_table(["running statistics", "test accuracy (%)",
                        "max |mean err| / std", "max |var err| / var"], rows)
    b, c = result["methods"][1], result["methods"][2]
    return (f"{table}\nagainst the float64 statistics of every BN layer's inputs over the "
            f"{result['n_train']} training images (batches of {result['batch_size']}): "
            f"the exact statistics are {b['var_error'] / max(c['var_error'], 1e-300):.3g}x "
            f"closer in variance than the average of batch statistics")


def plot(result, path):
    """Per-channel relative variance error of each method, one panel per BN layer."""
    n = len(result["truth"])
    fig, axes = new_figure(1, n, (4 * n, 3.6))
    for i, ax in enumerate(axes[0]):
        for m, color in zip(result["methods"], ("tab:gray", "tab:blue", "tab:red")):
            err = np.sort(m["var_errors"][i])
            ax.semilogy(np.arange(len(err)), np.maximum(err, 1e-12), color=color,
                        label=m["label"][:3])
        style_axes(ax, f"BN layer {i + 1}", "channels (sorted)",
                   "|running_var / var - 1|", legend="lower right" if i == 0 else None)
    return save_figure(fig, path, f"running variance against the population's: "
                                  f"{result['name']}, {result['steps']} SGD steps")


def main(argv: Any = None):
    """``python -m bncore demo precise``: train, compare the three estimates, print the table."""
    parser = make_parser(
        "python -m bncore demo precise",
        "Exact population statistics for BatchNorm (bncore.precise_batch_norm) against the "
        "momentum running statistics and against update_bn's average of batch statistics.",
        steps=600, out="bncore_precise.png")
    parser.add_argument("--lr", type=float, default=1.0,
                        help="SGD learning rate (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=60,
                        help="batch size of training and of the statistics pass "
                             "(default: %(default)s)")
    args = parse_args(parser, argv)
    if not (np.isfinite(args.lr) and args.lr > 0):
        parser.error(f"--lr must be a positive number, got {args.lr}")
    if args.batch_size < 2:
        parser.error(f"--batch-size must be at least 2, got {args.batch_size}")
    timer = Timer()
    digits = load_digits(seed=args.seed)
    if args.batch_size > len(digits[1]):
        parser.error(f"--batch-size must be at most the {len(digits[1])} training images, "
                     f"got {args.batch_size}")
    print(f"{digits[4]}: {len(digits[1])} training / {len(digits[3])} test images; MLP "
          f"{digits[0].shape[1]}-{'-'.join(map(str, HIDDEN))}-10 with BatchNorm and "
          f"sigmoids; SGD lr {args.lr:g}, batch {args.batch_size}, {args.steps} steps, "
          f"seed {args.seed}", flush=True)
    return run_and_report(
        args, timer, lambda progress: run_experiment(
            digits, steps=args.steps, lr=args.lr, batch_size=args.batch_size, seed=args.seed,
            progress=progress), format_report, plot)
