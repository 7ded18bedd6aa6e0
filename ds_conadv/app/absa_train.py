"""``ds-conadv train`` with ``"absa": {"enabled": true}``: the ABSA loop (adaptive batch size with adversarial
training, Yao et al. arXiv 1810.01021) on the bundled digits data, through the engine ``ds_conadv.initialize``
returns for such a config (:class:`~ds_conadv.absa_driver.DeepSpeedABSAEngine`).

Per epoch: ``engine.steps_per_epoch(n)`` optimizer steps at the current global batch (the batch grows through
gradient accumulation, so an epoch has fewer, larger steps as it grows), then ``engine.end_epoch()`` — the top
Hessian eigenvalue when due, and the schedule's decision — and a test-set evaluation every ``train.eval_every``
epochs. Rank 0 writes ``absa_log.csv`` / ``absa_log.json`` (one row per epoch), ``absa.png`` (eigenvalue, batch,
LR, adversarial ratio and accuracy per epoch) and ``metrics.json`` (the summary) into the output folder.
"""
from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time
from typing import Any, Dict, List, Optional

import torch

__all__ = ["run_absa"]


def run_absa(resolved, config_name: str, progress: bool, out, rank: int, world: int,
             threads: int, options: Any = None) -> Optional[Dict[str, Any]]:
    """Run the ABSA job on this rank (inside :func:`ds_conadv.app.train.run`'s distributed set-up). Returns the summary
    on rank 0, None elsewhere. ``options`` (:class:`~ds_conadv.app.train.RunOptions`): ``save_every`` (epochs
    here) and ``resume``."""
    import itertools
    import logging

    import torch.distributed as tdist

    from ds_conadv.checkpointing import CheckpointError, verify_directory

    import torch.nn.functional as F
    from tqdm import tqdm

    from ds_conadv.absa.driver import attack_config
    from ds_conadv.absa.policy import ABSAConfig
    from ds_conadv.integrations.deepspeed import compat, initialize

    from .common import (DigitsCNN, attack_description, default_out_dir, evaluate, gather_ranks, monitor_outputs,
                         prepare_data, print_accuracies, rank_batches)
    from .reliability import TrainingDiverged
    from .run_folder import commit_checkpoint, find_checkpoint, job_state, load_job_state, param_checksum

    tc = resolved.train
    ds_cfg = resolved.deepspeed
    x_tr, y_tr, x_te, y_te, normalize, conadv = prepare_data(resolved, ds_cfg)
    n = x_tr.shape[0]
    micro = ds_cfg.get("train_micro_batch_size_per_gpu")
    if micro is None:
        micro = ds_cfg["train_batch_size"] // (world * (ds_cfg.get("gradient_accumulation_steps") or 1))
    ds_cfg.setdefault("steps_per_print", 10 ** 9)
    out_dir = tc.out_dir or default_out_dir(config_name)
    os.makedirs(out_dir, exist_ok=True)
    monitors = monitor_outputs(ds_cfg, out_dir)  # "tensorboard" / "csv_monitor" sections: into the run's folder

    torch.manual_seed(tc.seed)
    smoothing = tc.label_smoothing

    def loss_fn(output, y):
        return F.cross_entropy(output, y, label_smoothing=smoothing)

    with compat.log_level(logging.ERROR):
        engine, _, _, _ = initialize(model=DigitsCNN(tc.width, 10), config=ds_cfg, loss_fn=loss_fn,
                                     conadv_seed=tc.seed, absa_options={"log_dir": out_dir})
    device = engine.device
    # the attack of the test-set evaluation: ABSA's own (its epsilon), else the conadv section's
    eval_attack = attack_config(ABSAConfig.from_section(ds_cfg["absa"]), conadv) or conadv
    micro_per_epoch = (n // world) // micro
    evals: List[Dict[str, Any]] = []
    step_times: List[float] = []
    steps = 0
    consumed = [0]  # micro-batches this rank has pulled from its stream
    ckpt_root = os.path.join(out_dir, "checkpoints")
    save_every = int(getattr(options, "save_every", 0) or 0)
    if getattr(options, "resume", None):
        ckpt = find_checkpoint(options.resume)
        meta = verify_directory(ckpt)  # every rank, before anything is loaded: a bad file raises, naming it
        if meta.get("job", "conadv") != "absa" or meta.get("backend", "deepspeed") != "deepspeed":
            raise CheckpointError(f"checkpoint {ckpt} is not an ABSA job's under DeepSpeed: resume it with the "
                                  "config that wrote it")
        engine.load_checkpoint(ckpt, tag="state")  # DeepSpeed's, then ABSA's (batch, LR factor, share, log, ...)
        job = load_job_state(os.path.join(ckpt, "state", f"job_rank{rank}.pt"), engine.module)
        steps, evals, step_times, consumed[0] = job["steps"], job["evals"], job["step_times"], job["consumed"]
        if rank == 0:
            print(f"ds-conadv train: resumed from {ckpt} at epoch {engine.epoch} (step {steps})", file=out,
                  flush=True)

    def counted(batches):
        for _, idx in batches:
            consumed[0] += 1
            yield x_tr[idx].to(device), y_tr[idx].to(device)

    # the data stream where the checkpoint left it (the data order is a function of seed and epoch)
    stream = counted(itertools.islice(rank_batches(n, micro, micro_per_epoch, rank, world, tc.seed), consumed[0],
                                      None))

    def save() -> None:
        staging = os.path.join(ckpt_root, f".staging-step{steps}")
        engine.save_checkpoint(staging, tag="state")  # DeepSpeed's and this rank's ABSA state
        torch.save(job_state(engine.module, steps=steps, evals=evals, step_times=step_times, consumed=consumed[0]),
                   os.path.join(staging, "state", f"job_rank{rank}.pt"))
        if world > 1:
            tdist.barrier()  # every rank's files are in the staging folder
        if rank == 0:
            commit_checkpoint(staging, ckpt_root, steps, {"step": steps, "epoch": engine.epoch, "world_size": world,
                                                          "backend": "deepspeed", "job": "absa"})
        if world > 1:
            tdist.barrier()

    if rank == 0:
        print(f"ds-conadv train: ABSA with {resolved.optimizer_type}, ZeRO "
              f"{ds_cfg.get('zero_optimization', {}).get('stage', 0)}, {world} rank(s) x {threads} thread(s), "
              f"global batch {engine.global_batch} ({micro} x {engine.grad_accum_steps} x {world}) growing to at "
              f"most {engine.cfg.max_batch}, {tc.epochs} epochs"
              f"{f', a checkpoint every {save_every} epoch(s)' if save_every else ''}; outputs in {out_dir}",
              file=out, flush=True)
        if monitors:
            print(f"DeepSpeed monitor: {'  '.join(monitors)}", file=out, flush=True)
    bar = tqdm(total=tc.epochs, initial=engine.epoch, desc=f"absa {resolved.optimizer_type} x{world}", unit="epoch",
               disable=not (progress and rank == 0), file=sys.stderr, dynamic_ncols=True)
    t_start = time.perf_counter()
    try:
        for epoch in range(engine.epoch, tc.epochs):
            if tc.max_steps and steps >= tc.max_steps:
                break
            for _ in range(engine.steps_per_epoch(n)):
                if tc.max_steps and steps >= tc.max_steps:
                    break
                t0 = time.perf_counter()
                m = engine.train_batch(stream)
                step_times.append(time.perf_counter() - t0)
                steps += 1
                if not math.isfinite(m["loss"]):
                    raise TrainingDiverged(f"training diverged at step {steps} (epoch {epoch}): non-finite loss "
                                           f"({m['loss']})")
            row = engine.end_epoch()
            last = epoch == tc.epochs - 1 or bool(tc.max_steps and steps >= tc.max_steps)
            if last or (epoch + 1) % tc.eval_every == 0:
                clean, adv = evaluate(engine.module, x_te, y_te, normalize, eval_attack, rank, world, tc.seed,
                                      device)
                evals.append({"epoch": epoch, "step": steps, "test_clean_acc": clean, "test_adv_acc": adv})
            if save_every and (epoch + 1) % save_every == 0:
                save()
            bar.set_postfix({"batch": row["global_batch"], "eig": f"{row['eigenvalue'] or float('nan'):.3g}",
                             "loss": f"{m['loss']:.3f}"}, refresh=False)
            bar.update(1)
            if last:
                break
    finally:
        bar.close()
    wall = time.perf_counter() - t_start

    checksum = param_checksum(list(engine.module.parameters()))
    ranks = gather_ranks({"rank": rank, "steps": steps, "param_checksum": checksum}, world)
    if rank != 0:
        return None
    plot = os.path.join(out_dir, "absa.png")
    engine.plot(plot, title=f"ds-conadv train: ABSA, {resolved.optimizer_type}, micro batch {micro}, {world} "
                            f"rank(s), {config_name}")
    final = evals[-1]
    timed = step_times[1:] or step_times
    summary = {
        "mode": "absa", "final_test_clean_acc": final["test_clean_acc"], "final_test_adv_acc": final["test_adv_acc"],
        "adversarial_eval": attack_description(eval_attack), "optimizer": resolved.optimizer_type,
        "steps": steps, "epochs": len(engine.log), "world_size": world, "threads_per_rank": threads,
        "micro_batch": micro, "final_global_batch": engine.global_batch,
        "global_batches": [r["global_batch"] for r in engine.log], "log": engine.log,
        "mean_step_time_s": statistics.fmean(timed) if timed else float("nan"), "wall_time_s": wall,
        "ranks": ranks, "ranks_agree": len({r["param_checksum"] for r in ranks}) == 1, "evals": evals,
        "paths": {"out_dir": out_dir, "absa_log_csv": os.path.join(out_dir, "absa_log.csv"),
                  "absa_log_json": os.path.join(out_dir, "absa_log.json"), "plot": plot,
                  "metrics_json": os.path.join(out_dir, "metrics.json")},
        "config_name": config_name, "config": resolved.raw, "device": str(device),
    }
    with open(summary["paths"]["metrics_json"], "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2, default=str)
    print(f"finished {steps} steps in {wall:.1f} s over {len(engine.log)} epochs, global batch "
          f"{summary['global_batches'][0]} -> {engine.global_batch} ({world} rank(s)"
          f"{'' if summary['ranks_agree'] else ', RANKS DISAGREE'})", file=out)
    print_accuracies(out, final["test_clean_acc"], final["test_adv_acc"], summary["adversarial_eval"])
    print(f"log:     {summary['paths']['absa_log_csv']}  {summary['paths']['metrics_json']}", file=out)
    print(f"plot:    {plot}", file=out, flush=True)
    return summary
