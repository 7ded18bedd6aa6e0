"""The reproduction study: which large-batch remedies pay, on tasks with a real large-batch generalisation gap.

``ds-conadv study`` (also ``python -m ds_conadv.study`` or ``benchmarks/reproduce.py``) runs, per task:

1. **tune** (seed 0, scored on the validation split): the LR of small-batch SGD, large-batch LARS and LAMB
   (per input kind; one-point grids are fixed choices); then epsilon for ConAdv (tau = 1) on top of the chosen
   LARS (paper's sum loss and the mean loss) and LAMB; DisAdv (tau = 0) and tau = 2, 4 take the epsilon of tau = 1
   with the same optimizer and loss. ABSA starts at the small batch with SGD's LR.
2. **final** (seeds 0..S-1, scored on the test split, validation accuracy reported too): every regime with its
   chosen settings; wall time per run; robustness (configured attack and untargeted PGD-10) on image tasks.
3. **variants** (validation split, opt-in): around the chosen ConAdv tau = 1 — BN handling, attack, epsilon,
   adv_weight, adversarial start/stop epochs, LR of the excluded (BN/bias) parameters, the staleness guard —
   and ABSA's eigenvalue sample size / smoothing.
4. **sweep** (``sweep_tasks``): test accuracy against the batch size for SGD, LARS and LAMB (seed 0, LR scaled
   by the square root of the batch).

The default suite (tune, final with :data:`DEFAULT_REGIMES`, sweep on digits) is sized for a 2-core machine
with ``--jobs 2``; ``--regimes all`` and ``--phases ...,variants`` add the rest.

Resumable: each finished run is one JSON under ``<out>/records/<task>/`` keyed by its spec; a rerun skips it.
The summary goes to ``<out>/../reproduce[_quick].json`` and the plots to ``--plots``.
"""
from __future__ import annotations

import argparse
import copy
import functools
import hashlib
import json
import math
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Dict, List, Optional, Sequence, Tuple

__all__ = ["main", "suite_settings", "REGIMES", "DEFAULT_REGIMES"]

REGIMES = ("sgd_small", "lars", "lamb", "lars+disadv", "lars+conadv_t1", "lars+conadv_t2", "lars+conadv_t4",
           "lars+disadv_mean", "lars+conadv_t1_mean", "lars+conadv_t2_mean", "lamb+disadv", "lamb+conadv_t1",
           "lamb+conadv_t2", "lamb+conadv_t4", "lamb+disadv_late", "lamb+conadv_t1_late", "absa_default", "absa_eig",
           "absa_eig512", "absa_eig512_r07", "absa_duration4")
#: the final phase's regimes unless ``--regimes`` says otherwise: the default suite (the paper's sum loss with
#: LARS, which collapses at LARS's tuned LR, and the ABSA eigenvalue studies are opt-in)
DEFAULT_REGIMES = ("sgd_small", "lars", "lamb", "lars+disadv_mean", "lars+conadv_t1_mean", "lamb+disadv",
                   "lamb+conadv_t1", "lamb+conadv_t2", "lamb+conadv_t4", "absa_default")


# ----------------------------------------------------------------------------------------------------------
# settings
# ----------------------------------------------------------------------------------------------------------
def suite_settings(quick: bool = False) -> Dict[str, Any]:
    """Everything the suite runs (the ``--quick`` one: tiny data, 2 epochs, 1-point grids, 1 seed)."""
    s = {
        "tasks": ["digits", "shapes", "phrases"],
        "sizes": None,
        "seeds": 3,
        "epochs": 40,
        "small_batch": 32,
        "large_batch": 1024,
        "warmup_epochs": 5,
        # per input kind; a one-point grid is a fixed choice (made on seed-0 validation runs before the suite)
        "grids": {
            "sgd_lr": {"image": [0.05], "tokens": [0.05, 0.1]},
            "lars_lr": {"image": [20.0], "tokens": [1.0, 5.0]},
            "lamb_lr": {"image": [0.05], "tokens": [0.05]},
            "epsilon": {"image": [0.01, 0.03], "tokens": [0.1, 0.3]},
        },
        "weight_decay": {"sgd": 5e-4, "lars": 5e-4, "lamb": 0.01},
        "absa": {"max_batch": 1024, "duration": 5, "adv_ratio": 0.2, "lr_scaling": "sqrt", "stop_epoch": 30,
                 "epsilon": {"image": 0.02, "tokens": 0.2}},
        "absa_default_eig": {"eig_samples": 128, "ema": 0.0},
        "absa_tuned_eig": {"eig_samples": 512, "ema": 0.5},
        # no smoothing (an EMA removes the rule's firing): 512 examples at the rule's ratio 0.5, and at 0.7
        "absa_eig512": {"eig_samples": 512, "ema": 0.0, "eig_ratio": 0.5},
        "absa_eig512_r07": {"eig_samples": 512, "ema": 0.0, "eig_ratio": 0.7},
        # no eigenvalue at all: the batch doubles every 4 epochs (about the steps of absa_eig512_r07), a clock
        "absa_duration4": {"eig_samples": 0, "duration": 4},
        "variants_tasks": ["digits", "shapes", "phrases"],
        "variant_seeds": 1,
        "sweep_tasks": ["digits"],
        "sweep_batches": [32, 128, 512, 1024],
        "robustness": True,
    }
    if quick:
        s.update(sizes=(256, 128, 128), seeds=1, epochs=2, small_batch=64, large_batch=128, warmup_epochs=1,
                 grids={"sgd_lr": {"image": [0.05], "tokens": [0.05]}, "lars_lr": {"image": [5.0], "tokens": [1.0]},
                        "lamb_lr": {"image": [0.02], "tokens": [0.02]}, "epsilon": {"image": [0.03], "tokens": [0.3]}},
                 absa={"max_batch": 128, "duration": 1, "adv_ratio": 0.2, "lr_scaling": "sqrt", "stop_epoch": 2,
                       "epsilon": {"image": 0.02, "tokens": 0.2}},
                 absa_default_eig={"eig_samples": 32, "ema": 0.0, "eig_max_iter": 2},
                 absa_tuned_eig={"eig_samples": 64, "ema": 0.5, "eig_max_iter": 2},
                 absa_eig512={"eig_samples": 64, "ema": 0.0, "eig_ratio": 0.5, "eig_max_iter": 2},
                 absa_eig512_r07={"eig_samples": 64, "ema": 0.0, "eig_ratio": 0.7, "eig_max_iter": 2},
                 absa_duration4={"eig_samples": 0, "duration": 1},
                 variants_tasks=["shapes"], sweep_tasks=["shapes"], sweep_batches=[64, 128], robustness=True)
    return s


def _base(s: Dict[str, Any], task: str, optimizer: str, batch: int, lr: float) -> Dict[str, Any]:
    return {"task": task, "optimizer": optimizer, "batch": batch, "lr": lr, "epochs": s["epochs"],
            "warmup_epochs": s["warmup_epochs"] if batch > s["small_batch"] else min(1, s["warmup_epochs"]),
            "weight_decay": s["weight_decay"][optimizer], "sizes": s["sizes"]}


def _kind(task: str) -> str:
    from .tasks import TASK_KINDS
    return TASK_KINDS[task]


def _adv(eps: float, tau: int, **kw) -> Dict[str, Any]:
    return {"epsilon": eps, "tau": tau, "bn": "dual", "attack": "fgsm", "target": "untargeted", **kw}


# ----------------------------------------------------------------------------------------------------------
# running (resumable)
# ----------------------------------------------------------------------------------------------------------
def run_key(spec: Dict[str, Any], split: str) -> str:
    blob = json.dumps({"spec": spec, "split": split, "v": 1}, sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=4)
def _task(name: str, sizes: Optional[Tuple[int, int, int]]):
    from .tasks import make_task
    return make_task(name, 0, tuple(sizes) if sizes else None)


def _work(item: Tuple[Dict[str, Any], str, bool, str]) -> Dict[str, Any]:
    spec, split, robust, path = item
    import torch
    torch.set_num_threads(1)
    from .core import run_spec
    task = _task(spec["task"], tuple(spec["sizes"]) if spec.get("sizes") else None)
    t0 = time.perf_counter()
    res = run_spec(spec, task, split=split, robustness=robust)
    rec = {"spec": spec, "split": split, "result": res, "total_time_s": time.perf_counter() - t0}
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(rec, f, indent=1, default=float)
    os.replace(tmp, path)
    return rec


class Runner:
    def __init__(self, out: str, jobs: int = 1, progress: bool = True, load_only: bool = False):
        self.out, self.jobs, self.progress, self.load_only = out, jobs, progress, load_only
        self.skipped = self.ran = self.missing = 0

    def path(self, spec, split) -> str:
        d = os.path.join(self.out, "records", spec["task"])
        os.makedirs(d, exist_ok=True)
        return os.path.join(d, run_key(spec, split) + ".json")

    def run(self, items: Sequence[Tuple[Dict[str, Any], str, bool]], desc: str) -> List[Dict[str, Any]]:
        """Run (or load) every ``(spec, split, robustness)``; results in the same order."""
        from tqdm import tqdm
        results: List[Optional[Dict[str, Any]]] = [None] * len(items)
        todo = []
        for i, (spec, split, robust) in enumerate(items):
            p = self.path(spec, split)
            if os.path.exists(p):
                with open(p, encoding="utf-8") as f:
                    results[i] = json.load(f)
                self.skipped += 1
            else:
                todo.append((i, (spec, split, robust, p)))
        if self.load_only:                      # summarise what exists; missing runs stay None
            self.missing += len(todo)
            return results  # type: ignore[return-value]
        bar = tqdm(total=len(items), initial=len(items) - len(todo), desc=desc, unit="run", file=sys.stderr,
                   disable=not self.progress, dynamic_ncols=True)
        try:
            if self.jobs <= 1 or len(todo) <= 1:
                for i, item in todo:
                    bar.set_postfix_str(_label(item[0]), refresh=True)
                    results[i] = _work(item)
                    self.ran += 1
                    bar.update(1)
            else:
                import multiprocessing as mp
                with ProcessPoolExecutor(self.jobs, mp_context=mp.get_context("spawn")) as ex:
                    futs = {ex.submit(_work, item): i for i, item in todo}
                    from concurrent.futures import as_completed
                    for fut in as_completed(futs):
                        results[futs[fut]] = fut.result()
                        self.ran += 1
                        bar.update(1)
        finally:
            bar.close()
        return results  # type: ignore[return-value]


def _label(spec: Dict[str, Any]) -> str:
    adv = spec.get("adv")
    extra = f" tau={adv['tau']} eps={adv['epsilon']}" if adv else (" absa" if spec.get("absa") else "")
    return f"{spec['task']} {spec['optimizer']} b{spec['batch']} lr{spec['lr']}{extra} s{spec['seed']}"


def _best(records: List[Dict[str, Any]], candidates: List[Any]) -> Any:
    """The candidate with the highest validation accuracy (the first one on ties; missing runs score -1)."""
    scores = [r["result"]["val_acc"] if r else -1.0 for r in records]
    return candidates[max(range(len(scores)), key=lambda i: (scores[i], -i))]


# ----------------------------------------------------------------------------------------------------------
# phases
# ----------------------------------------------------------------------------------------------------------
def tune(runner: Runner, s: Dict[str, Any], task: str, adversarial: Any = True) -> Dict[str, Dict[str, Any]]:
    """Chosen spec (without seed) per regime, from seed-0 validation accuracy (the adversarial regimes' epsilon
    only when ``adversarial``)."""
    g = {k: v[_kind(task)] for k, v in s["grids"].items()}
    sb, lb = s["small_batch"], s["large_batch"]
    cand = {"sgd_small": [_base(s, task, "sgd", sb, lr) for lr in g["sgd_lr"]],
            "lars": [_base(s, task, "lars", lb, lr) for lr in g["lars_lr"]],
            "lamb": [_base(s, task, "lamb", lb, lr) for lr in g["lamb_lr"]]}
    chosen: Dict[str, Dict[str, Any]] = {}
    tuning: Dict[str, Any] = {}
    for k, cs in cand.items():                  # a one-point grid is a fixed choice: nothing to run
        if len(cs) == 1:
            chosen[k], tuning[k] = cs[0], "fixed"
    flat = [(k, c) for k, cs in cand.items() if len(cs) > 1 for c in cs]
    recs = runner.run([(dict(c, seed=0), "val", False) for _, c in flat], f"tune {task} base")
    for k in {k for k, _ in flat}:
        rs = [r for (kk, _), r in zip(flat, recs) if kk == k]
        chosen[k] = _best(rs, cand[k])
        tuning[k] = [(c["lr"], r["result"]["val_acc"], r["result"]["train_acc"]) for c, r in zip(cand[k], rs) if r]
    lars, lamb = chosen["lars"], chosen["lamb"]
    eps_grid = g["epsilon"]
    # "_mean": the loss (clean + w adv) / (1 + w) instead of the paper's sum (see ds_conadv.study.core); LAMB's
    # update is invariant to the loss scale, so LAMB keeps the paper's sum. Epsilon is chosen per optimizer.
    adv_cand = {"lars+conadv_t1": [dict(lars, adv=_adv(e, 1)) for e in eps_grid],
                "lars+conadv_t1_mean": [dict(lars, adv=_adv(e, 1, normalize_loss=True)) for e in eps_grid],
                "lamb+conadv_t1": [dict(lamb, adv=_adv(e, 1)) for e in eps_grid]}
    wanted = set(adv_cand) if adversarial is True else set(adversarial or ())
    flat = [(k, c) for k, cs in adv_cand.items() if k in wanted for c in cs] if len(eps_grid) > 1 else []
    for k in adv_cand:
        if k not in {kk for kk, _ in flat}:
            chosen[k], tuning[k] = adv_cand[k][0], "fixed" if len(eps_grid) == 1 else "not tuned in this run"
    recs = runner.run([(dict(c, seed=0), "val", False) for _, c in flat], f"tune {task} adv")
    for k in {k for k, _ in flat}:
        rs = [r for (kk, _), r in zip(flat, recs) if kk == k]
        chosen[k] = _best(rs, adv_cand[k])
        tuning[k] = [(c["adv"]["epsilon"], r["result"]["val_acc"], r["result"]["train_acc"])
                     for c, r in zip(adv_cand[k], rs) if r]
    # DisAdv and the other staleness take the epsilon chosen for tau = 1 with the same optimizer and loss
    for base in ("lars+conadv_t1", "lars+conadv_t1_mean", "lamb+conadv_t1"):
        for tau in (0, 2, 4):
            name = base.replace("conadv_t1", "disadv" if tau == 0 else f"conadv_t{tau}")
            if name in REGIMES:
                chosen[name] = copy.deepcopy(chosen[base])
                chosen[name]["adv"]["tau"] = tau
    # "_late": adversarial examples only from the end of warm-up (the variant validation preferred on the images)
    for name in ("lamb+disadv", "lamb+conadv_t1"):
        chosen[name + "_late"] = copy.deepcopy(chosen[name])
        chosen[name + "_late"]["adv"]["start_epoch"] = s["warmup_epochs"]
    sgd = chosen["sgd_small"]
    a = dict(s["absa"], epsilon=s["absa"]["epsilon"][_kind(task)])
    chosen["absa_default"] = dict(sgd, absa=dict(a, **s["absa_default_eig"]))
    chosen["absa_eig"] = dict(sgd, absa=dict(a, **s["absa_tuned_eig"]))
    for name in ("absa_eig512", "absa_eig512_r07", "absa_duration4"):
        chosen[name] = dict(sgd, absa=dict(a, **s[name]))
    return {"chosen": chosen, "tuning": tuning}


def tuned_regime(regime: str) -> str:
    """The tau = 1 regime whose validation run chooses ``regime``'s epsilon."""
    if regime.startswith("lamb+"):
        return "lamb+conadv_t1"
    return "lars+conadv_t1" + ("_mean" if regime.endswith("_mean") else "")


def final(runner: Runner, s: Dict[str, Any], task: str, chosen: Dict[str, Dict[str, Any]],
          regimes: Sequence[str]) -> Dict[str, List[Dict[str, Any]]]:
    items, keys = [], []
    for k in regimes:
        for seed in range(s["seeds"]):
            items.append((dict(chosen[k], seed=seed), "test", s["robustness"] and _kind(task) == "image"))
            keys.append(k)
    return _run_grouped(runner, items, keys, f"final {task}")


def _run_grouped(runner: Runner, items: List[Any], keys: List[str], label: str) -> Dict[str, List[Dict[str, Any]]]:
    """Run ``items`` and group the finished records by the key given for each item."""
    out: Dict[str, List[Dict[str, Any]]] = {}
    for k, r in zip(keys, runner.run(items, label)):
        if r is not None:
            out.setdefault(k, []).append(r)
    return out


def variant_specs(s: Dict[str, Any], task: str, chosen: Dict[str, Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
    """Named variants around the chosen ConAdv tau = 1 (and ABSA), for the validation split."""
    c1 = chosen["lars+conadv_t1"]
    with_adv = functools.partial(_with_adv, c1)
    d0 = chosen["lars+disadv"]
    v: Dict[str, Dict[str, Any]] = {
        "conadv_t1 (chosen)": copy.deepcopy(c1),
        "tau 0 (DisAdv)": copy.deepcopy(d0),
        "tau 1, LARS lr x0.5": dict(copy.deepcopy(c1), lr=c1["lr"] * 0.5),
        "tau 1, loss normalised": with_adv(normalize_loss=True),
        "tau 0, loss normalised": dict(copy.deepcopy(d0), adv=dict(d0["adv"], normalize_loss=True)),
        "excluded params LR x0.1": dict(copy.deepcopy(c1), excl_lr_mult=0.1),
        "tau 1, loss normalised, excluded params LR x0.1": dict(with_adv(normalize_loss=True), excl_lr_mult=0.1),
        "vanilla LARS, excluded params LR x0.1": dict(copy.deepcopy(chosen["lars"]), excl_lr_mult=0.1),
        "staleness guard 0.05": with_adv(guard_drift=0.05),
        "tau 0, LARS lr x0.5": dict(copy.deepcopy(d0), lr=c1["lr"] * 0.5),
        "tau 1, LARS lr x2": dict(copy.deepcopy(c1), lr=c1["lr"] * 2),
        "lamb + conadv tau 1": dict(copy.deepcopy(chosen["lamb"]), adv=copy.deepcopy(c1["adv"])),
        "lamb + disadv": dict(copy.deepcopy(chosen["lamb"]), adv=dict(copy.deepcopy(c1["adv"]), tau=0)),
    }
    v.update(_adv_questions(task, c1))
    v.update(_lamb_variants(task, chosen["lamb+conadv_t1"]))
    for samples, ema, ratio in ((128, 0.0, 0.5), (512, 0.0, 0.5), (512, 0.0, 0.7), (1024, 0.5, 0.5)):
        v[f"absa eig {samples} samples, ema {ema}, ratio {ratio}"] = dict(
            copy.deepcopy(chosen["absa_default"]),
            absa=dict(chosen["absa_default"]["absa"], eig_samples=samples, ema=ema, eig_ratio=ratio))
    return v


def _with_adv(spec: Dict[str, Any], **kw) -> Dict[str, Any]:
    """A copy of ``spec`` with its ``adv`` section updated."""
    v = copy.deepcopy(spec)
    v["adv"].update(kw)
    return v


def _adv_questions(task: str, c1: Dict[str, Any], prefix: str = "") -> Dict[str, Dict[str, Any]]:
    """The variants asked around any ConAdv tau = 1 spec ``c1``: BN handling (images), attack, epsilon,
    adv_weight, adversarial start (end of warm-up) and stop (half the epochs); names start with ``prefix``."""
    eps = c1["adv"]["epsilon"]
    v: Dict[str, Dict[str, Any]] = {}
    if _kind(task) == "image":
        v.update({"bn shared": _with_adv(c1, bn="shared"),
                  "bn shared, adv out of running stats": _with_adv(c1, bn="shared_frozen"),
                  "bn mixed (one forward)": _with_adv(c1, bn="mixed")})
    v.update({
        "attack random-target PGD-1, random start 0.8": _with_adv(c1, attack="pgd", steps=1, target="random",
                                                                  random_start=True, random_start_prob=0.8),
        "attack untargeted PGD-3": _with_adv(c1, attack="pgd", steps=3, step_size=eps / 2),
        "epsilon x0.3": _with_adv(c1, epsilon=eps * 0.3), "epsilon x3": _with_adv(c1, epsilon=eps * 3),
        "adv_weight 0.5": _with_adv(c1, adv_weight=0.5),
        "adversarial from the end of warm-up": _with_adv(c1, start_epoch=c1["warmup_epochs"]),
        "adversarial stops at half the epochs": _with_adv(c1, stop_epoch=max(c1["epochs"] // 2, 1)),
    })
    return {prefix + k: spec for k, spec in v.items()}


def _lamb_variants(task: str, c1: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
    """The same questions around LAMB + ConAdv tau = 1, the setting that does not collapse with the paper's loss,
    plus staleness and a larger adv_weight. Names start with ``lamb:``."""
    v = {"lamb: conadv_t1 (chosen)": copy.deepcopy(c1), "lamb: tau 0 (DisAdv)": _with_adv(c1, tau=0),
         "lamb: tau 2": _with_adv(c1, tau=2)}
    v.update(_adv_questions(task, c1, "lamb: "))
    v["lamb: adv_weight 2"] = _with_adv(c1, adv_weight=2.0)
    return v


def sweep(runner: Runner, s: Dict[str, Any], task: str, chosen) -> Dict[str, List[Dict[str, Any]]]:
    items, keys = [], []
    for opt in ("lars", "lamb", "sgd"):
        base = chosen[opt if opt != "sgd" else "sgd_small"]
        for b in s["sweep_batches"]:
            ref = base["batch"]
            spec = dict(_base(s, task, opt, b, base["lr"] * math.sqrt(b / ref)), seed=0)
            items.append((spec, "test", False))
            keys.append(opt)
    return _run_grouped(runner, items, keys, f"sweep {task}")


# ----------------------------------------------------------------------------------------------------------
# summary and plots
# ----------------------------------------------------------------------------------------------------------
def _ms(vals: List[float]) -> Dict[str, float]:
    vals = [v for v in vals if v is not None]
    if not vals:
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    return {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
            "n": len(vals), "values": vals}


def growths_brought_forward(rec: Dict[str, Any]) -> int:
    """Eigenvalue-triggered growths of an ABSA run that came before ``duration`` would have grown the batch (one
    at the epoch ``duration`` fires too is the clock's as much as the rule's)."""
    duration, last, early = rec["spec"]["absa"]["duration"], 0, 0
    for row in rec["result"]["absa_log"]:
        if row["grew"]:
            early += row["reason"].startswith("eigenvalue") and row["epoch"] + 1 - last < duration
            last = row["epoch"] + 1
    return early


def summarize_final(fin: Dict[str, List[Dict[str, Any]]]) -> Dict[str, Any]:
    table = {}
    for k, recs in fin.items():
        rs = [r["result"] for r in recs]
        row = {"test_acc": _ms([100 * r["test_acc"] for r in rs]), "val_acc": _ms([100 * r["val_acc"] for r in rs]),
               "train_acc": _ms([100 * r["train_acc"] for r in rs]), "wall_time_s": _ms([r["wall_time_s"] for r in rs]),
               "steps": _ms([r["steps"] for r in rs]), "diverged": sum(bool(r.get("diverged")) for r in rs)}
        if rs and "robustness" in rs[0]:
            row["configured_attack_acc"] = _ms([100 * r["robustness"]["configured_attack_acc"] for r in rs])
            row["pgd10_acc"] = _ms([100 * r["robustness"]["pgd_acc"] for r in rs])
        if rs and "absa_log" in rs[0]:
            row["growths_eigenvalue"] = [r["growths_eigenvalue"] for r in rs]
            row["growths_duration"] = [r["growths_duration"] for r in rs]
            row["growths_brought_forward"] = [growths_brought_forward(r) for r in recs]
            row["eig_time_s"] = _ms([r["eig_time_s"] for r in rs])
            row["absa"] = {k: recs[0]["spec"]["absa"].get(k) for k in ("eig_samples", "ema", "eig_ratio", "duration")}
        table[k] = row
    sgd = table.get("sgd_small", {}).get("test_acc", {}).get("mean")
    for base in ("lars", "lamb"):
        b = table.get(base, {}).get("test_acc", {}).get("mean")
        if sgd is None or b is None:
            continue
        gap = sgd - b
        for k, row in table.items():
            if k.startswith(base + "+"):
                row["recovered_vs"] = base
                row[f"gap_recovered_vs_{base}"] = (row["test_acc"]["mean"] - b) / gap if gap > 0 else None
    for k, row in table.items():
        if sgd is not None:
            row["minus_small_batch"] = row["test_acc"]["mean"] - sgd
    return table


def plot_final(tables: Dict[str, Dict[str, Any]], path: str) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(5 * len(tables), 4.2))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(tables), squeeze=False)[0]
    for ax, (task, table) in zip(axes, tables.items()):
        ks = [k for k in REGIMES if k in table]
        m = [table[k]["test_acc"]["mean"] for k in ks]
        e = [table[k]["test_acc"]["std"] for k in ks]
        colors = ["tab:green" if k == "sgd_small" else "tab:blue" if k in ("lars", "lamb") else
                  "tab:purple" if k.startswith("absa") else "tab:orange" for k in ks]
        ax.bar(range(len(ks)), m, yerr=e, color=colors, capsize=3)
        ax.set_xticks(range(len(ks)), ks, rotation=60, ha="right", fontsize=8)
        lo = min(v for v in m if v == v) if m else 0
        ax.set_ylim(max(lo - 5, 0), min(max(m) + 2, 100) if m else 100)
        if "sgd_small" in table:
            ax.axhline(table["sgd_small"]["test_acc"]["mean"], color="tab:green", ls="--", lw=0.8)
        ax.set_title(f"{task}: test accuracy (mean ± std over seeds)", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def plot_sweep(sweeps: Dict[str, Dict[str, List[Dict[str, Any]]]], path: str) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(5 * len(sweeps), 3.6))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(sweeps), squeeze=False)[0]
    for ax, (task, sw) in zip(axes, sweeps.items()):
        for opt, recs in sw.items():
            b = [r["spec"]["batch"] for r in recs]
            ax.plot(b, [100 * r["result"]["test_acc"] for r in recs], "o-", label=f"{opt} test")
            ax.plot(b, [100 * r["result"]["train_acc"] for r in recs], "x:", label=f"{opt} train")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size (same epochs)")
        ax.set_title(f"{task}: accuracy vs batch (seed 0)", fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def plot_absa(fin_all: Dict[str, Dict[str, List[Dict[str, Any]]]], path: str) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    tasks = [t for t in fin_all if any(k.startswith("absa") for k in fin_all[t])]
    fig = Figure(figsize=(5 * max(len(tasks), 1), 6))
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, max(len(tasks), 1), squeeze=False)
    for j, task in enumerate(tasks):
        for k, style in (("absa_default", "o-"), ("absa_eig", "s-"), ("absa_eig512", "^-"),
                         ("absa_eig512_r07", "v-"), ("absa_duration4", "x:")):
            for r in fin_all[task].get(k, [])[:1]:
                log = r["result"]["absa_log"]
                pts = [(row["epoch"], row["eigenvalue"]) for row in log if row["eigenvalue"] is not None]
                if pts:
                    axes[0, j].plot(*zip(*pts), style, ms=3, label=k)
                line, = axes[1, j].plot([row["epoch"] for row in log], [row["batch"] for row in log], style, ms=3,
                                        label=k, drawstyle="steps-post")
                eig_grown = [(row["epoch"], row["batch"]) for row in log
                             if row["grew"] and row["reason"].startswith("eigenvalue")]
                if eig_grown:                  # the growths the eigenvalue rule triggered
                    axes[1, j].plot(*zip(*eig_grown), "*", ms=9, color=line.get_color(), alpha=0.6)
        axes[0, j].set_title(f"{task}: eigenvalue the rule sees (seed 0)", fontsize=9)
        axes[1, j].set_title(f"{task}: batch size (seed 0; *: grown by the eigenvalue rule)", fontsize=9)
        axes[1, j].set_yscale("log", base=2)
        for ax in axes[:, j]:
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
            ax.grid(alpha=0.3)
            ax.set_xlabel("epoch")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def markdown(summary: Dict[str, Any]) -> str:
    """The summary's tables as Markdown (final: test mean ± std over seeds; variants: validation, seed 0)."""
    lines: List[str] = []
    for task, entry in summary["tasks"].items():
        fin = entry.get("final")
        if fin:
            lines += [f"**{task}** (test accuracy %, mean ± std over {summary['settings']['seeds']} seeds)", "",
                      "| regime | test | train | val | gap recovered (vs its optimizer) | steps | wall s | PGD-10 "
                      "| configured |",
                      "|---|---|---|---|---|---|---|---|---|"]
            for k in REGIMES:
                if k not in fin:
                    continue
                r = fin[k]
                seeds = summary["settings"]["seeds"]
                f = (lambda d: (f"{d['mean']:.2f} ± {d['std']:.2f}" + (f" (n={d['n']})" if d["n"] != seeds else ""))
                     if d and d.get("n") else "")
                rec = r.get(f"gap_recovered_vs_{r.get('recovered_vs')}")
                div = f" (diverged {r['diverged']})" if r["diverged"] else ""
                lines.append(f"| {k}{div} | {f(r['test_acc'])} | {r['train_acc']['mean']:.1f} | "
                             f"{r['val_acc']['mean']:.2f} | {'' if rec is None else f'{100 * rec:.0f} %'} | "
                             f"{r['steps']['mean']:.0f} | {r['wall_time_s']['mean']:.0f} | "
                             f"{f(r.get('pgd10_acc'))} | {f(r.get('configured_attack_acc'))} |")
            lines.append("")
            absa = [k for k in REGIMES if k in fin and "growths_eigenvalue" in fin[k]]
            if absa:
                lines += [f"**{task} ABSA**: which rule grows the batch (test/val: mean ± std over seeds)", "",
                          "| regime | eigenvalue samples / EMA / ratio / duration | test | val | steps | growths by "
                          "eigenvalue / by duration, per seed | eigenvalue growths before `duration` | "
                          "eigenvalue s | wall s |",
                          "|---|---|---|---|---|---|---|---|---|"]
                for k in absa:
                    r = fin[k]
                    ac = r.get("absa", {})
                    setting = (f"{ac.get('eig_samples')} / {ac.get('ema') or 0} / {ac.get('eig_ratio') or 0.5} / "
                               f"{ac.get('duration')}" if ac.get("eig_samples") else
                               f"none / - / - / {ac.get('duration')}")
                    per_seed = ", ".join(f"{e}/{d}" for e, d in zip(r["growths_eigenvalue"], r["growths_duration"]))
                    fwd = r.get("growths_brought_forward", [])
                    total = sum(r["growths_eigenvalue"]) + sum(r["growths_duration"])
                    lines.append(f"| {k} | {setting} | {f(r['test_acc'])} | {f(r['val_acc'])} | "
                                 f"{r['steps']['mean']:.0f} | {per_seed} | {sum(fwd)} of {total} | "
                                 f"{r['eig_time_s']['mean']:.0f} | {r['wall_time_s']['mean']:.0f} |")
                lines.append("")
        var = entry.get("variants")
        if var:
            lines += [f"**{task} variants** (validation accuracy %, seed 0)", "",
                      "| variant | val | train | wall s | notes |", "|---|---|---|---|---|"]
            for n, r in var.items():
                notes = []
                if "guard_counts" in r:
                    notes.append(f"regenerated {r['guard_counts'][0]['regenerated']}/{r['guard_counts'][0]['checked']}")
                if "growths_eigenvalue" in r:
                    notes.append(f"growths eig/duration {r['growths_eigenvalue'][0]}/{r['growths_duration'][0]}, "
                                 f"steps {r['steps'][0]}")
                if r.get("last_epoch_adv_train_acc") and r["last_epoch_adv_train_acc"][0] is not None:
                    notes.append(f"adv train acc {100 * r['last_epoch_adv_train_acc'][0]:.1f}")
                if r["diverged"]:
                    notes.append("DIVERGED")
                lines.append(f"| {n} | {r['val_acc'][0]:.2f} | {r['train_acc'][0]:.1f} | {r['wall_time_s'][0]:.0f} | "
                             f"{'; '.join(notes)} |")
            lines.append("")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ds-conadv study", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny CI run: asserts the machinery, not the accuracy")
    p.add_argument("--tasks", default=None, help="comma-separated subset of digits,shapes,phrases")
    p.add_argument("--phases", default="tune,final,sweep", help="comma-separated phases to run: tune, final, "
                                                                 "variants, sweep (default: the suite without the "
                                                                 "variants)")
    p.add_argument("--regimes", default=",".join(DEFAULT_REGIMES),
                   help="regimes of the final phase, or 'all' (default: the default suite's)")
    p.add_argument("--seeds", type=int, default=None, help="final seeds (default 3; 1 with --quick)")
    p.add_argument("--sizes", default=None, help="TRAIN,VAL,TEST examples of every task (default: the task's own)")
    p.add_argument("--large-batch", type=int, default=None,
                   help="batch of the large-batch regimes and ABSA's largest batch (default 1024)")
    p.add_argument("--variant-tasks", default=None, help="tasks of the variants phase (default: all)")
    p.add_argument("--sweep-tasks", default=None, help="tasks of the batch-size sweep (default: digits)")
    p.add_argument("--out", default=None, help="folder of the per-run JSONs (default benchmarks/results/study"
                                                "[_quick])")
    p.add_argument("--summary", default=None, help="summary JSON (default benchmarks/results/reproduce[_quick].json)")
    p.add_argument("--plots", default=None, help="folder of the PNGs (default docs/img; with --quick: next to "
                                                 "the summary)")
    p.add_argument("--variants", default=None, help="comma-separated subset of the variant names (substring match)")
    p.add_argument("--markdown", default=None, help="also write the tables as Markdown to this file")
    p.add_argument("--jobs", type=int, default=1, help="parallel runs (processes, 1 thread each)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--load-only", action="store_true", help="run nothing: summarise the runs that exist (what is "
                                                            "missing is counted and left out)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    s = suite_settings(args.quick)
    if args.tasks:
        s["tasks"] = [t.strip() for t in args.tasks.split(",") if t.strip()]
        s["variants_tasks"] = [t for t in s["variants_tasks"] if t in s["tasks"]]
        s["sweep_tasks"] = [t for t in s["sweep_tasks"] if t in s["tasks"]]
    if args.variant_tasks is not None:
        s["variants_tasks"] = [t.strip() for t in args.variant_tasks.split(",") if t.strip()]
    if args.sweep_tasks is not None:
        s["sweep_tasks"] = [t.strip() for t in args.sweep_tasks.split(",") if t.strip()]
    from .tasks import TASK_SIZES
    bad = [t for t in s["tasks"] + s["variants_tasks"] + s["sweep_tasks"] if t not in TASK_SIZES]
    if bad:
        print(f"--tasks: unknown task {bad[0]!r}; allowed: {', '.join(TASK_SIZES)}", file=sys.stderr)
        return 2
    if args.seeds:
        s["seeds"] = args.seeds
    if args.sizes:
        try:
            sizes = tuple(int(v) for v in args.sizes.split(","))
            if len(sizes) != 3 or min(sizes) < 1:
                raise ValueError
        except ValueError:
            print(f"--sizes: {args.sizes!r} is not three positive integers TRAIN,VAL,TEST", file=sys.stderr)
            return 2
        s["sizes"] = sizes
    if args.large_batch is not None:
        train = s["sizes"][0] if s["sizes"] else min(TASK_SIZES[t][0] for t in s["tasks"])
        if not s["small_batch"] < args.large_batch <= train:
            print(f"--large-batch: {args.large_batch} must be above the small batch ({s['small_batch']}) and at "
                  "most the training examples", file=sys.stderr)
            return 2
        s["large_batch"] = args.large_batch
        s["absa"] = dict(s["absa"], max_batch=args.large_batch)
    phases = {p.strip() for p in args.phases.split(",") if p.strip()}
    regimes = list(REGIMES) if args.regimes.strip() == "all" else [r.strip() for r in args.regimes.split(",")
                                                                     if r.strip()]
    unknown = [r for r in regimes if r not in REGIMES]
    if unknown:
        print(f"--regimes: unknown regime {unknown[0]!r}; allowed: {', '.join(REGIMES)}", file=sys.stderr)
        return 2
    suffix = "_quick" if args.quick else ""
    out = args.out or os.path.join("benchmarks", "results", "study" + suffix)
    summary_path = args.summary or os.path.join("benchmarks", "results", f"reproduce{suffix}.json")
    plots = args.plots or (os.path.dirname(summary_path) or "." if args.quick else os.path.join("docs", "img"))
    os.makedirs(plots, exist_ok=True)
    os.makedirs(os.path.dirname(summary_path) or ".", exist_ok=True)
    runner = Runner(out, args.jobs, progress=not args.no_progress, load_only=args.load_only)
    t0 = time.perf_counter()
    summary: Dict[str, Any] = {"settings": s, "phases": sorted(phases), "tasks": {}}
    fin_all, sweeps = {}, {}
    for task in s["tasks"]:
        entry: Dict[str, Any] = {}
        if "variants" in phases and task in s["variants_tasks"]:
            adversarial: Any = True
        else:                               # tune epsilon only for the loss forms the requested regimes use
            adversarial = {tuned_regime(r) for r in regimes if "adv" in r}
        tuned = tune(runner, s, task, adversarial)
        entry["chosen"], entry["tuning"] = tuned["chosen"], tuned["tuning"]
        if "final" in phases:
            fin = final(runner, s, task, tuned["chosen"], regimes)
            fin_all[task] = fin
            entry["final"] = summarize_final(fin)
        if "variants" in phases and task in s["variants_tasks"]:
            vs = variant_specs(s, task, tuned["chosen"])
            if args.variants:
                wanted = [w.strip() for w in args.variants.split(",") if w.strip()]
                vs = {n: v for n, v in vs.items() if any(w in n for w in wanted)}
            items = [(dict(v, seed=seed), "val", False) for v in vs.values() for seed in range(s["variant_seeds"])]
            recs = runner.run(items, f"variants {task}")
            names = [n for n in vs for _ in range(s["variant_seeds"])]
            table: Dict[str, Any] = {}
            for n, r in zip(names, recs):
                if r is None:
                    continue
                res = r["result"]
                row = table.setdefault(n, {"val_acc": [], "train_acc": [], "diverged": 0, "wall_time_s": []})
                row["val_acc"].append(100 * res["val_acc"])
                row["train_acc"].append(100 * res["train_acc"])
                row["wall_time_s"].append(res["wall_time_s"])
                row["diverged"] += int(bool(res.get("diverged")))
                for extra in ("guard_counts", "growths_eigenvalue", "growths_duration", "steps",
                              "last_epoch_adv_train_acc"):
                    if extra in res:
                        row.setdefault(extra, []).append(res[extra])
            entry["variants"] = table
        if "sweep" in phases and task in s["sweep_tasks"]:
            sweeps[task] = sweep(runner, s, task, tuned["chosen"])
            entry["sweep"] = {opt: [{"batch": r["spec"]["batch"], "lr": r["spec"]["lr"],
                                     "train_acc": 100 * r["result"]["train_acc"],
                                     "test_acc": 100 * r["result"]["test_acc"]} for r in recs]
                              for opt, recs in sweeps[task].items()}
        summary["tasks"][task] = entry
    summary["plots"] = {}
    if fin_all:
        summary["plots"]["final"] = plot_final({t: summary["tasks"][t]["final"] for t in fin_all},
                                               os.path.join(plots, f"reproduce_final{suffix}.png"))
        if any(k.startswith("absa") for f in fin_all.values() for k in f):
            summary["plots"]["absa"] = plot_absa(fin_all, os.path.join(plots, f"reproduce_absa{suffix}.png"))
    if sweeps:
        summary["plots"]["sweep"] = plot_sweep(sweeps, os.path.join(plots, f"reproduce_sweep{suffix}.png"))
    summary["runs_executed"], summary["runs_loaded"] = runner.ran, runner.skipped
    summary["runs_missing"] = runner.missing
    summary["wall_time_s"] = time.perf_counter() - t0
    with open(summary_path, "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1, default=float)
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as f:
            f.write(markdown(summary))
    print(f"study: {runner.ran} runs executed, {runner.skipped} loaded, {summary['wall_time_s']:.0f} s; "
          f"summary {summary_path}", file=sys.stderr)
    for task, entry in summary["tasks"].items():
        for k, row in entry.get("final", {}).items():
            t = row["test_acc"]
            print(f"{task:8s} {k:16s} test {t['mean']:6.2f} ± {t['std']:4.2f}  train {row['train_acc']['mean']:6.2f}"
                  f"  steps {row['steps']['mean']:6.0f}  {row['wall_time_s']['mean']:6.1f} s"
                  f"{'  DIVERGED x' + str(row['diverged']) if row['diverged'] else ''}")
    return 0
