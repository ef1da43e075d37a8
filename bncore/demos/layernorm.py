"""Layer normalization's claim for recurrent nets.

Ba, Kiros & Hinton (2016), "Layer Normalization": normalizing each example
over its own features, at every time step, gives a recurrent net statistics
that depend neither on the batch nor on the sequence length, so training and
inference compute the same thing, at any batch size (1 included) and any
length -- where batch norm needs a batch in training and statistics per time
step, which end where the training sequences end.

The recurrent demo's LSTM on MNIST read row by row, three times from the same
weights and batches: without normalization, with ``bncore.RecurrentBatchNorm``
(Cooijmans et al.), and with layer norm (``bncore.layer_norm_train`` and
``layer_norm_backward``) in the same three places. After training each is
evaluated (1) in inference mode, in one batch and one sequence at a time,
(2) computing as in training -- batch statistics for batch norm -- on test
batches of 2 to 1000 sequences, and (3) on sequences longer than the 28 steps
trained on: the digit moved down a taller canvas (blank rows before it), and
blank rows after it.
"""
import sys

import numpy as np

from ..norms import layer_norm_backward, layer_norm_train
from .common import (Timer, format_table, load_digits, make_parser, new_figure, parse_args,
                     save_figure, single_threaded, style_axes)
from .recurrent import (BATCH, BLANK, HIDDEN, LSTM, ROWS, accuracy, batch_stat_accuracy, bn_lstm,
                        sequence_digits, smooth, train_nets)

TRAIN_BATCH_SIZES = (2, 4, 16, 1000)  # test batches when computing as in training
EXTRA_ROWS = (0, 7, 14, 28)  # blank rows added: sequences of 28, 35, 42, 56 steps
N_SINGLE = 300  # test sequences also fed one at a time


class RecurrentLayerNorm:
    """Layer norm over the C features of every (step, example), with gamma and beta
    shared by all steps, behind ``bncore.RecurrentBatchNorm``'s interface
    (``forward(x, t)`` / ``forward(x)`` for a (T, N, C) sequence, ``backward``
    adding to ``grad_weight`` / ``grad_bias``, a forward at step 0 starting
    over), so ``LSTM`` takes either. Training and eval mode compute the same."""

    def __init__(self, num_features, *, dtype=np.float32):
        self.shape = (num_features,)
        self.weight = np.ones(num_features, dtype)
        self.bias = np.zeros(num_features, dtype)
        self.training = True
        self._saved = {}

    def train(self, mode=True):
        self.training = bool(mode)  # kept for the interface; nothing depends on it

    def eval(self):
        self.train(False)

    def __call__(self, x, t=None):
        return self.forward(x, t)

    def forward(self, x, t=None):
        t = 0 if t is None else t
        if t == 0:
            self._saved = {}
            self.grad_weight = np.zeros_like(self.weight)
            self.grad_bias = np.zeros_like(self.bias)
        y, mean, invstd = layer_norm_train(x, self.shape, self.weight, self.bias)
        self._saved[t] = (x, mean, invstd)
        return y

    def backward(self, dy, t=None):
        x, mean, invstd = self._saved[0 if t is None else t]
        dx, dw, db = layer_norm_backward(dy, x, self.shape, mean, invstd, self.weight)
        self.grad_weight += dw.astype(self.weight.dtype)
        self.grad_bias += db.astype(self.bias.dtype)
        return dx


def ln_lstm(weights, dtype=np.float32):
    """The LSTM with layer norm on both terms and the cell (Ba et al.'s LN-LSTM)."""
    H = weights[1].shape[0]
    return LSTM(weights, norm_x=RecurrentLayerNorm(4 * H, dtype=dtype),
                norm_h=RecurrentLayerNorm(4 * H, dtype=dtype),
                norm_c=RecurrentLayerNorm(H, dtype=dtype), dtype=dtype)


NETS = (("LSTM", LSTM), ("BN-LSTM", bn_lstm), ("LN-LSTM", ln_lstm))


def one_at_a_time(net, xs, labels):
    """Inference-mode accuracy on sequences fed one by one (batch size 1) and in one
    batch, and the largest difference between the two's logits."""
    net.eval()
    single = np.concatenate([net.forward(xs[:, k:k + 1]) for k in range(len(labels))])
    batched = net.forward(xs)
    net.train()
    return (float(np.mean(single.argmax(axis=1) == labels)),
            float(np.mean(batched.argmax(axis=1) == labels)), float(np.abs(single - batched).max()))


def lengthen(xs, extra, where):
    """``extra`` blank rows before or after each (T, N, D) sequence."""
    blank = np.full((extra, *xs.shape[1:]), BLANK, xs.dtype)
    return np.concatenate([blank, xs] if where == "before" else [xs, blank])


def evaluate(net, xs_test, y_test):
    """Everything ``table`` and ``plot`` show after training, as a dict."""
    single, batched, diff = one_at_a_time(net, xs_test[:, :N_SINGLE], y_test[:N_SINGLE])
    return {
        "inference": accuracy(net, xs_test, y_test),
        "single": single, "single_batched": batched, "single_diff": diff,
        "batch_stats": {n: batch_stat_accuracy(net, xs_test, y_test, n)
                        for n in TRAIN_BATCH_SIZES},
        "longer": {where: {ROWS + e: accuracy(net, lengthen(xs_test, e, where), y_test)
                           for e in EXTRA_ROWS} for where in ("before", "after")},
    }


def run_experiment(digits=None, *, steps=600, lr=2e-3, seed=0, n_checkpoints=10,
                   progress=False):
    """Train the three nets, then ``evaluate`` each: a dict with ``name``, sizes and
    ``runs``, a list of dicts (``label``, ``history``, ``eval``)."""
    digits = sequence_digits(load_digits(seed=seed) if digits is None else digits)
    runs = train_nets(digits, NETS, steps=steps, lr=lr, seed=seed,
                      n_checkpoints=n_checkpoints, progress=progress)
    with single_threaded(), np.errstate(over="ignore", invalid="ignore"):
        runs = [{"label": label, "history": h, "eval": evaluate(net, digits[2], digits[3])}
                for label, net, h in runs]
    return {"name": digits[4], "n_train": len(digits[1]), "n_test": len(digits[3]),
            "steps": steps, "lr": lr, "runs": runs}


def tables(result):
    """Two text tables: accuracy in inference and as in training by batch size;
    accuracy on longer sequences."""
    width = max(1, result["steps"] // 10)
    rows = []
    for run in result["runs"]:
        e = run["eval"]
        rows.append([run["label"], f"{np.mean(run['history']['loss'][-width:]):.3f}",
                     f"{100 * e['inference']:.1f}",
                     f"{100 * e['single']:.1f} / {100 * e['single_batched']:.1f} "
                     f"({e['single_diff']:.0e})"]
                    + [f"{100 * e['batch_stats'][n]:.1f}" for n in TRAIN_BATCH_SIZES])
    first = format_table(
        ["test accuracy (%)", "train loss", "inference",
         f"first {N_SINGLE}: batch 1 / one batch (max |dlogit|)"]
        + [f"as trained, batch {n}" for n in TRAIN_BATCH_SIZES], rows)
    lengths = [ROWS + e for e in EXTRA_ROWS]
    rows = [[f"{run['label']}, blank rows {where}"]
            + [f"{100 * run['eval']['longer'][where][n]:.1f}" for n in lengths]
            for where in ("before", "after") for run in result["runs"]]
    second = format_table(["test accuracy (%), sequence length"] + lengths, rows)
    return first + "\n\n" + second


def verdict(result):
    """The claim, checked: layer norm computes the same at any batch size and in both
    modes; on longer sequences, what each net keeps of its accuracy."""
    e = {run["label"]: run["eval"] for run in result["runs"]}
    ln, bn = e["LN-LSTM"], e["BN-LSTM"]

    def spread(accuracies):
        return 100 * (max(accuracies.values()) - min(accuracies.values()))

    lines = [f"computing as in training, test batches of {TRAIN_BATCH_SIZES[0]} to "
             f"{TRAIN_BATCH_SIZES[-1]}: LN-LSTM's accuracy varies by "
             f"{spread(ln['batch_stats']):.1f} points, BN-LSTM's by "
             f"{spread(bn['batch_stats']):.1f} (and batch norm cannot train on one sequence); "
             f"one sequence at a time in inference, LN-LSTM's logits move by at most "
             f"{ln['single_diff']:.0e}"]
    longer = [ROWS + x for x in EXTRA_ROWS[1:]]
    for where in ("before", "after"):
        accs = "; ".join(f"{k} " + " / ".join(f"{100 * v['longer'][where][n]:.1f}"
                                              for n in [ROWS] + longer)
                         for k, v in e.items())
        ahead = all(ln["longer"][where][n] > bn["longer"][where][n] for n in longer)
        lines.append(f"blank rows {where} the digit, {ROWS} / "
                     + " / ".join(map(str, longer)) + f" steps: {accs} (%)"
                     + (" -- LN-LSTM ahead of BN-LSTM at every longer length" if ahead else
                        " -- LN-LSTM NOT ahead of BN-LSTM at every longer length"))
    return "\n".join(lines)


def plot(result, path):
    """(a) training loss, (b) accuracy against the test batch size computing as in
    training, (c) accuracy against the sequence length."""
    fig, ((ax_a, ax_b, ax_c),) = new_figure(1, 3, (16, 5.2))
    colors = {"LSTM": "tab:blue", "BN-LSTM": "tab:red", "LN-LSTM": "tab:green"}
    width = max(1, result["steps"] // 50)
    for run in result["runs"]:
        label, h, e, color = run["label"], run["history"], run["eval"], colors[run["label"]]
        ax_a.plot(np.arange(1, len(h["loss"]) + 1), smooth(h["loss"], width), color=color,
                  label=label)
        sizes = list(e["batch_stats"])
        ax_b.plot(sizes, [e["batch_stats"][n] for n in sizes], color=color, marker="o",
                  label=f"{label}, as in training")
        ax_b.plot([1], [e["inference"]], color=color, marker="*", ms=12, ls="none",
                  label=f"{label}, inference mode (any batch size)")
        for where, ls in (("before", "-"), ("after", "--")):
            lengths = list(e["longer"][where])
            ax_c.plot(lengths, [e["longer"][where][n] for n in lengths], color=color, ls=ls,
                      marker="o", label=f"{label}, blank rows {where}")
    style_axes(ax_a, f"(a) training loss (running mean over {width} steps)",
               f"training steps (batches of {BATCH})", "cross-entropy", legend="upper right")
    ax_b.set_xscale("log")
    style_axes(ax_b, "(b) test accuracy vs test batch size\n(BN: batch statistics, "
               "as in training; stars: inference mode)",
               "sequences per batch", "test accuracy", ylim=(0, 1), legend="lower right")
    ax_c.axvline(ROWS, color="0.5", lw=0.8)
    style_axes(ax_c, f"(c) test accuracy on longer sequences\n(trained on {ROWS} steps; "
               "the digit plus blank rows)", "sequence length (steps)", "test accuracy",
               ylim=(0, 1), legend="center right")
    return save_figure(fig, path,
                       f"Ba et al. (2016) layer norm in an LSTM, with bncore: {result['name']} "
                       f"read row by row, {result['n_train']} train / {result['n_test']} test, "
                       f"{HIDDEN} units, Adam lr {result['lr']:g}, {result['steps']} steps")


def main(argv=None):
    """``python -m bncore demo layernorm``: train, print the tables, save the figure."""
    parser = make_parser(
        "python -m bncore demo layernorm",
        "Ba et al. (2016): an LSTM with layer norm against batch norm and none, evaluated "
        "at batch size 1 and on sequences longer than trained on.",
        steps=600, out="bncore_demo_layernorm.png")
    parser.add_argument("--lr", type=float, default=2e-3,
                        help="Adam learning rate (default: %(default)s)")
    args = parse_args(parser, argv)
    if not (np.isfinite(args.lr) and args.lr > 0):
        parser.error(f"--lr must be a positive number, got {args.lr}")
    timer = Timer()
    digits = load_digits(seed=args.seed, source="mnist")
    print(f"{digits[4]} read row by row: {len(digits[1])} training / {len(digits[3])} test "
          f"sequences of {ROWS} steps; LSTM of {HIDDEN} units without normalization, with "
          f"batch norm and with layer norm; Adam lr {args.lr:g}, batch {BATCH}, "
          f"{args.steps} steps, seed {args.seed}", flush=True)
    result = run_experiment(digits, steps=args.steps, lr=args.lr, seed=args.seed,
                            progress=sys.stderr.isatty())
    print(tables(result))
    print(verdict(result))
    if not args.no_plot:
        print(f"figure saved to {plot(result, args.out)}")
    print(timer)
    return 0
