"""Horovod elastic training for :class:`~.trainers.HorovodConAdvTrainer`: :func:`ElasticConAdvState`."""
from __future__ import annotations

from typing import Any, Dict

from .optimizer import broadcast_state
from .trainers import HorovodConAdvTrainer

__all__ = ["ElasticConAdvState"]

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
        from .compat import elastic_object_state

        ObjectState = elastic_object_state()  # noqa: N806

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
