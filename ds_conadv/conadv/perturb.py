"""Adversarial examples from input gradients only: FGSM and PGD-k, untargeted or random-target.

Every gradient here is ``torch.autograd.grad(loss, [x_adv or delta])``: no ``.backward()``, so no parameter's
``.grad`` is written (and DeepSpeed's/DDP's gradient hooks, which sit on the parameters' grad accumulators, do
not fire). During generation (:func:`generation_mode`):

* the model keeps its mode (the trainer runs it in train mode: BatchNorm normalises with the batch statistics,
  as AdvProp does), but BatchNorm running statistics are **not** updated unless
  ``cfg.update_bn_stats_in_generation``;
* with ``cfg.dual_bn``, every :class:`~ds_conadv.conadv.dual_bn.DualBatchNorm` routes to its ``adv`` branch:
  the examples attack the branch they will be trained through.

Geometry (``perturb == "inputs"``): the L-inf ball of radius ``epsilon`` and the clip range ``input_range``
live in *pixel space*. Without ``mean``/``std``, pixel space is the model's input space. With them, the model
sees ``x = (pixel - mean) / std`` (per channel, dimension 1), so the attack runs in model space with the
per-channel radius ``epsilon / std``, step ``step_size / std`` and bounds ``(lo - mean) / std``,
``(hi - mean) / std`` — exactly the pixel-space attack (``sign`` is invariant to the positive factor 1/std),
without a round trip through pixel space.

* FGSM: ``x_adv = clip(x + epsilon * sign(grad_x L(x, y)))``; random target:
  ``clip(x - epsilon * sign(grad_x L(x, y_target)))``.
* PGD-k: optional random start ``x + U(-epsilon, epsilon)``, applied **per sample** with probability
  ``random_start_prob``; then k times ``x_adv <- clip(proj_ball(x_adv ± step_size * sign(grad)))``.
  With ``steps=1``, ``step_size=epsilon`` and no random start it is bit-for-bit FGSM.
* Random target (``target == "random"``): a label drawn uniformly among the *wrong* classes of each sample,
  once per generation (after the first forward, which gives the number of classes); the attack descends its
  loss (the attack of AdvProp and of the public ConAdv TPU code).

Randomness (random start, its per-sample coin flips, random targets) comes only from the ``generator``
passed in, drawn in this fixed order: start noise (full shape), start coins (one per sample), targets (one per
sample). The generator may live on another device than the data (values are drawn there, then moved).

``perturb == "embeddings"``: the attacked variable is ``delta`` added to the output of the module named
``cfg.embedding_module`` (a forward hook); only the epsilon-ball applies. :func:`generate` then returns
``delta`` (shaped like that output), and :func:`adversarial_forward` re-applies it in the training forward.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ds_conadv.config import ConAdvConfig, ConfigError

from .dual_bn import frozen_bn_stats, use_adversarial_bn

__all__ = ["generate", "fgsm", "pgd", "adversarial_forward", "generation_mode", "embedding_perturbation",
           "random_wrong_labels", "logits_of", "call_model"]

LossFn = Callable[[Any, Any], torch.Tensor]


# ----------------------------------------------------------------------------------------------------------
# small helpers
# ----------------------------------------------------------------------------------------------------------
def call_model(model: nn.Module, x: Any) -> Any:
    """``model(**x)`` for a dict, ``model(*x)`` for a tuple/list, else ``model(x)``."""
    if isinstance(x, dict):
        return model(**x)
    if isinstance(x, (tuple, list)):
        return model(*x)
    return model(x)


def logits_of(output: Any) -> torch.Tensor:
    """The logits in a model output: the tensor itself, ``output.logits``, ``output["logits"]`` or ``output[0]``."""
    if torch.is_tensor(output):
        return output
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, dict) and "logits" in output:
        return output["logits"]
    if isinstance(output, (tuple, list)) and output and torch.is_tensor(output[0]):
        return output[0]
    raise TypeError(f"cannot find logits in a model output of type {type(output).__name__}")


def _default_loss(output: Any, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits_of(output), y)


def _scalar(loss: torch.Tensor) -> torch.Tensor:
    return loss if loss.dim() == 0 else loss.sum()


def _draw_uniform(shape, generator: Optional[torch.Generator], like: torch.Tensor) -> torch.Tensor:
    """U[0, 1) of ``shape`` from ``generator`` (drawn on the generator's device, fp32), as ``like``'s dtype/device."""
    device = generator.device if generator is not None else like.device
    u = torch.rand(shape, generator=generator, device=device, dtype=torch.float32)
    return u.to(device=like.device, dtype=like.dtype)


def random_wrong_labels(y: torch.Tensor, num_classes: int, generator: Optional[torch.Generator] = None
                        ) -> torch.Tensor:
    """For each label, one of the ``num_classes - 1`` other classes, uniformly: ``(y + U{1..C-1}) mod C``."""
    if num_classes < 2:
        raise ValueError(f'target "random" needs at least 2 classes, the model gives {num_classes}')
    if y.dim() != 1 or y.is_floating_point():
        raise ValueError('target "random" needs integer class labels of shape (batch,), got '
                         f"{tuple(y.shape)} {y.dtype}")
    device = generator.device if generator is not None else y.device
    offset = torch.randint(1, num_classes, y.shape, generator=generator, device=device)
    return (y + offset.to(y.device)) % num_classes


def _random_start_mask(n: int, prob: float, generator: Optional[torch.Generator], like: torch.Tensor
                       ) -> torch.Tensor:
    """Per-sample 0/1 of shape (n, 1, ..., 1): which samples start at a random point of the ball."""
    coins = _draw_uniform((n,), generator, like)
    return (coins < prob).to(like.dtype).view((n,) + (1,) * (like.dim() - 1))


class _Geometry:
    """Radius, step and clip bounds in the model's input space (per channel when mean/std are given)."""

    def __init__(self, cfg: ConAdvConfig, x: torch.Tensor):
        eps, alpha = cfg.epsilon, cfg.effective_step_size
        if eps is None:
            raise ConfigError('"conadv.epsilon" is required to generate adversarial examples')
        lo = hi = None
        if cfg.input_range is not None:
            lo, hi = cfg.input_range
        if cfg.mean is not None:
            c = len(cfg.mean)
            if c > 1 and (x.dim() < 2 or x.shape[1] != c):
                raise ConfigError(f'"conadv.mean" has {c} channels but the input has shape {tuple(x.shape)} '
                                  "(channels are dimension 1)")
            shape = (1, c) + (1,) * (x.dim() - 2) if c > 1 else (1,) * max(x.dim(), 1)
            mean = torch.tensor(cfg.mean, dtype=x.dtype, device=x.device).view(shape)
            std = torch.tensor(cfg.std, dtype=x.dtype, device=x.device).view(shape)
            eps, alpha = eps / std, alpha / std
            if lo is not None:
                lo, hi = (lo - mean) / std, (hi - mean) / std
        self.eps, self.alpha, self.lo, self.hi = eps, alpha, lo, hi

    def clip(self, x_adv: torch.Tensor) -> torch.Tensor:
        if self.lo is None:
            return x_adv
        return torch.clamp(x_adv, self.lo, self.hi) if torch.is_tensor(self.lo) else x_adv.clamp(self.lo, self.hi)

    def project(self, x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Into the eps-ball around x, then into the input range."""
        return self.clip(torch.clamp(x_adv, x - self.eps, x + self.eps))


@contextlib.contextmanager
def generation_mode(model: nn.Module, cfg: ConAdvConfig) -> Iterator[nn.Module]:
    """Adversarial BN routing (``cfg.dual_bn``), frozen BN running stats (unless
    ``cfg.update_bn_stats_in_generation``) and grad mode on, for the duration of a generation pass."""
    with torch.enable_grad(), use_adversarial_bn(model, cfg.dual_bn), \
            frozen_bn_stats(model, not cfg.update_bn_stats_in_generation):
        yield model


def _targets(output: Any, y: Any, cfg: ConAdvConfig, generator: Optional[torch.Generator]) -> Tuple[Any, float]:
    """(labels whose loss is followed, direction): untargeted ascends L(y), random-target descends L(y_wrong)."""
    if cfg.target == "random":
        return random_wrong_labels(y, logits_of(output).shape[-1], generator), -1.0
    return y, 1.0


# ----------------------------------------------------------------------------------------------------------
# attacks on inputs
# ----------------------------------------------------------------------------------------------------------
def _check_inputs(x: Any) -> None:
    if not torch.is_tensor(x) or not x.is_floating_point():
        raise TypeError('"conadv.perturb": "inputs" needs a floating-point input tensor; for token ids use '
                        '"perturb": "embeddings" with "embedding_module"')


def fgsm(model: nn.Module, x: torch.Tensor, y: Any, cfg: ConAdvConfig, generator: Optional[torch.Generator] = None,
         loss_fn: Optional[LossFn] = None) -> torch.Tensor:
    """``clip(x + epsilon * sign(grad))`` (untargeted) or ``clip(x - epsilon * sign(grad L(y_target)))``."""
    _check_inputs(x)
    loss_fn = loss_fn or _default_loss
    x = x.detach()
    geo = _Geometry(cfg, x)
    with generation_mode(model, cfg):
        x_var = x.clone().requires_grad_(True)
        output = call_model(model, x_var)
        labels, direction = _targets(output, y, cfg, generator)
        (grad,) = torch.autograd.grad(_scalar(loss_fn(output, labels)), [x_var])
    return geo.clip(x + direction * geo.eps * grad.sign()).detach()


def pgd(model: nn.Module, x: torch.Tensor, y: Any, cfg: ConAdvConfig, generator: Optional[torch.Generator] = None,
        loss_fn: Optional[LossFn] = None) -> torch.Tensor:
    """PGD-k (``cfg.steps``) with step ``cfg.effective_step_size``, per-sample random start with probability
    ``cfg.effective_random_start_prob``, projection to the epsilon-ball and clipping to the input range."""
    _check_inputs(x)
    loss_fn = loss_fn or _default_loss
    x = x.detach()
    geo = _Geometry(cfg, x)
    x_adv = x
    prob = cfg.effective_random_start_prob
    if cfg.random_start:
        noise = _draw_uniform(x.shape, generator, x) * 2 - 1                  # U[-1, 1)
        mask = _random_start_mask(x.shape[0], prob, generator, x)
        x_adv = geo.project(x + noise * geo.eps * mask, x)
    labels = direction = None
    with generation_mode(model, cfg):
        for _ in range(cfg.steps):
            x_var = x_adv.detach().requires_grad_(True)
            output = call_model(model, x_var)
            if labels is None:
                labels, direction = _targets(output, y, cfg, generator)
            (grad,) = torch.autograd.grad(_scalar(loss_fn(output, labels)), [x_var])
            x_adv = geo.project(x_adv.detach() + direction * geo.alpha * grad.sign(), x)
    return x_adv.detach()


# ----------------------------------------------------------------------------------------------------------
# attacks on embeddings
# ----------------------------------------------------------------------------------------------------------
def _embedding_module(model: nn.Module, name: Optional[str]) -> nn.Module:
    if not name:
        raise ConfigError('"conadv.embedding_module" is required when "perturb" is "embeddings"')
    try:
        return model.get_submodule(name)
    except AttributeError:
        names = [n for n, _ in model.named_modules() if n][:20]
        raise ConfigError(f'"conadv.embedding_module" = {name!r}: no such submodule; some of the model\'s '
                          f"modules: {', '.join(names)}") from None


@contextlib.contextmanager
def embedding_perturbation(model: nn.Module, name: str, delta: Optional[torch.Tensor] = None,
                           make_delta: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> Iterator[dict]:
    """Add a perturbation to the output of ``model.<name>`` inside the block (forward hook).

    ``delta`` is added as is; or, when ``delta`` is None, ``make_delta(output)`` creates it at the first forward.
    The yielded dict holds the delta in use under ``"delta"`` (so callers may replace it between forwards).
    """
    module = _embedding_module(model, name)
    state = {"delta": delta}

    def hook(mod, inputs, output):
        if not torch.is_tensor(output):
            raise TypeError(f'"conadv.embedding_module" = {name!r} returns {type(output).__name__}; a tensor is '
                            "needed to add the perturbation to")
        if state["delta"] is None:
            if make_delta is None:
                return output
            state["delta"] = make_delta(output)
        d = state["delta"]
        if d.shape != output.shape:
            raise ValueError(f"embedding perturbation of shape {tuple(d.shape)} does not fit the output of "
                             f"{name!r}, {tuple(output.shape)}: the adversarial example belongs to another batch")
        return output + d

    handle = module.register_forward_hook(hook)
    try:
        yield state
    finally:
        handle.remove()


def _generate_embeddings(model: nn.Module, x: Any, y: Any, cfg: ConAdvConfig, generator: Optional[torch.Generator],
                         loss_fn: LossFn) -> torch.Tensor:
    eps = cfg.epsilon
    if eps is None:
        raise ConfigError('"conadv.epsilon" is required to generate adversarial examples')
    one_step = cfg.attack == "fgsm"
    alpha = eps if one_step else cfg.effective_step_size
    steps = 1 if one_step else cfg.steps
    random_start = cfg.random_start and not one_step

    def make_delta(output: torch.Tensor) -> torch.Tensor:
        out = output.detach()
        if random_start:
            noise = _draw_uniform(out.shape, generator, out) * 2 - 1
            mask = _random_start_mask(out.shape[0], cfg.effective_random_start_prob, generator, out)
            delta = noise * eps * mask
        else:
            delta = torch.zeros_like(out)
        return delta.requires_grad_(True)

    labels = direction = None
    with generation_mode(model, cfg), embedding_perturbation(model, cfg.embedding_module, None, make_delta) as st:
        for _ in range(steps):
            output = call_model(model, x)
            delta = st["delta"]
            if delta is None:
                raise RuntimeError(f'"conadv.embedding_module" = {cfg.embedding_module!r} was not called by the '
                                   "model's forward")
            if labels is None:
                labels, direction = _targets(output, y, cfg, generator)
            (grad,) = torch.autograd.grad(_scalar(loss_fn(output, labels)), [delta])
            delta = torch.clamp(delta.detach() + direction * alpha * grad.sign(), -eps, eps)
            st["delta"] = delta.requires_grad_(True)
    return st["delta"].detach()


# ----------------------------------------------------------------------------------------------------------
# entry points
# ----------------------------------------------------------------------------------------------------------
def generate(model: nn.Module, x: Any, y: Any, cfg: ConAdvConfig, generator: Optional[torch.Generator] = None,
             loss_fn: Optional[LossFn] = None) -> torch.Tensor:
    """The adversarial counterpart of batch ``(x, y)`` for the current weights of ``model``.

    Returns ``x_adv`` (same shape as ``x``) for ``perturb == "inputs"``, or the embedding-space ``delta`` for
    ``perturb == "embeddings"``. ``loss_fn(output, y)`` defaults to cross-entropy on the logits. Pass the bare
    module (``engine.module``), not a DDP wrapper. Parameters' ``.grad`` are never touched.
    """
    loss_fn = loss_fn or _default_loss
    if cfg.perturb == "embeddings":
        return _generate_embeddings(model, x, y, cfg, generator, loss_fn)
    if cfg.attack == "fgsm":
        return fgsm(model, x, y, cfg, generator, loss_fn)
    return pgd(model, x, y, cfg, generator, loss_fn)


def adversarial_forward(model: nn.Module, x: Any, adv: torch.Tensor, cfg: ConAdvConfig) -> Any:
    """The training forward of the adversarial branch: ``model(adv)`` for inputs (``model(x)`` with ``adv`` added
    to the embedding output for embeddings), through the adversarial BN when ``cfg.dual_bn``. Builds the graph
    for the weight gradient as usual; BN running stats update as in any training forward."""
    with use_adversarial_bn(model, cfg.dual_bn):
        if cfg.perturb == "embeddings":
            with embedding_perturbation(model, cfg.embedding_module, adv):
                return call_model(model, x)
        return call_model(model, adv)
