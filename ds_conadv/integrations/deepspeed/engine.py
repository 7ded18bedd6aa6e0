"""The ConAdv engine on top of a DeepSpeed engine: the generation pass runs while gradients are reduced.

Why a thread, not DeepSpeed's ``overlap_comm``: the generation of x̂_{t+τ} needs only the weights of step t,
which do not change until ``engine.step()``. On GPU, ZeRO's ``overlap_comm`` puts bucketed reductions on a side
stream but waits for them inside ``engine.backward`` (the backward epilogue); on CPU/gloo every DeepSpeed
collective is a blocking call inside ``engine.backward``. Either way the caller gets control back only after the
reduction. So the engine runs ``engine.backward(loss)`` — backward compute *and* DeepSpeed's own reduction, at
ZeRO 0, 1 or 2, with gradient accumulation and bf16 as configured — on a worker thread, and generates the next
adversarial examples on the calling thread meanwhile (torch and gloo release the GIL; on GPU the generation is
put on its own CUDA stream). Then it joins the thread and steps. Nothing of DeepSpeed's reduction is
re-implemented, so every ZeRO stage reduces exactly as it does without ConAdv.

When the generation starts (``generation_start``): by default (``"reduction"``) once the worker thread enters
DeepSpeed's backward epilogue, i.e. the backward compute is done and the reduction begins. Starting it together
with the backward (``"backward"``) makes the two passes compete for the GIL (each op dispatch of one thread
waits for the other's Python), for the CPU cores and, on GPU, for the autograd engine's one device thread and
the SMs: measured in ``benchmarks/conadv_overlap.py --compare-start`` (docs/benchmarks.md).

The generation pass cannot race with the reduction: it takes ``torch.autograd.grad`` w.r.t. the inputs only
(no ``.grad`` is written, no gradient hook fires) and freezes BN running statistics. ZeRO 3 gathers parameters
with collectives inside the forward, which must not interleave with the backward's: there the generation runs
after the backward (no overlap; documented, not hidden).
"""
from __future__ import annotations

import math
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, Union

import torch
from torch import nn

from ds_conadv.absa.driver import ABSADriver
from ds_conadv.absa.policy import ABSAConfig
from ds_conadv.conadv.perturb import call_model
from ds_conadv.conadv.trainer import ConAdvTrainer
from ds_conadv.config.sections import ConAdvConfig, ConfigError

from . import compat
from .monitor import MetricsWriter, detach_step_metrics

__all__ = ["EngineWrapper", "DeepSpeedConAdvEngine", "DeepSpeedABSAEngine"]


class EngineWrapper:
    """What the ConAdv and ABSA engines share: a drop-in for the DeepSpeed engine they wrap (``self.ds``; every
    attribute they do not have is the engine's, ``engine(x)`` calls it) and a per-rank side file next to
    DeepSpeed's checkpoint (``<save_dir>/<tag>/<prefix>_rank<r>.pt``)."""

    ds: Any

    def _wrap(self, ds_engine: Any) -> None:
        if isinstance(ds_engine, EngineWrapper):
            raise TypeError(f"{type(ds_engine).__name__} already wraps a DeepSpeed engine: pass the DeepSpeed engine "
                            "itself (ConAdv's engine and ABSA do not combine)")
        self.ds = ds_engine
        detach_step_metrics(ds_engine)  # this engine writes its own metrics (monitor sections)
        self.metrics_writer = MetricsWriter(ds_engine)
        self.metrics_writer.take_over_train_loss()  # the ConAdv and ABSA engines write train_loss

    @property
    def wrapped_engine(self) -> Any:
        """The DeepSpeed engine inside (e.g. for :func:`ds_conadv.hessian.hvp.unwrap_model`)."""
        return self.__dict__["ds"]

    def __getattr__(self, name: str) -> Any:
        # only called for attributes this object does not have
        try:
            ds = self.__dict__["ds"]
        except KeyError:  # not built yet (copy, unpickling): no forwarding
            raise AttributeError(name) from None
        return getattr(ds, name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.ds(*args, **kwargs)

    @staticmethod
    def zero_stage(ds_engine: Any) -> int:
        return int(ds_engine.zero_optimization_stage()) if ds_engine.zero_optimization() else 0

    def _side_file(self, folder: str, tag: Optional[str], prefix: str, saving: bool) -> str:
        if tag is None:
            if saving:
                tag = f"global_step{self.ds.global_steps}"
            else:
                with open(os.path.join(folder, "latest"), encoding="utf-8") as f:
                    tag = f.read().strip()
        return os.path.join(folder, str(tag), f"{prefix}_rank{self.ds.global_rank}.pt")


class DeepSpeedConAdvEngine(EngineWrapper, ConAdvTrainer):
    """``ds_conadv.initialize`` returns this when the config has a ``"conadv"`` section.

    ``engine.train_batch(data_iter)`` runs one *global* step: ``gradient_accumulation_steps`` micro-batches pulled
    from ``data_iter`` (τ counts optimizer steps; ``steps_per_epoch`` counts micro-batches), each with its
    clean+adversarial loss, and one optimizer step at the boundary. Everything else (``engine(x)``, ``backward``,
    ``step``, ``save_checkpoint``, ``module``, ...) is the DeepSpeed engine's, so the object is a drop-in for it.
    ``enabled: false`` gives vanilla DeepSpeed training.
"""

    GENERATION_STARTS = ("reduction", "backward")

    def __init__(self, ds_engine, cfg: ConAdvConfig, loss_fn: Optional[Callable] = None, *,
                 overlap: Optional[bool] = None, seed: int = 0, steps_per_epoch: Optional[int] = None,
                 generation_start: str = "reduction"):
        if generation_start not in self.GENERATION_STARTS:
            raise ValueError(f"generation_start={generation_start!r}: expected one of {self.GENERATION_STARTS}")
        self._wrap(ds_engine)
        self.generation_start = generation_start
        stage = self.zero_stage(ds_engine)
        self.overlap = (stage < 3) if overlap is None else bool(overlap)
        if self.overlap and stage >= 3:
            raise ValueError("ConAdv overlap under ZeRO stage 3 would interleave the generation's parameter "
                             "all-gathers with the backward's collectives; use stage 0-2 or overlap=False")
        if self.overlap:
            sync_bn = [name for name, m in ds_engine.module.named_modules()
                       if isinstance(m, torch.nn.SyncBatchNorm)]
            if sync_bn:
                raise ConfigError(
                    f"SyncBatchNorm layers ({', '.join(sync_bn[:3])}{', ...' if len(sync_bn) > 3 else ''}) with the "
                    "ConAdv overlap: their all-reduces (generation on the main thread) and the gradient reduction "
                    "(on the backward thread) would share the process group in no agreed order across ranks; "
                    "use BatchNorm (ConAdv's dual BN keeps per-rank statistics, as the paper) or overlap=False")
        # the process group's rank (a launcher's RANK variable need not be set, e.g. under mpirun)
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else int(os.environ.get("RANK", "0"))
        super().__init__(ds_engine, ds_engine, loss_fn, cfg, seed=seed + 1000003 * rank,
                         steps_per_epoch=steps_per_epoch, device=ds_engine.device,
                         micro_batches_per_step=int(ds_engine.gradient_accumulation_steps()))
        self.generation_model = ds_engine.module
        self._worker: Optional[ThreadPoolExecutor] = None
        self._pending: Optional[Future] = None
        self._stream = torch.cuda.Stream(device=ds_engine.device) if ds_engine.device.type == "cuda" else None
        self.last_timings: Dict[str, float] = {}
        self._generating_ahead = False
        self._sync_generation_s = 0.0
        # set by the worker when the backward compute is over (DeepSpeed's epilogue = the reduction begins)
        self._reduction_started = threading.Event()
        self._reduction_started.set()
        self.epilogue_hooked = False
        if self.overlap:
            self._signal_epilogue()

    def _signal_epilogue(self) -> None:
        """Wake the generation when ``engine.backward`` has finished the autograd pass and starts the gradient
        reduction (DeepSpeed's backward epilogue, hooked through :mod:`.compat`). A DeepSpeed without that hook
        warns there (:class:`~.compat.DeepSpeedCompatWarning`); the generation then waits for the whole
        ``engine.backward`` (``self.epilogue_hooked`` is False)."""
        self.epilogue_hooked = compat.hook_backward_epilogue(self.ds, self._reduction_started.set,
                                                             self._record_reduction)

    def _record_reduction(self, seconds: float) -> None:
        # the reduction's wall time on the worker (host-side on GPU): what the generation can hide in
        self.last_timings["reduction"] = seconds

    # -- the step ------------------------------------------------------------------------------------------
    def prepare_batch(self, x: Any, y: Any):
        x, y = super().prepare_batch(x, y)
        dtype = next(self.ds.module.parameters()).dtype
        if torch.is_tensor(x) and x.is_floating_point() and x.dtype != dtype:
            x = x.to(dtype)  # bf16/fp16 engines: inputs in the module's dtype (also for the generation pass)
        return x, y

    def zero_grad(self) -> None:
        pass  # DeepSpeed owns the gradients and clears them in engine.step()

    def backward(self, loss: torch.Tensor) -> None:
        if not self.overlap or not self.schedule.ahead_due():
            # nothing to generate beside this reduction (vanilla, DisAdv, outside the window): no hand-off to
            # the worker thread, whose round trip would only add to the step
            self.ds.backward(loss)
            return
        if self._worker is None:  # one long-lived thread: no thread start per step
            self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ds_conadv-backward")
        # backward compute + DeepSpeed's reduction (at the boundary); an exception re-raises in finish_reduction
        self._reduction_started.clear()
        self._pending = self._worker.submit(self._backward_on_worker, loss)

    def _backward_on_worker(self, loss: torch.Tensor) -> None:
        try:
            self.ds.backward(loss)
        finally:
            self._reduction_started.set()  # never leave the generation waiting (errors, no epilogue)

    def generate(self, x: Any, y: Any, generator: Optional[torch.Generator] = None) -> Any:
        if self._generating_ahead:
            return super().generate(x, y, generator)
        t = time.perf_counter()  # a synchronous generation (start-up, DisAdv, a gap): all of it exposed
        try:
            return super().generate(x, y, generator)
        finally:
            self._sync_generation_s += time.perf_counter() - t

    def generate_next(self) -> int:
        self._generating_ahead = True
        try:
            return self._generate_next()
        finally:
            self._generating_ahead = False

    def _generate_next(self) -> int:
        if self.generation_start == "reduction" and self._pending is not None:
            t = time.perf_counter()
            self._reduction_started.wait()
            self.last_timings["wait_backward_compute"] = time.perf_counter() - t
        if self._stream is None:
            return super().generate_next()
        self._stream.wait_stream(torch.cuda.current_stream(self.ds.device))
        with torch.cuda.stream(self._stream):
            made = super().generate_next()
        torch.cuda.current_stream(self.ds.device).wait_stream(self._stream)
        return made

    def finish_reduction(self) -> None:
        if self._pending is not None:
            t = time.perf_counter()
            pending, self._pending = self._pending, None
            pending.result()
            self.last_timings["wait_reduction"] = time.perf_counter() - t

    def optimizer_step(self) -> None:
        self.ds.step()  # clipping, optimizer (at the boundary), zero grads, lr scheduler: all DeepSpeed's

    def train_batch(self, data_iter) -> Dict[str, Any]:
        """One global step (``gradient_accumulation_steps`` micro-batches); returns the last micro-batch's
        metrics with ``loss`` averaged over the micro-batches, ``global_step``, and over the step's micro-batches
        ``time_generation`` (wall seconds of the generation passes, look-ahead and synchronous) and
        ``exposed_fraction`` (the share of it not hidden behind the gradient reduction; None without a
        generation; see :meth:`_generation_timing`)."""
        gas = self.ds.gradient_accumulation_steps()
        losses = []
        generation = exposed = 0.0
        self.metrics_writer.begin_step()
        for _ in range(gas):
            self.last_timings.pop("reduction", None)
            self.last_timings.pop("wait_backward_compute", None)
            self._sync_generation_s = 0.0
            metrics = super().train_batch(data_iter)
            losses.append(metrics["loss"])
            spent, hidden = self._generation_timing(metrics)
            generation += spent
            exposed += spent - hidden
        metrics["loss"] = sum(losses) / len(losses)
        metrics["global_step"] = self.ds.global_steps
        metrics["time_generation"] = generation
        metrics["exposed_fraction"] = exposed / generation if generation > 0 else None
        if self.metrics_writer.active:
            self._write_metrics(metrics)
        return metrics

    def _generation_timing(self, metrics: Dict[str, Any]) -> Tuple[float, float]:
        """(generation seconds, seconds of it hidden) of one micro-batch. The look-ahead pass starts when the
        reduction starts and is hidden for as long as the reduction lasted (DeepSpeed's backward epilogue on the
        worker thread); a synchronous generation (start-up, DisAdv, no overlap) is hidden not at all. The estimate
        cannot see how much the generation slows the reduction running beside it: benchmarks/conadv_overlap.py
        measures that against a run without generation."""
        now = self._sync_generation_s
        ahead = 0.0
        if metrics["generated_ahead"]:
            waited = self.last_timings.get("wait_backward_compute", 0.0)  # for the backward compute, not generating
            ahead = max(0.0, float(metrics["time_generate_ahead"]) - waited)
        hidden = min(ahead, self.last_timings.get("reduction", 0.0)) if self.overlap else 0.0
        return now + ahead, hidden

    def _write_metrics(self, metrics: Dict[str, Any]) -> None:
        adversarial = bool(metrics["adversarial"])
        clean = not adversarial or self.cfg.loss_mode == "clean+adv"

        def known(key: str, computed: bool) -> Optional[float]:
            value = metrics.get(key)
            return None if not computed or value is None or math.isnan(value) else float(value)

        generation = metrics["time_generation"]
        self.metrics_writer.write_step({
            "train_loss": metrics["loss"],
            "train_clean_loss": known("clean_loss", clean), "train_adv_loss": known("adv_loss", adversarial),
            "train_clean_acc": known("clean_acc", clean), "train_adv_acc": known("adv_acc", adversarial),
            "conadv_generation_time_ms": generation * 1e3 if generation > 0 else None,
            "conadv_exposed_fraction": metrics["exposed_fraction"],
            "conadv_stale_by": metrics["stale_by"],
        })

    # -- checkpoints ---------------------------------------------------------------------------------------
    def save_checkpoint(self, save_dir: str, tag: Optional[str] = None, client_state: Optional[dict] = None,
                        **kwargs):
        """DeepSpeed's checkpoint plus, per rank, the ConAdv schedule (pending adversarial batches, generator)."""
        ok = self.ds.save_checkpoint(save_dir, tag=tag, client_state=client_state or {}, **kwargs)
        torch.save(self.schedule.state_dict(), self._side_file(save_dir, tag, "conadv", saving=True))
        return ok

    def load_checkpoint(self, load_dir: str, tag: Optional[str] = None, **kwargs):
        result = self.ds.load_checkpoint(load_dir, tag=tag, **kwargs)
        path = self._side_file(load_dir, tag, "conadv", saving=False)
        self.schedule.load_state_dict(torch.load(path, weights_only=False), map_location=self.ds.device)
        return result


class DeepSpeedABSAEngine(EngineWrapper, ABSADriver):
    """ABSA on a DeepSpeed engine (ZeRO 0/1/2); ``ds_conadv.initialize`` returns it when the config has
    ``"absa": {"enabled": true}``. A drop-in for the engine: ``engine(x)``, ``module``, ``backward``, ``step``,
    ``get_lr`` ... are DeepSpeed's. Use::

        for epoch in range(epochs):
            for _ in range(engine.steps_per_epoch(samples_per_epoch)):
                engine.train_batch(data_iter)          # this rank's micro-batches
            engine.end_epoch()

    The starting global batch is the config's ``train_batch_size``; growth calls ``set_train_batch_size`` (the
    micro batch stays, gradient accumulation steps grow). The driver sets the accumulation boundary itself
    (``set_gradient_accumulation_boundary``): DeepSpeed's own rule, ``(micro_steps + 1) % gas == 0`` over the
    micro-steps since the start of the run, would end the first step after a growth early whenever the
    micro-steps so far are not a multiple of the new ``gas``. The engine's LR scheduler, if any, is wrapped in a
    :class:`ScaledLRScheduler`. Other arguments: :class:`ABSADriver`.
    """

    def __init__(self, ds_engine: Any, cfg: Union[ABSAConfig, Dict[str, Any]], loss_fn: Optional[Callable] = None,
                 **kwargs: Any):
        self._wrap(ds_engine)
        stage = self.zero_stage(ds_engine)
        if stage >= 3:
            raise ConfigError('"absa" needs ZeRO stage 0, 1 or 2: the eigenvalue needs the full parameters on every '
                              f"rank, stage {stage} partitions them")
        self.micro_batch = int(ds_engine.train_micro_batch_size_per_gpu())
        self.world_size = int(ds_engine.dp_world_size)
        self.rank = int(getattr(ds_engine, "global_rank", 0))
        self.device = ds_engine.device
        self._managed = bool(getattr(ds_engine, "managed_gradient_accumulation", lambda: True)())
        super().__init__(cfg, loss_fn, **kwargs)
        ds_engine.lr_scheduler = self._wrap_scheduler(ds_engine.lr_scheduler)

    @property
    def module(self) -> nn.Module:
        return self.ds.module

    @property
    def param_groups(self) -> List[Dict[str, Any]]:
        return self.ds.optimizer.param_groups

    def _initial_global_batch(self) -> int:
        return int(self.ds.train_batch_size())

    def _set_accumulation(self, gas: int) -> None:
        batch = gas * self.micro_batch * self.world_size
        if batch != self.ds.train_batch_size():
            self.ds.set_train_batch_size(batch)
        inner: Any = getattr(self.ds, "optimizer", None)
        if hasattr(inner, "gradient_accumulation_steps"):  # ZeRO 1/2 reads it for CPU offload
            inner.gradient_accumulation_steps = gas

    def _micro_step(self, x: Any, y: Any, index: int, gas: int) -> torch.Tensor:
        last = index == gas - 1
        if self._managed:
            self.ds.set_gradient_accumulation_boundary(last)
        loss = self.loss_fn(call_model(self.ds, x), y)
        self.ds.backward(loss)  # divides by gas (DeepSpeed's scale_wrt_gas)
        if self._managed or last:  # unmanaged accumulation: step() is the boundary
            self.ds.step()
        return loss

    def train_batch(self, data_iter: Iterator) -> Dict[str, Any]:
        self.metrics_writer.begin_step()
        metrics = super().train_batch(data_iter)
        if self.metrics_writer.active:
            self.metrics_writer.write_step({
                "train_loss": metrics["loss"], "absa_global_batch": metrics["global_batch"], "absa_lr": metrics["lr"],
                "absa_adv_ratio": self.adv_ratio if self.attack is not None else 0.0})
        return metrics

    train_batch.__doc__ = ABSADriver.train_batch.__doc__

    def end_epoch(self, epoch: Optional[int] = None) -> Dict[str, Any]:
        row = super().end_epoch(epoch)
        if row["eigenvalue"] is not None:
            self.metrics_writer.write({"absa_eigenvalue": row["eigenvalue"]})
        return row

    end_epoch.__doc__ = ABSADriver.end_epoch.__doc__

    def _hessian_model(self) -> Any:
        return self.ds  # the Hessian sums over the engine's data-parallel group

    def _comm(self):
        from ds_conadv.hessian import make_communicator

        return make_communicator(engine=self.ds)

    # checkpoints: DeepSpeed's, plus ABSA's state per rank (the attack generator is per rank)
    def save_checkpoint(self, save_dir: str, tag: Optional[str] = None, client_state: Optional[dict] = None,
                        **kwargs):
        """DeepSpeed's checkpoint plus ``absa_rank{r}.pt`` in the tag folder. Call between epochs (after
        :meth:`end_epoch`), on every rank."""
        ok = self.ds.save_checkpoint(save_dir, tag=tag, client_state=client_state or {}, **kwargs)
        torch.save(self.absa_state_dict(), self._side_file(save_dir, tag, "absa", saving=True))
        return ok

    def load_checkpoint(self, load_dir: str, tag: Optional[str] = None, **kwargs):
        """DeepSpeed's ``load_checkpoint``, then ABSA's state: the global batch, LR factor and adversarial ratio
        of the saved run are restored (the scheduler's LRs come back from DeepSpeed's checkpoint)."""
        result = self.ds.load_checkpoint(load_dir, tag=tag, **kwargs)
        # raw_lrs in it are the scheduler's own LRs at the save, where DeepSpeed has put the scheduler back
        state = torch.load(self._side_file(load_dir, tag, "absa", saving=False), weights_only=False)
        self.load_absa_state_dict(state)
        return result
