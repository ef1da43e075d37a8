"""fold_into_conv_transpose against a direct float64 transposed convolution
(tests/reference.py, itself checked against PyTorch where installed) and
against torch.nn.functional.conv_transpose1d/2d; the layout distinction from
fold_into_conv (same shape when in == out, different answer); refusals."""
import numpy as np
import pytest

import bncore
import reference as ref

# (in_channels, out_channels, groups): plain, grouped, in == out, in == out
# grouped, depthwise
CHANNELS = [(4, 6, 1), (4, 6, 2), (6, 6, 1), (6, 6, 3), (4, 4, 4)]


def _bn(rng, C, dtype=np.float64):
    """(weight, bias, running_mean, running_var) of an eval-mode batch norm,
    weights of both signs."""
    w = rng.uniform(0.5, 1.5, C) * rng.choice([-1, 1], C)
    return (w.astype(dtype), rng.standard_normal(C).astype(dtype),
            rng.standard_normal(C).astype(dtype), rng.uniform(0.3, 2.0, C).astype(dtype))


def _layer(rng, cin, cout, groups, kernel, dtype):
    W = rng.standard_normal((cin, cout // groups) + kernel).astype(dtype)
    return W, rng.standard_normal(cout).astype(dtype)


# ---- the reference itself ------------------------------------------------------------------

@pytest.mark.parametrize("nd", [1, 2])
def test_reference_matches_torch(rng, nd):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    t = torch.from_numpy
    x = rng.standard_normal((2, 4) + (7, 6)[:nd])
    Wt = rng.standard_normal((4, 3) + (3, 2)[:nd])
    Wc = rng.standard_normal((6, 2) + (3, 2)[:nd])
    b = rng.standard_normal(6)
    ct = F.conv_transpose1d if nd == 1 else F.conv_transpose2d
    cv = F.conv1d if nd == 1 else F.conv2d
    for stride, pad, opad, dil in [(1, 0, 0, 1), (2, 1, 1, 1), (2, 2, 0, 2), (3, 1, 2, 1)]:
        want = ct(t(x), t(Wt), t(b), stride=stride, padding=pad, output_padding=opad,
                  dilation=dil, groups=2).numpy()
        got = ref.conv_transpose_nd(x, Wt, b, stride, pad, opad, dil, groups=2)
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
        want = cv(t(x), t(Wc), t(b), stride=stride, padding=pad, dilation=dil, groups=2).numpy()
        np.testing.assert_allclose(ref.conv_nd(x, Wc, b, stride, pad, dil, groups=2), want,
                                   rtol=1e-12, atol=1e-12)


# ---- folding against the float64 reference -------------------------------------------------

@pytest.mark.parametrize("cin,cout,groups", CHANNELS)
@pytest.mark.parametrize("kernel", [(3,), (3, 2)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_layer_bn_any_geometry(rng, cin, cout, groups, kernel, dtype):
    """BN after the transposed convolution: exact with stride, padding, output
    padding and dilation."""
    W, bias = _layer(rng, cin, cout, groups, kernel, dtype)
    x = rng.standard_normal((2, cin) + (5,) * len(kernel))
    w, b, rm, rv = _bn(rng, cout)
    Wf, bf = bncore.fold_into_conv_transpose(W, bias, *bncore.fold_batch_norm(rm, rv, w, b),
                                             groups=groups)
    assert Wf.shape == W.shape and bf.shape == (cout,) and Wf.dtype == bf.dtype == dtype
    for geom in [dict(), dict(stride=2, padding=1, output_padding=1),
                 dict(stride=2, padding=2, dilation=2)]:
        ct = lambda W_, b_: ref.conv_transpose_nd(x, W_, b_, groups=groups, **geom)
        want = ref.evaluate(ct(W, bias), rm, rv, w, b)
        ref.assert_close(ct(Wf, bf), want, ref.NORM_RTOL[dtype] * 10, f"{geom}")


@pytest.mark.parametrize("cin,cout,groups", CHANNELS)
@pytest.mark.parametrize("kernel,dilation", [((3,), 1), ((3, 2), 1), ((3, 3), 2), ((1, 1), 1)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_bn_layer_exact_geometry(rng, cin, cout, groups, kernel, dilation, dtype):
    """BN before the transposed convolution: exact with stride 1 and the output
    cropped by dilation * (kernel - 1) on both sides (here, or more)."""
    W, bias = _layer(rng, cin, cout, groups, kernel, dtype)
    x = rng.standard_normal((2, cin) + (6,) * len(kernel))
    w, b, rm, rv = _bn(rng, cin)
    Wf, bf = bncore.fold_into_conv_transpose(W, bias, *bncore.fold_batch_norm(rm, rv, w, b),
                                             groups=groups, order="bn_layer")
    assert Wf.dtype == bf.dtype == dtype
    crop = [dilation * (k - 1) for k in kernel]
    for pads in [crop, [(c + 1, c) for c in crop]]:
        ct = lambda x_, W_, b_: ref.conv_transpose_nd(x_, W_, b_, padding=pads,
                                                      dilation=dilation, groups=groups)
        want = ct(ref.evaluate(x, rm, rv, w, b), W, bias)
        ref.assert_close(ct(x, Wf, bf), want, ref.NORM_RTOL[dtype] * 10, f"pads {pads}")


def test_bn_layer_inexact_geometry_is_what_the_docstring_says(rng):
    """Less cropping, stride 2 or output padding: border (or in-between)
    positions see fewer taps than the folded bias assumes; with shift 0 the
    fold is exact anyway."""
    W, bias = _layer(rng, 4, 6, 2, (3, 3), np.float64)
    x = rng.standard_normal((2, 4, 5, 5))
    w, b, rm, rv = _bn(rng, 4)
    scale, shift = bncore.fold_batch_norm(rm, rv, w, b)
    Wf, bf = bncore.fold_into_conv_transpose(W, bias, scale, shift, groups=2, order="bn_layer")
    Wz, bz = bncore.fold_into_conv_transpose(W, bias, scale, np.zeros(4), groups=2,
                                             order="bn_layer")
    xs = x * scale[:, None, None]
    for geom in [dict(padding=1), dict(padding=0), dict(stride=2, padding=2),
                 dict(padding=(2, 2), output_padding=1, dilation=2)]:
        ct = lambda x_, W_, b_: ref.conv_transpose_nd(x_, W_, b_, groups=2, **geom)
        want = ct(ref.evaluate(x, rm, rv, w, b), W, bias)
        err = np.abs(ct(x, Wf, bf) - want).max()
        assert err > 1e-3, f"{geom}: expected the fold to be inexact, max error {err}"
        np.testing.assert_allclose(ct(x, Wz, bz), ct(xs, W, bias), rtol=1e-12, atol=1e-12)


# ---- against PyTorch -----------------------------------------------------------------------

@pytest.mark.parametrize("cin,cout,groups", CHANNELS)
@pytest.mark.parametrize("nd", [1, 2])
@pytest.mark.parametrize("order", ["layer_bn", "bn_layer"])
def test_matches_torch(rng, cin, cout, groups, nd, order):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    t = torch.from_numpy
    ct = F.conv_transpose1d if nd == 1 else F.conv_transpose2d
    W, bias = _layer(rng, cin, cout, groups, (3, 3)[:nd], np.float32)
    x = rng.standard_normal((2, cin) + (9, 7)[:nd]).astype(np.float32)
    C = cout if order == "layer_bn" else cin
    w, b, rm, rv = _bn(rng, C, np.float32)
    bn = lambda v: F.batch_norm(v, t(rm), t(rv), t(w), t(b), training=False, eps=1e-5)
    Wf, bf = bncore.fold_into_conv_transpose(W, bias, *bncore.fold_batch_norm(rm, rv, w, b),
                                             groups=groups, order=order)
    if order == "layer_bn":  # any geometry
        geom = dict(stride=2, padding=1, output_padding=1, groups=groups)
        want = bn(ct(t(x), t(W), t(bias), **geom))
    else:  # stride 1, cropped by kernel - 1
        geom = dict(padding=2, groups=groups)
        want = bn(t(x))
        want = ct(want, t(W), t(bias), **geom)
    got = ct(t(x), t(Wf), t(bf), **geom)
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-4, atol=1e-4)


# ---- the layouts are not interchangeable ---------------------------------------------------

@pytest.mark.parametrize("order", ["layer_bn", "bn_layer"])
def test_fold_into_conv_on_a_transposed_square_weight_is_wrong(rng, order):
    """in == out: a ConvTranspose weight has the shape fold_into_conv accepts,
    and it silently scales the wrong axis; fold_into_conv_transpose is right."""
    C = 5
    W, bias = _layer(rng, C, C, 1, (3, 3), np.float64)
    x = rng.standard_normal((2, C, 6, 6))
    w, b, rm, rv = _bn(rng, C)
    scale, shift = bncore.fold_batch_norm(rm, rv, w, b)
    ct = lambda x_, W_, b_: ref.conv_transpose_nd(x_, W_, b_, padding=2)
    if order == "layer_bn":
        want = ref.evaluate(ct(x, W, bias), rm, rv, w, b)
    else:
        want = ct(ref.evaluate(x, rm, rv, w, b), W, bias)
    Wright, bright = bncore.fold_into_conv_transpose(W, bias, scale, shift, order=order)
    np.testing.assert_allclose(ct(x, Wright, bright), want, rtol=1e-12, atol=1e-12)
    Wwrong, bwrong = bncore.fold_into_conv(W, bias, scale, shift, order=order)  # no error...
    err = np.abs(ct(x, Wwrong, bwrong) - want).max()
    assert err > 0.1 * np.abs(want).max(), f"expected a wrong answer, max error {err}"


# ---- refusals ------------------------------------------------------------------------------

def test_refusals_name_the_layout(rng):
    W = rng.standard_normal((4, 3, 3, 3))  # ConvTranspose: in 4, out 3 (groups 1)
    s, t = np.ones(3), np.zeros(3)
    before = W.copy()
    with pytest.raises(ValueError, match=r"weight: expected a ConvTranspose weight "
                                         r"\(in_channels, out_channels / groups, \*kernel\)"):
        bncore.fold_into_conv_transpose(np.ones((4, 3)), None, s, t)
    with pytest.raises(ValueError, match=r"weight: expected a Conv weight \(out_channels, "
                                         r"in_channels / groups, \*kernel\).*fold_into_conv_"
                                         r"transpose"):
        bncore.fold_into_conv(np.ones((4, 3)), None, s, t)
    with pytest.raises(TypeError, match="weight"):
        bncore.fold_into_conv_transpose(W.astype(int), None, s, t)
    with pytest.raises(ValueError, match="groups: .*in_channels"):
        bncore.fold_into_conv_transpose(W, None, s, t, groups=3)
    with pytest.raises(ValueError, match="order"):
        bncore.fold_into_conv_transpose(W, None, s, t, order="after")
    with pytest.raises(ValueError, match=r"scale: expected shape \(3,\)"):
        bncore.fold_into_conv_transpose(W, None, np.ones(5), t)
    with pytest.raises(ValueError, match=r"shift: expected shape \(3,\)"):
        bncore.fold_into_conv_transpose(W, None, s, np.zeros(4))
    with pytest.raises(ValueError, match=r"scale: expected shape \(4,\)"):  # before: in = 4
        bncore.fold_into_conv_transpose(W, None, s, t, order="bn_layer")
    with pytest.raises(ValueError, match=r"bias: expected shape \(6,\)"):  # out = 2 * 3
        bncore.fold_into_conv_transpose(W, np.ones(3), np.ones(6), np.zeros(6), groups=2)
    # a stated layout that is the other function's names it
    with pytest.raises(ValueError, match="layout: 'OI'.*bncore.fold_into_conv$"):
        bncore.fold_into_conv_transpose(W, None, s, t, layout="OI")
    with pytest.raises(ValueError, match="layout: 'IO'.*bncore.fold_into_conv_transpose"):
        bncore.fold_into_conv(W, None, np.ones(4), np.zeros(4), layout="IO")
    with pytest.raises(ValueError, match="layout: expected 'IO'"):
        bncore.fold_into_conv_transpose(W, None, s, t, layout="IOHW")
    # a transposed weight given to fold_into_conv with BN after it (out = 3 channels, axis 1):
    # the message points at the other layout
    with pytest.raises(ValueError, match="scale: .*ConvTranspose weight.*fold_into_conv_transpose"):
        bncore.fold_into_conv(W, None, s, t)
    with pytest.raises(ValueError, match="scale: .*Conv weight.*fold_into_conv\\?"):
        bncore.fold_into_conv_transpose(W, None, np.ones(4), np.zeros(4))
    np.testing.assert_array_equal(W, before)  # nothing changed the weight
    Wf, bf = bncore.fold_into_conv_transpose(W, None, s, t, layout="IO")  # stated, accepted
    np.testing.assert_array_equal(Wf, W)
    np.testing.assert_array_equal(bf, np.zeros(3))
