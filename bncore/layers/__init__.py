"""Layers: one base class (base.Module) owning mode, state dict, gradients and
the saved forward record; batch norm and its variants; layer/group/instance
norm, RMS norm."""
from .base import Module
from .batch_norm import BatchNorm, BatchRenorm, FrozenBatchNorm, InPlaceABN, RecurrentBatchNorm
from .norms import GroupNorm, InstanceNorm, LayerNorm, RMSNorm

__all__ = ["Module", "BatchNorm", "BatchRenorm", "RecurrentBatchNorm", "InPlaceABN",
           "FrozenBatchNorm", "LayerNorm", "GroupNorm", "InstanceNorm", "RMSNorm"]
