"""Independent float64 NumPy reference for batch normalization (the test oracle)."""
import numpy as np


def _axes(x, axis):
    axis %= x.ndim
    red = tuple(i for i in range(x.ndim) if i != axis)
    shape = [1] * x.ndim
    shape[axis] = -1
    return red, tuple(shape)


def stats(x, axis=1):
    """(count, mean, M2) in float64, two-pass."""
    red, shape = _axes(x, axis)
    x64 = np.asarray(x, dtype=np.float64)
    count = x64.size // x64.shape[axis % x64.ndim] if x64.shape[axis % x64.ndim] else 0
    mean = x64.mean(red) if count else np.zeros(x64.shape[axis])
    m2 = ((x64 - mean.reshape(shape)) ** 2).sum(red)
    return count, mean, m2


def train(x, weight=None, bias=None, axis=1, eps=1e-5):
    """(y, mean, invstd, unbiased var) in float64."""
    red, shape = _axes(x, axis)
    x64 = np.asarray(x, dtype=np.float64)
    count, mean, m2 = stats(x, axis)
    var = m2 / count
    invstd = 1.0 / np.sqrt(var + eps)
    y = (x64 - mean.reshape(shape)) * invstd.reshape(shape)
    if weight is not None:
        y = y * np.asarray(weight, np.float64).reshape(shape)
    if bias is not None:
        y = y + np.asarray(bias, np.float64).reshape(shape)
    return y, mean, invstd, m2 / (count - 1)


def evaluate(x, rm, rv, weight=None, bias=None, axis=1, eps=1e-5):
    red, shape = _axes(x, axis)
    y = (np.asarray(x, np.float64) - np.asarray(rm, np.float64).reshape(shape)) / np.sqrt(
        np.asarray(rv, np.float64).reshape(shape) + eps)
    if weight is not None:
        y = y * np.asarray(weight, np.float64).reshape(shape)
    if bias is not None:
        y = y + np.asarray(bias, np.float64).reshape(shape)
    return y


def backward(dy, x, mean, invstd, weight=None, axis=1, training=True):
    """(dx, dweight, dbias) in float64 from the textbook formulas."""
    red, shape = _axes(x, axis)
    dy64 = np.asarray(dy, np.float64)
    xhat = (np.asarray(x, np.float64) - np.asarray(mean, np.float64).reshape(shape)) * \
        np.asarray(invstd, np.float64).reshape(shape)
    w = np.ones(x.shape[axis]) if weight is None else np.asarray(weight, np.float64)
    dbias = dy64.sum(red)
    dweight = (dy64 * xhat).sum(red)
    k = (w * np.asarray(invstd, np.float64)).reshape(shape)
    if training:
        dx = k * (dy64 - dy64.mean(red, keepdims=True) - xhat * (dy64 * xhat).mean(red, keepdims=True))
    else:
        dx = k * dy64
    return dx, dweight, dbias


def activate(v, activation):
    if activation is None:
        return v
    slope = 0.0 if activation == "relu" else activation[1]
    return np.where(v < 0, v * slope, v)


def activation_grad(dy, y, activation):
    if activation is None:
        return dy
    slope = 0.0 if activation == "relu" else activation[1]
    return np.where(y > 0, dy, dy * slope)


def numeric_grad(loss, arr, h=1e-6):
    """Central finite differences of the scalar loss() with respect to arr,
    perturbing arr in place one element at a time."""
    num = np.empty_like(arr)
    for i in np.ndindex(arr.shape):
        old = arr[i]
        arr[i] = old + h
        up = loss()
        arr[i] = old - h
        num[i] = (up - loss()) / (2 * h)
        arr[i] = old
    return num
