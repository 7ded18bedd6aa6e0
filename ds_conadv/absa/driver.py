"""ABSA's driver: runs :class:`~ds_conadv.absa.ABSASchedule` inside a training loop (DeepSpeed, Horovod, or one
process), measuring the top Hessian eigenvalue with :mod:`ds_conadv.hessian` and applying the decisions.

Per global step (:meth:`ABSADriver.train_batch`): ``gradient_accumulation_steps`` micro-batches of this rank, each
with its first ``floor(adv_ratio · micro)`` examples replaced by adversarial ones (FGSM by default, made with
:func:`ds_conadv.conadv.perturb.generate` against the current weights), one loss on the mixed micro-batch, one
optimizer step at the end. Per epoch (:meth:`ABSADriver.end_epoch`): when the schedule wants it, the top
eigenvalue (power iteration, ``eig_batches`` batches per rank or enough of them for ``eig_samples`` examples, all
ranks' batches together; rank 0's value is broadcast so that every rank takes the same decision), then the
schedule's decision: a larger global batch (more gradient accumulation steps at the same micro batch), the LR
multiplier, the adversarial ratio.

Three front ends share that logic:

* :class:`~ds_conadv.integrations.deepspeed.engine.DeepSpeedABSAEngine` — what ``ds_conadv.initialize`` returns for
  ``"absa": {"enabled": true}``; a
  drop-in for the DeepSpeed engine. The batch grows through ``engine.set_train_batch_size``.
* :class:`~ds_conadv.integrations.horovod.trainers.HorovodABSATrainer` — under ``horovodrun``; the batch grows through
  ``optimizer.set_backward_passes_per_step`` (Horovod 0.28 changes it at run time; no optimizer rebuild).
* :class:`ABSATrainer` — one process, plain PyTorch gradient accumulation.

Learning rate: ABSA multiplies the LR by a factor (the schedule's ``lr``, 1 at the start). Without an LR scheduler
each param group runs at its initial LR times the factor. With one, the factor multiplies the *scheduler's* LR:
the scheduler is wrapped (:class:`ScaledLRScheduler`) so that it always sees, and computes from, its own
unscaled values (chainable torch schedulers read the group's current LR), and the optimizer steps with the scaled
ones. A step-based schedule (warm-up, decay over ``total_num_steps``) keeps counting optimizer steps, of which
ABSA makes fewer per epoch as the batch grows.
"""
from __future__ import annotations

import collections
import csv
import json
import math
import os
import time
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Union

import torch
from torch import nn

from .policy import ABSAConfig, ABSASchedule, accumulation_steps, check_reachable_batches, plot_log
from ds_conadv.config import ConAdvConfig, ConfigError
from ds_conadv.conadv.perturb import call_model, generate, logits_of
from ds_conadv.conadv.schedule import split_batch

__all__ = ["ABSADriver", "ABSATrainer", "ScaledLRScheduler",
           "attack_config", "adversarial_count", "LOG_FIELDS"]

#: columns of ``absa_log.csv`` (one row per epoch, describing the epoch as it was trained)
LOG_FIELDS = ("epoch", "global_batch", "micro_batch", "grad_accum_steps", "lr", "lr_scale", "adv_ratio",
              "adv_examples", "steps", "total_steps", "samples", "eigenvalue", "eig_seconds", "grew", "reason",
              "next_global_batch")

EigData = Union[None, Sequence[Any], Callable[[int], Iterable[Any]]]


def _default_loss(output: Any, y: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits_of(output), y)


def attack_config(absa: ABSAConfig, conadv: Union[ConAdvConfig, Dict[str, Any], None] = None) -> Optional[ConAdvConfig]:
    """The attack that makes ABSA's adversarial examples: the ``"conadv"`` section's attack settings when there is
    one (FGSM by default; its ``input_range``, ``mean``/``std`` geometry), with ``"absa.epsilon"`` overriding its
    epsilon, no dual BN (ABSA trains clean and adversarial examples in one batch, through the same layers).
    ``None`` when no example will ever be adversarial (disabled, or ``adv_ratio`` 0). Raises
    :class:`ConfigError` when ``"conadv"`` is enabled too (two adversarial schemes), when no epsilon is given,
    or for ``"perturb": "embeddings"`` (ABSA replaces inputs)."""
    base = conadv if isinstance(conadv, ConAdvConfig) else ConAdvConfig.from_section(conadv)
    if absa.enabled and base.enabled:
        raise ConfigError('"absa.enabled" and "conadv.enabled" are both true: ABSA makes its own adversarial share '
                          'of each batch; set "conadv.enabled": false (its attack keys, e.g. epsilon and input_range, '
                          "still shape ABSA's attack) or disable ABSA")
    if not absa.enabled or absa.adv_ratio == 0:
        return None
    eps = absa.epsilon if absa.epsilon is not None else base.epsilon
    if eps is None:
        raise ConfigError(f'"absa.epsilon" is required when "absa.adv_ratio" = {absa.adv_ratio} > 0 (or give '
                          '"conadv.epsilon"); the paper uses FGSM with epsilon 0.005 on inputs in range')
    if base.perturb != "inputs":
        raise ConfigError('"conadv.perturb" = "embeddings" does not apply to ABSA, which replaces a share of each '
                          'batch\'s inputs by adversarial ones (allowed: "inputs")')
    fields = base.model_dump()
    fields.update(enabled=False, dual_bn=False, epsilon=eps)
    if fields["attack"] == "fgsm":
        fields["step_size"] = None  # FGSM steps by epsilon: a step size tied to another epsilon would be refused
    return ConAdvConfig.from_section(fields)


def adversarial_count(ratio: float, n: int) -> int:
    """How many of ``n`` examples are adversarial at ``ratio``: ``floor(ratio · n)`` (with a guard against
    ``0.29 · 100 = 28.999…``)."""
    return min(n, max(0, int(math.floor(ratio * n + 1e-9))))


def _move(value: Any, device: Optional[torch.device], dtype: Optional[torch.dtype] = None) -> Any:
    if torch.is_tensor(value):
        if dtype is not None and value.is_floating_point():
            return value.to(device=device, dtype=dtype)
        return value.to(device) if device is not None else value
    if isinstance(value, dict):
        return {k: _move(v, device, dtype) for k, v in value.items()}
    return value


class ScaledLRScheduler:
    """Wraps an LR scheduler so that ABSA's LR factor multiplies what the scheduler sets.

    ``step()`` puts the scheduler's own (unscaled) LRs back into the param groups, steps the scheduler, records
    its new LRs, and writes them times the factor. Everything else (``state_dict``, ``get_last_lr``, ...) is the
    wrapped scheduler's, so checkpoints hold the scheduler's own state."""

    def __init__(self, scheduler: Any, driver: "ABSADriver"):
        self.scheduler = scheduler
        self._driver = driver

    def step(self, *args, **kwargs):
        driver = self._driver
        groups = driver.param_groups
        for group, raw in zip(groups, driver._raw_lrs):
            group["lr"] = raw
        result = self.scheduler.step(*args, **kwargs)
        driver._raw_lrs = [float(g["lr"]) for g in groups]
        driver._apply_lr()
        return result

    def __getattr__(self, name: str) -> Any:
        try:
            scheduler = self.__dict__["scheduler"]
        except KeyError:  # not built yet (copy, unpickling): no forwarding
            raise AttributeError(name) from None
        return getattr(scheduler, name)


class ABSADriver:
    """The ABSA loop, independent of the training backend. Front ends implement the hooks at the end.

    Args:
        cfg: the ``"absa"`` section (:class:`~ds_conadv.absa.ABSAConfig` or its dict).
        loss_fn: ``loss_fn(output, y) -> scalar`` batch mean; the training loss, the attack's loss and the
            Hessian's criterion. Default: cross-entropy on the logits.
        attack: the ``"conadv"`` section (or its :class:`ConAdvConfig`) whose attack settings ABSA uses (see
            :func:`attack_config`); ``None``: FGSM with ``"absa.epsilon"``.
        eig_data: what the eigenvalue is measured on, per rank: ``None`` (default) = the clean part of this rank's
            last ``eig_batches`` micro-batches; a sequence of batches (the first ``eig_batches`` are used every
            time); or ``callable(epoch) -> iterable of batches``. Every rank passes its own share; the Hessian is
            the one of the mean loss over all ranks' batches.
        eigenvalue_fn: ``fn(driver, epoch) -> float`` replaces the measurement (tests, or another estimator; it
            may call :meth:`measure_eigenvalue`). Rank 0's value is used on every rank.
        seed: attack randomness (random targets/starts of a PGD attack); rank r uses ``seed + 1000003 · r``. The
            eigenvalue's power iteration uses ``seed + epoch``.
        log_dir: rank 0 writes ``absa_log.csv`` and ``absa_log.json`` there after every epoch.
    """

    def __init__(self, cfg: Union[ABSAConfig, Dict[str, Any]], loss_fn: Optional[Callable] = None, *,
                 attack: Union[ConAdvConfig, Dict[str, Any], None] = None, eig_data: EigData = None,
                 eigenvalue_fn: Optional[Callable[["ABSADriver", int], float]] = None, seed: int = 0,
                 log_dir: Optional[str] = None):
        self.cfg = cfg if isinstance(cfg, ABSAConfig) else ABSAConfig.from_section(cfg)
        self.loss_fn = loss_fn or _default_loss
        self.attack = attack_config(self.cfg, attack)
        self.eig_data = eig_data
        self.eigenvalue_fn = eigenvalue_fn
        self.seed = int(seed)
        self.log_dir = log_dir
        start = self._initial_global_batch()
        # fail now, not epochs later at the growth that would not divide
        check_reachable_batches(start, self.cfg, self.micro_batch, self.world_size)
        # the schedule's "lr" is ABSA's multiplier on the LRs the optimizer (or its scheduler) has
        self.schedule = ABSASchedule(self.cfg, batch=start, lr=1.0)
        self._raw_lrs: List[float] = [float(g["lr"]) for g in self.param_groups]
        self.generator = torch.Generator().manual_seed(self.seed + 1000003 * self.rank)
        self._eig_buffer: collections.deque = collections.deque(maxlen=self.eig_batches)
        self.epoch = 0
        self.samples = 0  # over all ranks
        self.log: List[Dict[str, Any]] = []
        self.last_info: Dict[str, Any] = {}
        self._reset_epoch_counters()
        self._set_accumulation(self.grad_accum_steps)

    # -- what the schedule decided ---------------------------------------------------------------------------------
    @property
    def global_batch(self) -> int:
        return self.schedule.batch

    @property
    def grad_accum_steps(self) -> int:
        return accumulation_steps(self.schedule.batch, self.micro_batch, self.world_size)

    @property
    def adv_ratio(self) -> float:
        return self.schedule.adv_ratio

    @property
    def lr_scale(self) -> float:
        return self.schedule.lr

    def steps_per_epoch(self, samples_per_epoch: int) -> int:
        """Optimizer steps that an epoch of ``samples_per_epoch`` samples (all ranks together) takes at the current
        global batch (the last partial batch is dropped)."""
        steps = int(samples_per_epoch) // self.global_batch
        if steps < 1:
            raise ValueError(f"an epoch of {samples_per_epoch} samples is smaller than the global batch "
                             f"{self.global_batch}: lower \"absa.max_batch\" or use more data per epoch")
        return steps

    # -- training ----------------------------------------------------------------------------------------------
    def _reset_epoch_counters(self) -> None:
        self._epoch_steps = 0
        self._epoch_adv = 0
        self._epoch_lr: Optional[float] = None

    def _prepare(self, x: Any, y: Any):
        dtype = next(self.module.parameters()).dtype
        # bf16/fp16 engines: inputs in the module's dtype (also for the attack and the Hessian)
        return _move(x, self.device, dtype if dtype in (torch.bfloat16, torch.float16) else None), _move(y, self.device)

    def train_batch(self, data_iter: Iterator) -> Dict[str, Any]:
        """One global step: ``grad_accum_steps`` micro-batches from ``data_iter`` (this rank's stream of
        ``(inputs, labels)``), each with its adversarial share, then one optimizer step. Returns
        ``loss`` (mean over this rank's micro-batches), ``adv_examples`` (this rank), ``global_batch``,
        ``grad_accum_steps``, ``lr`` (param group 0's, used by this step) and ``step`` (optimizer steps so far)."""
        gas = self.grad_accum_steps
        module = self.module
        module.train()
        lr = float(self.param_groups[0]["lr"])
        ratio = self.schedule.adv_ratio if self.attack is not None else 0.0
        loss_sum, adv = 0.0, 0
        for i in range(gas):
            x, y = self._prepare(*split_batch(next(data_iter)))
            if not torch.is_tensor(x) or not x.is_floating_point():
                raise TypeError("ABSA replaces a share of each batch by adversarial inputs: it needs a floating-point "
                                f"input tensor, got {type(x).__name__}")
            k = adversarial_count(ratio, x.shape[0])
            if k:
                # made with the weights of this step, through the model in train mode with its BN running
                # statistics frozen (ds_conadv.conadv.perturb); no parameter gradient is touched
                x_adv = generate(module, x[:k], y[:k], self.attack,  # type: ignore[arg-type]  # set when k > 0
                                 generator=self.generator,
                                 loss_fn=self.loss_fn)
                x_train = torch.cat([x_adv.to(x.dtype), x[k:]])
            else:
                x_train = x
            self._eig_buffer.append((x.detach(), y.detach() if torch.is_tensor(y) else y))
            loss = self._micro_step(x_train, y, i, gas)
            loss_sum += float(loss.detach())
            adv += k
        self.schedule.count_step()
        self.samples += self.global_batch
        self._epoch_steps += 1
        self._epoch_adv += adv
        self._epoch_lr = lr
        return {"loss": loss_sum / gas, "adv_examples": adv, "global_batch": self.global_batch,
                "grad_accum_steps": gas, "lr": lr, "step": self.schedule.steps}

    # -- the eigenvalue ----------------------------------------------------------------------------------------
    @property
    def eig_batches(self) -> int:
        """Micro-batches per rank the eigenvalue is measured on (``"eig_batches"``, or enough for ``"eig_samples"``
        examples over all ranks)."""
        return self.cfg.eig_batches_per_rank(self.micro_batch, self.world_size)

    def _eig_batches(self, epoch: int) -> List[Any]:
        n = self.eig_batches
        if self.eig_data is None:
            batches = list(self._eig_buffer)
        elif callable(self.eig_data):
            batches = []
            for batch in self.eig_data(epoch):
                batches.append(batch)
                if len(batches) == n:
                    break
        else:
            batches = list(self.eig_data)[:n]
        if not batches:
            raise ValueError("no batches to measure the top eigenvalue on: train at least one step before "
                             "end_epoch(), or pass eig_data=")
        return [self._prepare(*split_batch(b)) for b in batches]

    def measure_eigenvalue(self, epoch: int) -> float:
        """The top Hessian eigenvalue (largest magnitude) of the mean training loss over all ranks' eig batches,
        by power iteration (``eig_max_iter`` products at most, relative tolerance ``eig_tol``), in eval mode
        (BN running statistics, no dropout), as HessianFlow does. Every rank must call it; all get the same value."""
        from ds_conadv.hessian import Hessian

        h = Hessian(self._hessian_model(), self.loss_fn, dataloader=self._eig_batches(epoch),
                    seed=self.seed + epoch, progress=False, **self._hessian_kwargs())
        values, _ = h.eigenvalues(top_n=1, max_iter=self.cfg.eig_max_iter, tol=self.cfg.eig_tol)
        self.last_info = {"eigenvalue": values[0], "products": h.last_info.get("products"),
                          "samples": h.num_samples}
        return float(values[0])

    def _agree(self, value: float) -> float:
        # a rank that grew alone would hang in the next all-reduce: every rank decides on rank 0's value
        t = torch.tensor([float(value)], dtype=torch.float64)
        return float(self._comm().broadcast_(t).item())

    # -- the end of an epoch -----------------------------------------------------------------------------------
    def end_epoch(self, epoch: Optional[int] = None) -> Dict[str, Any]:
        """Measure the eigenvalue if the schedule wants it, apply the schedule's decision (batch, LR, adversarial
        ratio), log the epoch and return its row (keys: :data:`LOG_FIELDS`). ``epoch`` (optional) must be the
        driver's own count, which starts at 0 and follows the calls. Call on every rank at every epoch end."""
        if epoch is not None and epoch != self.epoch:
            raise ValueError(f"end_epoch({epoch}) but the driver is at epoch {self.epoch} (it counts end_epoch calls "
                             "from 0, and resumes the count from a checkpoint)")
        epoch = self.epoch
        eig, eig_seconds = None, 0.0
        if self.schedule.wants_eigenvalue(epoch):
            t0 = time.perf_counter()
            value = self.eigenvalue_fn(self, epoch) if self.eigenvalue_fn is not None else \
                self.measure_eigenvalue(epoch)
            eig = self._agree(value)
            eig_seconds = time.perf_counter() - t0
        batch, gas, scale, ratio = self.global_batch, self.grad_accum_steps, self.lr_scale, self.adv_ratio
        lr = self._epoch_lr if self._epoch_lr is not None else float(self.param_groups[0]["lr"])
        decision = self.schedule.end_epoch(epoch, eig)
        if decision.grew:
            self._set_accumulation(self.grad_accum_steps)
        self._apply_lr()
        row = {"epoch": epoch, "global_batch": batch, "micro_batch": self.micro_batch, "grad_accum_steps": gas,
               "lr": lr, "lr_scale": scale, "adv_ratio": ratio if self.attack is not None else 0.0,
               "adv_examples": self._epoch_adv * self.world_size, "steps": self._epoch_steps,
               "total_steps": self.schedule.steps, "samples": self.samples, "eigenvalue": eig,
               "eig_seconds": eig_seconds, "grew": decision.grew, "reason": decision.reason,
               "next_global_batch": self.global_batch}
        self.log.append(row)
        self.epoch += 1
        self._reset_epoch_counters()
        if self.log_dir is not None and self.rank == 0:
            self.write_log(self.log_dir)
        return row

    # -- learning rate -----------------------------------------------------------------------------------------
    def _apply_lr(self) -> None:
        scale = self.schedule.lr
        for group, raw in zip(self.param_groups, self._raw_lrs):
            group["lr"] = raw * scale

    def _wrap_scheduler(self, scheduler: Any) -> Any:
        if scheduler is None or isinstance(scheduler, ScaledLRScheduler):
            return scheduler
        return ScaledLRScheduler(scheduler, self)

    # -- outputs -----------------------------------------------------------------------------------------------
    def write_log(self, folder: str) -> Dict[str, str]:
        """``absa_log.csv`` and ``absa_log.json`` (the rows so far, and the config) in ``folder``."""
        os.makedirs(folder, exist_ok=True)
        paths = {"csv": os.path.join(folder, "absa_log.csv"), "json": os.path.join(folder, "absa_log.json")}
        with open(paths["csv"], "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=LOG_FIELDS)
            writer.writeheader()
            for row in self.log:
                writer.writerow({k: ("" if row[k] is None else row[k]) for k in LOG_FIELDS})
        with open(paths["json"], "w", encoding="utf-8") as f:
            json.dump({"absa": self.cfg.model_dump(), "world_size": self.world_size, "micro_batch": self.micro_batch,
                       "epochs": self.log}, f, indent=1)
        return paths

    def plot(self, path: str, title: Optional[str] = None) -> str:
        """PNG of the log: eigenvalue, global batch, LR, adversarial ratio and optimizer steps per epoch."""
        return plot_log(self.log, path, title)

    # -- state -------------------------------------------------------------------------------------------------
    def absa_state_dict(self) -> Dict[str, Any]:
        """ABSA's own state, between epochs: the schedule, the LR bookkeeping, counters, the log, this rank's
        attack generator and its eig-batch buffer (the last ``eig_batches`` micro-batches: an epoch with fewer
        micro-batches measures on some of the previous epoch's). Model and optimizer are checkpointed by the
        backend."""
        return {"version": 1, "schedule": self.schedule.state_dict(), "raw_lrs": list(self._raw_lrs),
                "epoch": self.epoch, "samples": self.samples, "log": [dict(r) for r in self.log],
                "generator": self.generator.get_state(), "world_size": self.world_size,
                "micro_batch": self.micro_batch, "eig_buffer": list(self._eig_buffer)}

    def load_absa_state_dict(self, state: Dict[str, Any]) -> None:
        for key, mine in (("world_size", self.world_size), ("micro_batch", self.micro_batch)):
            if state[key] != mine:
                raise ValueError(f"the ABSA state was saved with {key} {state[key]}, this run has {mine}: the global "
                                 "batch sequence would differ")
        self.schedule.load_state_dict(state["schedule"])
        self._raw_lrs = [float(v) for v in state["raw_lrs"]]
        self.epoch = int(state["epoch"])
        self.samples = int(state["samples"])
        self.log = [dict(r) for r in state["log"]]
        self.generator.set_state(state["generator"])
        self._reset_epoch_counters()
        self._eig_buffer.clear()
        self._eig_buffer.extend(state.get("eig_buffer", ()))  # absent in states saved before it was kept
        self._set_accumulation(self.grad_accum_steps)
        self._apply_lr()

    # -- hooks of the front ends ---------------------------------------------------------------------------------
    micro_batch: int
    world_size: int
    rank: int
    device: Optional[torch.device]

    @property
    def module(self) -> nn.Module:
        raise NotImplementedError

    @property
    def param_groups(self) -> List[Dict[str, Any]]:
        raise NotImplementedError

    def _initial_global_batch(self) -> int:
        raise NotImplementedError

    def _set_accumulation(self, gas: int) -> None:
        """Make the next optimizer step accumulate ``gas`` micro-batches (called between global steps)."""
        raise NotImplementedError

    def _micro_step(self, x: Any, y: Any, index: int, gas: int) -> torch.Tensor:
        """Forward, loss, backward of micro-batch ``index`` of ``gas``; the optimizer step after the last."""
        raise NotImplementedError

    def _hessian_model(self) -> Any:
        return self.module

    def _hessian_kwargs(self) -> Dict[str, Any]:
        return {}

    def _comm(self):
        from ds_conadv.hessian import make_communicator

        return make_communicator(False)


# ----------------------------------------------------------------------------------------------------------
# DeepSpeed
# ----------------------------------------------------------------------------------------------------------
# ----------------------------------------------------------------------------------------------------------
# one process, and Horovod
# ----------------------------------------------------------------------------------------------------------
class ABSATrainer(ABSADriver):
    """ABSA in one process with plain PyTorch gradient accumulation (each micro-batch's loss divided by the
    accumulation steps, one ``optimizer.step()`` per global step).

    Args:
        model, optimizer: any; ``lr_scheduler`` (optional) is stepped after every optimizer step and wrapped
            in a :class:`ScaledLRScheduler` (use :attr:`lr_scheduler` from here on).
        micro_batch: examples per micro-batch (what the data iterator yields).
        gradient_accumulation_steps: at the start; the starting global batch is micro × this × ranks.
        device: batches move there (default: the model's device).
        Others: :class:`ABSADriver`.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, cfg: Union[ABSAConfig, Dict[str, Any]],
                 micro_batch: int, loss_fn: Optional[Callable] = None, *, lr_scheduler: Any = None,
                 gradient_accumulation_steps: int = 1, device: Optional[Union[str, torch.device]] = None,
                 **kwargs: Any):
        if micro_batch < 1 or gradient_accumulation_steps < 1:
            raise ValueError(f"micro_batch ({micro_batch}) and gradient_accumulation_steps "
                             f"({gradient_accumulation_steps}) must be >= 1")
        self.model = model
        self.optimizer = optimizer
        self.micro_batch = int(micro_batch)
        self._start_gas = int(gradient_accumulation_steps)
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self._setup_ranks()
        super().__init__(cfg, loss_fn, **kwargs)
        self.lr_scheduler = self._wrap_scheduler(lr_scheduler)

    def _setup_ranks(self) -> None:
        self.world_size, self.rank = 1, 0

    @property
    def module(self) -> nn.Module:
        return self.model

    @property
    def param_groups(self) -> List[Dict[str, Any]]:
        return self.optimizer.param_groups

    def _initial_global_batch(self) -> int:
        return self.micro_batch * self._start_gas * self.world_size

    def _set_accumulation(self, gas: int) -> None:
        pass  # the loop reads grad_accum_steps at every step

    def _micro_step(self, x: Any, y: Any, index: int, gas: int) -> torch.Tensor:
        loss = self.loss_fn(call_model(self.model, x), y)
        (loss / gas if gas > 1 else loss).backward()
        if index == gas - 1:
            self._optimizer_step()
        return loss

    def _optimizer_step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad()  # (Horovod's takes no set_to_none; torch defaults to it)
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()

    def _hessian_kwargs(self) -> Dict[str, Any]:
        return {"distributed": False}

    def state_dict(self) -> Dict[str, Any]:
        """Model, optimizer, LR scheduler (its own, unscaled state) and :meth:`absa_state_dict`."""
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "absa": self.absa_state_dict()}
        if self.lr_scheduler is not None:
            state["lr_scheduler"] = self.lr_scheduler.state_dict()
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.lr_scheduler is not None and "lr_scheduler" in state:
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.load_absa_state_dict(state["absa"])
