"""The tau bookkeeping of ConAdv: which batch gets which adversarial example, generated with which weights.

:class:`ConAdvSchedule` sits between the data iterator and the training step. It counts *steps* (one call of
:meth:`~ConAdvSchedule.next_batch` each, i.e. micro-batches under gradient accumulation) and keeps a look-ahead
queue of ``tau * micro_batches_per_step`` batches already pulled from the iterator, so that ``tau`` is counted in
**optimizer steps** whatever the accumulation: the adversarial examples of every micro-batch of optimizer step
s were made with the weights of optimizer step s - tau. Below, with one micro-batch per step:

* step t, :meth:`next_batch`: pop batch t (pull it if the queue is empty); refill the queue to ``tau`` batches
  (t+1 .. t+tau); if step t is in the adversarial window, batch t's adversarial example x̂_t was normally
  generated at step t−tau from w_{t−tau} and is returned with it; if it is missing (tau = 0 — DisAdv —, the
  first step, the first steps of the window when the epoch of future steps is not known, after the iterator
  ran dry) it is generated **now**, from w_t, before the forward (sequential, like DisAdv).
* after the backward, :meth:`generate_ahead`: generate x̂ for every queued batch that will be used in the
  window and has none yet — normally only batch t+tau — with the current weights w_t. This is the pass that
  an engine runs while the gradient reduction is in flight.
* :meth:`end_step` after the optimizer step.

Outside the window ``[start_epoch, stop_epoch)``, or with ``enabled: false``, nothing is generated and the
batch comes without x̂ (vanilla step); with ``enabled: false`` nothing is pulled ahead either.

Epochs: with ``steps_per_epoch`` the epoch of step s is ``s // steps_per_epoch`` (future steps included, so
the first window step's x̂ is generated tau steps ahead); without it, the epoch is what :meth:`set_epoch` said
last, for current and queued steps alike.

Iterators: pass an endless one (e.g. DeepSpeed's ``RepeatingLoader``) for uninterrupted look-ahead. A
per-epoch iterator works too: when it runs dry the look-ahead stops, and the first tau steps on the next
iterator generate synchronously. :attr:`batches_consumed` counts the batches pulled so far, which is where a
resumed data iterator has to continue (look-ahead batches are saved in the state).

Everything needed to resume mid-run exactly is in :meth:`state_dict`: step, epoch, batches consumed, the
queued batches with their adversarial examples and the step that generated them, and the generator's state.
"""
from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Any, Callable, Deque, Dict, Iterator, Optional, Tuple

import torch

from ds_conadv.config import ConAdvConfig

__all__ = ["ConAdvSchedule", "ConAdvBatch", "PendingBatch", "split_batch"]

#: generate_fn(x, y, generator) -> adversarial example (x_adv, or the embedding delta)
GenerateFn = Callable[[Any, Any, Optional[torch.Generator]], Any]


def split_batch(batch: Any) -> Tuple[Any, Any]:
    """A batch from the iterator as ``(x, y)``: a 2-tuple/list, or a dict with ``"x"``/``"y"`` (or
    ``"input"``/``"label"``, ``"inputs"``/``"labels"``)."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    if isinstance(batch, dict):
        for kx, ky in (("x", "y"), ("input", "label"), ("inputs", "labels")):
            if kx in batch and ky in batch:
                return batch[kx], batch[ky]
    raise TypeError(f"a batch must be (inputs, labels) or a dict with x/y; got {type(batch).__name__}"
                    + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else ""))


def _to_device(value: Any, device: Any) -> Any:
    if torch.is_tensor(value):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_to_device(v, device) for v in value)
    return value


@dataclass
class PendingBatch:
    """A batch in the look-ahead queue: its data, and its adversarial example once generated."""
    x: Any
    y: Any
    index: int                      # position in the stream of batches pulled (0-based)
    adv: Any = None                 # x_adv (inputs) or delta (embeddings); None = not generated
    gen_step: Optional[int] = None  # the step whose weights generated adv


@dataclass
class ConAdvBatch:
    """What step ``step`` trains on. ``x_adv`` is None on a vanilla step."""
    x: Any
    y: Any
    x_adv: Any
    step: int
    epoch: int
    index: int
    gen_step: Optional[int]
    generated_now: bool             # x_adv was generated synchronously in next_batch (w_t)
    micro_batches_per_step: int = 1

    @property
    def optimizer_step(self) -> int:
        return self.step // self.micro_batches_per_step

    @property
    def stale_by(self) -> Optional[int]:
        """How many optimizer steps old the weights that generated x_adv are (tau in steady state)."""
        if self.gen_step is None:
            return None
        return self.optimizer_step - self.gen_step // self.micro_batches_per_step


class ConAdvSchedule:
    """Look-ahead queue and window logic; see the module docstring.

    Args:
        cfg: the ``"conadv"`` section.
        generator: the torch.Generator all attack randomness comes from (a CPU one seeded with ``seed`` if None).
        seed: seed of the default generator.
        steps_per_epoch: steps per epoch, to know the epoch of future steps (else use :meth:`set_epoch`).
        prepare: applied to ``(x, y)`` when a batch is pulled (e.g. move to the device); returns ``(x, y)``.
        split: turns an iterator item into ``(x, y)`` (default :func:`split_batch`).
        micro_batches_per_step: gradient accumulation steps (``steps`` and ``steps_per_epoch`` count
            micro-batches; ``tau`` counts optimizer steps).
    """

    def __init__(self, cfg: ConAdvConfig, generator: Optional[torch.Generator] = None, seed: int = 0,
                 steps_per_epoch: Optional[int] = None,
                 prepare: Optional[Callable[[Any, Any], Tuple[Any, Any]]] = None,
                 split: Callable[[Any], Tuple[Any, Any]] = split_batch, micro_batches_per_step: int = 1):
        if not isinstance(micro_batches_per_step, int) or micro_batches_per_step < 1:
            raise ValueError(f"micro_batches_per_step must be a positive int, got {micro_batches_per_step!r}")
        self.micro_batches_per_step = micro_batches_per_step
        if steps_per_epoch is not None and (not isinstance(steps_per_epoch, int) or steps_per_epoch < 1):
            raise ValueError(f"steps_per_epoch must be a positive int or None, got {steps_per_epoch!r}")
        self.cfg = cfg
        if generator is None:
            generator = torch.Generator()
            generator.manual_seed(seed)
        self.generator = generator
        self.steps_per_epoch = steps_per_epoch
        self.prepare = prepare
        self.split = split
        self.step = 0
        self._epoch = 0
        self.batches_consumed = 0
        self._queue: Deque[PendingBatch] = collections.deque()
        self._current: Optional[PendingBatch] = None

    # ---- window ---------------------------------------------------------------------------------------------
    @property
    def tau(self) -> int:
        return self.cfg.tau if self.cfg.enabled else 0

    @property
    def lookahead(self) -> int:
        """Batches pulled ahead: tau optimizer steps' worth of micro-batches."""
        return self.tau * self.micro_batches_per_step

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch if self.steps_per_epoch else self._epoch

    @property
    def epoch(self) -> int:
        return self.epoch_of(self.step)

    def set_epoch(self, epoch: int) -> None:
        if self.steps_per_epoch:
            raise ValueError("the epoch follows from steps_per_epoch; set_epoch is for schedules without it")
        self._epoch = int(epoch)

    def active(self, step: Optional[int] = None) -> bool:
        """Whether step ``step`` (default: the current one) trains on adversarial examples."""
        cfg = self.cfg
        if not cfg.enabled:
            return False
        epoch = self.epoch_of(self.step if step is None else step)
        return epoch >= cfg.start_epoch and (cfg.stop_epoch is None or epoch < cfg.stop_epoch)

    @property
    def pending(self) -> Tuple[PendingBatch, ...]:
        """The look-ahead queue: the batches of steps step+1, step+2, ... (after next_batch)."""
        return tuple(self._queue)

    def drop_lookahead(self) -> int:
        """Forget the look-ahead batches (and their adversarial examples); returns how many. For a change of the
        data stream between steps — e.g. an elastic reset that re-numbers the ranks — after which the next
        ``tau`` steps pull their batches anew and generate synchronously, as step 0 does. ``batches_consumed``
        then counts only the batches trained on."""
        if self._current is not None:
            raise RuntimeError("ConAdvSchedule.drop_lookahead in the middle of a step; call it after end_step")
        dropped = len(self._queue)
        self._queue.clear()
        self.batches_consumed -= dropped
        return dropped

    # ---- the step ---------------------------------------------------------------------------------------------
    def _pull(self, data_iter: Iterator) -> bool:
        try:
            item = next(data_iter)
        except StopIteration:
            return False
        x, y = self.split(item)
        if self.prepare is not None:
            x, y = self.prepare(x, y)
        self._queue.append(PendingBatch(x=x, y=y, index=self.batches_consumed))
        self.batches_consumed += 1
        return True

    def next_batch(self, data_iter: Iterator, generate_fn: GenerateFn) -> ConAdvBatch:
        """Batch t with its x̂_t (generated now from w_t if it is due and missing); refills the look-ahead.
        Raises StopIteration when neither the queue nor the iterator has a batch."""
        if self._current is not None:
            raise RuntimeError("ConAdvSchedule.next_batch called twice without end_step")
        if not hasattr(data_iter, "__next__"):
            raise TypeError(f"pass an iterator (iter(loader)), not a {type(data_iter).__name__}: the schedule pulls "
                            "batches ahead and must continue where it stopped")
        if not self._queue and not self._pull(data_iter):
            raise StopIteration
        entry = self._queue.popleft()
        while len(self._queue) < self.lookahead and self._pull(data_iter):
            pass
        generated_now = False
        if not self.active():
            entry.adv, entry.gen_step = None, None      # vanilla step: a stale x̂ (window ended) is dropped
        elif entry.adv is None:
            entry.adv = generate_fn(entry.x, entry.y, self.generator)
            entry.gen_step = self.step
            generated_now = True
        self._current = entry
        return ConAdvBatch(x=entry.x, y=entry.y, x_adv=entry.adv, step=self.step, epoch=self.epoch,
                           index=entry.index, gen_step=entry.gen_step, generated_now=generated_now,
                           micro_batches_per_step=self.micro_batches_per_step)

    def _due_ahead(self) -> Iterator[PendingBatch]:
        """The queued batches due in the adversarial window that have no x̂ yet (normally just batch t+tau)."""
        return (entry for k, entry in enumerate(self._queue) if entry.adv is None and self.active(self.step + 1 + k))

    def ahead_due(self) -> bool:
        """Whether :meth:`generate_ahead` would generate anything now: an engine overlaps the reduction with a
        generation only then."""
        return any(True for _ in self._due_ahead())

    def generate_ahead(self, generate_fn: GenerateFn) -> int:
        """Generate, with the current weights, x̂ for every queued batch that is due in the window and has none
        (normally just batch t+tau). Returns how many were generated."""
        due = list(self._due_ahead())
        for entry in due:
            entry.adv = generate_fn(entry.x, entry.y, self.generator)
            entry.gen_step = self.step
        return len(due)

    def end_step(self) -> None:
        """After the optimizer step: the next next_batch is step + 1."""
        if self._current is None:
            raise RuntimeError("ConAdvSchedule.end_step without next_batch")
        self._current = None
        self.step += 1

    # ---- checkpoint ---------------------------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """Between steps only. Tensors are referenced, not copied (``torch.save`` it, or deepcopy)."""
        if self._current is not None:
            raise RuntimeError("ConAdvSchedule.state_dict in the middle of a step; take it after end_step")
        return {
            "version": 1,
            "step": self.step,
            "epoch": self._epoch,
            "batches_consumed": self.batches_consumed,
            "generator": self.generator.get_state(),
            "pending": [{"x": e.x, "y": e.y, "index": e.index, "adv": e.adv, "gen_step": e.gen_step}
                        for e in self._queue],
        }

    def load_state_dict(self, state: Dict[str, Any], map_location: Optional[Any] = None) -> None:
        """Restore :meth:`state_dict`; ``map_location`` (a device) moves the queued tensors there."""
        if state.get("version") != 1:
            raise ValueError(f"unknown ConAdvSchedule state version {state.get('version')!r}")
        self.step = int(state["step"])
        self._epoch = int(state["epoch"])
        self.batches_consumed = int(state["batches_consumed"])
        self.generator.set_state(state["generator"])
        move = (lambda v: v) if map_location is None else (lambda v: _to_device(v, map_location))
        self._queue = collections.deque(
            PendingBatch(x=move(e["x"]), y=move(e["y"]), index=int(e["index"]), adv=move(e["adv"]),
                         gen_step=e["gen_step"])
            for e in state["pending"])
        self._current = None
