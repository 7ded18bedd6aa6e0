"""``hvd.DistributedOptimizer`` with its rebuild checked, and the state broadcast that never steps the optimizer.
Importing this module does not import Horovod."""
from __future__ import annotations

from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch
from torch import nn

from . import compat

__all__ = ["available", "require_horovod", "is_distributed_optimizer", "group_settings", "check_settings_survived",
           "distributed_optimizer", "broadcast_state", "INSTALL_HINT"]

INSTALL_HINT = ("Horovod is not installed: run `bash scripts/install_horovod.sh` (or set DS_CONADV_WITH_HOROVOD=1 "
                "for scripts/test.sh / scripts/run.sh); see docs/horovod.md")


def available() -> bool:
    """Whether ``horovod.torch`` can be imported."""
    try:
        import horovod.torch  # noqa: F401
    except Exception:  # ImportError, or a build against another torch (undefined symbol)
        return False
    return True


def require_horovod():
    """``horovod.torch``, or an ImportError that says how to install it."""
    try:
        import horovod.torch as hvd
    except ImportError as exc:
        raise ImportError(f"{INSTALL_HINT} ({exc})") from exc
    compat.check_version()
    return hvd


def is_distributed_optimizer(optimizer: Any) -> bool:
    return callable(getattr(optimizer, "synchronize", None)) and callable(getattr(optimizer, "skip_synchronize", None))


# ----------------------------------------------------------------------------------------------------------
# hvd.DistributedOptimizer: verified settings
# ----------------------------------------------------------------------------------------------------------
def group_settings(optimizer: torch.optim.Optimizer) -> List[Dict[str, Any]]:
    """Each param group's settings (every key but ``"params"``), copied."""
    return [{k: (v.detach().clone() if torch.is_tensor(v) else v) for k, v in g.items() if k != "params"}
            for g in optimizer.param_groups]


def _same(a: Any, b: Any) -> bool:
    if torch.is_tensor(a) or torch.is_tensor(b):
        return torch.is_tensor(a) and torch.is_tensor(b) and a.shape == b.shape and bool(torch.equal(a.cpu(), b.cpu()))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b  # True != 1 here: a bool flag turned int is a change


def check_settings_survived(before: List[Dict[str, Any]], optimizer: torch.optim.Optimizer) -> None:
    """Raise if ``optimizer``'s groups differ from ``before`` (:func:`group_settings` of the original): a key
    changed, disappeared or appeared. The message names the group and the key."""
    after = optimizer.param_groups
    if len(after) != len(before):
        raise RuntimeError(f"hvd.DistributedOptimizer rebuilt {type(optimizer).__name__} with {len(after)} param "
                           f"groups instead of {len(before)}")
    for i, (old, new) in enumerate(zip(before, after)):
        for key in sorted((set(old) | set(new)) - {"params"}, key=str):
            if key not in new:
                raise RuntimeError(f"param group {i} lost setting {key!r} (was {old[key]!r}) when "
                                   f"hvd.DistributedOptimizer re-ran {type(optimizer).__name__}.__init__")
            if key not in old:
                raise RuntimeError(f"param group {i} gained setting {key!r} = {new[key]!r} when "
                                   f"hvd.DistributedOptimizer re-ran {type(optimizer).__name__}.__init__")
            if not _same(old[key], new[key]):
                raise RuntimeError(
                    f"param group {i} setting {key!r} changed from {old[key]!r} to {new[key]!r} when "
                    f"hvd.DistributedOptimizer re-ran {type(optimizer).__name__}.__init__ with only the param "
                    "groups: keep every setting in the param groups (ds_conadv.optim.LAMB/LARS do)")


def distributed_optimizer(optimizer: torch.optim.Optimizer,
                          named_parameters: Optional[Iterable[Tuple[str, nn.Parameter]]] = None,
                          backward_passes_per_step: int = 1, **hvd_kwargs) -> torch.optim.Optimizer:
    """``hvd.DistributedOptimizer(optimizer, ...)`` with the rebuild checked.

    Horovod returns a new object of a subclass of ``type(optimizer)`` whose ``__init__`` ran again with only
    ``optimizer.param_groups``. This checks that every group setting survived (raises naming the key if not),
    puts the original ``defaults`` back (optimizers that read ``self.defaults`` at step time, like timm's Lamb
    for ``max_grad_norm``, would otherwise silently get the class defaults), and carries over any optimizer
    state the original already had (e.g. loaded from a checkpoint), our ``"ds_conadv"`` extras included.

    The returned optimizer steps on gradients averaged over all ranks (``op=hvd.Average``), so LAMB/LARS take
    their trust ratios, and ``max_grad_norm`` its global norm, on the full averaged gradient. With
    ``backward_passes_per_step=k`` the gradients are the local *sum* of k backwards, averaged over ranks
    (divide the loss by k for a mean, as :class:`HorovodConAdvTrainer` does). Use the *returned* optimizer
    from here on (build the LR scheduler on it).
    """
    hvd = require_horovod()
    if is_distributed_optimizer(optimizer):
        raise ValueError(f"{type(optimizer).__name__} is already a hvd.DistributedOptimizer")
    before = group_settings(optimizer)
    defaults = dict(optimizer.defaults)
    state = optimizer.state_dict() if len(optimizer.state) else None
    wrapped = hvd.DistributedOptimizer(optimizer, named_parameters=named_parameters,
                                       backward_passes_per_step=backward_passes_per_step, **hvd_kwargs)
    check_settings_survived(before, wrapped)
    wrapped.defaults = defaults
    if state is not None:
        wrapped.load_state_dict(state)
    return wrapped


# ----------------------------------------------------------------------------------------------------------
# broadcast
# ----------------------------------------------------------------------------------------------------------
def broadcast_state(model: Optional[nn.Module], optimizer: Optional[torch.optim.Optimizer] = None,
                    root_rank: int = 0, lr_scheduler: Any = None) -> None:
    """Make every rank start from ``root_rank``'s model (parameters *and* buffers, e.g. BN statistics),
    optimizer state (moments, step counters, group settings, our ``"ds_conadv"`` extras such as
    ``skipped_steps``) and LR scheduler state. Call on all ranks, after building the optimizer.

    Unlike ``hvd.broadcast_optimizer_state`` this never steps the optimizer: that function initialises an
    empty state with a zero-gradient ``step()``, which under LAMB/LARS with weight decay is *not* a no-op (the
    trust ratio turns ``wd * p`` into a step of ``lr * p``). The optimizer state travels pickled from the root
    (``hvd.broadcast_object``); the model's tensors are broadcast in place.
    """
    hvd = require_horovod()
    if model is not None:
        hvd.broadcast_parameters(model.state_dict(), root_rank=root_rank)
    is_root = hvd.rank() == root_rank
    if optimizer is not None:
        sd = hvd.broadcast_object(optimizer.state_dict() if is_root else None, root_rank,
                                  name="ds_conadv.optimizer_state")
        if not is_root:
            optimizer.load_state_dict(sd)
    if lr_scheduler is not None:
        sd = hvd.broadcast_object(lr_scheduler.state_dict() if is_root else None, root_rank,
                                  name="ds_conadv.lr_scheduler_state")
        if not is_root:
            lr_scheduler.load_state_dict(sd)


_is_distributed_optimizer = is_distributed_optimizer  # the old private name
