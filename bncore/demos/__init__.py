"""The demos of ``python -m bncore demo [mnist|renorm|recurrent|layernorm] [options]``:
small NumPy reproductions of what the batch-normalization family's papers claim.

* ``mnist`` (the default): Figure 1 of Ioffe & Szegedy (2015), batch norm.
* ``renorm``: Batch Renormalization (Ioffe 2017) with small and non-i.i.d. batches.
* ``recurrent``: a batch-normalized LSTM (Cooijmans et al. 2016) on sequential MNIST.
* ``layernorm``: layer normalization (Ba et al. 2016) in an LSTM, against batch norm,
  at batch size 1 and on longer sequences.
* ``precise``: exact population statistics against momentum running statistics and
  against an average of batch statistics (PyTorch's update_bn).

Each experiment is a module here; ``common`` holds what they share. They need
the ``demo`` extra: ``pip install "bncore[demo]"`` (matplotlib, tqdm, mlxtend).
"""
import importlib
import sys

EXPERIMENTS = ("mnist", "renorm", "recurrent", "layernorm", "precise")


def main(argv=None):
    """Run the experiment named by ``argv[0]`` (MNIST when it names none) with the
    rest of ``argv`` as its options; return the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    name = argv.pop(0) if argv and argv[0] in EXPERIMENTS else "mnist"
    return importlib.import_module(f"{__name__}.{name}").main(argv)
