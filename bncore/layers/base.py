"""The one layer base class.

A layer validates everything, then changes state: `forward` calls the
subclass's `_forward(x, out, n_threads)`, which checks its arguments before
any running statistic moves and returns (y, record); only then is the record
(what `backward` needs) stored. `backward` calls `_backward(dy, record,
out, n_threads) -> (dx, dweight, dbias)` and only then sets grad_weight and
grad_bias. State dicts use PyTorch's keys and are checked whole (keys,
shapes, dtypes, count ranges) before anything is assigned.
"""
import numpy as np

from .. import _checks as chk

__all__ = ["Module"]


class Module:
    """Base of bncore's layers: train/eval, __call__, state_dict, gradients."""

    training = True
    weight = bias = None
    grad_weight = grad_bias = None
    _saved = None

    def _setup(self, dtype, eps):
        self.dtype = chk.dtype(dtype)
        self.eps = chk.real(eps, "eps", 0.0)
        self.training = True
        self.grad_weight = self.grad_bias = None
        self._saved = None

    def train(self, mode=True):
        self.training = bool(mode)
        return self

    def eval(self):
        return self.train(False)

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def forward(self, x, *, out=None, n_threads=None):
        y, record = self._forward(x, out, n_threads)
        self._saved = record
        return y

    def backward(self, dy, *, out=None, n_threads=None):
        """dx of the most recent forward; sets grad_weight and grad_bias."""
        dx, dw, db = self._backward(dy, self._record(), out, n_threads)
        self._set_grads(dw, db)
        return dx

    def _record(self):
        if self._saved is None:
            raise RuntimeError("backward: no forward call to differentiate; call forward first")
        return self._saved

    def _set_grads(self, dw, db, accumulate=False):
        for name, g in (("weight", dw), ("bias", db)):
            p = getattr(self, name)
            if p is None:
                continue
            g = np.asarray(g).astype(p.dtype).reshape(p.shape)
            if accumulate:
                getattr(self, "grad_" + name)[...] += g
            else:
                setattr(self, "grad_" + name, g)

    # ---- state -------------------------------------------------------------------------

    def _state_names(self):
        return [k for k in ("weight", "bias") if getattr(self, k) is not None]

    def state_dict(self):
        """Copies of the parameters and buffers under PyTorch's keys."""
        return {k: np.array(getattr(self, k)) for k in self._state_names()}

    def load_state_dict(self, state, strict=True):
        """Loads arrays (or anything np.asarray takes, e.g. CPU torch tensors).

        Everything is checked before anything is assigned."""
        names = self._state_names()
        chk.state_keys(state, names, strict)
        staged = {k: chk.state_entry(k, state[k], getattr(self, k)) for k in names if k in state}
        self._assign(staged)

    def _assign(self, staged):
        for k, v in staged.items():
            getattr(self, k)[...] = v
