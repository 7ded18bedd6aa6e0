"""ds_conadv's training metrics through DeepSpeed's own monitor: the ``"tensorboard"``, ``"csv_monitor"``,
``"wandb"`` (and ``"comet"``) sections of the config.

DeepSpeed's engine writes ``Train/Samples/lr`` (and ``loss_scale`` under fp16) at every optimizer step (before 0.19
also a ``train_loss`` of its own in backward, left out where ds_conadv writes one). The
engines :func:`ds_conadv.initialize` returns add their own figures at the same cadence (every optimizer step,
whatever ``steps_per_print``), through the same ``MonitorMaster.write_events`` (so every enabled section gets
them), on rank 0 only and against the samples trained so far (all ranks together) as DeepSpeed's own events:

* every engine: ``train_loss`` (this rank's, averaged over the step's micro-batches), ``skipped_step`` (1 when
  the optimizer step was skipped for inf/NaN gradients or an fp16 overflow), ``skipped_steps_total``, and with
  ds_conadv's LAMB/LARS ``trust_ratio_min`` / ``_mean`` / ``_max`` over the tensors the trust ratio applies to;
* the ConAdv engine: ``train_clean_loss``, ``train_adv_loss``, ``train_clean_acc``, ``train_adv_acc`` where
  computed, ``conadv_generation_time_ms``, ``conadv_exposed_fraction`` and ``conadv_stale_by``;
* the ABSA engine: ``absa_global_batch``, ``absa_lr``, ``absa_adv_ratio`` per step, ``absa_eigenvalue`` at the
  end of an epoch that measured it.

Cost: none when no section is enabled or on ranks other than 0 (no hook, nothing recorded, no host sync). On
rank 0 with a section enabled: a few device operations per step for the trust-ratio statistics, and one host
sync per optimizer step, when the values are written.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Tuple

import torch

from . import compat
from .zero_layout import find_trust_optimizer

__all__ = ["PREFIX", "MetricsWriter", "attach_step_metrics", "detach_step_metrics"]

#: DeepSpeed's prefix of its per-sample training events (x-axis: samples trained so far)
PREFIX = "Train/Samples/"
#: dropped when NaN: a skipped step applies no trust ratio
_NAN_MEANS_NONE = ("trust_ratio_min", "trust_ratio_mean", "trust_ratio_max")
_MARK = "_ds_conadv_metrics"


class MetricsWriter:
    """Writes one optimizer step's metrics of ``ds_engine`` through its ``MonitorMaster``.

    Inactive (every method returns at once) when the engine has no enabled monitor section or this is not
    rank 0. When active and the engine runs ds_conadv's LAMB/LARS, that optimizer records its trust-ratio
    statistics (:meth:`~ds_conadv.optim.base.TrustRatioOptimizer.take_trust_ratio_stats`)."""

    def __init__(self, ds_engine: Any):
        self.ds = ds_engine
        self.monitor = compat.engine_monitor(ds_engine)
        self.optimizer = None
        self._skipped_before: Optional[Tuple[int, Optional[torch.Tensor]]] = None
        if self.monitor is not None:
            self.optimizer = find_trust_optimizer(getattr(ds_engine, "optimizer", None))
            if self.optimizer is not None:
                self.optimizer.collect_trust_ratio_stats = True
                self.optimizer.take_trust_ratio_stats()  # nothing from before the writer

    @property
    def active(self) -> bool:
        return self.monitor is not None

    def _skip_counters(self) -> Tuple[int, Optional[torch.Tensor]]:
        # DeepSpeed counts its fp16 overflow skips, our optimizer its inf/NaN skips (a device tensor)
        ours = self.optimizer.skipped_steps if self.optimizer is not None else None
        return int(getattr(self.ds, "skipped_steps", 0) or 0), ours

    def begin_step(self) -> None:
        """Call before an optimizer step: the skip counters to compare with afterwards (no host sync)."""
        if self.monitor is None:
            return
        ds_skips, ours = self._skip_counters()
        self._skipped_before = (ds_skips, None if ours is None else ours.detach().clone())

    def write_step(self, values: Dict[str, Any]) -> None:
        """After an optimizer step: ``values`` (name -> float, int, 0-d tensor, or None to leave out) plus the
        skipped-step counts and the trust-ratio statistics of the step."""
        if self.monitor is None:
            return
        ds_now, ours_now = self._skip_counters()
        ds_before, ours_before = self._skipped_before or (ds_now, ours_now)
        self._skipped_before = None
        values = dict(values)
        skipped: Any = float(ds_now - ds_before)
        total: Any = float(ds_now)
        if ours_now is not None:
            skipped = (ours_now - (ours_before if ours_before is not None else ours_now)).float() + skipped
            total = ours_now.float() + total
        values["skipped_step"] = skipped
        values["skipped_steps_total"] = total
        if self.optimizer is not None:
            stats = self.optimizer.take_trust_ratio_stats()
            if stats is not None:
                values.update(trust_ratio_min=stats[0], trust_ratio_mean=stats[1], trust_ratio_max=stats[2])
        self.write(values, skipped_flag="skipped_step")

    def write(self, values: Dict[str, Any], skipped_flag: Optional[str] = None) -> None:
        """Write ``values`` (name -> number, 0-d tensor or None) as ``Train/Samples/<name>`` events at the
        engine's samples so far; the device tensors are read with one host sync."""
        if self.monitor is None:
            return
        names: List[str] = []
        numbers: List[float] = []
        tensor_names: List[str] = []
        tensors: List[torch.Tensor] = []
        for name, value in values.items():
            if value is None:
                continue
            if torch.is_tensor(value):
                tensor_names.append(name)
                tensors.append(value.detach().reshape(()))
            else:
                names.append(name)
                numbers.append(float(value))
        if tensors:
            device = tensors[0].device
            read = torch.stack([t.to(device=device, dtype=torch.float64) for t in tensors]).tolist()
            names += tensor_names
            numbers += read
        samples = compat.global_samples(self.ds)
        events = []
        for name, number in zip(names, numbers):
            if math.isnan(number) and name in _NAN_MEANS_NONE:
                continue
            if name == skipped_flag:
                number = float(number > 0)  # a step is skipped or not, whatever counted it
            events.append((PREFIX + name, number, samples))
        compat.write_events(self.monitor, events)

    def take_over_train_loss(self) -> None:
        """Call when this writer writes ``train_loss``: where DeepSpeed's engine writes its own under that tag
        (before 0.19: in backward, at the samples before the step), the engine's is left out."""
        if self.monitor is not None:
            compat.leave_out_engine_train_loss(self.monitor)


def attach_step_metrics(engine: Any) -> Optional[MetricsWriter]:
    """For a plain DeepSpeed engine (no ConAdv, no ABSA) whose config enables a monitor section, on rank 0: wrap
    the instance's ``backward`` (keeps each loss as a detached device tensor) and ``step`` (after an optimizer
    step writes ``train_loss``, the mean of the losses given to ``backward`` since the last one, with the skip
    counts and trust-ratio statistics). Returns the writer, or None (nothing changed) when inactive."""
    writer = MetricsWriter(engine)
    if not writer.active:
        return None
    if callable(getattr(engine, "train_batch", None)):
        return writer  # a pipeline engine calls backward/step itself and writes its own train_loss
    writer.take_over_train_loss()
    original_backward, original_step = engine.backward, engine.step
    losses: List[torch.Tensor] = []

    def backward(loss: Any, *args: Any, **kwargs: Any) -> Any:
        if torch.is_tensor(loss):
            losses.append(loss.detach())
        return original_backward(loss, *args, **kwargs)

    def step(*args: Any, **kwargs: Any) -> Any:
        steps_before = engine.global_steps
        writer.begin_step()
        result = original_step(*args, **kwargs)
        if engine.global_steps != steps_before:  # an optimizer step (applied or skipped), not a micro-step
            loss = torch.stack([t.float().reshape(()) for t in losses]).mean() if losses else None
            losses.clear()
            writer.write_step({"train_loss": loss})
        return result

    for name, fn in (("backward", backward), ("step", step)):
        setattr(fn, _MARK, True)
        setattr(engine, name, fn)
    return writer


def detach_step_metrics(engine: Any) -> None:
    """Undo :func:`attach_step_metrics` (the ConAdv and ABSA engines write their own metrics)."""
    for name in ("backward", "step"):
        fn = engine.__dict__.get(name)
        if fn is not None and getattr(fn, _MARK, False):
            del engine.__dict__[name]
