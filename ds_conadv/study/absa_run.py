"""The ABSA regime of the study: adaptive batch size from the top Hessian eigenvalue, with FGSM examples.

The policy is the library's :class:`ds_conadv.absa.ABSASchedule` (grow when λ ≤ eig_ratio · λ_ref, or after
``duration`` epochs; batch ×factor, LR ×factor, adversarial ratio ÷factor); the eigenvalue comes from
:class:`ds_conadv.hessian.Hessian` (power iteration, eval mode) on ``eig_samples`` fresh training examples per
check (0: none, so that ``duration`` alone grows the batch: a fixed clock to compare the rule with). ``ema``
(0 = off) smooths the measured eigenvalues before the rule sees them: ``s_k = ema · s_{k-1} + (1 - ema) · λ_k``
(restarted at each growth), so one noisy high measurement does not set the reference and one noisy low one does
not trigger a growth. On top of the schedule's LR, the same warm-up
and cosine decay over the epoch budget as the fixed-batch regimes.
"""
from __future__ import annotations

import math
import time
from typing import Any, Dict

import torch
import torch.nn.attention
import torch.nn.functional as F

from ds_conadv.absa import ABSAConfig, ABSASchedule
from ds_conadv.conadv import adversarial_forward, generate
from ds_conadv.conadv.perturb import call_model

__all__ = ["run_absa"]


def run_absa(spec: Dict[str, Any], task, model, split: str, progress=None, *, build_optimizer, adv_config,
             evaluate) -> Dict[str, Any]:
    """One ABSA run; the study's optimizer builder, attack config and evaluation come from the caller
    (:mod:`ds_conadv.study.core`), so that the regimes share them."""
    _optimizer = build_optimizer

    a = spec["absa"]
    seed, epochs = spec["seed"], spec["epochs"]
    cfg = ABSAConfig(enabled=True, max_batch=a["max_batch"], duration=a.get("duration", 10),
                     eig_ratio=a.get("eig_ratio", 0.5), adv_ratio=a.get("adv_ratio", 0.2),
                     interval=a.get("interval", 1), factor=a.get("factor", 2),
                     lr_scaling=a.get("lr_scaling", "linear"),
                     stop_epoch=a.get("stop_epoch", epochs // 2))
    sched = ABSASchedule(cfg, batch=spec["batch"], lr=spec["lr"])
    opt = _optimizer(model, spec)
    base = [g["lr"] / spec["lr"] for g in opt.param_groups]      # excluded-group multipliers
    attack = adv_config(task, {"epsilon": a.get("epsilon", 0.02), "attack": "fgsm", "bn": "shared"})
    g = torch.Generator().manual_seed(1_000_003 * seed + 17)
    eg = torch.Generator().manual_seed(7 * seed + 3)
    n = len(task.y_train)
    warm = spec.get("warmup_epochs", 0)
    ema = a.get("ema", 0.0)
    smooth = None
    log, eig_seconds = [], 0.0
    t0 = time.perf_counter()
    steps = 0
    diverged = False
    for epoch in range(epochs):
        perm = torch.randperm(n, generator=g)
        bs = sched.batch
        nb = n // bs
        for i in range(nb):
            frac = epoch + i / nb
            cosine = 0.5 * (1 + math.cos(math.pi * (frac - warm) / max(epochs - warm, 1e-9)))
            factor = frac / warm if frac < warm else cosine
            for grp, b in zip(opt.param_groups, base):
                grp["lr"] = sched.lr * b * max(factor, 1e-3 if frac < warm else 0.0)
            idx = perm[i * bs:(i + 1) * bs]
            x, y = task.x_train[idx], task.y_train[idx]
            n_adv = max(int(bs * sched.adv_ratio), 1) if sched.adv_ratio > 0 else 0
            model.train()
            opt.zero_grad(set_to_none=True)
            if n_adv:
                model.eval()                                     # HessianFlow: FGSM in eval mode
                x_adv = generate(model, x[:n_adv], y[:n_adv], attack, generator=g)
                model.train()
                adv_out = adversarial_forward(model, x[:n_adv], x_adv, attack)
                clean_out = call_model(model, x[n_adv:])
                loss = (F.cross_entropy(adv_out, y[:n_adv], reduction="sum")
                        + F.cross_entropy(clean_out, y[n_adv:], reduction="sum")) / bs
            else:
                loss = F.cross_entropy(call_model(model, x), y)
            if not torch.isfinite(loss):
                diverged = True
                break
            loss.backward()
            opt.step()
            steps += 1
            sched.count_step()
        if diverged:
            break
        eig = None
        if sched.wants_eigenvalue(epoch) and a.get("eig_samples", 128) > 0:
            from ds_conadv.hessian import Hessian
            te = time.perf_counter()
            sel = torch.randperm(n, generator=eg)[: a.get("eig_samples", 128)]
            h = Hessian(model, F.cross_entropy, data=(task.x_train[sel], task.y_train[sel]), seed=seed + epoch,
                        progress=False)
            # the math attention kernel: the fused CPU kernels have no double backward
            with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
                values, _ = h.eigenvalues(top_n=1, max_iter=a.get("eig_max_iter", 10), tol=a.get("eig_tol", 1e-2))
            eig_seconds += time.perf_counter() - te
            raw = float(values[0])
            smooth = raw if (smooth is None or not ema) else ema * smooth + (1 - ema) * raw
            eig = smooth
        row = sched.end_epoch(epoch, eig)
        if row.grew:
            smooth = None
        log.append({"epoch": epoch, "eigenvalue": eig, "batch": row.batch, "lr": row.lr, "adv_ratio": row.adv_ratio,
                    "steps": row.steps, "grew": row.grew, "reason": row.reason})
        if progress is not None:
            progress(epoch + 1, epochs)
    wall = time.perf_counter() - t0
    growth = [r["reason"] for r in log if r["grew"]]
    res = {"steps": steps, "wall_time_s": wall, "eig_time_s": eig_seconds, "diverged": diverged, "absa_log": log,
           "growths_eigenvalue": sum(r.startswith("eigenvalue") for r in growth),
           "growths_duration": sum("without growth" in r for r in growth), "final_batch": sched.batch}
    if diverged:
        c = 1.0 / task.num_classes
        res.update(train_acc=c, val_acc=c, test_acc=c if split == "test" else None)
        return res
    res.update(train_acc=evaluate(model, task.x_train, task.y_train), val_acc=evaluate(model, task.x_val, task.y_val))
    if split == "test":
        res["test_acc"] = evaluate(model, task.x_test, task.y_test)
    return res
