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

import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Dict, Optional

import torch

from ds_conadv.config import ConAdvConfig
from ds_conadv.conadv.trainer import ConAdvTrainer

__all__ = ["DeepSpeedConAdvEngine"]


class DeepSpeedConAdvEngine(ConAdvTrainer):
    """``ds_conadv.initialize`` returns this when the config has a ``"conadv"`` section.

    ``engine.train_batch(data_iter)`` runs one *global* step: ``gradient_accumulation_steps`` micro-batches pulled
    from ``data_iter`` (τ counts micro-batches), each with its clean+adversarial loss, and one optimizer step at
    the boundary. Everything else (``engine(x)``, ``backward``, ``step``, ``save_checkpoint``, ``module``, ...) is
    the DeepSpeed engine's, so the object is a drop-in for it. ``enabled: false`` gives vanilla DeepSpeed training.
    """

    GENERATION_STARTS = ("reduction", "backward")

    def __init__(self, ds_engine, cfg: ConAdvConfig, loss_fn: Optional[Callable] = None, *,
                 overlap: Optional[bool] = None, seed: int = 0, steps_per_epoch: Optional[int] = None,
                 generation_start: str = "reduction"):
        if generation_start not in self.GENERATION_STARTS:
            raise ValueError(f"generation_start={generation_start!r}: expected one of {self.GENERATION_STARTS}")
        self.ds = ds_engine
        self.generation_start = generation_start
        stage = ds_engine.zero_optimization_stage() if ds_engine.zero_optimization() else 0
        self.overlap = (stage < 3) if overlap is None else bool(overlap)
        if self.overlap and stage >= 3:
            raise ValueError("ConAdv overlap under ZeRO stage 3 would interleave the generation's parameter "
                             "all-gathers with the backward's collectives; use stage 0-2 or overlap=False")
        rank = int(os.environ.get("RANK", "0"))
        super().__init__(ds_engine, ds_engine, loss_fn, cfg, seed=seed + 1000003 * rank,
                         steps_per_epoch=steps_per_epoch, device=ds_engine.device)
        self.generation_model = ds_engine.module
        self._worker: Optional[ThreadPoolExecutor] = None
        self._pending: Optional[Future] = None
        self._stream = torch.cuda.Stream(device=ds_engine.device) if ds_engine.device.type == "cuda" else None
        self.last_timings: Dict[str, float] = {}
        # set by the worker when the backward compute is over (DeepSpeed's epilogue = the reduction begins)
        self._reduction_started = threading.Event()
        self._reduction_started.set()
        if self.overlap:
            self._signal_epilogue()

    def _signal_epilogue(self) -> None:
        """Wrap this engine's ``_backward_epilogue`` (the point where ``engine.backward`` has finished the autograd
        pass and starts the gradient reduction) so that it wakes the generation. A DeepSpeed without it (the
        method is private) still works: the generation then waits for the whole ``engine.backward``."""
        original = getattr(self.ds, "_backward_epilogue", None)
        if original is None or getattr(original, "_ds_conadv_signal", False):
            return

        def epilogue(*args, **kwargs):
            self._reduction_started.set()
            t = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:  # the reduction's wall time on the worker (host-side on GPU): what the generation can hide in
                self.last_timings["reduction"] = time.perf_counter() - t

        epilogue._ds_conadv_signal = True
        self.ds._backward_epilogue = epilogue

    # -- drop-in for the DeepSpeed engine ------------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        # only called for attributes this object does not have
        return getattr(self.__dict__["ds"], name)

    def __call__(self, *args, **kwargs):
        return self.ds(*args, **kwargs)

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
        if not self.overlap:
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

    def generate_next(self) -> int:
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
        metrics with ``loss`` averaged over the micro-batches."""
        gas = self.ds.gradient_accumulation_steps()
        losses = []
        for _ in range(gas):
            metrics = super().train_batch(data_iter)
            losses.append(metrics["loss"])
        metrics["loss"] = sum(losses) / len(losses)
        metrics["global_step"] = self.ds.global_steps
        return metrics

    # -- checkpoints ---------------------------------------------------------------------------------------
    def save_checkpoint(self, save_dir: str, tag: Optional[str] = None, client_state: Optional[dict] = None,
                        **kwargs):
        """DeepSpeed's checkpoint plus, per rank, the ConAdv schedule (pending adversarial batches, generator)."""
        ok = self.ds.save_checkpoint(save_dir, tag=tag, client_state=client_state or {}, **kwargs)
        tag = tag or f"global_step{self.ds.global_steps}"
        path = os.path.join(save_dir, str(tag), f"conadv_rank{self.ds.global_rank}.pt")
        torch.save(self.schedule.state_dict(), path)
        return ok

    def load_checkpoint(self, load_dir: str, tag: Optional[str] = None, **kwargs):
        result = self.ds.load_checkpoint(load_dir, tag=tag, **kwargs)
        if tag is None:
            with open(os.path.join(load_dir, "latest"), encoding="utf-8") as f:
                tag = f.read().strip()
        path = os.path.join(load_dir, str(tag), f"conadv_rank{self.ds.global_rank}.pt")
        self.schedule.load_state_dict(torch.load(path, weights_only=False), map_location=self.ds.device)
        return result
