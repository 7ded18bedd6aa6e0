"""The ConAdv training step, single process, as overridable hooks (the engines build on it).

One :meth:`ConAdvTrainer.train_batch` call is one step t::

    batch = schedule.next_batch(data_iter)     # x_t, y_t and x̂_t (from w_{t-tau}; generated now if missing)
    forward_backward(x_t, y_t, x̂_t)            # clean (main BN) + adv_weight * adv (adv BN); ONE backward
    start_reduction()                          # engine: launch the gradient all-reduce (no-op here)
    generate_next()                            # x̂_{t+tau} from w_t: input gradients only, runs during the reduction
    finish_reduction()                         # engine: wait for the all-reduce (no-op here)
    optimizer_step()                           # w_{t+1}; zero grads; lr scheduler
    schedule.end_step()

An engine overrides ``backward`` (or ``forward_backward``), ``start_reduction``, ``finish_reduction`` and
``optimizer_step``, and sets :attr:`generation_model` to the bare module (not a DDP wrapper). The generation
never writes ``.grad`` (``torch.autograd.grad`` w.r.t. the inputs only), so it cannot race with the gradients
being reduced, and it runs with the weights of the step (the optimizer has not stepped yet).
"""
from __future__ import annotations

import time
from typing import Any, Callable, Dict, Iterator, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from ds_conadv.config import ConAdvConfig, ConfigError

from .dual_bn import convert_dual_bn, dual_bn_layers, has_plain_batchnorm, use_adversarial_bn
from .perturb import adversarial_forward, call_model, generate, logits_of
from .schedule import ConAdvBatch, ConAdvSchedule, split_batch

__all__ = ["ConAdvTrainer", "prepare_model", "default_loss"]


def default_loss(output: Any, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy on the logits of ``output`` (a tensor, ``.logits``, ``["logits"]`` or ``[0]``)."""
    return F.cross_entropy(logits_of(output), y)


def prepare_model(model: nn.Module, cfg: ConAdvConfig) -> nn.Module:
    """What the model needs before the optimizer is built: dual BN when ConAdv is enabled with ``dual_bn``."""
    if cfg.enabled and cfg.dual_bn:
        return convert_dual_bn(model)
    return model


def _accuracy(output: Any, y: Any) -> Optional[torch.Tensor]:
    try:
        logits = logits_of(output)
    except TypeError:
        return None
    if not torch.is_tensor(y) or y.is_floating_point() or logits.dim() != 2 or y.shape != logits.shape[:1]:
        return None
    return (logits.detach().argmax(dim=-1) == y).float().mean()


def _as_config(cfg: Union[ConAdvConfig, Dict[str, Any], None]) -> ConAdvConfig:
    if cfg is None:
        return ConAdvConfig()
    if isinstance(cfg, ConAdvConfig):
        return cfg
    return ConAdvConfig.from_section(cfg)


class ConAdvTrainer:
    """ConAdv (or DisAdv with tau=0, or vanilla with ``enabled: false``) around a model and an optimizer.

    Args:
        model: the model; with ``dual_bn`` already converted (:func:`prepare_model` / ``convert_dual_bn``)
            before ``optimizer`` was built.
        optimizer: any optimizer (``ds_conadv.optim.LAMB``/``LARS`` included).
        loss_fn: ``loss_fn(output, y) -> scalar``; default cross-entropy on the logits.
        cfg: the ``"conadv"`` section (a :class:`ConAdvConfig` or its dict; None = disabled).
        lr_scheduler: stepped after every optimizer step.
        generator, seed: attack randomness (see :class:`~ds_conadv.conadv.schedule.ConAdvSchedule`).
        steps_per_epoch: lets the schedule know the epoch of future steps (else call :meth:`set_epoch`).
        device: batches are moved there when pulled.
        attack_loss_fn: the loss the attack follows (default: ``loss_fn``).
        split: turns an iterator item into ``(x, y)``.
        micro_batches_per_step: gradient accumulation (an engine's); ``tau`` then counts optimizer steps.
    """

    def __init__(self, model: nn.Module, optimizer: Any, loss_fn: Optional[Callable] = None,
                 cfg: Union[ConAdvConfig, Dict[str, Any], None] = None, *, lr_scheduler: Any = None,
                 generator: Optional[torch.Generator] = None, seed: int = 0, steps_per_epoch: Optional[int] = None,
                 device: Optional[Union[str, torch.device]] = None, attack_loss_fn: Optional[Callable] = None,
                 split: Callable = split_batch, micro_batches_per_step: int = 1):
        self.cfg = _as_config(cfg)
        self.model = model
        self.generation_model = model
        self.optimizer = optimizer
        self.loss_fn = loss_fn or default_loss
        self.attack_loss_fn = attack_loss_fn or self.loss_fn
        self.lr_scheduler = lr_scheduler
        self.device = torch.device(device) if device is not None else None
        self._check_model()
        self.schedule = ConAdvSchedule(self.cfg, generator=generator, seed=seed, steps_per_epoch=steps_per_epoch,
                                       prepare=self.prepare_batch, split=split,
                                       micro_batches_per_step=micro_batches_per_step)
        self.last_batch: Optional[ConAdvBatch] = None

    # ---- checks --------------------------------------------------------------------------------------------
    def _check_model(self) -> None:
        cfg = self.cfg
        if cfg.enabled and cfg.dual_bn and has_plain_batchnorm(self.model):
            raise ConfigError('"conadv.dual_bn" is true but the model has plain BatchNorm layers: call '
                              "ds_conadv.conadv.convert_dual_bn(model) (or prepare_model(model, cfg)) before "
                              'building the optimizer, or set "dual_bn": false')
        if isinstance(self.optimizer, torch.optim.Optimizer):
            known = {id(p) for g in self.optimizer.param_groups for p in g["params"]}
            names = {id(p): n for n, p in self.model.named_parameters()}
            missing = [names[id(p)] for m in dual_bn_layers(self.model) for p in m.adv.parameters()
                       if p.requires_grad and id(p) not in known and id(p) in names]
            if missing:
                raise ValueError(f"the optimizer does not hold the adversarial BN parameters ({', '.join(missing[:4])}"
                                 f"{', ...' if len(missing) > 4 else ''}): convert the model to dual BN before "
                                 "building the optimizer")

    # ---- the step --------------------------------------------------------------------------------------------
    @property
    def step(self) -> int:
        return self.schedule.step

    @property
    def epoch(self) -> int:
        return self.schedule.epoch

    def set_epoch(self, epoch: int) -> None:
        self.schedule.set_epoch(epoch)

    def prepare_batch(self, x: Any, y: Any):
        """Called on every batch pulled from the iterator; moves it to :attr:`device` if one was given."""
        if self.device is None:
            return x, y
        move = (lambda v: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v)
        x = {k: move(v) for k, v in x.items()} if isinstance(x, dict) else move(x)
        return x, move(y)

    def generate(self, x: Any, y: Any, generator: Optional[torch.Generator] = None) -> Any:
        """One generation pass with the current weights (what the schedule calls)."""
        return generate(self.generation_model, x, y, self.cfg, generator=generator, loss_fn=self.attack_loss_fn)

    def train_batch(self, data_iter: Iterator) -> Dict[str, Any]:
        """One training step on the next batch of ``data_iter``; returns its metrics (floats).

        Keys: loss, clean_loss, adv_loss, clean_acc, adv_acc (NaN where not computed), adversarial (bool),
        stale_by (steps; None on a vanilla step), generated_now / generated_ahead (examples generated
        synchronously before the forward / during the reduction), step, epoch, and wall times in seconds:
        time_generate_now, time_forward_backward, time_generate_ahead, time_step, time_total.
        """
        self.model.train()
        t0 = time.perf_counter()
        batch = self.schedule.next_batch(data_iter, self.generate)
        self.last_batch = batch
        t1 = time.perf_counter()
        out = self.forward_backward(batch.x, batch.y, batch.x_adv)
        t2 = time.perf_counter()
        self.start_reduction()
        ahead = self.generate_next()
        t3 = time.perf_counter()
        self.finish_reduction()
        self.optimizer_step()
        self.schedule.end_step()
        t4 = time.perf_counter()
        nan = float("nan")
        metrics = {k: (float(v) if v is not None else nan) for k, v in out.items()}
        metrics.update(adversarial=batch.x_adv is not None, stale_by=batch.stale_by,
                       generated_now=int(batch.generated_now), generated_ahead=ahead, step=batch.step,
                       epoch=batch.epoch, time_generate_now=t1 - t0, time_forward_backward=t2 - t1,
                       time_generate_ahead=t3 - t2, time_step=t4 - t3, time_total=t4 - t0)
        return metrics

    # ---- hooks an engine overrides ------------------------------------------------------------------------
    def forward_backward(self, x: Any, y: Any, x_adv: Any) -> Dict[str, Optional[torch.Tensor]]:
        """Loss of step t and its single backward. Without ``x_adv``: the clean loss only (vanilla). With it:
        ``clean (main BN) + adv_weight * adv (adv BN)`` (divided by ``1 + adv_weight`` with
        ``loss_reduction: "mean"``), or ``adv`` alone for ``loss_mode: "adv"``.
        Returns detached tensors (None where not computed): loss, clean_loss, adv_loss, clean_acc, adv_acc."""
        self.zero_grad()
        cfg = self.cfg
        clean_loss = adv_loss = clean_acc = adv_acc = None
        if x_adv is None or cfg.loss_mode == "clean+adv":
            with use_adversarial_bn(self.model, False):
                clean_out = call_model(self.model, x)
            clean_loss = self.loss_fn(clean_out, y)
            clean_acc = _accuracy(clean_out, y)
        if x_adv is not None:
            adv_out = adversarial_forward(self.model, x, x_adv, cfg)
            adv_loss = self.loss_fn(adv_out, y)
            adv_acc = _accuracy(adv_out, y)
        if adv_loss is None:
            loss = clean_loss
        elif clean_loss is None:
            loss = adv_loss
        else:
            loss = clean_loss + cfg.adv_weight * adv_loss
            if cfg.loss_reduction == "mean":  # a vanilla step's gradient scale: an LR tuned without ConAdv fits
                loss = loss / (1.0 + cfg.adv_weight)
        self.backward(loss)
        d = (lambda t: None if t is None else t.detach())
        return {"loss": d(loss), "clean_loss": d(clean_loss), "adv_loss": d(adv_loss), "clean_acc": clean_acc,
                "adv_acc": adv_acc}

    def _first_micro_batch(self) -> bool:
        return self.schedule.step % self.schedule.micro_batches_per_step == 0

    def _at_boundary(self) -> bool:
        return (self.schedule.step + 1) % self.schedule.micro_batches_per_step == 0

    def zero_grad(self) -> None:
        if self._first_micro_batch():  # gradients accumulate over the micro-batches of one optimizer step
            self.optimizer.zero_grad(set_to_none=True)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.schedule.micro_batches_per_step).backward()

    def start_reduction(self) -> None:
        """Launch the gradient reduction (single process: nothing to do)."""

    def generate_next(self) -> int:
        """Adversarial examples for the look-ahead batches (normally t+tau) with the current weights."""
        return self.schedule.generate_ahead(self.generate)

    def finish_reduction(self) -> None:
        """Wait for the gradient reduction (single process: nothing to do)."""

    def optimizer_step(self) -> None:
        if not self._at_boundary():
            return
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()

    # ---- checkpoint ---------------------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """Model, optimizer, lr scheduler and the ConAdv schedule (between steps). Not included: the global torch
        RNG (dropout, data augmentation) — save ``torch.get_rng_state()`` yourself if the model draws from it."""
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "conadv": self.schedule.state_dict()}
        if self.lr_scheduler is not None:
            state["lr_scheduler"] = self.lr_scheduler.state_dict()
        return state

    def load_state_dict(self, state: Dict[str, Any], map_location: Any = None) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.lr_scheduler is not None and "lr_scheduler" in state:
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.schedule.load_state_dict(state["conadv"], map_location=map_location or self.device)
