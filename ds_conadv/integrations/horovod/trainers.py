"""Horovod trainers: the ConAdv step for ``horovodrun`` with the generation pass overlapped with Horovod's
asynchronous allreduce (:class:`HorovodConAdvTrainer`), and ABSA under Horovod (:class:`HorovodABSATrainer`).
Importing this module does not import Horovod.

How the overlap works: ``hvd.DistributedOptimizer`` hooks every parameter's gradient accumulator; the hook
starts ``allreduce_async_(p.grad, Average)`` in Horovod's background thread as soon as that gradient is ready
(after ``backward_passes_per_step`` backwards). ``step()`` normally waits for the handles (``synchronize()``).
:class:`HorovodConAdvTrainer` splits that: ``loss.backward()`` (allreduces start), then the generation of
x̂_{t+τ} with ``torch.autograd.grad`` w.r.t. the inputs only (it fires no hook and writes no ``.grad``), then
``optimizer.synchronize()`` and ``with optimizer.skip_synchronize(): optimizer.step()``.
"""
from __future__ import annotations

import os
import time
from typing import Any, Callable, Dict, Optional, Union

import torch
from torch import nn

from ds_conadv.absa.driver import ABSATrainer
from ds_conadv.absa.policy import ABSAConfig
from ds_conadv.conadv.schedule import split_batch
from ds_conadv.conadv.trainer import ConAdvTrainer
from ds_conadv.config.sections import ConAdvConfig

from .compat import repoint_scheduler
from .optimizer import broadcast_state, distributed_optimizer, is_distributed_optimizer, require_horovod

__all__ = ["HorovodConAdvTrainer", "HorovodABSATrainer", "wrap_optimizer"]


def wrap_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, lr_scheduler: Any,
                   backward_passes_per_step: int, **hvd_kwargs: Any) -> torch.optim.Optimizer:
    """What both trainers do with a plain optimizer: :func:`~.optimizer.distributed_optimizer` (named after
    ``model.named_parameters()``), and an LR scheduler built on the original pointed at the rebuild."""
    wrapped = distributed_optimizer(optimizer, named_parameters=model.named_parameters(),
                                    backward_passes_per_step=backward_passes_per_step, **hvd_kwargs)
    if lr_scheduler is not None and getattr(lr_scheduler, "optimizer", None) is not None:
        repoint_scheduler(lr_scheduler, wrapped)
    return wrapped


# ----------------------------------------------------------------------------------------------------------
# the ConAdv step under Horovod
# ----------------------------------------------------------------------------------------------------------
class HorovodConAdvTrainer(ConAdvTrainer):
    """ConAdv (τ ≥ 1), DisAdv (τ = 0) or vanilla (``enabled: false``) training under ``horovodrun``, sharing
    the step, the τ schedule and the ``"conadv"`` semantics with :class:`~ds_conadv.conadv.ConAdvTrainer`
    (and so with the DeepSpeed engine). Per micro-batch::

        next_batch            x_t, y_t and x̂_t (from w_{t−τ}; generated now from w_t if missing)
        backward()            loss.backward(): Horovod's hooks launch the async allreduces
        generate_next()       x̂_{t+τ} from w_t — while the allreduces run in Horovod's background thread
        finish_reduction()    optimizer.synchronize()          (only at the accumulation boundary)
        optimizer_step()      with optimizer.skip_synchronize(): optimizer.step(); zero_grad; lr_scheduler

    Args:
        model: the model (dual BN already converted, see :func:`~ds_conadv.conadv.prepare_model`).
        optimizer: a plain optimizer (wrapped here with :func:`distributed_optimizer`, named after
            ``model.named_parameters()``) or one already wrapped by ``hvd.DistributedOptimizer``.
        gradient_accumulation_steps: micro-batches per optimizer step (``backward_passes_per_step``); the
            loss of each is divided by it, so the step sees the mean gradient over the global batch. τ counts
            micro-batches, as in the DeepSpeed engine.
        max_grad_norm: clip all (averaged) gradients to this global norm between ``synchronize()`` and
            ``step()`` — for optimizers without their own clipping. LAMB/LARS: set *their* ``max_grad_norm``
            instead (same norm, since their step sees the averaged gradients; fused, and inf/NaN skip the step).
        broadcast: broadcast model/optimizer/scheduler state from ``root_rank`` at construction.
        seed: attack randomness; rank r uses ``seed + 1000003 * r`` (as the DeepSpeed engine).
        Others: as :class:`~ds_conadv.conadv.ConAdvTrainer`.

    :meth:`train_batch` runs one optimizer step; :meth:`save_checkpoint` / :meth:`load_checkpoint` resume
    exactly (rank 0 writes model/optimizer/scheduler, every rank its ConAdv schedule and RNG).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: Optional[Callable] = None,
                 cfg: Union[ConAdvConfig, Dict[str, Any], None] = None, *, lr_scheduler: Any = None,
                 gradient_accumulation_steps: Optional[int] = None, seed: int = 0,
                 steps_per_epoch: Optional[int] = None, device: Optional[Union[str, torch.device]] = None,
                 attack_loss_fn: Optional[Callable] = None, split: Callable = split_batch,
                 max_grad_norm: Optional[float] = None, broadcast: bool = True, root_rank: int = 0,
                 **hvd_kwargs):
        hvd = require_horovod()
        self.hvd = hvd
        self.rank, self.world_size = hvd.rank(), hvd.size()
        self.root_rank = root_rank
        if is_distributed_optimizer(optimizer):
            if hvd_kwargs:
                raise ValueError(f"optimizer is already wrapped; Horovod options {sorted(hvd_kwargs)} cannot apply")
            k = int(getattr(optimizer, "backward_passes_per_step", 1))
            if gradient_accumulation_steps is not None and gradient_accumulation_steps != k:
                raise ValueError(f"gradient_accumulation_steps={gradient_accumulation_steps} but the optimizer was "
                                 f"wrapped with backward_passes_per_step={k}")
        else:
            k = 1 if gradient_accumulation_steps is None else int(gradient_accumulation_steps)
            optimizer = wrap_optimizer(model, optimizer, lr_scheduler, k, **hvd_kwargs)
        if k < 1:
            raise ValueError(f"gradient_accumulation_steps must be >= 1, got {k}")
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 or None, got {max_grad_norm!r}")
        self.max_grad_norm = max_grad_norm
        self.gradient_accumulation_steps = k
        self.seed = seed
        super().__init__(model, optimizer, loss_fn, cfg, lr_scheduler=lr_scheduler, seed=seed + 1000003 * self.rank,
                         steps_per_epoch=steps_per_epoch, device=device, attack_loss_fn=attack_loss_fn, split=split,
                         micro_batches_per_step=k)
        self.global_step = 0
        self._micro = 0
        self.last_timings: Dict[str, float] = {}
        optimizer.zero_grad()
        if broadcast:
            broadcast_state(model, optimizer, root_rank, lr_scheduler)

    # -- the step ------------------------------------------------------------------------------------------
    @property
    def _at_boundary(self) -> bool:
        return self._micro == self.gradient_accumulation_steps - 1

    def zero_grad(self) -> None:
        pass  # gradients accumulate over the micro-batches; cleared after the optimizer step

    def backward(self, loss: torch.Tensor) -> None:
        k = self.gradient_accumulation_steps
        (loss / k if k > 1 else loss).backward()  # Horovod's hooks start the allreduces (at the last pass)

    def finish_reduction(self) -> None:
        if not self._at_boundary:
            return
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        unused = [p for p in params if p.grad is None]
        t = time.perf_counter()
        self.optimizer.synchronize()
        self.last_timings["wait_reduction"] = time.perf_counter() - t
        # Horovod allreduces a zero gradient for params no backward reached (another rank might have used
        # them). The ConAdv step takes the same branches on every rank (the schedule depends only on the
        # step), so these had no gradient anywhere: keep them gradient-less, as in one process (an optimizer
        # skips a None grad, but would apply momentum/decay on a zero one).
        for p in unused:
            p.grad = None
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], self.max_grad_norm)

    def optimizer_step(self) -> None:
        if not self._at_boundary:
            return
        with self.optimizer.skip_synchronize():
            self.optimizer.step()
        self.optimizer.zero_grad()
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()
        self.global_step += 1

    def train_batch(self, data_iter) -> Dict[str, Any]:
        """One optimizer step over ``gradient_accumulation_steps`` micro-batches of ``data_iter`` (this rank's
        shard); returns the last micro-batch's metrics (see :meth:`ConAdvTrainer.train_batch`) with ``loss``
        averaged over the micro-batches (this rank), ``global_step`` and ``time_wait_reduction``."""
        losses = []
        self.last_timings = {}
        for micro in range(self.gradient_accumulation_steps):
            self._micro = micro
            metrics = super().train_batch(data_iter)
            losses.append(metrics["loss"])
        self._micro = 0
        metrics["loss"] = sum(losses) / len(losses)
        metrics["global_step"] = self.global_step
        metrics["time_wait_reduction"] = self.last_timings.get("wait_reduction", 0.0)
        return metrics

    def on_world_change(self) -> None:
        """After an elastic reset (between steps): take the new rank and size, drop this rank's look-ahead (its
        batches belonged to the old data shard; the next τ steps generate synchronously, as step 0 does), and
        re-seed the attack generator from the seed, the new rank and the step, so every run of the same
        membership history draws alike."""
        self.rank, self.world_size = self.hvd.rank(), self.hvd.size()
        self._micro = 0
        self.schedule.drop_lookahead()
        self.reseed_attack()

    def reseed_attack(self) -> None:
        self.schedule.generator.manual_seed(self.seed + 1000003 * self.rank + 7919 * self.schedule.step)

    # -- checkpoints ---------------------------------------------------------------------------------------
    def _barrier(self) -> None:
        barrier = getattr(self.hvd, "barrier", None)
        if barrier is not None:
            barrier()
        else:  # pragma: no cover - Horovod < 0.23
            self.hvd.allreduce(torch.zeros(1), name="ds_conadv.barrier")

    def save_checkpoint(self, path: str) -> None:
        """Between steps, on every rank: rank ``root_rank`` writes ``path/state.pt`` (model, optimizer, LR
        scheduler, step counters, world size); every rank writes ``path/conadv_rank{r}.pt`` (its ConAdv
        schedule — look-ahead batches with their adversarial examples, generator — and its torch RNG). ``path``
        must be a directory all ranks can read back (shared filesystem on several hosts)."""
        os.makedirs(path, exist_ok=True)
        if self.rank == self.root_rank:
            state = {"version": 1, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                     "global_step": self.global_step, "world_size": self.world_size,
                     "gradient_accumulation_steps": self.gradient_accumulation_steps}
            if self.lr_scheduler is not None:
                state["lr_scheduler"] = self.lr_scheduler.state_dict()
            _atomic_save(state, os.path.join(path, "state.pt"))
        _atomic_save({"version": 1, "rank": self.rank, "conadv": self.schedule.state_dict(),
                      "torch_rng": torch.get_rng_state()}, os.path.join(path, f"conadv_rank{self.rank}.pt"))
        self._barrier()

    def load_checkpoint(self, path: str) -> None:
        """On every rank: load what :meth:`save_checkpoint` wrote, with the same number of ranks. The data
        iterator must continue at :attr:`schedule.batches_consumed <ds_conadv.conadv.ConAdvSchedule>` batches
        of this rank's stream (the look-ahead batches are in the checkpoint)."""
        state = torch.load(os.path.join(path, "state.pt"), map_location="cpu", weights_only=False)
        if state.get("world_size") != self.world_size:
            raise ValueError(f"{path} was saved by {state.get('world_size')} ranks, this run has {self.world_size}: "
                             "each rank's ConAdv look-ahead batches are per rank (resume with the same -np)")
        if state.get("gradient_accumulation_steps", 1) != self.gradient_accumulation_steps:
            raise ValueError(f"{path} was saved with gradient_accumulation_steps="
                             f"{state.get('gradient_accumulation_steps')}, this run has "
                             f"{self.gradient_accumulation_steps}")
        mine = torch.load(os.path.join(path, f"conadv_rank{self.rank}.pt"), map_location="cpu", weights_only=False)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.lr_scheduler is not None and "lr_scheduler" in state:
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.global_step = int(state["global_step"])
        self.schedule.load_state_dict(mine["conadv"], map_location=self.device)
        torch.set_rng_state(mine["torch_rng"])
        self._barrier()


def _atomic_save(obj: Any, path: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


class HorovodABSATrainer(ABSATrainer):
    """ABSA under ``horovodrun``: :class:`ABSATrainer` with the optimizer wrapped by ``hvd.DistributedOptimizer``
    (:func:`ds_conadv.integrations.horovod.distributed_optimizer`, settings checked) and
    ``backward_passes_per_step`` = the accumulation steps, changed at run time with Horovod's
    ``set_backward_passes_per_step`` when the batch grows (Horovod ≥ 0.21; it resets the per-parameter
    countdown, so it must happen between steps, as here). Gradients are averaged over ranks; each micro-batch's
    loss is divided by the accumulation steps, so a step sees the mean over the global batch. The eigenvalue
    sums over the Horovod ranks. ``broadcast`` (default) starts every rank from rank 0's model, optimizer and
    scheduler state. Pass the plain optimizer, and an LR scheduler built on it.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, cfg: Union[ABSAConfig, Dict[str, Any]],
                 micro_batch: int, loss_fn: Optional[Callable] = None, *, lr_scheduler: Any = None,
                 gradient_accumulation_steps: int = 1, broadcast: bool = True, **kwargs: Any):
        self.hvd = require_horovod()
        if is_distributed_optimizer(optimizer):
            raise ValueError("pass the plain optimizer: HorovodABSATrainer wraps it (backward_passes_per_step is "
                             "ABSA's to set)")
        optimizer = wrap_optimizer(model, optimizer, lr_scheduler, gradient_accumulation_steps)
        if broadcast:
            broadcast_state(model, optimizer, 0, lr_scheduler)
        super().__init__(model, optimizer, cfg, micro_batch, loss_fn, lr_scheduler=lr_scheduler,
                         gradient_accumulation_steps=gradient_accumulation_steps, **kwargs)

    def _setup_ranks(self) -> None:
        self.world_size, self.rank = int(self.hvd.size()), int(self.hvd.rank())

    def _set_accumulation(self, gas: int) -> None:
        if self.optimizer.backward_passes_per_step != gas:
            self.optimizer.set_backward_passes_per_step(gas)

    def _hessian_kwargs(self) -> Dict[str, Any]:
        return {"distributed": "horovod"}

    def _comm(self):
        from ds_conadv.hessian import make_communicator

        return make_communicator("horovod")
