"""ABSA's adaptive batch-size policy (Yao et al., arXiv 1810.01021), as pure logic.

The ``"absa"`` section (:class:`ABSAConfig`) and :class:`ABSASchedule`, which turns a sequence of per-epoch top
Hessian eigenvalues into the batch size, learning rate and adversarial ratio of the next epochs. The integrations
(DeepSpeed ``set_train_batch_size``, Horovod ``backward_passes_per_step``) and the eigenvalue computation
(:mod:`ds_conadv.hessian`) drive it (:mod:`ds_conadv.absa.driver`); it imports neither.

Rules, checked once per epoch in :meth:`ABSASchedule.end_epoch`:

* every ``interval`` epochs (while checks are on) the caller measures the top eigenvalue λ on ``eig_batches``
  micro-batches per rank (or on at least ``eig_samples`` examples over all ranks) and passes it in; λ_ref is the
  largest eigenvalue seen **since the batch last grew** (a reference that is never reset would trigger at every
  check after the first growth, because the landscape stays flat);
* the batch grows when λ ≤ ``eig_ratio`` · λ_ref, or when ``duration`` epochs have passed since it last grew
  (or since the start);
* growing multiplies the global batch by ``factor`` (capped at ``max_batch``; the applied factor f is the ratio
  actually reached), the learning rate by f (``lr_scaling: "linear"``) or √f (``"sqrt"``), and divides the
  adversarial ratio (the fraction of each batch trained on FGSM examples) by f;
* at ``max_batch`` or from ``stop_epoch`` on, eigenvalue checks and adversarial training stop (ratio 0);
* with ``enabled: false`` nothing is checked, the batch never grows and no example is adversarial.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Dict, List, Literal, Mapping, Optional, Sequence

from pydantic import Field, model_validator

from ds_conadv.config import ConfigError, SectionModel

__all__ = ["ABSAConfig", "ABSASchedule", "ABSAEpoch", "accumulation_steps", "reachable_batches",
           "check_reachable_batches", "plot_log"]


class ABSAConfig(SectionModel):
    """The ``"absa"`` section (next to ``"conadv"``)."""

    section_name: ClassVar[str] = "absa"
    enabled: bool = False
    interval: int = Field(1, ge=1, description="epochs between eigenvalue checks")
    eig_batches: int = Field(10, ge=1, description="micro-batches per rank the top eigenvalue is measured on")
    eig_samples: Optional[int] = Field(
        None, ge=1, description="examples (all ranks together) the top eigenvalue is measured on, at least; replaces "
                                "eig_batches by ceil(eig_samples / (micro batch x ranks))")
    eig_max_iter: int = Field(10, ge=1, description="power-iteration products per check at most (HessianFlow: 10)")
    eig_tol: float = Field(1e-2, gt=0.0, description="stop the power iteration at this relative change")
    eig_ratio: float = Field(0.5, gt=0.0, le=1.0, description="grow when lambda <= eig_ratio * lambda_ref")
    duration: int = Field(10, ge=1, description="grow anyway after this many epochs without growth")
    factor: int = Field(2, ge=2, description="batch multiplier per growth")
    max_batch: Optional[int] = Field(None, ge=1, description="largest global batch (required when enabled)")
    lr_scaling: Literal["linear", "sqrt"] = "linear"
    adv_ratio: float = Field(0.5, ge=0.0, le=1.0, description="initial fraction of each batch made adversarial")
    epsilon: Optional[float] = Field(None, gt=0.0, description="FGSM epsilon (default: the conadv section's)")
    stop_epoch: Optional[int] = Field(None, ge=0, description="no checks and no adversarial training from here on")

    @model_validator(mode="after")
    def _needs_max_batch(self):
        if self.enabled and self.max_batch is None:
            raise ValueError('"max_batch" is required when "enabled" is true')
        if self.eig_samples is not None and "eig_batches" in self.model_fields_set:
            raise ValueError('"eig_batches" and "eig_samples" are both set: give one (eig_samples counts examples '
                             'over all ranks, eig_batches micro-batches per rank)')
        return self

    def eig_batches_per_rank(self, micro_batch: int, world_size: int) -> int:
        """Micro-batches per rank the eigenvalue is measured on: ``eig_batches``, or with ``eig_samples`` the fewest
        that hold that many examples over all ranks."""
        if self.eig_samples is None:
            return self.eig_batches
        return -(-self.eig_samples // (int(micro_batch) * int(world_size)))


@dataclass
class ABSAEpoch:
    """What happened at the end of one epoch (one row of the log / plot)."""

    epoch: int
    eigenvalue: Optional[float]
    batch: int
    lr: float
    adv_ratio: float
    steps: int
    grew: bool = False
    reason: str = ""


@dataclass
class ABSASchedule:
    """Batch size, LR and adversarial ratio from per-epoch eigenvalues (see the module docstring)."""

    cfg: ABSAConfig
    batch: int
    lr: float
    adv_ratio: float = field(default=-1.0)
    reference: Optional[float] = None  # largest eigenvalue since the last growth
    last_growth_epoch: int = 0
    checking: bool = True
    steps: int = 0
    history: List[ABSAEpoch] = field(default_factory=list)

    def __post_init__(self):
        if self.adv_ratio < 0:
            self.adv_ratio = self.cfg.adv_ratio
        if not self.cfg.enabled:
            self._stop()
        if self.cfg.max_batch is not None and self.batch > self.cfg.max_batch:
            raise ConfigError(f'the starting batch {self.batch} is larger than "absa.max_batch" = {self.cfg.max_batch}')
        if self.cfg.max_batch is not None and self.batch >= self.cfg.max_batch:
            self._stop()

    def _stop(self) -> None:
        self.checking = False
        self.adv_ratio = 0.0

    def wants_eigenvalue(self, epoch: int) -> bool:
        """Whether the caller should measure the top eigenvalue at the end of ``epoch``."""
        if not (self.cfg.enabled and self.checking):
            return False
        if self.cfg.stop_epoch is not None and epoch >= self.cfg.stop_epoch:
            return False
        return epoch % self.cfg.interval == 0

    def count_step(self, n: int = 1) -> None:
        self.steps += n

    def end_epoch(self, epoch: int, eigenvalue: Optional[float] = None) -> ABSAEpoch:
        """Apply the rules after ``epoch``; returns the log row (``grew`` tells the caller to resize)."""
        cfg = self.cfg
        grew, reason = False, ""
        if cfg.enabled and self.checking and cfg.stop_epoch is not None and epoch + 1 >= cfg.stop_epoch:
            self._stop()
            reason = "stop_epoch"
        elif cfg.enabled and self.checking:
            if eigenvalue is not None:
                if not math.isfinite(eigenvalue):
                    raise ValueError(f"top eigenvalue at epoch {epoch} is {eigenvalue}")
                if self.reference is not None and eigenvalue <= cfg.eig_ratio * self.reference:
                    grew, reason = True, f"eigenvalue {eigenvalue:.4g} <= {cfg.eig_ratio} x {self.reference:.4g}"
                self.reference = eigenvalue if self.reference is None else max(self.reference, eigenvalue)
            if not grew and epoch + 1 - self.last_growth_epoch >= cfg.duration:
                grew, reason = True, f"{cfg.duration} epochs without growth"
            if grew:
                self._grow(epoch)
        row = ABSAEpoch(epoch, eigenvalue, self.batch, self.lr, self.adv_ratio, self.steps, grew, reason)
        self.history.append(row)
        return row

    def _grow(self, epoch: int) -> None:
        cfg = self.cfg
        new_batch = min(self.batch * cfg.factor, cfg.max_batch)
        f = new_batch / self.batch
        self.batch = new_batch
        self.lr *= f if cfg.lr_scaling == "linear" else math.sqrt(f)
        self.adv_ratio /= f
        self.reference = None  # the next check measures against the landscape at this batch size
        self.last_growth_epoch = epoch + 1
        if self.batch >= cfg.max_batch:
            self._stop()

    # -- checkpoints / plots ---------------------------------------------------------------------------------
    def state_dict(self) -> Dict:
        return {"batch": self.batch, "lr": self.lr, "adv_ratio": self.adv_ratio, "reference": self.reference,
                "last_growth_epoch": self.last_growth_epoch, "checking": self.checking, "steps": self.steps,
                "history": [asdict(h) for h in self.history]}

    def load_state_dict(self, state: Dict) -> None:
        for key in ("batch", "lr", "adv_ratio", "reference", "last_growth_epoch", "checking", "steps"):
            setattr(self, key, state[key])
        self.history = [ABSAEpoch(**h) for h in state["history"]]

    def plot(self, path: str) -> str:
        """Eigenvalue, batch, LR (here: whatever ``lr`` the schedule was given, times the factors), adversarial
        ratio and optimizer steps per epoch, as a PNG (see :func:`plot_log`). Each row is the state *after* that
        epoch's decision."""
        rows = [{"epoch": h.epoch, "eigenvalue": h.eigenvalue, "global_batch": h.batch, "lr": h.lr,
                 "adv_ratio": h.adv_ratio, "total_steps": h.steps, "grew": h.grew} for h in self.history]
        return plot_log(rows, path)


def accumulation_steps(global_batch: int, micro_batch: int, world_size: int) -> int:
    """Gradient accumulation steps for ``global_batch`` (DeepSpeed ``set_train_batch_size`` / Horovod
    ``backward_passes_per_step``); the batch must be a multiple of micro batch × ranks."""
    unit = micro_batch * world_size
    if global_batch % unit:
        raise ConfigError(f"global batch {global_batch} is not a multiple of micro batch {micro_batch} x "
                          f"{world_size} ranks = {unit}; choose max_batch/factor so every size divides")
    return global_batch // unit


def reachable_batches(start: int, cfg: ABSAConfig) -> List[int]:
    """Every global batch the schedule can reach from ``start``: start, start·f, start·f², ... capped at
    ``max_batch`` (just ``[start]`` when disabled or already at the cap)."""
    sizes = [int(start)]
    if not cfg.enabled or cfg.max_batch is None:
        return sizes
    while sizes[-1] < cfg.max_batch:
        sizes.append(min(sizes[-1] * cfg.factor, cfg.max_batch))
    return sizes


def check_reachable_batches(start: int, cfg: ABSAConfig, micro_batch: int, world_size: int) -> List[int]:
    """Gradient accumulation steps for every reachable batch, checked before training starts (a batch that does
    not divide would otherwise fail epochs later, at its growth). Raises :class:`ConfigError` naming the batch,
    the micro batch, the number of ranks and the whole sequence."""
    if cfg.max_batch is not None and start > cfg.max_batch:
        raise ConfigError(f'the starting global batch {start} is larger than "absa.max_batch" = {cfg.max_batch}')
    sizes = reachable_batches(start, cfg)
    try:
        return [accumulation_steps(b, micro_batch, world_size) for b in sizes]
    except ConfigError as e:
        raise ConfigError(f"ABSA can grow the global batch through {sizes} (start {start}, \"factor\" "
                          f"{cfg.factor}, \"max_batch\" {cfg.max_batch}): {e}") from None


def plot_log(rows: Sequence[Mapping[str, Any]], path: str, title: Optional[str] = None) -> str:
    """One PNG with five panels per epoch: top eigenvalue (measured epochs only), global batch, learning rate,
    adversarial ratio and cumulative optimizer steps. ``rows`` are dicts with ``epoch``, ``eigenvalue`` (None when
    not measured), ``global_batch``, ``lr``, ``adv_ratio``, ``total_steps`` and ``grew``; a dashed line marks the
    end of each epoch after which the batch grew. Matplotlib's Agg canvas, without pyplot (the global backend
    is untouched)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    epochs = [r["epoch"] for r in rows]
    fig = Figure(figsize=(20, 3.6))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 5, sharex=True)
    eig = [(r["epoch"], r["eigenvalue"]) for r in rows if r.get("eigenvalue") is not None]
    if eig:
        axes[0].plot(*zip(*eig), "o-")
    axes[0].set_title("top Hessian eigenvalue")
    # per-epoch settings as steps (constant over the epoch); the step count accumulates
    panels = (("global_batch", "global batch", "steps-mid"), ("lr", "learning rate", "steps-mid"),
              ("adv_ratio", "adversarial ratio", "steps-mid"), ("total_steps", "optimizer steps (total)", "default"))
    for ax, (key, name, style) in zip(axes[1:], panels):
        ax.plot(epochs, [r[key] for r in rows], "o-", drawstyle=style, ms=3)
        ax.set_title(name)
    batches = sorted({r["global_batch"] for r in rows})
    if len(batches) > 1:
        axes[1].set_yscale("log", base=2)
        axes[1].set_yticks(batches, [str(b) for b in batches])
        axes[1].minorticks_off()
    for ax in axes:
        for r in rows:
            if r.get("grew"):
                ax.axvline(r["epoch"] + 0.5, color="grey", ls="--", lw=0.8)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path
