"""SyncBatchNorm over an allgather callable: a fake allgather between threads
(one layer per simulated rank) for the fast cases, and torch.distributed over
gloo on 2 and 3 local processes through bncore.distributed.torch_allgather.
Every case is checked against one process on the concatenated batch (the
float64 NumPy reference of tests/reference.py and bncore's own single-process
layers), with uneven and empty shards, and for identical bits on every rank."""
import doctest
import importlib.util
import inspect
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

import bncore
import reference as ref

dist = pytest.importorskip("bncore.distributed")  # needs no MPI on this path

TESTS = Path(__file__).resolve().parent
BNCORE_PARENT = Path(bncore.__file__).resolve().parent.parent  # the bncore under test
RTOL = {np.float32: 1e-4, np.float64: 1e-11}


class Group:
    """P simulated ranks in threads: rank r's allgather stacks every rank's
    array in rank order once all have arrived (or fails them all)."""

    def __init__(self, P, timeout=30):
        self.P = P
        self.barrier = threading.Barrier(P, timeout=timeout)
        self.slots = [None] * P

    def allgather(self, rank, tamper=None):
        def gather(local):
            self.slots[rank] = np.array(local)
            self.barrier.wait()
            out = np.stack(self.slots)
            self.barrier.wait()
            return out if tamper is None else tamper(out)
        gather.rank = rank
        return gather

    def run(self, body):
        """body(rank, allgather) on every rank; (results, exceptions) per rank."""
        results, errors = [None] * self.P, [None] * self.P

        def one(r):
            try:
                results[r] = body(r, self.allgather(r))
            except Exception as exc:  # noqa: BLE001 - reported per rank
                errors[r] = exc
        threads = [threading.Thread(target=one, args=(r,)) for r in range(self.P)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not any(t.is_alive() for t in threads), "a simulated rank hung"
        return results, errors


def run_ranks(sizes, body):
    results, errors = Group(len(sizes)).run(body)
    for e in errors:
        if e is not None:
            raise e
    return results


VARIANTS = {"plain": {}, "ghost": dict(virtual_batch_size=3),
            "renorm": dict(renorm=True, rmax=1.5, dmax=0.5),
            "ghost_renorm": dict(virtual_batch_size=2, renorm=True, rmax=1.5, dmax=0.5)}
SHARDS = [[4, 5], [3, 0, 6], [0, 7], [2, 2, 3]]


def single_layer(C, dtype, kw):
    """One process on the whole batch: BatchNorm or BatchRenorm, same settings."""
    common = dict(dtype=dtype, momentum=0.2, virtual_batch_size=kw.get("virtual_batch_size"))
    if kw.get("renorm"):
        return bncore.BatchRenorm(C, rmax=kw["rmax"], dmax=kw["dmax"], warmup_steps=0,
                                  rmax_ramp_steps=0, dmax_ramp_steps=0, **common)
    return bncore.BatchNorm(C, **common)


def check_against_one_process(results, batches, C, dtype, kw):
    """results[rank][step] = (y, dx, running_mean, running_var, grad_weight, grad_bias)."""
    single = single_layer(C, dtype, kw)
    limits = (kw["rmax"], kw["dmax"]) if kw.get("renorm") else None
    vbs = kw.get("virtual_batch_size")
    for step, (sizes, x, dy) in enumerate(batches):
        x, dy = x.astype(dtype), dy.astype(dtype)
        rm0, rv0 = single.running_mean.astype(np.float64), single.running_var.astype(np.float64)
        y1, dx1 = single(x), single.backward(dy)
        y_ref, _, _, r, d, rm_ref, rv_ref = ref.parts_train(x, rm0, rv0, vbs, limits=limits,
                                                            momentum=0.2)
        dx_ref, dw_ref, db_ref = ref.parts_backward(dy, x, r, d, vbs)
        got = [results[rank][step] for rank in range(len(sizes))]
        y = np.concatenate([g[0] for g in got])
        dx = np.concatenate([g[1] for g in got])
        tol = RTOL[dtype]
        for a, want in ((y, y_ref), (y, y1), (dx, dx_ref), (dx, dx1)):
            ref.assert_close(a, want, tol, f"step {step}")
        for i, want, mine in ((2, rm_ref, single.running_mean), (3, rv_ref, single.running_var),
                              (4, dw_ref, single.grad_weight), (5, db_ref, single.grad_bias)):
            ref.assert_close(got[0][i], want, tol, f"step {step} [{i}] vs reference")
            ref.assert_close(got[0][i], mine, tol, f"step {step} [{i}] vs one process")
            for g in got[1:]:  # merged in rank order: the same bits on every rank
                assert g[i].tobytes() == got[0][i].tobytes(), f"step {step} [{i}]"


def make_batches(rng, shard_list, C):
    return [(sizes, 3.0 + 2.0 * rng.standard_normal((sum(sizes), C, 5)),
             rng.standard_normal((sum(sizes), C, 5))) for sizes in shard_list]


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("P", [2, 3])
def test_threads_equal_one_process(rng, variant, dtype, P):
    C, kw = 3, VARIANTS[variant]
    shard_list = [s for s in SHARDS if len(s) == P] * 2
    batches = make_batches(rng, shard_list, C)

    def body(rank, gather):
        layer = dist.SyncBatchNorm(C, dtype=dtype, momentum=0.2, allgather=gather, **kw)
        out = []
        for sizes, x, dy in batches:
            lo, hi = sum(sizes[:rank]), sum(sizes[:rank + 1])
            y = layer(x[lo:hi].astype(dtype))
            dx = layer.backward(dy[lo:hi].astype(dtype))
            out.append((y, dx, layer.running_mean.copy(), layer.running_var.copy(),
                        layer.grad_weight.copy(), layer.grad_bias.copy()))
        return out

    results = run_ranks(shard_list[0], body)
    check_against_one_process(results, batches, C, dtype, kw)


def test_ghost_batches_span_ranks(rng):
    # 2 samples per rank, ghost batches of 3 samples of the concatenated batch
    C, sizes = 2, [2, 2, 2]
    x = rng.standard_normal((6, C)) * 2 + 1

    def body(rank, gather):
        layer = dist.SyncBatchNorm(C, dtype=np.float64, allgather=gather,
                                   virtual_batch_size=3)
        return layer(x[2 * rank:2 * rank + 2])

    y = np.concatenate(run_ranks(sizes, body))
    want = ref.ghost_train(x, 3)[0]
    ref.assert_close(y, want, 1e-12, "y")
    assert not np.allclose(y, ref.train(x)[0])  # not the whole-batch statistics


def test_eval_mode_is_local_and_sums_gradients(rng):
    C, sizes = 3, [3, 0, 4]
    x, dy = rng.standard_normal((7, C)), rng.standard_normal((7, C))

    def body(rank, gather):
        layer = dist.SyncBatchNorm(C, dtype=np.float64, allgather=gather, renorm=True)
        layer.running_mean[...] = [0.5, -1.0, 2.0]
        layer.eval()
        lo, hi = sum(sizes[:rank]), sum(sizes[:rank + 1])
        y = layer(x[lo:hi])
        return y, layer.backward(dy[lo:hi]), layer.grad_weight.copy()

    res = run_ranks(sizes, body)
    single = bncore.BatchNorm(C, dtype=np.float64)
    single.running_mean[...] = [0.5, -1.0, 2.0]
    single.eval()
    ref.assert_close(np.concatenate([r[0] for r in res]), single(x), 1e-12, "y")
    ref.assert_close(np.concatenate([r[1] for r in res]), single.backward(dy), 1e-12, "dx")
    for r in res:
        ref.assert_close(r[2], single.grad_weight, 1e-12, "grad_weight")


# -- bad input and bad allgathers: clear errors, nothing changes ---------------------------

def layer_state(layer):
    return [np.copy(getattr(layer, k)) for k in ("running_mean", "running_var",
                                                 "num_batches_tracked")]


@pytest.mark.parametrize("tamper,error,match", [
    (lambda out: out.tolist(), TypeError, "numpy.ndarray"),
    (lambda out: out[:, :-1], ValueError, "shape"),
    (lambda out: out[0], ValueError, "shape"),
    (lambda out: out[::-1].copy(), ValueError, "differs from what this rank sent"),
    (lambda out: out.astype(np.complex128), TypeError, "real"),
    (lambda out: out[:1], ValueError, "rank"),
])
def test_bad_allgather_result_is_refused_before_any_change(rng, tamper, error, match):
    C, sizes = 2, [3, 4]
    x = rng.standard_normal((7, C))
    layers = [dist.SyncBatchNorm(C, dtype=np.float64, virtual_batch_size=2, renorm=True,
                                 allgather=lambda a: a[None], rank=0)
              for _ in sizes]
    x_good = x[:4]
    for lay in layers:  # a step that succeeds, so the layer holds a record and gradients
        lay(x_good)
        lay.backward(np.ones_like(x_good))
    before = [layer_state(lay) for lay in layers]
    grads = [lay.grad_weight.copy() for lay in layers]
    saved = [lay._saved for lay in layers]
    # rank 1 refuses after the exchange, so rank 0 waits in the next one (as
    # real ranks would) until the simulated collective times out
    group = Group(2, timeout=2)

    def body(rank, _):
        lay = layers[rank]
        lay.allgather, lay.rank = group.allgather(rank, tamper if rank == 1 else None), rank
        lo, hi = sum(sizes[:rank]), sum(sizes[:rank + 1])
        return lay(x[lo:hi])

    _, errors = group.run(body)
    assert isinstance(errors[1], error) and match in str(errors[1]), errors[1]
    for lay, b, g, s in zip(layers, before, grads, saved):
        for a, c in zip(layer_state(lay), b):
            np.testing.assert_array_equal(a, c)
        np.testing.assert_array_equal(lay.grad_weight, g)
        assert lay._saved is s  # the previous step's record, for backward


def test_bad_input_on_one_rank_raises_on_every_rank(rng):
    C, sizes = 3, [3, 4, 2]

    def body(rank, gather):
        layer = dist.SyncBatchNorm(C, allgather=gather, virtual_batch_size=2)
        x = np.ones((sizes[rank], C if rank != 1 else C + 1), np.float32)
        try:
            layer(x)
        finally:
            assert int(layer.num_batches_tracked) == 0
            np.testing.assert_array_equal(layer.running_mean, 0)

    _, errors = Group(3).run(body)
    assert all(isinstance(e, ValueError) for e in errors), errors
    assert "channel" in str(errors[0]) or "rejected" in str(errors[0])


def test_different_channel_counts_raise_on_every_rank():
    def body(rank, gather):
        layer = dist.SyncBatchNorm(3 + rank, allgather=gather)
        layer(np.ones((4, 3 + rank), np.float32))

    _, errors = Group(2).run(body)
    assert all(isinstance(e, ValueError) and "num_features" in str(e) for e in errors), errors


def test_transport_arguments_are_checked():
    with pytest.raises(TypeError, match="allgather"):
        dist.SyncBatchNorm(3, allgather="all")
    with pytest.raises(ValueError, match="reduction"):
        dist.SyncBatchNorm(3, allgather=lambda a: a[None], reduction="allreduce")
    with pytest.raises(ValueError, match="rank"):
        dist.SyncBatchNorm(3, allgather=lambda a: a[None], rank=-1)
    mpi = pytest.importorskip("mpi4py.MPI")
    with pytest.raises(ValueError, match="comm"):
        dist.SyncBatchNorm(3, allgather=lambda a: a[None], comm=mpi.COMM_SELF)
    with pytest.raises(ValueError, match="rank"):
        dist.SyncBatchNorm(3, comm=mpi.COMM_SELF, rank=0)


def test_callable_path_needs_no_mpi4py(tmp_path):
    # a fresh interpreter where mpi4py cannot be imported
    code = ("import sys; sys.modules['mpi4py'] = None\n"
            "import numpy as np\n"
            "from bncore.distributed import SyncBatchNorm\n"
            "x = np.array([[1.0, 2.0], [3.0, 6.0]])\n"
            "layer = SyncBatchNorm(2, dtype=np.float64, allgather=lambda a: a[None])\n"
            "print(layer(x).tolist())\n"
            "try:\n"
            "    SyncBatchNorm(2)\n"
            "except ImportError as e:\n"
            "    print('ImportError', 'mpi4py' in str(e))\n")
    env = dict(os.environ, PYTHONPATH=str(BNCORE_PARENT))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    np.testing.assert_allclose(eval(lines[0]), ref.train(np.array([[1.0, 2.0], [3.0, 6.0]]),
                                                         eps=1e-5)[0], rtol=1e-12)
    assert lines[1] == "ImportError True"


# -- torch.distributed over gloo ----------------------------------------------------------

def _load_torch_script():
    spec = importlib.util.spec_from_file_location(
        "check_torch_allgather", TESTS / "mpi" / "check_torch_allgather.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_torch_allgather_needs_an_initialized_group():
    torch_dist = pytest.importorskip("torch.distributed")
    if torch_dist.is_available() and torch_dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    with pytest.raises(RuntimeError, match="init_process_group"):
        dist.torch_allgather()


@pytest.mark.parametrize("world", [2, 3])
def test_torch_gloo_equals_one_process(tmp_path, world):
    torch_dist = pytest.importorskip("torch.distributed")
    if not torch_dist.is_available():
        pytest.skip("torch.distributed is not available in this build")
    script = _load_torch_script()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        filter(None, [str(BNCORE_PARENT), os.environ.get("PYTHONPATH")])),
        OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    init = tmp_path / "init"
    procs = [subprocess.Popen([sys.executable, str(TESTS / "mpi" / "check_torch_allgather.py"),
                               str(r), str(world), str(init), str(tmp_path)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=env, cwd=tmp_path) for r in range(world)]
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=120)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-4000:]
    saved = [np.load(tmp_path / f"rank{r}.npz") for r in range(world)]
    batches = list(script.batches(world))
    for name, kw in script.VARIANTS.items():
        for dtype in (np.float32, np.float64):
            results = [[tuple(s[f"{name}_{dtype.__name__}_{step}_{k}"] for k in
                              ("y", "dx", "running_mean", "running_var", "grad_weight",
                               "grad_bias")) for step in range(len(batches))] for s in saved]
            check_against_one_process(results, batches, script.C, dtype, kw)


# -- bncore.distributed's public names: docstrings that run --------------------------------

def _distributed_objects():
    out = []
    for name in dist.__all__:
        obj = getattr(dist, name)
        out.append((f"bncore.distributed.{name}", obj))
        if inspect.isclass(obj):
            out += [(f"bncore.distributed.{name}.{a}", m) for a, m in vars(obj).items()
                    if callable(m) and not a.startswith("_")]
            out += [(f"bncore.distributed.{name}.{a}", m.__func__) for a, m in vars(obj).items()
                    if isinstance(m, classmethod)]
    return out


@pytest.mark.parametrize("qualname,obj", _distributed_objects(), ids=lambda v: str(v))
def test_distributed_docstrings_run(qualname, obj):
    docscrape = pytest.importorskip("numpydoc.docscrape")
    doc = (docscrape.ClassDoc if inspect.isclass(obj) else docscrape.FunctionDoc)(obj)
    for section in ("Parameters", "Raises", "Examples"):
        if section == "Parameters" and not [
                p for p in inspect.signature(obj).parameters if p not in ("self", "cls")]:
            continue
        assert doc[section], f"{qualname}: no {section} section"
    source = "\n".join(doc["Examples"])
    if "SyncBatchNorm(2, dtype=np.float64)" in source or "from_batchnorm(bn)" in source:
        pytest.importorskip("mpi4py.MPI")  # the examples' default communicator
    finder = doctest.DocTestFinder(recurse=False)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in finder.find(obj, qualname, globs={"np": np, "bncore": bncore}):
        with np.printoptions(legacy=False):
            result = runner.run(test, out=sys.stdout.write)
        assert result.failed == 0, f"{qualname}: {result.failed} examples failed"


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_out_and_threads_give_the_same_bits(rng, variant, dtype):
    C, kw = 4, VARIANTS[variant]
    x, dy = (rng.standard_normal((9, C, 6)) + 2).astype(dtype), \
        rng.standard_normal((9, C, 6)).astype(dtype)
    results = []
    for nt, use_out in ((None, False), (1, True), (2, True)):
        layer = dist.SyncBatchNorm(C, dtype=dtype, allgather=lambda a: a[None], rank=0, **kw)
        out = np.empty_like(x) if use_out else None
        dx_out = np.empty_like(x) if use_out else None
        y = layer(x, out=out, n_threads=nt)
        dx = layer.backward(dy, out=dx_out, n_threads=nt)
        if use_out:
            assert y is out and dx is dx_out
        results.append((y.copy(), dx.copy(), layer.running_mean, layer.running_var,
                        layer.grad_weight, layer.grad_bias))
    for other in results[1:]:
        for a, c in zip(results[0], other):
            np.testing.assert_array_equal(a, c)


@pytest.mark.parametrize("vbs", [None, 4])
def test_masked_shards_equal_one_process_on_the_concatenated_batch(rng, vbs):
    """Padded shards of different lengths (a mask per rank, some channels
    masked out entirely on a rank, one rank empty): statistics, output, dx,
    parameter gradients and running statistics equal single-process BatchNorm
    with the concatenated mask, on every rank, in the same bits."""
    C, T, sizes = 3, 5, [3, 0, 4, 2]
    xs = [rng.standard_normal((n, C, T)) * 2 + 30 for n in sizes]
    dys = [rng.standard_normal((n, C, T)) for n in sizes]
    masks = [rng.random((n, C, T)) < 0.6 for n in sizes]
    masks[0][:, 2] = False  # channel 2 has no value on rank 0
    kw = dict(dtype=np.float64, momentum=0.3, virtual_batch_size=vbs)

    def body(rank, gather):
        layer = dist.SyncBatchNorm(C, allgather=gather, **kw)
        y = layer(xs[rank], mask=masks[rank])
        dx = layer.backward(dys[rank])
        return (y, dx, layer.grad_weight.copy(), layer.grad_bias.copy(),
                layer.running_mean.copy(), layer.running_var.copy())

    results = run_ranks(sizes, body)
    one = bncore.BatchNorm(C, **kw)
    x, mask = np.concatenate(xs), np.concatenate(masks)
    y = one(x, mask=mask)
    dx = one.backward(np.concatenate(dys))
    cuts = np.cumsum([0] + sizes)
    for r, got in enumerate(results):
        sl = slice(cuts[r], cuts[r + 1])
        np.testing.assert_allclose(got[0], y[sl], rtol=1e-11, atol=1e-11)
        np.testing.assert_allclose(got[1], dx[sl], rtol=1e-9, atol=1e-11)
        assert not got[1][~masks[r]].any()
        for a, b in zip(got[2:], (one.grad_weight, one.grad_bias, one.running_mean,
                                  one.running_var)):
            np.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-12)
        for a, b in zip(got, results[0]):
            if a.ndim == 1:  # the per-channel results: the same bits on every rank
                np.testing.assert_array_equal(a, b)


def test_masked_channel_with_one_value_is_refused_on_every_rank(rng):
    x = [rng.standard_normal((2, 2, 3)) for _ in range(2)]
    masks = [np.zeros((2, 2, 3), bool) for _ in range(2)]
    masks[0][0, 0, 0] = True  # channel 0: one value over all ranks
    masks[0][:, 1] = masks[1][:, 1] = True
    layers = []

    def body(rank, gather):
        layer = dist.SyncBatchNorm(2, allgather=gather, dtype=np.float64)
        layers.append(layer)
        return layer(x[rank], mask=masks[rank])

    _, errors = Group(2).run(body)
    for e in errors:
        assert isinstance(e, ValueError) and "mask" in str(e)
    for layer in layers:
        np.testing.assert_array_equal(layer.running_mean, 0)
        assert int(layer.num_batches_tracked) == 0
