"""Robustness evaluation: accuracy under the configured attack next to a standard untargeted PGD-k.

The configured attack (often AdvProp's one-step random-target PGD) is a training device, not a robustness
measure: a random wrong target is a weak attack, so its accuracy is close to the clean one. The standard figure
is the accuracy under untargeted PGD-k (k >= 10) with a random start, step ``2.5 * epsilon / k`` (Madry et al.),
in the same epsilon-ball and input range as the configured attack.

Evaluation runs the model in eval mode (BN running statistics) through its **main** BN: a dual-BN model is
evaluated, and attacked, as it predicts.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional

import torch
from torch import nn

from ds_conadv.config import ConAdvConfig

from .perturb import call_model, generate, logits_of

__all__ = ["untargeted_pgd_config", "evaluation_attack_config", "robust_accuracy", "robustness_report"]


def evaluation_attack_config(cfg: ConAdvConfig) -> ConAdvConfig:
    """``cfg`` as an evaluation attack: enabled, through the main BN (``dual_bn`` false)."""
    return cfg.model_copy(update={"enabled": True, "dual_bn": False, "loss_mode": "clean+adv"})


def untargeted_pgd_config(cfg: ConAdvConfig, steps: int = 10, step_size: Optional[float] = None,
                          random_start: bool = True) -> ConAdvConfig:
    """Untargeted PGD-``steps`` in the epsilon-ball (and input range / mean / std, or embedding module) of ``cfg``;
    step ``2.5 * epsilon / steps`` unless ``step_size`` is given."""
    if steps < 1:
        raise ValueError(f"PGD steps must be >= 1, got {steps}")
    if cfg.epsilon is None:
        raise ValueError('"conadv.epsilon" is required for a robustness evaluation')
    alpha = step_size if step_size is not None else 2.5 * cfg.epsilon / steps
    data = evaluation_attack_config(cfg).model_dump()
    data.update(attack="pgd", steps=steps, step_size=alpha, random_start=random_start, random_start_prob=None,
                target="untargeted")
    return ConAdvConfig(**data)


@torch.no_grad()
def _predict(model: nn.Module, x: Any) -> torch.Tensor:
    return logits_of(call_model(model, x)).argmax(dim=-1)


def robust_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: Optional[ConAdvConfig],
                    batch_size: int = 500, seed: int = 0, loss_fn: Optional[Callable] = None) -> float:
    """Accuracy of ``model`` (eval mode, main BN) on ``(x, y)`` attacked by ``cfg`` (None = clean accuracy).
    The attack's randomness comes from a generator seeded with ``seed``; the model's mode is restored."""
    from .perturb import adversarial_forward
    was_training = model.training
    model.eval()
    gen = torch.Generator(device=x.device).manual_seed(seed)
    correct = 0
    try:
        for i in range(0, len(y), batch_size):
            xb, yb = x[i:i + batch_size], y[i:i + batch_size]
            if cfg is None:
                pred = _predict(model, xb)
            else:
                adv = generate(model, xb, yb, cfg, generator=gen, loss_fn=loss_fn)
                with torch.no_grad():
                    pred = logits_of(adversarial_forward(model, xb, adv, cfg)).argmax(dim=-1)
            correct += int((pred == yb).sum())
    finally:
        model.train(was_training)
    return correct / max(len(y), 1)


def robustness_report(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: ConAdvConfig, pgd_steps: int = 10,
                      batch_size: int = 500, seed: int = 0, loss_fn: Optional[Callable] = None) -> Dict[str, Any]:
    """Clean accuracy, accuracy under the configured attack and under untargeted PGD-``pgd_steps``."""
    configured = evaluation_attack_config(cfg)
    pgd = untargeted_pgd_config(cfg, pgd_steps)
    return {"clean_acc": robust_accuracy(model, x, y, None, batch_size, seed, loss_fn),
            "configured_attack_acc": robust_accuracy(model, x, y, configured, batch_size, seed, loss_fn),
            "pgd_acc": robust_accuracy(model, x, y, pgd, batch_size, seed, loss_fn),
            "configured_attack": {k: getattr(cfg, k) for k in ("attack", "target", "epsilon", "steps")},
            "pgd": {"steps": pgd_steps, "step_size": pgd.step_size, "epsilon": cfg.epsilon, "random_start": True}}
