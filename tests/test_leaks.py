"""Leaks: 100,000 calls of each function leave resident memory, the number of
live Python objects and the reference counts of the arguments flat (10,000
more through the copy, float16 and error paths, and of the normalization
family's train + backward).

Tiny inputs keep each call at a few microseconds, so the whole file stays
well under a minute. BNCORE_LEAK_CALLS overrides the count (the sanitizer run
uses fewer: its instrumented build is slower, and ASan's quarantine grows the
resident set by design, so the RSS half is skipped there).
"""
import gc
import os
import sys

import numpy as np
import pytest

import bncore

CALLS = int(os.environ.get("BNCORE_LEAK_CALLS", "100000"))
SANITIZED = bool(os.environ.get("BNCORE_SANITIZER_RUN"))
RSS_SLACK = 1 << 20  # bytes; a leak of 16 bytes per call would show 1.6 MB
PAGE = os.sysconf("SC_PAGE_SIZE")


def _rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def _inputs():
    rng = np.random.default_rng(16)
    x = rng.standard_normal((4, 3, 2)).astype(np.float32)
    return dict(
        x=x, dy=rng.standard_normal(x.shape).astype(np.float32),
        xt=rng.standard_normal((2, 3, 4)).astype(np.float32).transpose(2, 1, 0),  # copy path
        x16=x.astype(np.float16), out=np.empty_like(x), w=np.ones(3, np.float32),
        b=np.zeros(3, np.float32), rm=np.zeros(3, np.float32), rv=np.ones(3, np.float32),
        m=np.zeros(3), inv=np.ones(3), counts=np.array([8.0, 8.0]), means=np.zeros((2, 3)),
        m2s=np.ones((2, 3)), bad=np.zeros((4, 3), np.int32),
    )


def _layer_step(layer, a):
    layer.train()
    layer(a["x"])
    layer.backward(a["dy"])
    layer.eval()
    layer(a["x"])


def _raises(f):
    try:
        f()
    except (TypeError, ValueError):
        return
    raise AssertionError("expected an error")


CALLS_UNDER_TEST = {
    "batch_norm_train": lambda a: bncore.batch_norm_train(
        a["x"], a["w"], a["b"], running_mean=a["rm"], running_var=a["rv"], out=a["out"]),
    "batch_norm_train_copy_path": lambda a: bncore.batch_norm_train(a["xt"], activation="relu"),
    "batch_norm_train_float16": lambda a: bncore.batch_norm_train(a["x16"]),
    "batch_norm_eval": lambda a: bncore.batch_norm_eval(a["x"], a["rm"], a["rv"], a["w"], a["b"]),
    "batch_norm_backward": lambda a: bncore.batch_norm_backward(a["dy"], a["x"], a["m"], a["inv"],
                                                                a["w"]),
    "batch_norm_stats": lambda a: bncore.batch_norm_stats(a["x"]),
    "merge_stats": lambda a: bncore.merge_stats(a["counts"], a["means"], a["m2s"]),
    "batch_norm_elemt": lambda a: bncore.batch_norm_elemt(a["x"], a["m"], a["inv"], out=a["out"]),
    "batch_norm_backward_reduce": lambda a: bncore.batch_norm_backward_reduce(a["dy"], a["x"],
                                                                              a["m"]),
    "batch_norm_backward_elemt": lambda a: bncore.batch_norm_backward_elemt(
        a["dy"], a["x"], a["m"], a["inv"], a["w"], a["m"], a["m"], 8),
    "errors": lambda a: (_raises(lambda: bncore.batch_norm_train(a["bad"])),
                         _raises(lambda: bncore.batch_norm_eval(a["x"], a["rm"], a["rv"][:2]))),
    # the normalization family (train + backward per call)
    "layer_norm": lambda a: bncore.layer_norm_backward(
        a["dy"], a["x"], (2,), *bncore.layer_norm_train(a["x"], (2,))[1:]),
    "group_norm": lambda a: bncore.group_norm_backward(
        a["dy"], a["x"], 3, *bncore.group_norm_train(a["x"], 3)[1:]),
    "instance_norm": lambda a: bncore.instance_norm_backward(
        a["dy"], a["x"], *bncore.instance_norm_train(a["x"], running_mean=a["rm"],
                                                     running_var=a["rv"])[1:]),
}


VARIANTS = ("batch_norm_train_copy_path", "batch_norm_train_float16", "errors", "layer_norm",
            "group_norm", "instance_norm")


@pytest.mark.parametrize("name", list(CALLS_UNDER_TEST) + ["BatchNorm"])
def test_no_leak_over_many_calls(name):
    a = _inputs()
    if name == "BatchNorm":
        layer = bncore.BatchNorm(3)
        call = lambda a: _layer_step(layer, a)  # noqa: E731
        calls = CALLS // 4  # four calls per step
    else:
        call, calls = CALLS_UNDER_TEST[name], CALLS
    if name in VARIANTS:
        calls //= 10  # other paths through the same functions
    for _ in range(2000):  # warm up caches, free lists and the allocator
        call(a)
    gc.collect()
    refs = {k: sys.getrefcount(v) for k, v in a.items()}
    objects = len(gc.get_objects())
    rss = _rss()
    for _ in range(calls):
        call(a)
    gc.collect()
    assert {k: sys.getrefcount(v) for k, v in a.items()} == refs, "argument reference leak"
    assert len(gc.get_objects()) - objects <= 10, "Python objects leak"
    if not SANITIZED:
        grown = _rss() - rss
        assert grown <= RSS_SLACK, f"resident memory grew by {grown} bytes over {calls} calls"
