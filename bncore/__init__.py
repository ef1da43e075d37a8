"""bncore: fast, accurate CPU batch normalization for NumPy.

Operations (batch_norm_train, batch_norm_eval, batch_norm_backward and the
building blocks of synchronized batch norm; layer, group, instance and RMS norm;
batch renormalization; folding) and layers (BatchNorm and its variants),
over C kernels with OpenMP. The documentation's "API contract" page states
what every function guarantees.
"""
from ._version import __version__

try:
    from . import _kernels
except ImportError as e:  # an unbuilt source tree
    raise ImportError(
        "bncore's compiled kernels are missing: this is a source folder without a build. "
        "Install with `pip install -e .` (builds them here) or `pip install .` and run "
        "from another folder, or build in place with `python setup.py build_ext --inplace`"
    ) from e

from ._config import show_config
from ._include import get_include
from ._threads import get_num_threads, set_num_threads
from .folding import fold_batch_norm, fold_into_conv, fold_into_conv_transpose, fold_into_linear
from .functional import (batch_norm_backward, batch_norm_backward_elemt,
                         batch_norm_backward_from_output, batch_norm_backward_reduce,
                         batch_norm_elemt, batch_norm_eval, batch_norm_stats, batch_norm_train,
                         merge_stats)
from .interop import (batch_norm_from_flax, batch_norm_from_keras, batch_norm_from_onnx,
                      batch_norm_to_flax, batch_norm_to_keras, batch_norm_to_onnx,
                      batch_norm_to_torch)
from .layers import (BatchNorm, BatchRenorm, FrozenBatchNorm, GroupNorm, InPlaceABN,
                     InstanceNorm, LayerNorm, RecurrentBatchNorm, RMSNorm)
from .norms import (group_norm, group_norm_backward, group_norm_train, instance_norm,
                    instance_norm_backward, instance_norm_train, layer_norm,
                    layer_norm_backward, layer_norm_train, rms_norm, rms_norm_backward,
                    rms_norm_train)
from .onnx_folding import fold_onnx_model
from .precise import PopulationStats, collect_population_stats, precise_batch_norm
from .renorm import batch_renorm_backward, batch_renorm_train

__all__ = [
    "__version__", "show_config", "get_include", "get_num_threads", "set_num_threads",
    "BatchNorm",
    "batch_norm_train", "batch_norm_eval", "batch_norm_backward",
    "batch_norm_stats", "merge_stats", "batch_norm_elemt",
    "batch_norm_backward_reduce", "batch_norm_backward_elemt",
    # the normalization family
    "LayerNorm", "GroupNorm", "InstanceNorm", "BatchRenorm", "RecurrentBatchNorm",
    "layer_norm", "layer_norm_train", "layer_norm_backward",
    "group_norm", "group_norm_train", "group_norm_backward",
    "instance_norm", "instance_norm_train", "instance_norm_backward",
    "batch_renorm_train", "batch_renorm_backward",
    "RMSNorm", "rms_norm", "rms_norm_train", "rms_norm_backward",
    # inference services
    "FrozenBatchNorm", "InPlaceABN", "batch_norm_backward_from_output", "fold_batch_norm",
    "fold_into_linear", "fold_into_conv", "batch_norm_from_keras", "batch_norm_from_onnx",
    "fold_into_conv_transpose", "fold_onnx_model",
    # parameters out to other frameworks (and Flax in)
    "batch_norm_from_flax", "batch_norm_to_torch", "batch_norm_to_keras", "batch_norm_to_flax",
    "batch_norm_to_onnx",
    # population statistics
    "PopulationStats", "collect_population_stats", "precise_batch_norm",
]
