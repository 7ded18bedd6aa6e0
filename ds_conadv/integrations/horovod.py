"""Horovod glue: our LAMB/LARS (or any optimizer) under ``hvd.DistributedOptimizer``, state broadcast, and the
ConAdv step for ``horovodrun`` with the generation pass overlapped with Horovod's asynchronous allreduce.

Horovod is optional (``bash scripts/install_horovod.sh``); this module imports it lazily, so it can be imported
(and :func:`check_settings_survived` used) without it. See docs/horovod.md.

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
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple, Union

import torch
from torch import nn

from ds_conadv.config import ConAdvConfig
from ds_conadv.conadv.schedule import split_batch
from ds_conadv.conadv.trainer import ConAdvTrainer

__all__ = ["available", "require_horovod", "group_settings", "check_settings_survived", "distributed_optimizer",
           "broadcast_state", "HorovodConAdvTrainer", "ElasticConAdvState", "INSTALL_HINT"]

INSTALL_HINT = ("Horovod is not installed: run `bash scripts/install_horovod.sh` (or set DS_CONADV_WITH_HOROVOD=1 "
                "for scripts/test.sh / scripts/run.sh); see docs/horovod.md")


def available() -> bool:
    """Whether ``horovod.torch`` can be imported."""
    try:
        import horovod.torch  # noqa: F401
    except Exception:  # ImportError, or a build against another torch (undefined symbol)
        return False
    return True


def require_horovod():
    """``horovod.torch``, or an ImportError that says how to install it."""
    try:
        import horovod.torch as hvd
    except ImportError as exc:
        raise ImportError(f"{INSTALL_HINT} ({exc})") from exc
    return hvd


def _is_distributed_optimizer(optimizer: Any) -> bool:
    return callable(getattr(optimizer, "synchronize", None)) and callable(getattr(optimizer, "skip_synchronize", None))


# ----------------------------------------------------------------------------------------------------------
# hvd.DistributedOptimizer: verified settings
# ----------------------------------------------------------------------------------------------------------
def group_settings(optimizer: torch.optim.Optimizer) -> List[Dict[str, Any]]:
    """Each param group's settings (every key but ``"params"``), copied."""
    return [{k: (v.detach().clone() if torch.is_tensor(v) else v) for k, v in g.items() if k != "params"}
            for g in optimizer.param_groups]


def _same(a: Any, b: Any) -> bool:
    if torch.is_tensor(a) or torch.is_tensor(b):
        return torch.is_tensor(a) and torch.is_tensor(b) and a.shape == b.shape and bool(torch.equal(a.cpu(), b.cpu()))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b  # True != 1 here: a bool flag turned int is a change


def check_settings_survived(before: List[Dict[str, Any]], optimizer: torch.optim.Optimizer) -> None:
    """Raise if ``optimizer``'s groups differ from ``before`` (:func:`group_settings` of the original): a key
    changed, disappeared or appeared. The message names the group and the key."""
    after = optimizer.param_groups
    if len(after) != len(before):
        raise RuntimeError(f"hvd.DistributedOptimizer rebuilt {type(optimizer).__name__} with {len(after)} param "
                           f"groups instead of {len(before)}")
    for i, (old, new) in enumerate(zip(before, after)):
        for key in sorted((set(old) | set(new)) - {"params"}, key=str):
            if key not in new:
                raise RuntimeError(f"param group {i} lost setting {key!r} (was {old[key]!r}) when "
                                   f"hvd.DistributedOptimizer re-ran {type(optimizer).__name__}.__init__")
            if key not in old:
                raise RuntimeError(f"param group {i} gained setting {key!r} = {new[key]!r} when "
                                   f"hvd.DistributedOptimizer re-ran {type(optimizer).__name__}.__init__")
            if not _same(old[key], new[key]):
                raise RuntimeError(
                    f"param group {i} setting {key!r} changed from {old[key]!r} to {new[key]!r} when "
                    f"hvd.DistributedOptimizer re-ran {type(optimizer).__name__}.__init__ with only the param "
                    "groups: keep every setting in the param groups (ds_conadv.optim.LAMB/LARS do)")


def distributed_optimizer(optimizer: torch.optim.Optimizer,
                          named_parameters: Optional[Iterable[Tuple[str, nn.Parameter]]] = None,
                          backward_passes_per_step: int = 1, **hvd_kwargs) -> torch.optim.Optimizer:
    """``hvd.DistributedOptimizer(optimizer, ...)`` with the rebuild checked.

    Horovod returns a new object of a subclass of ``type(optimizer)`` whose ``__init__`` ran again with only
    ``optimizer.param_groups``. This checks that every group setting survived (raises naming the key if not),
    puts the original ``defaults`` back (optimizers that read ``self.defaults`` at step time, like timm's Lamb
    for ``max_grad_norm``, would otherwise silently get the class defaults), and carries over any optimizer
    state the original already had (e.g. loaded from a checkpoint), our ``"ds_conadv"`` extras included.

    The returned optimizer steps on gradients averaged over all ranks (``op=hvd.Average``), so LAMB/LARS take
    their trust ratios, and ``max_grad_norm`` its global norm, on the full averaged gradient. With
    ``backward_passes_per_step=k`` the gradients are the local *sum* of k backwards, averaged over ranks
    (divide the loss by k for a mean, as :class:`HorovodConAdvTrainer` does). Use the *returned* optimizer
    from here on (build the LR scheduler on it).
    """
    hvd = require_horovod()
    if _is_distributed_optimizer(optimizer):
        raise ValueError(f"{type(optimizer).__name__} is already a hvd.DistributedOptimizer")
    before = group_settings(optimizer)
    defaults = dict(optimizer.defaults)
    state = optimizer.state_dict() if len(optimizer.state) else None
    wrapped = hvd.DistributedOptimizer(optimizer, named_parameters=named_parameters,
                                       backward_passes_per_step=backward_passes_per_step, **hvd_kwargs)
    check_settings_survived(before, wrapped)
    wrapped.defaults = defaults
    if state is not None:
        wrapped.load_state_dict(state)
    return wrapped


# ----------------------------------------------------------------------------------------------------------
# broadcast
# ----------------------------------------------------------------------------------------------------------
def broadcast_state(model: Optional[nn.Module], optimizer: Optional[torch.optim.Optimizer] = None,
                    root_rank: int = 0, lr_scheduler: Any = None) -> None:
    """Make every rank start from ``root_rank``'s model (parameters *and* buffers, e.g. BN statistics),
    optimizer state (moments, step counters, group settings, our ``"ds_conadv"`` extras such as
    ``skipped_steps``) and LR scheduler state. Call on all ranks, after building the optimizer.

    Unlike ``hvd.broadcast_optimizer_state`` this never steps the optimizer: that function initialises an
    empty state with a zero-gradient ``step()``, which under LAMB/LARS with weight decay is *not* a no-op (the
    trust ratio turns ``wd * p`` into a step of ``lr * p``). The optimizer state travels pickled from the root
    (``hvd.broadcast_object``); the model's tensors are broadcast in place.
    """
    hvd = require_horovod()
    if model is not None:
        hvd.broadcast_parameters(model.state_dict(), root_rank=root_rank)
    is_root = hvd.rank() == root_rank
    if optimizer is not None:
        sd = hvd.broadcast_object(optimizer.state_dict() if is_root else None, root_rank,
                                  name="ds_conadv.optimizer_state")
        if not is_root:
            optimizer.load_state_dict(sd)
    if lr_scheduler is not None:
        sd = hvd.broadcast_object(lr_scheduler.state_dict() if is_root else None, root_rank,
                                  name="ds_conadv.lr_scheduler_state")
        if not is_root:
            lr_scheduler.load_state_dict(sd)


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
        if _is_distributed_optimizer(optimizer):
            if hvd_kwargs:
                raise ValueError(f"optimizer is already wrapped; Horovod options {sorted(hvd_kwargs)} cannot apply")
            k = int(getattr(optimizer, "backward_passes_per_step", 1))
            if gradient_accumulation_steps is not None and gradient_accumulation_steps != k:
                raise ValueError(f"gradient_accumulation_steps={gradient_accumulation_steps} but the optimizer was "
                                 f"wrapped with backward_passes_per_step={k}")
        else:
            k = 1 if gradient_accumulation_steps is None else int(gradient_accumulation_steps)
            optimizer = distributed_optimizer(optimizer, named_parameters=model.named_parameters(),
                                              backward_passes_per_step=k, **hvd_kwargs)
            if lr_scheduler is not None and getattr(lr_scheduler, "optimizer", None) is not None:
                _repoint_scheduler(lr_scheduler, optimizer)
        if k < 1:
            raise ValueError(f"gradient_accumulation_steps must be >= 1, got {k}")
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 or None, got {max_grad_norm!r}")
        self.max_grad_norm = max_grad_norm
        self.gradient_accumulation_steps = k
        self.seed = seed
        super().__init__(model, optimizer, loss_fn, cfg, lr_scheduler=lr_scheduler, seed=seed + 1000003 * self.rank,
                         steps_per_epoch=steps_per_epoch, device=device, attack_loss_fn=attack_loss_fn, split=split)
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


def _repoint_scheduler(scheduler: Any, optimizer: torch.optim.Optimizer) -> None:
    """Point an LR scheduler built on the original optimizer at its Horovod rebuild. The rebuild shares the
    param-group dicts, so the learning rates already reach it; this also redoes torch's ``step`` patch that
    tells the scheduler the optimizer stepped (else torch warns on every ``scheduler.step()``)."""
    import functools
    import weakref

    scheduler.optimizer = optimizer
    if not isinstance(scheduler, torch.optim.lr_scheduler.LRScheduler) or hasattr(optimizer.step,
                                                                                  "_wrapped_by_lr_sched"):
        return
    opt_ref, func = weakref.ref(optimizer), optimizer.step.__func__

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        opt = opt_ref()
        opt._opt_called = True
        return func.__get__(opt, opt.__class__)(*args, **kwargs)

    wrapper._wrapped_by_lr_sched = True
    optimizer.step = wrapper


def _atomic_save(obj: Any, path: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


_ELASTIC_STATE_CLASS = None


def ElasticConAdvState(trainer: "HorovodConAdvTrainer", **kwargs):  # noqa: N802 - used like hvd.elastic.TorchState
    """``hvd.elastic`` state of a :class:`HorovodConAdvTrainer`: model, optimizer, LR scheduler and step
    counters, committed together, plus any picklable attributes passed as keywords (synced from rank 0).

    Use it as Horovod's ``TorchState``::

        state = ElasticConAdvState(trainer, epoch=0)

        @hvd.elastic.run
        def train(state):
            data = my_stream(hvd.rank(), hvd.size(), start_step=state.trainer.global_step)
            while state.trainer.global_step < total:
                state.trainer.train_batch(data)
                state.commit()            # copies the state; raises HostsUpdatedInterrupt on a membership change

    What differs from ``TorchState``: the optimizer state is synchronised with :func:`broadcast_state` (Horovod's
    ``broadcast_optimizer_state`` initialises empty state with a zero-gradient step, which moves weights under
    weight decay), the ConAdv schedule's counters are part of the commit, and at every reset the trainer
    re-numbers itself (:meth:`HorovodConAdvTrainer.on_world_change`): the look-ahead batches of the old data shard
    are dropped, so the first τ steps after a reset generate their adversarial examples synchronously. Training
    goes on from the last commit with the same weights on every rank. Rebuild the data stream for the new rank
    and size at the top of the ``@hvd.elastic.run`` function (from ``state.trainer.global_step``).
    """
    global _ELASTIC_STATE_CLASS
    if not isinstance(trainer, HorovodConAdvTrainer):
        raise TypeError(f"ElasticConAdvState needs a HorovodConAdvTrainer, got {type(trainer).__name__}")
    if _ELASTIC_STATE_CLASS is None:  # built at first use: importing this module must not import Horovod
        from horovod.common.elastic import ObjectState

        _ELASTIC_STATE_CLASS = type("ElasticConAdvState", (_ElasticConAdvState, ObjectState),
                                    {"__module__": __name__, "__doc__": ElasticConAdvState.__doc__})
    return _ELASTIC_STATE_CLASS(trainer, **kwargs)


class _ElasticConAdvState:
    """The methods of :func:`ElasticConAdvState` (mixed into Horovod's ``ObjectState`` at first use)."""

    def __init__(self, trainer: "HorovodConAdvTrainer", **kwargs):
        self.trainer = trainer
        self._committed = self._snapshot()
        super().__init__(bcast_object=trainer.hvd.broadcast_object, get_rank=trainer.hvd.rank, **kwargs)

    def _snapshot(self) -> Dict[str, Any]:
        import copy

        tr = self.trainer
        if tr.schedule._current is not None:
            raise RuntimeError("ElasticConAdvState.commit in the middle of a step; commit between train_batch calls")
        snap = {"model": tr.model.state_dict(), "optimizer": tr.optimizer.state_dict(), "counters": self._counters()}
        if tr.lr_scheduler is not None:
            snap["lr_scheduler"] = tr.lr_scheduler.state_dict()
        return copy.deepcopy(snap)

    def _counters(self) -> Dict[str, int]:
        sch = self.trainer.schedule
        return {"global_step": self.trainer.global_step, "step": sch.step, "epoch": sch._epoch}

    def _set_counters(self, c: Dict[str, int]) -> None:
        tr, sch = self.trainer, self.trainer.schedule
        tr.global_step, sch.step, sch._epoch = int(c["global_step"]), int(c["step"]), int(c["epoch"])
        sch.batches_consumed = sch.step  # no look-ahead is kept across a restore or reset

    def save(self) -> None:
        self._committed = self._snapshot()
        super().save()

    def restore(self) -> None:
        """Back to the last commit (after a failed collective: the step in flight is undone)."""
        tr, snap = self.trainer, self._committed
        tr.schedule._current = None
        tr.schedule.drop_lookahead()
        tr.model.load_state_dict(snap["model"])
        tr.optimizer.load_state_dict(snap["optimizer"])  # Horovod's: also clears its pending allreduce handles
        tr.optimizer.zero_grad()
        if tr.lr_scheduler is not None and "lr_scheduler" in snap:
            tr.lr_scheduler.load_state_dict(snap["lr_scheduler"])
        self._set_counters(snap["counters"])
        super().restore()

    def reset(self) -> None:
        """Membership changed (before sync; the only call when workers were just removed): new rank and size,
        this rank's look-ahead dropped, the attack generator re-seeded."""
        self.trainer.optimizer.zero_grad()
        self.trainer.on_world_change()

    def sync(self) -> None:
        """Everyone takes rank 0's model, optimizer, scheduler and counters (a joining worker starts there)."""
        tr = self.trainer
        tr.on_world_change()
        broadcast_state(tr.model, tr.optimizer, 0, tr.lr_scheduler)
        self._set_counters(tr.hvd.broadcast_object(self._counters(), root_rank=0))
        tr.reseed_attack()
        self._committed = self._snapshot()
        super().sync()
