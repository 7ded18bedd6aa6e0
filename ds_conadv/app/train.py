"""The main job, ``ds-conadv train``: ConAdv training through DeepSpeed (``ds_conadv.initialize``).

One JSON file holds everything: DeepSpeed's config (batch sizes, ZeRO, precision, ``"scheduler"``), our
``"optimizer": {"type": "LARS" | "LAMB"}``, the ``"conadv"`` section and the job's own ``"train"`` section
(:class:`~ds_conadv.config.TrainConfig`). Keys that start with ``"_comment"`` are comments, at any depth. The
embedded default ships inside the package (``ds_conadv/configs/conadv_digits.json``, the same file as
``configs/conadv_digits.json``): a small CNN with BatchNorm on scikit-learn's bundled digits (no download).

Launch modes: a single process (it initialises torch.distributed itself, world size 1), ``torchrun``,
the ``deepspeed`` launcher, or ``--nproc N`` (the CLI re-launches itself through torch.distributed.run).
Every rank trains on its shard of the training set; every rank evaluates its shard of the test set; rank 0
shows the progress bar and writes ``metrics.csv``, ``metrics.json`` and ``curves.png`` to the output folder.
"""
from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import statistics
import sys
import time
import warnings
from typing import Any, Dict, List, Optional

import torch

from ds_conadv.config.builders import AUTO as _AUTO
from ds_conadv.config.sections import ConfigError
from ds_conadv.integrations.deepspeed import compat

from .common import (DigitsCNN, attack_description, batch_geometry, default_out_dir, describe_mode, distributed,
                     evaluate, gather_ranks, plot_curves, prepare_data, print_accuracies, rank_batches)
from .common import _fmt
from .job_config import DEFAULT_CONFIG_NAME, ResolvedConfig, check_runnable

__all__ = ["CSV_FIELDS", "run", "prepare_data"]

#: the metrics of every step, in the order of metrics.csv's columns
CSV_FIELDS = ("step", "epoch", "lr", "loss", "clean_loss", "adv_loss", "clean_acc", "adv_acc", "step_time",
              "stale_by", "generated_now", "test_clean_acc", "test_adv_acc")


def run(resolved: ResolvedConfig, *, config_name: str = DEFAULT_CONFIG_NAME, progress: bool = True,
        out=None) -> Optional[Dict[str, Any]]:
    """Run the job on this rank. Returns the summary (what metrics.json holds) on rank 0, None elsewhere."""

    check_runnable(resolved)
    compat.quiet_import()
    import logging

    import deepspeed

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    threads_before = torch.get_num_threads()
    ds_level = deepspeed.utils.logger.level
    deepspeed.utils.logger.setLevel(logging.WARNING)  # DeepSpeed's INFO lines would break up the progress bar
    try:
        with distributed(backend) as (rank, world, local_world, _), warnings.catch_warnings():
            # ZeRO 1/2 on gloo call a collective that torch has deprecated: not ours to fix, nor the user's
            warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated",
                                    category=FutureWarning)
            threads = resolved.train.threads or max(1, (os.cpu_count() or 1) // max(1, local_world))
            torch.set_num_threads(threads)
            return _run(resolved, config_name, progress, out or sys.stdout, rank, world, threads)
    finally:
        torch.set_num_threads(threads_before)
        deepspeed.utils.logger.setLevel(ds_level)


def _run(resolved: ResolvedConfig, config_name: str, progress: bool, out, rank: int, world: int,
         threads: int) -> Optional[Dict[str, Any]]:
    import logging

    import torch.distributed as tdist
    import torch.nn.functional as F
    from tqdm import tqdm

    import deepspeed

    from ds_conadv.integrations.deepspeed import initialize

    if resolved.absa_enabled:
        from .absa_train import run_absa

        return run_absa(resolved, config_name, progress, out, rank, world, threads)
    tc = resolved.train
    ds_cfg = resolved.deepspeed
    x_tr_n, y_tr, x_te, y_te, normalize, conadv = prepare_data(resolved, ds_cfg)
    n = x_tr_n.shape[0]

    # ---- batch geometry: DeepSpeed's rule (train = micro * gas * world) --------------------------------------
    micro, gas = batch_geometry(ds_cfg, world)
    micro_per_epoch = ((n // world) // (micro * gas)) * gas
    if micro_per_epoch == 0:
        raise ConfigError(f"a rank's shard ({n // world} examples) is smaller than one global step "
                          f"({micro} x {gas} accumulation steps): lower the batch size")
    steps_per_epoch = micro_per_epoch // gas
    total_steps = tc.epochs * steps_per_epoch
    run_steps = min(total_steps, tc.max_steps) if tc.max_steps else total_steps
    sched = ds_cfg.get("scheduler")
    if isinstance(sched, dict) and isinstance(sched.get("params"), dict) \
            and sched["params"].get("total_num_steps") == _AUTO:
        sched["params"]["total_num_steps"] = total_steps
        resolved.raw["scheduler"]["params"]["total_num_steps"] = total_steps
    ds_cfg.setdefault("steps_per_print", 10 ** 9)  # DeepSpeed's own periodic log lines: off unless asked for

    # ---- model and engine ----------------------------------------------------------------------------------------
    torch.manual_seed(tc.seed)
    model = DigitsCNN(tc.width, 10)
    smoothing = tc.label_smoothing

    def loss_fn(output, y):
        return F.cross_entropy(output, y, label_smoothing=smoothing)

    with compat.log_level(logging.ERROR):  # "untested optimizer" (ours, attached to ZeRO), "lr before start", ...
        engine, _, _, _ = initialize(model=model, config=ds_cfg, loss_fn=loss_fn, conadv_seed=tc.seed,
                                     steps_per_epoch=micro_per_epoch)
    device = engine.device
    stream = ((x_tr_n[idx], y_tr[idx]) for _, idx in rank_batches(n, micro, micro_per_epoch, rank, world, tc.seed))

    # ---- outputs (rank 0) ----------------------------------------------------------------------------------------
    out_dir = tc.out_dir or default_out_dir(config_name)
    paths = {"out_dir": out_dir, "metrics_csv": os.path.join(out_dir, "metrics.csv"),
             "metrics_json": os.path.join(out_dir, "metrics.json"), "plot": os.path.join(out_dir, "curves.png")}
    csv_file = writer = None
    if rank == 0:
        os.makedirs(out_dir, exist_ok=True)
        csv_file = open(paths["metrics_csv"], "w", newline="", encoding="utf-8")
        writer = csv.DictWriter(csv_file, fieldnames=CSV_FIELDS)
        writer.writeheader()
        print(f"ds-conadv train: {describe_mode(resolved)} with {resolved.optimizer_type}, "
              f"ZeRO {ds_cfg.get('zero_optimization', {}).get('stage', 0)}, {world} rank(s) x {threads} thread(s), "
              f"global batch {micro * gas * world} ({micro} x {gas} x {world}), {steps_per_epoch} steps/epoch, "
              f"{run_steps} steps; outputs in {out_dir}", file=out, flush=True)
    desc = f"{resolved.mode} {resolved.optimizer_type} x{world}"
    bar = tqdm(total=run_steps, desc=desc, unit="step", disable=not (progress and rank == 0), file=sys.stderr,
               dynamic_ncols=True)

    rows: List[Dict[str, Any]] = []
    evals: List[Dict[str, Any]] = []
    step_times: List[float] = []
    t_start = time.perf_counter()
    step = 0
    try:
        for epoch in range(tc.epochs):
            if step >= run_steps:
                break
            if engine.schedule.steps_per_epoch is None:
                engine.set_epoch(epoch)
            elif engine.epoch != epoch:  # the schedule's epoch follows from steps_per_epoch
                raise RuntimeError(f"ConAdv schedule is at epoch {engine.epoch}, the data at {epoch}")
            for _ in range(steps_per_epoch):
                if step >= run_steps:
                    break
                lr = float(engine.get_lr()[0])  # the lr of this step (the scheduler moves on in the step)
                t0 = time.perf_counter()
                m = engine.train_batch(stream)
                dt = time.perf_counter() - t0
                vals = torch.tensor([m["loss"], m["clean_loss"], m["adv_loss"], m["clean_acc"], m["adv_acc"]],
                                    dtype=torch.float64, device=device)  # NCCL reduces device tensors
                if world > 1:
                    tdist.all_reduce(vals)
                    vals /= world
                step += 1
                step_times.append(dt)
                vals = vals.tolist()
                row = dict(step=step, epoch=epoch, lr=lr, loss=vals[0], clean_loss=vals[1],
                           adv_loss=vals[2], clean_acc=vals[3], adv_acc=vals[4],
                           step_time=dt, stale_by=m.get("stale_by"), generated_now=m.get("generated_now"),
                           test_clean_acc=None, test_adv_acc=None)
                if not math.isfinite(row["loss"]):
                    raise FloatingPointError(f"training diverged at step {step} (loss {row['loss']}): lower the lr")
                last_of_epoch = (step % steps_per_epoch == 0)
                if step == run_steps or (last_of_epoch and (epoch + 1) % tc.eval_every == 0):
                    clean, adv = evaluate(engine.module, x_te, y_te, normalize, conadv, rank, world, tc.seed, device)
                    row.update(test_clean_acc=clean, test_adv_acc=adv)
                    evals.append({"step": step, "epoch": epoch, "test_clean_acc": clean, "test_adv_acc": adv})
                rows.append(row)
                if rank == 0:
                    writer.writerow({k: _fmt(row[k]) for k in CSV_FIELDS})
                    csv_file.flush()
                    post = {"loss": f"{row['loss']:.3f}", "acc": f"{row['clean_acc']:.3f}"}
                    if not math.isnan(row["adv_acc"]):
                        post["adv"] = f"{row['adv_acc']:.3f}"
                    if evals:
                        post["test"] = f"{evals[-1]['test_clean_acc']:.3f}"
                    bar.set_postfix(post, refresh=False)
                    bar.update(1)
                    if tc.print_every and step % tc.print_every == 0:
                        bar.write(f"step {step}/{run_steps} epoch {epoch} lr {lr:.4g} loss {row['loss']:.4f} "
                                  f"clean acc {row['clean_acc']:.4f} adv acc {row['adv_acc']:.4f} "
                                  f"step {dt * 1e3:.0f} ms", file=sys.stderr)
    finally:
        bar.close()
        if csv_file is not None:
            csv_file.close()
    wall = time.perf_counter() - t_start

    # ---- every rank reports; all must hold the same weights ------------------------------------------------------
    params = list(engine.module.parameters())
    gather = (deepspeed.zero.GatheredParameters(params) if engine.zero_optimization_stage() == 3
              else contextlib.nullcontext())  # ZeRO 3 holds only a partition of each parameter
    with torch.no_grad(), gather:
        checksum = sum(float(p.detach().double().sum()) + 1e-3 * float(p.detach().double().square().sum())
                       for p in params)
    mine = {"rank": rank, "steps": step, "batches_consumed": engine.schedule.batches_consumed,
            "param_checksum": checksum}
    ranks = gather_ranks(mine, world)
    if rank != 0:
        return None

    final = evals[-1] if evals else {"test_clean_acc": float("nan"), "test_adv_acc": float("nan")}
    timed = step_times[1:] or step_times  # the first step includes one-off start-up work
    summary = {
        "final_test_clean_acc": final["test_clean_acc"],
        "final_test_adv_acc": final["test_adv_acc"],
        "final_train_loss": rows[-1]["loss"] if rows else float("nan"),
        "final_train_clean_acc": rows[-1]["clean_acc"] if rows else float("nan"),
        "final_train_adv_acc": rows[-1]["adv_acc"] if rows else float("nan"),
        "adversarial_eval": attack_description(conadv),
        "mode": resolved.mode, "optimizer": resolved.optimizer_type,
        "steps": step, "epochs": math.ceil(step / steps_per_epoch), "steps_per_epoch": steps_per_epoch,
        "world_size": world, "threads_per_rank": threads, "global_batch": micro * gas * world,
        "micro_batch": micro, "gradient_accumulation_steps": gas,
        "mean_step_time_s": statistics.fmean(timed) if timed else float("nan"),
        "median_step_time_s": statistics.median(timed) if timed else float("nan"),
        "wall_time_s": wall,
        "ranks": ranks, "ranks_agree": len({r["param_checksum"] for r in ranks}) == 1,
        "evals": evals, "paths": paths, "config_name": config_name, "config": resolved.raw,
        "device": str(device), "backend": tdist.get_backend() if tdist.is_initialized() else None,
    }
    with open(paths["metrics_json"], "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2, default=str)
    plot_curves(rows, evals, paths["plot"],
                f"ds-conadv train: {describe_mode(resolved)}, {resolved.optimizer_type}, "
                f"global batch {micro * gas * world}, {world} rank(s), {config_name}")
    adv = summary["final_test_adv_acc"]
    print(f"finished {step} steps in {wall:.1f} s (mean step {summary['mean_step_time_s'] * 1e3:.0f} ms, "
          f"{world} rank(s){'' if summary['ranks_agree'] else ', RANKS DISAGREE'})", file=out)
    print_accuracies(out, summary["final_test_clean_acc"], adv, summary["adversarial_eval"])
    print(f"metrics: {paths['metrics_csv']}  {paths['metrics_json']}", file=out)
    print(f"plot:    {paths['plot']}", file=out, flush=True)
    return summary
