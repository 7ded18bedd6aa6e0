"""AdvProp-style dual BatchNorm: clean examples through the main BN, adversarial ones through a twin.

:func:`convert_dual_bn` replaces every ``BatchNorm{1,2,3}d`` / ``SyncBatchNorm`` (any
``torch.nn.modules.batchnorm._BatchNorm``) by a :class:`DualBatchNorm` holding ``main`` (the original module,
same parameters and buffers) and ``adv`` (a copy of it, taken at conversion). A routing flag picks the branch;
it defaults to ``main``, so evaluation and any forward outside :func:`use_adversarial_bn` use the main BN.

* Both branches are trained: the clean forward only touches ``main``, the adversarial forward only ``adv``,
  so each gets the gradient of its own branch (``adv``'s parameters have ``grad is None`` on a step without
  adversarial examples).
* Running statistics stay separate: ``main``'s change only from clean forwards, ``adv``'s only from
  adversarial ones.
* State-dict keys are ``<name>.main.<key>`` and ``<name>.adv.<key>``. A checkpoint of the unconverted model
  (``<name>.weight``, ...) loads too: its BN entries go into both branches.

Convert **before** building the optimizer (and before ``deepspeed.initialize``), so that the ``adv``
parameters are among the optimized ones.
"""
from __future__ import annotations

import contextlib
import copy
from typing import Iterator, List

import torch
from torch import nn
from ds_conadv.torch_compat import BatchNormBase as _BatchNorm

__all__ = ["DualBatchNorm", "convert_dual_bn", "use_adversarial_bn", "dual_bn_layers", "has_plain_batchnorm"]


class DualBatchNorm(nn.Module):
    """Two BatchNorms of the same shape; :attr:`adversarial` routes the forward to ``adv`` instead of ``main``."""

    def __init__(self, bn: _BatchNorm):
        super().__init__()
        if not isinstance(bn, _BatchNorm):
            raise TypeError(f"DualBatchNorm wraps a BatchNorm module, got {type(bn).__name__}")
        self.main = bn
        self.adv = copy.deepcopy(bn)
        for p in self.adv.parameters():
            p.grad = None
        self.adversarial = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adv(x) if self.adversarial else self.main(x)

    def extra_repr(self) -> str:
        return f"routing={'adv' if self.adversarial else 'main'}"

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # a checkpoint of the plain model has <prefix>weight etc.: feed both branches from it
        names = [n for n, _ in self.main.named_parameters(recurse=False)] + \
                [n for n, _ in self.main.named_buffers(recurse=False)]
        for name in names:
            key = prefix + name
            if key in state_dict and prefix + "main." + name not in state_dict:
                value = state_dict.pop(key)
                state_dict[prefix + "main." + name] = value
                state_dict.setdefault(prefix + "adv." + name, value)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


def convert_dual_bn(model: nn.Module) -> nn.Module:
    """Replace every BatchNorm in ``model`` (in place) by a :class:`DualBatchNorm`; returns the model (or the
    wrapper, if ``model`` itself is a BatchNorm). Idempotent: existing DualBatchNorm layers are kept."""
    if isinstance(model, DualBatchNorm):
        return model
    if isinstance(model, _BatchNorm):
        return DualBatchNorm(model)
    for name, child in list(model.named_children()):
        if isinstance(child, DualBatchNorm):
            continue
        if isinstance(child, _BatchNorm):
            setattr(model, name, DualBatchNorm(child))
        else:
            convert_dual_bn(child)
    return model


def dual_bn_layers(model: nn.Module) -> List[DualBatchNorm]:
    return [m for m in model.modules() if isinstance(m, DualBatchNorm)]


def has_plain_batchnorm(model: nn.Module) -> bool:
    """True if ``model`` has a BatchNorm that is not one of the two branches of a DualBatchNorm."""
    inside: set = set()
    for m in dual_bn_layers(model):
        inside.update((id(m.main), id(m.adv)))
    return any(isinstance(m, _BatchNorm) and id(m) not in inside for m in model.modules())


@contextlib.contextmanager
def use_adversarial_bn(model: nn.Module, on: bool = True) -> Iterator[nn.Module]:
    """Route every DualBatchNorm of ``model`` to its ``adv`` branch (``on=True``) or to ``main`` (``on=False``)
    inside the block; the previous routing is restored on exit. A model without DualBatchNorm is unaffected."""
    layers = dual_bn_layers(model)
    before = [m.adversarial for m in layers]
    try:
        for m in layers:
            m.adversarial = bool(on)
        yield model
    finally:
        for m, b in zip(layers, before):
            m.adversarial = b


@contextlib.contextmanager
def frozen_bn_stats(model: nn.Module, frozen: bool = True) -> Iterator[nn.Module]:
    """Inside the block, BatchNorm layers in train mode normalise with the batch statistics (as usual) but do not
    update ``running_mean`` / ``running_var`` / ``num_batches_tracked``; in eval mode they use the running
    statistics as usual. Implemented by clearing ``track_running_stats`` for the block (PyTorch then passes no
    running buffers to ``F.batch_norm`` in train mode); restored on exit."""
    changed = []
    if frozen:
        for m in model.modules():
            if isinstance(m, _BatchNorm) and m.track_running_stats:
                changed.append(m)
    try:
        for m in changed:
            m.track_running_stats = False
        yield model
    finally:
        for m in changed:
            m.track_running_stats = True
