"""The one place that names torch's private classes and attributes (torch is required: ``setup.py``'s
``torch>=2.1``; tested with the pinned 2.13). Each has been stable for many releases; if one moves, importing this
module fails naming it, not some distant ``isinstance``.

* ``torch.nn.modules.batchnorm._BatchNorm``, ``instancenorm._InstanceNorm``, ``dropout._DropoutNd``: the common
  bases of the BatchNorm / InstanceNorm / Dropout layers (norm layers get no weight decay; ConAdv's dual BN and the
  Hessian's eval-mode switch find them by these);
* ``LRScheduler``'s ``step`` patch (``_wrapped_by_lr_sched``, ``_opt_called``): :func:`repoint_scheduler`;
* the ``torch.optim`` namespace, where :func:`register_optimizer` puts our classes under names of their own
  (``"ds_conadv.LAMB"``): DeepSpeed builds an ``"optimizer"`` type it does not know as ``getattr(torch.optim,
  type)``, so a plain ``deepspeed.initialize`` (and transformers/accelerate through it) builds ours from the JSON.
"""

from __future__ import annotations

import functools
import weakref
from typing import Any

import torch

# an ImportError here names the class that moved
from torch.nn.modules.batchnorm import _BatchNorm as BatchNormBase
from torch.nn.modules.dropout import _DropoutNd as DropoutBase
from torch.nn.modules.instancenorm import _InstanceNorm as InstanceNormBase

__all__ = ["BatchNormBase", "InstanceNormBase", "DropoutBase", "repoint_scheduler", "register_optimizer"]


def repoint_scheduler(scheduler: Any, optimizer: torch.optim.Optimizer) -> None:
    """Point an LR scheduler built on one optimizer at another that shares its param-group dicts (e.g. the
    rebuild of ``hvd.DistributedOptimizer``): the learning rates already reach it; this also redoes torch's
    ``step`` patch that tells the scheduler the optimizer stepped (else torch warns on every ``scheduler.step()``)."""
    scheduler.optimizer = optimizer
    if not isinstance(scheduler, torch.optim.lr_scheduler.LRScheduler) or hasattr(
        optimizer.step, "_wrapped_by_lr_sched"
    ):
        return
    opt_ref, func = weakref.ref(optimizer), optimizer.step.__func__  # type: ignore[attr-defined]

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        opt = opt_ref()
        opt._opt_called = True  # type: ignore[union-attr]
        return func.__get__(opt, opt.__class__)(*args, **kwargs)

    wrapper._wrapped_by_lr_sched = True  # type: ignore[attr-defined]
    optimizer.step = wrapper  # type: ignore[method-assign]


def register_optimizer(name: str, cls: type) -> None:
    """Make ``getattr(torch.optim, name)`` return ``cls`` (idempotent). A name torch already uses for something
    else is refused: registering must never shadow a torch optimizer."""
    present = getattr(torch.optim, name, None)
    if present is cls:
        return
    if present is not None:
        raise RuntimeError(f"torch.optim already has {name!r} ({present!r}); ds_conadv does not replace it")
    setattr(torch.optim, name, cls)
