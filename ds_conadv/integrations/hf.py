"""Hugging Face Trainer and accelerate: ds_conadv's LAMB/LARS where those libraries would swap them out, and
ConAdv inside ``transformers.Trainer``. See docs/integrations.md.

What transformers (5.x) and accelerate do with an optimizer, and what this module adds:

* ``Trainer(optimizers=(LAMB(...), sched))`` without DeepSpeed: ours steps. **With DeepSpeed** transformers'
  ``deepspeed_init`` sets ``trainer.optimizer = None`` and calls ``create_optimizer()``, which builds the
  optimizer of ``TrainingArguments.optim`` (AdamW): the passed one is dropped without a message.
* ``Trainer(optimizer_cls_and_kwargs=(LAMB, {...}))``: ``create_optimizer()`` builds ours on Trainer's two
  param groups (decay / no decay), with and without DeepSpeed. This is the supported route. Each group's
  ``weight_decay`` is ``TrainingArguments.weight_decay`` (default 0.0), whatever the kwargs say.
* A DeepSpeed config with an ``"optimizer"`` section makes Trainer (and accelerate, with ``DummyOptim``) hand
  the choice to DeepSpeed, which builds its own class: ``"LAMB"`` is DeepSpeed's FusedLamb (CUDA only; on
  GPU its trust ratios are taken over ZeRO partitions). ``optimizer_cls_and_kwargs`` is then ignored too.

:class:`OptimizerGuard` (a ``TrainerCallback``) turns each of these into an error with the fix, and checks at
``on_train_begin`` that the optimizer which will step is ours. :func:`require_trust_optimizer` and
:func:`check_deepspeed_config` do the same for accelerate users. Under DeepSpeed ZeRO our optimizer attaches to
the flat partitions at its first step (exact per-tensor trust ratios; :mod:`ds_conadv.integrations.deepspeed`).

:class:`ConAdvTrainer` is a ``Trainer`` that trains with ConAdv (:mod:`ds_conadv.conadv`): the step logic is
:class:`ds_conadv.conadv.ConAdvTrainer`'s, the look-ahead and staleness bookkeeping
:class:`~ds_conadv.conadv.ConAdvSchedule`'s.
"""
from __future__ import annotations

import inspect
import math
import os
import time
import warnings
from collections import deque
from typing import Any, Callable, Deque, Dict, Iterator, List, Optional, Union

import torch

try:
    import transformers
    from transformers import Trainer, TrainerCallback
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("ds_conadv.integrations.hf needs transformers (pip install 'transformers>=4.48'): "
                      f"{exc}") from None

from ds_conadv.config import ConAdvConfig, ConfigError
from ds_conadv.conadv.dual_bn import has_plain_batchnorm
from ds_conadv.conadv.perturb import generate, logits_of
from ds_conadv.conadv.trainer import ConAdvTrainer as _ConAdvStep
from ds_conadv.conadv.trainer import prepare_model
from ds_conadv.optim import LARC, TrustRatioOptimizer

__all__ = ["OptimizerSwapError", "OptimizerGuard", "ConAdvTrainer", "require_trust_optimizer",
           "check_deepspeed_config", "find_trust_optimizer", "token_cross_entropy"]


class OptimizerSwapError(RuntimeError):
    """A Trainer/accelerate/DeepSpeed setup would step another optimizer than the ds_conadv one asked for."""


_FIX = "pass Trainer(optimizer_cls_and_kwargs=(LAMB, {...})) (see docs/integrations.md)"


def find_trust_optimizer(optimizer: Any) -> Optional[Any]:
    """Our LAMB/LARS (or LARC) inside the wrappers accelerate, DeepSpeed and ZeRO put around it, or None.
    Follows ``.optimizer`` attributes (AcceleratedOptimizer, DeepSpeedOptimizerWrapper, the ZeRO and fp16 wrappers,
    a DeepSpeed engine)."""
    seen = set()
    while optimizer is not None and id(optimizer) not in seen:
        if isinstance(optimizer, (TrustRatioOptimizer, LARC)):
            return optimizer
        seen.add(id(optimizer))
        optimizer = getattr(optimizer, "optimizer", None)
    return None


def _innermost(optimizer: Any) -> Any:
    seen = set()
    while getattr(optimizer, "optimizer", None) is not None and id(optimizer) not in seen:
        seen.add(id(optimizer))
        optimizer = optimizer.optimizer
    return optimizer


def require_trust_optimizer(optimizer: Any, *, allow_plain_adam: bool = False) -> Any:
    """The ds_conadv optimizer that ``optimizer`` (as returned by ``accelerator.prepare``, ``trainer.optimizer``
    or a DeepSpeed engine) steps; raises :class:`OptimizerSwapError` naming the class that steps instead.

    Also raises when a LAMB/LARS would never apply a trust ratio: every group has ``weight_decay == 0`` and
    ``always_adapt`` is off (apex semantics; Trainer sets every group's weight decay from
    ``TrainingArguments.weight_decay``, default 0.0). ``allow_plain_adam=True`` accepts that."""
    ours = find_trust_optimizer(optimizer)
    if ours is None:
        inner = _innermost(optimizer)
        raise OptimizerSwapError(f"the optimizer that steps is {type(inner).__module__}.{type(inner).__name__}, "
                                 f"not ds_conadv's LAMB/LARS: {_FIX}")
    if isinstance(ours, TrustRatioOptimizer) and not allow_plain_adam:
        groups = ours.param_groups
        if groups and not any(g.get("weight_decay", 0) != 0 or g.get("always_adapt", False) for g in groups):
            raise OptimizerSwapError(
                f"{type(ours).__name__} has weight_decay 0 in every param group and always_adapt=False: no trust "
                "ratio is ever applied (it steps as plain Adam/SGD). Trainer sets each group's weight decay from "
                "TrainingArguments.weight_decay (default 0.0): set it (e.g. 0.01), or pass always_adapt=True")
    return ours


def _deepspeed_section_type(config: Dict[str, Any]) -> Optional[str]:
    section = config.get("optimizer")
    if section is None:
        return None
    return str(section.get("type", "")) if isinstance(section, dict) else repr(section)


def _deepspeed_resolves_to_ours(kind: str) -> bool:
    """DeepSpeed builds a type that is not one of its own names as ``getattr(torch.optim, type)``: ours when a
    LAMB/LARS class was registered there under that name."""
    try:
        from deepspeed.runtime.config import DEEPSPEED_OPTIMIZERS
    except ImportError:
        return False
    cls = getattr(torch.optim, kind, None)
    return (kind.lower() not in DEEPSPEED_OPTIMIZERS and isinstance(cls, type)
            and issubclass(cls, TrustRatioOptimizer))


def check_deepspeed_config(config: Dict[str, Any]) -> None:
    """Raise :class:`OptimizerSwapError` when a DeepSpeed config (the dict transformers/accelerate pass to
    ``deepspeed.initialize``) would make DeepSpeed build its own optimizer in place of ours: an ``"optimizer"``
    section, unless its type resolves to a LAMB/LARS registered in ``torch.optim`` under a name that is not one of
    DeepSpeed's. ``"LAMB"`` there is DeepSpeed's FusedLamb, not ds_conadv's."""
    kind = _deepspeed_section_type(config)
    if kind is None or _deepspeed_resolves_to_ours(kind):
        return
    what = "FusedLamb (CUDA only; trust ratios over ZeRO partitions)" if "lamb" in kind.lower() else "own optimizer"
    raise OptimizerSwapError(
        f'the DeepSpeed config has "optimizer": {{"type": "{kind}"}}: transformers/accelerate then let DeepSpeed '
        f"build its {what} and ignore any optimizer given in Python. Delete the \"optimizer\" section and {_FIX}; "
        "with accelerate, pass LAMB(...) to accelerator.prepare")


class OptimizerGuard(TrainerCallback):
    """Fails loudly where Trainer would silently train with another optimizer than ds_conadv's LAMB/LARS.

    * at the end of ``Trainer.__init__``: a DeepSpeed config with an ``"optimizer"`` section, or DeepSpeed with
      ``optimizers=(opt, sched)`` (which Trainer drops for AdamW);
    * at ``on_train_begin``: the optimizer that will step (under accelerate's and DeepSpeed's wrappers) must be
      ours, with a trust ratio that can apply (see :func:`require_trust_optimizer`).
    """

    def __init__(self, allow_plain_adam: bool = False):
        self.allow_plain_adam = allow_plain_adam

    def on_init_end(self, args, state, control, optimizer=None, **kwargs):
        ds_config = getattr(args, "hf_deepspeed_config", None)
        if ds_config is None:
            return control
        check_deepspeed_config(ds_config.config)
        if optimizer is not None:
            raise OptimizerSwapError(
                f"Trainer with DeepSpeed drops optimizers=({type(optimizer).__name__}(...), ...) and builds "
                f"TrainingArguments.optim ({getattr(args.optim, 'value', args.optim)}) instead (transformers' "
                f"deepspeed_init): {_FIX}")
        return control

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        require_trust_optimizer(optimizer, allow_plain_adam=self.allow_plain_adam)
        return control


# ----------------------------------------------------------------------------------------------------------
# ConAdv under Trainer
# ----------------------------------------------------------------------------------------------------------
def token_cross_entropy(output: Any, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the logits against ``labels`` of any shape (sequence or token classification);
    label -100 is ignored, as in transformers."""
    logits = logits_of(output)
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                                             ignore_index=-100)


def _check_trainer_hooks() -> None:
    """ConAdvTrainer overrides these public Trainer methods; fail at construction if their signature moved."""
    expected = {"get_batch_samples": ["self", "epoch_iterator", "num_batches", "device"],
                "training_step": ["self", "model", "inputs", "num_items_in_batch"]}
    for name, params in expected.items():
        method = getattr(Trainer, name, None)
        found = list(inspect.signature(method).parameters) if method is not None else None
        if found != params:
            raise ImportError(f"ConAdvTrainer supports transformers whose Trainer.{name} takes {params}; "
                              f"transformers {transformers.__version__} has {found}")


class _Feed:
    """The data iterator of the ConAdv schedule under Trainer. Trainer pulls each update step's micro-batches
    itself (``get_batch_samples``); the schedule takes those in order and, to look ahead past them, pulls from
    Trainer's epoch iterator directly — those batches are handed to Trainer first at its next pull."""

    def __init__(self):
        self.epoch_iterator: Optional[Iterator] = None
        self.handed: Deque[Any] = deque()      # given to Trainer, not yet pulled by the schedule
        self.ahead: Deque[Any] = deque()       # pulled by the schedule, not yet given to Trainer
        self.skip_check: List[Any] = []        # after a resume: batches already in the schedule's queue

    def __iter__(self):
        return self

    def __next__(self):
        if self.handed:
            return self.handed.popleft()
        if self.epoch_iterator is None:
            raise StopIteration
        batch = next(self.epoch_iterator)
        self.ahead.append(batch)
        return batch


def _to(value: Any, device: torch.device) -> Any:
    if torch.is_tensor(value):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


class _AheadFirst:
    """The batches the schedule pulled ahead, then the epoch iterator (a plain iterator: a generator's
    ``yield from`` would close Trainer's epoch iterator when it is dropped)."""

    def __init__(self, ahead: Deque[Any], epoch_iterator: Iterator):
        self.ahead, self.epoch_iterator = ahead, epoch_iterator

    def __iter__(self):
        return self

    def __next__(self):
        return self.ahead.popleft() if self.ahead else next(self.epoch_iterator)


class _TrainerStep(_ConAdvStep):
    """The ConAdv step of :class:`ds_conadv.conadv.ConAdvTrainer` with Trainer's backward; Trainer zeroes the
    gradients after its optimizer step (gradient accumulation) and steps the optimizer itself."""

    def __init__(self, trainer: "ConAdvTrainer", *args, **kwargs):
        self.trainer = trainer
        super().__init__(*args, **kwargs)

    def zero_grad(self) -> None:
        pass

    def backward(self, loss: torch.Tensor) -> None:
        self.trainer._conadv_backward(loss)

    def generate(self, x: Any, y: Any, generator: Optional[torch.Generator] = None) -> Any:
        # on the bare model, with the embedding module named on it
        return generate(self.generation_model, x, y, self.trainer.conadv_cfg, generator=generator,
                        loss_fn=self.attack_loss_fn)


class _SaveConAdvState(TrainerCallback):
    def __init__(self, trainer: "ConAdvTrainer"):
        self.trainer = trainer

    def on_save(self, args, state, control, **kwargs):
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        self.trainer.save_conadv_state(folder)
        return control


class ConAdvTrainer(Trainer):
    """``transformers.Trainer`` training with ConAdv: each micro-batch's loss is ``clean + adv_weight * adv``
    (main / adversarial BatchNorm for vision models), the adversarial example of micro-batch t+tau is generated
    after the backward of micro-batch t, with the weights of step t (the optimizer has not stepped yet).

    Args (besides Trainer's):
        conadv: the ``"conadv"`` section (:class:`~ds_conadv.config.ConAdvConfig` or its dict). Text models:
            ``"perturb": "embeddings"`` with ``"embedding_module"`` named on the bare model (e.g.
            ``"bert.embeddings"``). Vision models with BatchNorm: ``"dual_bn": true`` converts the model here,
            before Trainer builds the optimizer.
        conadv_loss_fn: ``loss_fn(output, labels)`` for the clean and adversarial losses and the attack (default
            :func:`token_cross_entropy`; Trainer's ``compute_loss``, label smoothing and ``num_items_in_batch``
            scaling are not used). Labels are the batch's ``"labels"`` entry.
        conadv_seed: attack randomness (per process: ``conadv_seed + 1000003 * process_index``).

    tau counts micro-batches, like every ds_conadv engine (with ``gradient_accumulation_steps=1``, optimizer
    steps). The pending look-ahead batch and its adversarial example are saved with each checkpoint
    (``conadv_state_<process>.pt``) and restored by ``train(resume_from_checkpoint=...)``. The ConAdv figures
    (clean/adversarial loss and accuracy, staleness, generation time) are added to Trainer's logs, averaged over
    the logging window, under ``conadv/...``.
    """

    def __init__(self, model=None, args=None, *trainer_args, conadv: Union[ConAdvConfig, Dict[str, Any], None] = None,
                 conadv_loss_fn: Optional[Callable] = None, conadv_seed: int = 0, **trainer_kwargs):
        _check_trainer_hooks()
        cfg = conadv if isinstance(conadv, ConAdvConfig) else ConAdvConfig.from_section(conadv)
        if model is not None:
            model = prepare_model(model, cfg)
        super().__init__(model, args, *trainer_args, **trainer_kwargs)
        if cfg.enabled and cfg.dual_bn and has_plain_batchnorm(self.model):
            raise ConfigError('"conadv.dual_bn" is true but the model still has plain BatchNorm layers')
        if len(self.label_names) > 1:
            raise ConfigError(f"ConAdvTrainer needs one label column, TrainingArguments.label_names = "
                              f"{self.label_names}")
        self.conadv_cfg = cfg
        self._label = self.label_names[0] if self.label_names else "labels"
        self._feed = _Feed()
        # the step logic of ds_conadv.conadv.ConAdvTrainer on Trainer's model; checks dual BN against a given
        # optimizer (one built before the conversion misses the adversarial BN parameters)
        self.conadv_step = _TrainerStep(self, self.model, self.optimizer, conadv_loss_fn or token_cross_entropy, cfg,
                                        seed=conadv_seed + 1000003 * self.args.process_index, split=self._split)
        self._wrapped_for: Optional[int] = None
        self._conadv_logs: List[Dict[str, float]] = []
        self._epoch_seen: Optional[int] = None
        self.add_callback(_SaveConAdvState(self))

    @property
    def conadv_schedule(self):
        return self.conadv_step.schedule

    # ---- data: Trainer's pulls and the schedule's look-ahead share one stream ---------------------------------
    def _split(self, batch: Any):
        if not isinstance(batch, dict) or self._label not in batch:
            keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
            raise TypeError(f"ConAdvTrainer needs dict batches with a {self._label!r} entry, got {keys} (a model "
                            "whose forward takes no labels needs TrainingArguments(remove_unused_columns=False))")
        x = {k: v for k, v in batch.items() if k != self._label}
        if self.conadv_cfg.perturb == "inputs":  # the attack needs the one input tensor (model(x), positional)
            if len(x) != 1:
                raise ConfigError(f'"conadv.perturb": "inputs" under ConAdvTrainer needs batches with one input '
                                  f"besides {self._label!r} (e.g. pixel_values), got {sorted(x)}; for text use "
                                  '"perturb": "embeddings"')
            (x,) = x.values()
        return x, batch[self._label]

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        feed = self._feed
        if epoch_iterator is not feed.epoch_iterator:
            if feed.ahead:  # Trainer left an epoch with batches the schedule had pulled ahead
                raise RuntimeError(f"{len(feed.ahead)} look-ahead batch(es) of the previous epoch were never "
                                   "trained on")
            feed.epoch_iterator = epoch_iterator
            feed.handed.clear()
            if not self.conadv_schedule.steps_per_epoch:
                self.conadv_schedule.set_epoch(int(math.floor(self.state.epoch + 1e-6)))
        from_ahead = min(len(feed.ahead), num_batches)  # already in the schedule's queue
        batches, num_items = super().get_batch_samples(_AheadFirst(feed.ahead, epoch_iterator), num_batches, device)
        fresh = batches[from_ahead:]
        if feed.skip_check:
            resumed = fresh[:len(feed.skip_check)]
            if self._same_batches(feed.skip_check[:len(resumed)], resumed):
                fresh = fresh[len(resumed):]
                del feed.skip_check[:len(resumed)]
            else:
                dropped = self.conadv_schedule.drop_lookahead()
                feed.skip_check = []
                warnings.warn(f"ConAdvTrainer: the resumed data stream differs from the saved look-ahead batches; "
                              f"dropped {dropped}: their steps generate the adversarial examples synchronously "
                              "(is the data order reproducible across a restart?)")
        feed.handed.extend(fresh)
        return batches, num_items

    def _same_batches(self, queued: List[Any], batches: List[Any]) -> bool:
        def same(a, b):
            return torch.is_tensor(a) and torch.is_tensor(b) and a.shape == b.shape and torch.equal(a.cpu(), b.cpu())

        for entry, batch in zip(queued, batches):
            x, y = self._split(batch)
            if not same(entry.y, y):
                return False
            if isinstance(x, dict):
                if set(entry.x) != set(x) or not all(same(entry.x[k], v) for k, v in x.items() if torch.is_tensor(v)):
                    return False
            elif not same(entry.x, x):
                return False
        return True

    # ---- the step ----------------------------------------------------------------------------------------
    def _for_wrapped(self, model: torch.nn.Module) -> None:
        """The training forward goes through Trainer's wrapper (DDP, DeepSpeed engine); the embedding module is
        named on the bare model: prefix it with the bare model's name inside the wrapper."""
        if self._wrapped_for == id(model):
            return
        cfg = self.conadv_cfg
        if cfg.enabled and cfg.dual_bn and isinstance(model, torch.nn.parallel.DistributedDataParallel):
            # the clean and adversarial forwards use different BN parameters before one backward
            raise NotImplementedError('ConAdvTrainer with "conadv.dual_bn" under DDP is not supported: use DeepSpeed '
                                      '(TrainingArguments(deepspeed=...)), one process, or "dual_bn": false')
        step_cfg = cfg
        if cfg.perturb == "embeddings" and model is not self.model:
            prefix = next((name for name, m in model.named_modules() if m is self.model), None)
            if prefix is None:
                raise RuntimeError(f"cannot find the model inside Trainer's {type(model).__name__} wrapper")
            if prefix:
                step_cfg = cfg.model_copy(update={"embedding_module": f"{prefix}.{cfg.embedding_module}"})
        self.conadv_step.cfg = step_cfg
        self.conadv_step.model = model
        self.conadv_step.generation_model = self.model
        self._wrapped_for = id(model)

    def _conadv_backward(self, loss: torch.Tensor) -> None:
        from accelerate.utils import DistributedType

        loss = loss / self.current_gradient_accumulation_steps
        kwargs = {}
        if self.accelerator.distributed_type == DistributedType.DEEPSPEED:
            kwargs["scale_wrt_gas"] = False  # as Trainer.training_step: the loss is scaled here
        self.accelerator.backward(loss, **kwargs)

    def training_step(self, model, inputs, num_items_in_batch=None):
        self._for_wrapped(model)
        model.train()
        schedule = self.conadv_schedule
        device = self.args.device
        schedule.prepare = lambda x, y: (_to(x, device), _to(y, device))
        batch = schedule.next_batch(self._feed, self.conadv_step.generate)
        if batch.y is not inputs[self._label] and not torch.equal(batch.y.cpu(), inputs[self._label].cpu()):
            raise RuntimeError("ConAdvTrainer lost track of the data stream: the schedule's batch is not the one "
                               "Trainer trains on")
        step = self.conadv_step
        step.last_batch = batch
        t0 = time.perf_counter()
        out = step.forward_backward(batch.x, batch.y, batch.x_adv)
        t1 = time.perf_counter()
        ahead = step.generate_next()
        t2 = time.perf_counter()
        schedule.end_step()
        logs = {k: float(v) for k, v in out.items() if v is not None and k != "loss"}
        logs.update(adversarial=float(batch.x_adv is not None), generated_ahead=float(ahead),
                    generated_now=float(batch.generated_now), time_forward_backward=t1 - t0,
                    time_generate_ahead=t2 - t1)
        if batch.stale_by is not None:
            logs["stale_by"] = float(batch.stale_by)
        self._conadv_logs.append(logs)
        return out["loss"].detach() / self.current_gradient_accumulation_steps

    def log(self, logs: Dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs and self._conadv_logs:
            keys = {k for entry in self._conadv_logs for k in entry}
            for key in sorted(keys):
                values = [e[key] for e in self._conadv_logs if key in e]
                logs[f"conadv/{key}"] = sum(values) / len(values)
            self._conadv_logs.clear()
        super().log(logs, *args, **kwargs)

    # ---- checkpoint --------------------------------------------------------------------------------------------
    def _state_file(self, folder: str) -> str:
        return os.path.join(folder, f"conadv_state_{self.args.process_index}.pt")

    def save_conadv_state(self, folder: str) -> None:
        """The schedule (step, look-ahead batches with their adversarial examples, generator) of this process."""
        os.makedirs(folder, exist_ok=True)
        torch.save(self.conadv_schedule.state_dict(), self._state_file(folder))

    def load_conadv_state(self, folder: str) -> None:
        path = self._state_file(folder)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: the checkpoint has no ConAdv state (saved by another Trainer?); "
                                    "resuming would lose the pending adversarial batch")
        state = torch.load(path, map_location="cpu", weights_only=False)
        self.conadv_schedule.load_state_dict(state, map_location=self.args.device)
        # the resumed data stream yields the queued batches again: they are checked, not queued twice
        self._feed.skip_check = list(self.conadv_schedule.pending)

    def train(self, resume_from_checkpoint: Union[str, bool, None] = None, **kwargs):
        folder = resume_from_checkpoint
        if isinstance(folder, bool):
            folder = get_last_checkpoint(self.args.output_dir) if folder else None
            if resume_from_checkpoint and folder is None:
                raise ValueError(f"no checkpoint found in {self.args.output_dir} to resume from")
        if folder:
            self.load_conadv_state(folder)
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
