"""Fused LAMB and LARS optimizers (and apex-compatible FusedLAMB / LARC)."""
from .apex_compat import LARC, FusedLAMB
from .backends import BACKENDS, BackendUnavailable, get_kernels
from .base import SegmentLayout, TrustRatioOptimizer
from .factory import OPTIMIZER_NAMES, TORCH_OPTIM_NAMES, create_optimizer
from .groups import param_groups
from .kernel_set import KernelSet
from .lamb import LAMB
from .lars import LARS
from .sharding import is_sharded, mark_sharded, unmark_sharded

__all__ = ["LAMB", "LARS", "FusedLAMB", "LARC", "param_groups", "SegmentLayout", "TrustRatioOptimizer",
           "BACKENDS", "BackendUnavailable", "get_kernels", "KernelSet", "create_optimizer", "OPTIMIZER_NAMES",
           "mark_sharded", "unmark_sharded", "is_sharded",
           "TORCH_OPTIM_NAMES"]
