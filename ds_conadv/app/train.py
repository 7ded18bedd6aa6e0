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
import itertools
import math
import os
import sys
import time
import warnings
from typing import Any, Dict, List, Optional

import torch

from ds_conadv.checkpointing import CheckpointError, verify_directory
from ds_conadv.config.builders import AUTO as _AUTO
from ds_conadv.config.sections import ConfigError
from ds_conadv.integrations.deepspeed import compat

from .common import (DigitsCNN, attack_description, batch_geometry, default_out_dir, describe_mode, distributed,
                     evaluate, evaluate_untargeted_pgd, gather_ranks, monitor_outputs, prepare_data,
                     rank_batches)
from .job_config import DEFAULT_CONFIG_NAME, ResolvedConfig, check_runnable
from .run_folder import (CSV_FIELDS, RunRecorder, commit_checkpoint, find_checkpoint, job_state, load_job_state,
                         param_checksum, recorder_state)

__all__ = ["CSV_FIELDS", "run", "prepare_data", "RunOptions", "find_checkpoint"]

class RunOptions:
    """The run's reliability knobs (from the command line, not the config): checkpoints every ``save_every``
    steps into ``<out_dir>/checkpoints``, ``resume`` from a committed checkpoint folder, the process-group
    timeout ``rank_timeout`` (seconds) and ``max_skipped`` consecutive skipped optimizer steps before the run
    is stopped as diverged."""

    def __init__(self, save_every: int = 0, resume: Optional[str] = None, rank_timeout: float = 60.0,
                 max_skipped: int = 10):
        self.save_every = int(save_every or 0)
        self.resume = resume
        self.rank_timeout = float(rank_timeout)
        self.max_skipped = int(max_skipped)


def _base_optimizer(engine: Any) -> Any:
    """Our optimizer inside DeepSpeed's wrappers (the object that counts ``skipped_steps``), or None."""
    opt = getattr(engine, "basic_optimizer", None) or getattr(engine, "optimizer", None)
    for _ in range(4):
        if opt is None or torch.is_tensor(getattr(opt, "skipped_steps", None)):
            return opt
        opt = getattr(opt, "optimizer", None)
    return None


def _skipped_total(engine: Any, opt: Any) -> int:
    """Optimizer steps skipped so far: our optimizer's non-finite skips plus DeepSpeed's overflow skips."""
    total = int(getattr(engine, "skipped_steps", 0) or 0)
    if opt is not None and torch.is_tensor(getattr(opt, "skipped_steps", None)):
        total += int(opt.skipped_steps.item())
    return total


def run(resolved: ResolvedConfig, *, config_name: str = DEFAULT_CONFIG_NAME, progress: bool = True,
        out=None, options: Optional[RunOptions] = None) -> Optional[Dict[str, Any]]:
    """Run the job on this rank. Returns the summary (what metrics.json holds) on rank 0, None elsewhere."""
    options = options or RunOptions()

    check_runnable(resolved)
    compat.quiet_import()
    import logging

    import deepspeed

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    threads_before = torch.get_num_threads()
    ds_level = deepspeed.utils.logger.level
    deepspeed.utils.logger.setLevel(logging.WARNING)  # DeepSpeed's INFO lines would break up the progress bar
    try:
        with distributed(backend, timeout=options.rank_timeout) as (rank, world, local_world, _), \
                warnings.catch_warnings():
            # ZeRO 1/2 on gloo call a collective that torch has deprecated: not ours to fix, nor the user's
            warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated",
                                    category=FutureWarning)
            threads = resolved.train.threads or max(1, (os.cpu_count() or 1) // max(1, local_world))
            torch.set_num_threads(threads)
            return _run(resolved, config_name, progress, out or sys.stdout, rank, world, threads, options)
    finally:
        torch.set_num_threads(threads_before)
        deepspeed.utils.logger.setLevel(ds_level)


def _run(resolved: ResolvedConfig, config_name: str, progress: bool, out, rank: int, world: int,
         threads: int, options: RunOptions) -> Optional[Dict[str, Any]]:
    import logging

    import torch.distributed as tdist
    import torch.nn.functional as F

    import deepspeed

    from ds_conadv.integrations.deepspeed import initialize

    if resolved.absa_enabled:
        from .absa_train import run_absa

        return run_absa(resolved, config_name, progress, out, rank, world, threads, options)
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

    out_dir = tc.out_dir or default_out_dir(config_name)
    monitors = monitor_outputs(ds_cfg, out_dir)  # "tensorboard" / "csv_monitor" sections: into the run's folder
    with compat.log_level(logging.ERROR):  # "untested optimizer" (ours, attached to ZeRO), "lr before start", ...
        engine, _, _, _ = initialize(model=model, config=ds_cfg, loss_fn=loss_fn, conadv_seed=tc.seed,
                                     steps_per_epoch=micro_per_epoch)
    device = engine.device
    ckpt_root = os.path.join(out_dir, "checkpoints")
    rows: List[Dict[str, Any]] = []
    evals: List[Dict[str, Any]] = []
    step_times: List[float] = []
    step = 0
    if options.resume:
        ckpt = find_checkpoint(options.resume)
        meta = verify_directory(ckpt)  # every rank, before anything is loaded: a bad file raises, naming it
        if meta.get("backend", "deepspeed") != "deepspeed":
            raise CheckpointError(f"checkpoint {ckpt} was written by the {meta['backend']} backend: resume it with "
                                  f"--backend {meta['backend']}")
        if meta.get("job", "conadv") != "conadv":
            raise CheckpointError(f"checkpoint {ckpt} is the {meta['job']} job's: resume it with the config that "
                                  "wrote it")
        engine.load_checkpoint(ckpt, tag="state")
        # this rank's rows, RNG and buffers (BN running stats are per rank; DeepSpeed saves rank 0's)
        job = load_job_state(os.path.join(ckpt, "state", f"job_rank{rank}.pt"), engine.module)
        step, rows, evals, step_times = job["step"], job["rows"], job["evals"], job["step_times"]
        if rank == 0:
            print(f"ds-conadv train: resumed from {ckpt} at step {step}", file=out, flush=True)
    # the data stream where the checkpoint left it: the micro-batches already pulled (those queued for their
    # adversarial examples included) are skipped; the data order is a function of (seed, epoch)
    batches = rank_batches(n, micro, micro_per_epoch, rank, world, tc.seed)
    stream = ((x_tr_n[idx], y_tr[idx])
              for _, idx in itertools.islice(batches, engine.schedule.batches_consumed, None))
    base_opt = _base_optimizer(engine)

    def save(at_step: int) -> None:
        staging = os.path.join(ckpt_root, f".staging-step{at_step}")
        engine.save_checkpoint(staging, tag="state")
        torch.save(job_state(engine.module, **recorder_state(rec)),
                   os.path.join(staging, "state", f"job_rank{rank}.pt"))
        if world > 1:
            tdist.barrier()  # every rank's files are in the staging folder
        if rank == 0:
            commit_checkpoint(staging, ckpt_root, at_step, {"step": at_step, "world_size": world,
                                                             "backend": "deepspeed"})
        if world > 1:
            tdist.barrier()

    # ---- outputs (rank 0) ----------------------------------------------------------------------------------------
    rec = RunRecorder(out_dir, rank, run_steps, rows=rows, evals=evals, step_times=step_times,
                      max_skipped=options.max_skipped, progress=progress, desc=f"{resolved.mode} "
                      f"{resolved.optimizer_type} x{world}", print_every=tc.print_every, eval_every=tc.eval_every,
                      steps_per_epoch=steps_per_epoch)
    if rank == 0:
        print(f"ds-conadv train: {describe_mode(resolved)} with {resolved.optimizer_type}, "
              f"ZeRO {ds_cfg.get('zero_optimization', {}).get('stage', 0)}, {world} rank(s) x {threads} thread(s), "
              f"global batch {micro * gas * world} ({micro} x {gas} x {world}), {steps_per_epoch} steps/epoch, "
              f"{run_steps} steps; outputs in {out_dir}", file=out, flush=True)
        if monitors:
            print(f"DeepSpeed monitor: {'  '.join(monitors)}", file=out, flush=True)

    t_start = time.perf_counter()
    skipped_before = _skipped_total(engine, base_opt)
    try:
        for epoch in range(step // steps_per_epoch, tc.epochs):
            if step >= run_steps:
                break
            if engine.schedule.steps_per_epoch is None:
                engine.set_epoch(epoch)
            elif engine.epoch != epoch:  # the schedule's epoch follows from steps_per_epoch
                raise RuntimeError(f"ConAdv schedule is at epoch {engine.epoch}, the data at {epoch}")
            for _ in range(step % steps_per_epoch if epoch == step // steps_per_epoch else 0, steps_per_epoch):
                if step >= run_steps:
                    break
                lr = float(engine.get_lr()[0])  # the lr of this step (the scheduler moves on in the step)
                t0 = time.perf_counter()
                m = engine.train_batch(stream)
                dt = time.perf_counter() - t0
                skipped_now = _skipped_total(engine, base_opt)
                vals = torch.tensor([m["loss"], m["clean_loss"], m["adv_loss"], m["clean_acc"], m["adv_acc"],
                                     float(skipped_now - skipped_before)],
                                    dtype=torch.float64, device=device)  # NCCL reduces device tensors
                skipped_before = skipped_now
                if world > 1:
                    tdist.all_reduce(vals)
                    vals /= world
                step += 1
                row = rec.make_row(step, epoch, lr, vals.tolist(), dt, m)
                if rec.due_eval(row):
                    rec.add_eval(row, *evaluate(engine.module, x_te, y_te, normalize, conadv, rank, world, tc.seed,
                                                device))
                rec.commit(row)  # raises after a divergence, the row written
                if options.save_every and step % options.save_every == 0:
                    save(step)
                rec.show(row)
    finally:
        rec.close()
    wall = time.perf_counter() - t_start

    # ---- the standard robustness figure (untargeted PGD-10) next to the configured attack, every rank's shard ----
    pgd_steps = 10
    test_pgd_acc = evaluate_untargeted_pgd(engine.module, x_te, y_te, normalize, conadv, rank, world, tc.seed,
                                           device, steps=pgd_steps)

    # ---- every rank reports; all must hold the same weights ------------------------------------------------------
    params = list(engine.module.parameters())
    gather = (deepspeed.zero.GatheredParameters(params) if engine.zero_optimization_stage() == 3
              else contextlib.nullcontext())  # ZeRO 3 holds only a partition of each parameter
    with torch.no_grad(), gather:
        checksum = param_checksum(params)
    mine = {"rank": rank, "steps": step, "batches_consumed": engine.schedule.batches_consumed,
            "param_checksum": checksum}
    ranks = gather_ranks(mine, world)
    if rank != 0:
        return None

    summary = rec.summary(
        ranks, wall, adversarial_eval=attack_description(conadv), final_test_pgd_acc=test_pgd_acc,
        pgd_eval=f"untargeted PGD-{pgd_steps}, eps={conadv.epsilon} px, random start, eval mode, main BN",
        mode=resolved.mode, optimizer=resolved.optimizer_type, epochs=math.ceil(step / steps_per_epoch),
        steps_per_epoch=steps_per_epoch, world_size=world, threads_per_rank=threads,
        global_batch=micro * gas * world, micro_batch=micro, gradient_accumulation_steps=gas,
        config_name=config_name, config=resolved.raw, device=str(device),
        backend=tdist.get_backend() if tdist.is_initialized() else None, resumed_from=options.resume)
    rec.write_results(summary, f"ds-conadv train: {describe_mode(resolved)}, {resolved.optimizer_type}, "
                               f"global batch {micro * gas * world}, {world} rank(s), {config_name}", out)
    return summary
