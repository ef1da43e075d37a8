"""Batch Renormalization's claim, on the MNIST demo's MLP.

Ioffe (2017), "Batch Renormalization: Towards Reducing Minibatch Dependence in
Batch-Normalized Models": batch norm works less well when the batches it
normalizes over are small or not i.i.d., because training normalizes with the
batch's statistics and inference with the moving averages; Batch
Renormalization corrects the batch statistics toward the moving ones (r and d,
clipped to rmax and dmax) so that both compute the same thing, and recovers
most of the loss.

The MNIST demo's net (784-100-100-100-10, sigmoids, plain SGD on batches of
60) is trained with ``bncore.BatchNorm`` and with ``bncore.BatchRenorm`` in
three settings:

* i.i.d.: each batch of 60 is normalized as a whole (the reference);
* small: each batch of 60 is normalized in groups of 4 images, as when every
  worker of a data-parallel job normalizes its own 4 images; the gradient
  still sums over all 60 (each group's forward and backward, then one step);
* non-i.i.d.: each batch of 60 holds 30 images of each of 2 classes, and,
  more extreme, each batch of 60 is normalized in 3 groups of 20 images of
  one class each.

Test accuracy is measured in inference mode (moving statistics), where batch
norm's dependence on the batch shows. Renorm follows the paper's schedule
(rmax = 1 and dmax = 0, plain batch norm, for a warm-up, then linear ramps to
rmax = 3 and dmax = 5), compressed so rmax reaches 3 halfway through the run.
"""
from typing import Any

import numpy as np

from ..layers import BatchNorm, BatchRenorm
from .common import (
    Timer,
    eval_points,
    format_table,
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
from .mnist import HIDDEN, MLP, accuracy

SETTINGS = {  # name: (normalization group size, classes per batch; None: i.i.d.)
    "i.i.d. batch 60": (60, None),
    "groups of 4": (4, None),
    "2 classes per batch": (60, 2),
    "1 class per group of 20": (20, 3),  # a batch's classes come in blocks of 20
}
REFERENCE = "i.i.d. batch 60"
NORMS = ("BN", "renorm")
BATCH = 60
MOMENTUM = 0.01  # of the moving statistics, for both layers (BatchRenorm's default)
# the paper's schedule in its steps: warm-up, end of the rmax ramp, end of the dmax ramp
PAPER_SCHEDULE = (5000, 40000, 25000)
RMAX, DMAX = 3.0, 5.0


def schedule(steps):
    """``(warmup, rmax_ramp, dmax_ramp)`` in SGD steps: the paper's, scaled so the
    rmax ramp ends at ``steps / 2``."""
    warmup, rmax_end, dmax_end = (round(s * steps / 2 / PAPER_SCHEDULE[1])
                                  for s in PAPER_SCHEDULE)
    return warmup, rmax_end - warmup, dmax_end - warmup


def norm_factory(kind, steps, groups_per_step):
    """``make_norm`` for ``MLP``: BatchNorm, or BatchRenorm on the scaled schedule.

    The layers count forward calls, one per normalization group, so the
    schedule's steps are multiplied by the groups per SGD step.
    """
    if kind == "BN":
        return lambda n, dtype: BatchNorm(n, momentum=MOMENTUM, dtype=dtype)
    warmup, rmax_ramp, dmax_ramp = (s * groups_per_step for s in schedule(steps))
    return lambda n, dtype: BatchRenorm(n, momentum=MOMENTUM, dtype=dtype, rmax=RMAX, dmax=DMAX,
                                        warmup_steps=warmup, rmax_ramp_steps=rmax_ramp,
                                        dmax_ramp_steps=dmax_ramp)


def class_batches(rng, labels, batch_size, n_classes):
    """Non-i.i.d. index batches without end: ``n_classes`` classes drawn at random,
    ``batch_size // n_classes`` images of each (every class cycles through its
    own shuffled images)."""
    classes = np.unique(labels)
    per_class = batch_size // n_classes
    pools = {c: np.flatnonzero(labels == c) for c in classes}
    streams = {c: shuffled_batches(rng, len(pools[c]), per_class) for c in classes}
    while True:
        chosen = rng.choice(classes, n_classes, replace=False)
        yield np.concatenate([pools[c][next(streams[c])] for c in chosen])


def grouped_gradients(net, x, labels, group):
    """Loss and gradients of a batch normalized in consecutive groups of ``group`` rows.

    Each group goes forward and backward on its own (its own batch
    statistics); the gradients add up to that of the batch's mean loss.
    Returns ``(loss, [gradient of each of net.parameters()])``.
    """
    total, loss = None, 0.0
    for start in range(0, len(labels), group):
        rows = slice(start, start + group)
        value, grad = softmax_cross_entropy(net.forward(x[rows]), labels[rows])
        share = len(labels[rows]) / len(labels)
        net.backward(grad * share)
        loss += value * share
        grads = [g for _, g in net.parameters()]
        total = ([g.copy() for g in grads] if total is None
                 else [t + g for t, g in zip(total, grads)])
    return loss, total


def sgd_step(net, x, labels, group, lr):
    """One SGD step of ``grouped_gradients``; returns the loss."""
    loss, grads = grouped_gradients(net, x, labels, group)
    for (param, _), grad in zip(net.parameters(), grads):
        param -= lr * grad
    return loss


def train(net, data, *, steps, lr, group, n_classes, seed, checkpoints=(), progress=None):
    """Train ``net``; return ``steps`` and inference-mode test ``accuracy`` at the
    checkpoints (always with 0 and ``steps``) and the final training ``loss``
    (mean over the last tenth of the steps)."""
    x_train, y_train, x_test, y_test = data
    rng = np.random.default_rng(seed)
    batches = (shuffled_batches(rng, len(y_train), BATCH) if n_classes is None
               else class_batches(rng, y_train, BATCH, n_classes))
    checkpoints = set(checkpoints) | {0, steps}
    history: dict[str, Any] = {"steps": [], "accuracy": []}
    losses = []
    for step in range(steps + 1):
        if step in checkpoints:
            history["steps"].append(step)
            history["accuracy"].append(accuracy(net, x_test, y_test))
        if step == steps:
            break
        batch = next(batches)
        losses.append(sgd_step(net, x_train[batch], y_train[batch], group, lr))
        if progress is not None:
            progress.update(1)
    history = {key: np.array(value) for key, value in history.items()}
    history["loss"] = float(np.mean(losses[-max(1, steps // 10):]))
    return history


def run_experiment(digits=None, *, steps=1500, lr=1.0, seed=0, n_checkpoints=30,
                   settings=tuple(SETTINGS), progress=False):
    """Train BN and renorm nets from the same initialization in each setting.

    Returns a dict with the data's ``name`` and sizes, ``steps``, the renorm
    ``schedule`` and ``runs``: a list of dicts (``setting``, ``norm``,
    ``history`` from ``train``).
    """
    x_train, y_train, x_test, y_test, name = load_digits(seed=seed) if digits is None else digits
    data = (x_train, y_train, x_test, y_test)
    weights = init_weights((x_train.shape[1], *HIDDEN, 10), seed)
    checkpoints = eval_points(steps, n_checkpoints)
    runs = []
    with single_threaded(), np.errstate(over="ignore", invalid="ignore"):
        for setting in settings:
            group, n_classes = SETTINGS[setting]
            for kind in NORMS:
                make_norm = norm_factory(kind, steps, BATCH // group)
                net = MLP(weights, batch_norm=True, make_norm=make_norm)
                bar = progress_bar(steps, f"{kind:>6}, {setting:>22}", progress)
                history = train(net, data, steps=steps, lr=lr, group=group,
                                n_classes=n_classes, seed=seed, checkpoints=checkpoints,
                                progress=bar)
                if bar is not None:
                    bar.close()
                runs.append({"setting": setting, "norm": kind, "history": history})
    return {"name": name, "n_train": len(y_train), "n_test": len(y_test), "steps": steps,
            "lr": lr, "schedule": schedule(steps), "runs": runs}


def final_accuracy(result):
    """``{(setting, norm): final inference-mode test accuracy}``."""
    return {(r["setting"], r["norm"]): float(r["history"]["accuracy"][-1])
            for r in result["runs"]}


def table(result):
    """Final test accuracy (%, inference mode) per setting for BN and renorm."""
    acc = final_accuracy(result)
    settings = list(dict.fromkeys(r["setting"] for r in result["runs"]))
    rows = [[s] + [f"{100 * acc[s, k]:.1f}" for k in NORMS]
            + [f"{100 * (acc[s, 'renorm'] - acc[s, 'BN']):+.1f}"] for s in settings]
    return format_table(["test accuracy (%), inference mode", "BN", "renorm", "renorm - BN"],
                        rows)


def verdict(result):
    """One line per degraded setting: did renorm recover what BN lost?"""
    acc = final_accuracy(result)
    reference = acc.get((REFERENCE, "BN"))
    lines = []
    for setting in dict.fromkeys(r["setting"] for r in result["runs"]):
        if setting == REFERENCE or reference is None:
            continue
        bn, rn = acc[setting, "BN"], acc[setting, "renorm"]
        lost, gained = reference - bn, rn - bn
        head = f"{setting}: BN {100 * bn:.1f}% against {100 * reference:.1f}% i.i.d."
        if lost <= 0.01:
            lines.append(f"{head}: batch norm does not degrade here, so there is nothing for "
                         f"renorm to recover (renorm {100 * gained:+.1f} points); the paper's "
                         "claim does not show at this scale")
        elif gained >= lost:
            lines.append(f"{head}: renorm recovers all {100 * lost:.1f} points lost "
                         f"({100 * rn:.1f}%), as the paper claims")
        else:
            lines.append(f"{head}: renorm recovers {100 * gained:.1f} of the {100 * lost:.1f} "
                         f"points lost ({100 * gained / lost:.0f}%)"
                         + (", most of it, as the paper claims" if gained >= lost / 2 else
                            ", less than half: the claim does not reproduce here"))
    return "\n".join(lines)


def plot(result, path):
    """(a-c) inference-mode test accuracy curves, BN against renorm, in each degraded
    setting, with i.i.d. BN as reference; (d) renorm's rmax/dmax schedule."""
    fig, axes = new_figure(2, 2, (12, 9))
    runs = {(r["setting"], r["norm"]): r["history"] for r in result["runs"]}
    degraded = [s for s in dict.fromkeys(r["setting"] for r in result["runs"]) if s != REFERENCE]
    for ax, setting, letter in zip(axes.flat, degraded, "abc"):
        for key, color, ls, label in (
                ((REFERENCE, "BN"), "0.5", ":", f"BN, {REFERENCE} (reference)"),
                ((setting, "BN"), "tab:blue", "-", "BN"),
                ((setting, "renorm"), "tab:red", "-", "renorm")):
            if key in runs:
                ax.plot(runs[key]["steps"], runs[key]["accuracy"], color=color, ls=ls,
                        label=label)
        style_axes(ax, f"({letter}) {setting}", "SGD steps (batches of 60)",
                   "test accuracy, inference mode", ylim=(0, 1), legend="best")
    ax = axes.flat[3]
    steps = np.arange(result["steps"] + 1)
    warmup, rmax_ramp, dmax_ramp = result["schedule"]
    layer = BatchRenorm(1, rmax=RMAX, dmax=DMAX, warmup_steps=warmup,
                        rmax_ramp_steps=rmax_ramp, dmax_ramp_steps=dmax_ramp)
    limits = np.array([layer.limits(int(s)) for s in steps])
    ax.plot(steps, limits[:, 0], color="tab:purple", label="rmax: r clipped to [1/rmax, rmax]")
    ax.plot(steps, limits[:, 1], color="tab:green", label="dmax: d clipped to [-dmax, dmax]")
    style_axes(ax, "(d) renorm's limits: the paper's schedule, compressed",
               "SGD steps", "limit", legend="center right")
    return save_figure(fig, path,
                       f"Ioffe (2017) Batch Renormalization, with bncore: {result['name']},\n"
                       f"{result['n_train']} train / {result['n_test']} test images, "
                       f"784-100-100-100-10 sigmoid MLP, SGD batch {BATCH}, lr {result['lr']:g}")


def main(argv=None):
    """``python -m bncore demo renorm``: train, print the table, save the figure."""
    parser = make_parser(
        "python -m bncore demo renorm",
        "Ioffe (2017): batch norm with small or non-i.i.d. batches against Batch "
        "Renormalization, on the MNIST demo's MLP.",
        steps=1500, out="bncore_demo_renorm.png")
    parser.add_argument("--lr", type=float, default=1.0,
                        help="SGD learning rate (default: %(default)s)")
    args = parse_args(parser, argv)
    if not (np.isfinite(args.lr) and args.lr > 0):
        parser.error(f"--lr must be a positive number, got {args.lr}")
    timer = Timer()
    digits = load_digits(seed=args.seed)
    warmup, rmax_ramp, dmax_ramp = schedule(args.steps)
    print(f"{digits[4]}: {len(digits[1])} training / {len(digits[3])} test images; MLP "
          f"784-{'-'.join(map(str, HIDDEN))}-10 with sigmoids; SGD batch {BATCH}, "
          f"lr {args.lr:g}, {args.steps} steps, seed {args.seed}; renorm: rmax 1 -> {RMAX:g} "
          f"over steps {warmup}-{warmup + rmax_ramp}, dmax 0 -> {DMAX:g} over steps "
          f"{warmup}-{warmup + dmax_ramp}", flush=True)
    return run_and_report(
        args, timer, lambda progress: run_experiment(digits, steps=args.steps, lr=args.lr,
                                                     seed=args.seed, progress=progress),
        lambda r: table(r) + "\n" + verdict(r), plot)
