"""One training run of the reproduction study: a plain dict spec in, a plain dict of results out.

Regimes are combinations of: the optimizer (``sgd`` / ``lars`` / ``lamb``, the latter two with
:func:`ds_conadv.optim.param_groups`), the batch size, an optional ``adv`` section (DisAdv / ConAdv through
:class:`ds_conadv.conadv.ConAdvTrainer`, with a BN mode and an optional staleness guard), or an ``absa`` section
(adaptive batch size with FGSM examples, :class:`ds_conadv.absa.ABSASchedule` + :mod:`ds_conadv.hessian`).

BN modes of the adversarial forward (``adv.bn``):

* ``dual``          — the paper / AdvProp: adversarial examples through a separate BN (``convert_dual_bn``).
* ``shared``        — one BN; the adversarial forward normalises with its own batch statistics and updates the
  running statistics like any training forward.
* ``shared_frozen`` — one BN; the adversarial forward normalises with its own batch statistics but leaves the
  running statistics alone, so evaluation sees clean statistics only.
* ``mixed``         — one BN, one forward over the concatenated clean + adversarial batch (statistics over the
  mixture, running statistics of the mixture).

Loss scale (``adv.normalize_loss``): the paper's loss is ``clean + adv_weight * adv``, which doubles the
gradient of every parameter the trust ratio does not rescale (BN, biases: LARS's excluded group) compared with
the vanilla run whose LR was tuned; ``normalize_loss`` divides by ``1 + adv_weight`` instead (the library's
``"loss_reduction": "mean"``).

Staleness guard (``adv.guard_drift``): before using a stale example, the relative weight change since it was
generated, ``sum over the stale steps of ||w_{s+1} - w_s|| / ||w_s||``, is compared with the threshold; above it,
the example is regenerated now with the current weights (a DisAdv step). ``guard_counts`` in the result says how
often that happened.
"""
from __future__ import annotations

import collections
import math
import time
from typing import Any, Dict, Optional

import torch
from torch import nn

from ds_conadv.config import ConAdvConfig
from ds_conadv.conadv import ConAdvTrainer, adversarial_forward, convert_dual_bn, frozen_bn_stats
from ds_conadv.conadv.perturb import call_model
from ds_conadv.conadv.trainer import _accuracy
from ds_conadv.optim import LAMB, LARS, param_groups

from .models import build_model
from .tasks import Task

__all__ = ["run_spec", "adv_config", "evaluate"]

_ADV_KEYS = ("tau", "epsilon", "attack", "steps", "step_size", "target", "adv_weight", "start_epoch", "stop_epoch",
             "random_start", "random_start_prob")


def adv_config(task: Task, adv: Dict[str, Any]) -> ConAdvConfig:
    """The ConAdvConfig of a spec's ``adv`` section for ``task`` (inputs in [0, 1], or the token embeddings)."""
    data = {k: adv[k] for k in _ADV_KEYS if k in adv}
    data.update(enabled=True, dual_bn=adv.get("bn", "dual") == "dual")
    if adv.get("normalize_loss"):
        data["loss_reduction"] = "mean"
    if task.kind == "image":
        data.update(perturb="inputs", input_range=task.input_range)
    else:
        data.update(perturb="embeddings", embedding_module="embed")
    return ConAdvConfig(**data)


class StudyTrainer(ConAdvTrainer):
    """ConAdvTrainer with the study's BN modes and the staleness guard."""

    def __init__(self, *args, bn_mode: str = "dual", guard_drift: Optional[float] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.bn_mode = bn_mode
        self.guard_drift = guard_drift
        self.drifts: collections.deque = collections.deque(maxlen=64)
        self.guard_counts = {"checked": 0, "regenerated": 0}
        self._params = [p for p in self.model.parameters() if p.requires_grad]

    def forward_backward(self, x, y, x_adv):
        if x_adv is not None and self.guard_drift is not None and self.last_batch.stale_by:
            self.guard_counts["checked"] += 1
            drift = sum(list(self.drifts)[-self.last_batch.stale_by:])
            if drift > self.guard_drift:
                self.guard_counts["regenerated"] += 1
                x_adv = self.generate(x, y, self.schedule.generator)
        if x_adv is None or self.bn_mode in ("dual", "shared"):
            return super().forward_backward(x, y, x_adv)
        self.zero_grad()
        cfg = self.cfg
        if self.bn_mode == "mixed" and cfg.perturb == "inputs":
            out = call_model(self.model, torch.cat([x, x_adv]))
            clean_out, adv_out = out[: len(y)], out[len(y):]
        else:                                       # shared_frozen (or mixed on embeddings: no BN there)
            clean_out = call_model(self.model, x)
            with frozen_bn_stats(self.model, self.bn_mode == "shared_frozen"):
                adv_out = adversarial_forward(self.model, x, x_adv, cfg)
        clean_loss, adv_loss = self.loss_fn(clean_out, y), self.loss_fn(adv_out, y)
        loss = clean_loss + cfg.adv_weight * adv_loss
        if cfg.loss_reduction == "mean":
            loss = loss / (1.0 + cfg.adv_weight)
        self.backward(loss)
        return {"loss": loss.detach(), "clean_loss": clean_loss.detach(), "adv_loss": adv_loss.detach(),
                "clean_acc": _accuracy(clean_out, y), "adv_acc": _accuracy(adv_out, y)}

    def optimizer_step(self) -> None:
        before = [p.detach().clone() for p in self._params] if self.guard_drift is not None else None
        super().optimizer_step()
        if before is not None:
            num = math.sqrt(sum(float((p.detach() - b).pow(2).sum()) for p, b in zip(self._params, before)))
            den = math.sqrt(sum(float(b.pow(2).sum()) for b in before)) or 1.0
            self.drifts.append(num / den)


def _optimizer(model: nn.Module, spec: Dict[str, Any]):
    opt, lr, wd = spec["optimizer"], spec["lr"], spec.get("weight_decay", 5e-4)
    mult = spec.get("excl_lr_mult", 1.0)
    if opt == "sgd":
        groups = param_groups(model, wd)
        for g in groups:
            g["lr"] = lr * (mult if g["weight_decay"] == 0.0 else 1.0)
            g.pop("always_adapt", None)
        return torch.optim.SGD(groups, lr=lr, momentum=spec.get("momentum", 0.9))
    groups = param_groups(model, wd)
    for g in groups:
        g["lr"] = lr * (mult if g["weight_decay"] == 0.0 else 1.0)
    if opt == "lars":
        return LARS(groups, lr=lr, momentum=spec.get("momentum", 0.9), weight_decay=wd,
                    trust_coefficient=spec.get("trust_coefficient", 0.001), backend="reference")
    if opt == "lamb":
        return LAMB(groups, lr=lr, weight_decay=wd, backend="reference")
    raise ValueError(f"optimizer {opt!r}; allowed: sgd, lars, lamb")


def _lr_lambda(total_steps: int, warmup_steps: int):
    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return f


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> float:
    was = model.training
    model.eval()
    correct = sum(int((call_model(model, x[i:i + batch_size]).argmax(-1) == y[i:i + batch_size]).sum())
                  for i in range(0, len(y), batch_size))
    model.train(was)
    return correct / len(y)


def _batches(x: torch.Tensor, y: torch.Tensor, batch: int, seed: int):
    """Endless stream of shuffled batches (drop-last per epoch), from its own generator."""
    g = torch.Generator().manual_seed(1_000_003 * seed + 17)
    n = len(y)
    while True:
        perm = torch.randperm(n, generator=g)
        for i in range(0, n - batch + 1, batch):
            idx = perm[i:i + batch]
            yield x[idx], y[idx]


def run_spec(spec: Dict[str, Any], task: Task, split: str = "val", robustness: bool = False,
             progress=None) -> Dict[str, Any]:
    """Train one model as ``spec`` says and return its metrics. ``split`` is what it is scored on ("val" while
    choosing hyper-parameters, "test" for the final seeds; the validation accuracy is always reported)."""
    seed = spec["seed"]
    torch.manual_seed(seed)
    model = build_model(task, spec.get("width", 16))
    adv = spec.get("adv")
    cfg = adv_config(task, adv) if adv else None
    if cfg is not None and cfg.dual_bn:
        model = convert_dual_bn(model)
    if spec.get("absa"):
        from .absa_run import run_absa
        return run_absa(spec, task, model, split, progress, build_optimizer=_optimizer, adv_config=adv_config,
                        evaluate=evaluate)
    opt = _optimizer(model, spec)
    n = len(task.y_train)
    batch = spec["batch"]
    steps_per_epoch = n // batch
    total = steps_per_epoch * spec["epochs"]
    warm = int(round(spec.get("warmup_epochs", 0) * steps_per_epoch))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(total, warm))
    trainer = StudyTrainer(model, opt, cfg=cfg, lr_scheduler=sched, seed=seed, steps_per_epoch=steps_per_epoch,
                           bn_mode=(adv or {}).get("bn", "dual"), guard_drift=(adv or {}).get("guard_drift"))
    stream = _batches(task.x_train, task.y_train, batch, seed)
    t0 = time.perf_counter()
    diverged = False
    last: Dict[str, Any] = {}
    adv_acc_sum = adv_n = 0.0
    for step in range(total):
        m = trainer.train_batch(stream)
        if not math.isfinite(m["loss"]):
            diverged = True
            break
        if m["adversarial"] and step >= total - steps_per_epoch:
            adv_acc_sum += m["adv_acc"]
            adv_n += 1
        last = m
        if progress is not None:
            progress(step + 1, total)
    wall = time.perf_counter() - t0
    res = {"steps": step + 1, "wall_time_s": wall, "diverged": diverged,
           "final_train_loss": last.get("loss"), "last_epoch_adv_train_acc": adv_acc_sum / adv_n if adv_n else None}
    if diverged or not all(torch.isfinite(p).all() for p in model.parameters()):
        chance = 1.0 / task.num_classes
        res.update(diverged=True, train_acc=chance, val_acc=chance, test_acc=chance if split == "test" else None)
        return res
    res.update(train_acc=evaluate(model, task.x_train, task.y_train), val_acc=evaluate(model, task.x_val, task.y_val))
    if split == "test":
        res["test_acc"] = evaluate(model, task.x_test, task.y_test)
    if trainer.guard_drift is not None:
        res["guard_counts"] = dict(trainer.guard_counts)
    if robustness and task.kind == "image":
        # one evaluation radius for every regime (comparable PGD figures); "configured" = the regime's own attack
        # type (vanilla regimes: AdvProp's random-target one-step attack) at that radius
        from ds_conadv.conadv.robustness import robustness_report
        eps = spec.get("robust_epsilon", 8 / 255)
        rcfg = (cfg.model_copy(update={"epsilon": eps, "step_size": None}) if cfg is not None
                else adv_config(task, {"epsilon": eps, "attack": "pgd", "target": "random"}))
        xs, ys = (task.x_test, task.y_test) if split == "test" else (task.x_val, task.y_val)
        res["robustness"] = robustness_report(model, xs[:1000], ys[:1000], rcfg, pgd_steps=10, seed=seed)
    return res
