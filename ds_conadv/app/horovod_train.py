"""The main job under ``horovodrun``: the same JSON config as ``ds-conadv train`` (DeepSpeed-style), run with
Horovod instead of DeepSpeed: the same data and model (:mod:`ds_conadv.app.common`), the same optimizer builder
and scheduler factory (:mod:`ds_conadv.config.builders`); pass ``model_fn`` / ``data_fn`` to use other builders.

    horovodrun --gloo -np 2 -H localhost:2 python -m ds_conadv.app.horovod_train --config cfg.json

(``python -m ds_conadv.integrations.horovod_train``, the old path, runs the same.)

Keys read from the config (everything else, e.g. ``zero_optimization``, is DeepSpeed's and ignored here):

* ``train_batch_size`` / ``train_micro_batch_size_per_gpu`` / ``gradient_accumulation_steps`` — DeepSpeed's
  rule: ``train_batch_size = micro * accumulation * ranks`` (give any two);
* ``optimizer`` — ``{"type": "LAMB" | "LARS" | <torch.optim class>, "params": {...}}`` (``exclude_norm_and_bias``
  as in ``ds_conadv.initialize``);
* ``gradient_clipping`` — LAMB/LARS: their ``max_grad_norm``; other optimizers: clipped between
  ``synchronize()`` and ``step()``;
* ``scheduler`` — ``WarmupPolyDecayLR`` (ours) or a DeepSpeed scheduler type (``total_num_steps: "auto"`` =
  epochs x steps per epoch), stepped every optimizer step;
* ``conadv`` — the ConAdv section, same semantics as under DeepSpeed;
* ``train`` — data/model/epochs/max_steps/seed/eval_every/threads/... (:class:`ds_conadv.config.TrainConfig`);
* ``fp16`` / ``bf16``, ``zero_optimization`` — not used under Horovod (rank 0 says so): the run is fp32 and
  every rank holds the whole model and optimizer state.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import sys
import time
from typing import Any, Callable, Dict, Iterator, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from ds_conadv.config.builders import (build_from_spec, build_scheduler, optimizer_params, optimizer_spec,
                                       resolve_clipping)
from ds_conadv.config.sections import ConAdvConfig, ConfigError, strip_comments

from .common import digits_cnn, digits_data

__all__ = ["train_horovod", "resolve_batch", "digits_data", "digits_cnn", "main"]


# ----------------------------------------------------------------------------------------------------------
# config pieces
# ----------------------------------------------------------------------------------------------------------
def resolve_batch(cfg: Dict[str, Any], world_size: int) -> Tuple[int, int, int]:
    """``(train_batch_size, micro_batch, accumulation)`` by DeepSpeed's rule."""
    tbs = cfg.get("train_batch_size")
    micro = cfg.get("train_micro_batch_size_per_gpu")
    gas = cfg.get("gradient_accumulation_steps")
    for key, value in (("train_batch_size", tbs), ("train_micro_batch_size_per_gpu", micro),
                       ("gradient_accumulation_steps", gas)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f'"{key}" = {value!r}: must be a positive integer')
    if tbs is not None and micro is not None and gas is not None:
        pass
    elif tbs is not None and micro is not None:
        gas = tbs // (micro * world_size)
    elif tbs is not None and gas is not None:
        micro = tbs // (gas * world_size)
    elif micro is not None:
        gas = gas or 1
        tbs = micro * gas * world_size
    elif tbs is not None:
        gas = 1
        micro = tbs // world_size
    else:
        raise ConfigError('give "train_batch_size" or "train_micro_batch_size_per_gpu" (DeepSpeed\'s batch keys)')
    if micro < 1 or gas < 1 or tbs != micro * gas * world_size:
        raise ConfigError(f'"train_batch_size" ({tbs}) must equal train_micro_batch_size_per_gpu ({micro}) x '
                          f"gradient_accumulation_steps ({gas}) x ranks ({world_size})")
    return tbs, micro, gas


def _train_section(cfg: Dict[str, Any]) -> Any:
    from ds_conadv.config.sections import TrainConfig

    return TrainConfig.from_section(cfg.get("train"))


def _build_optimizer(model: nn.Module, cfg: Dict[str, Any]) -> Tuple[torch.optim.Optimizer, Optional[float]]:
    """(optimizer, clip norm the trainer applies itself: for optimizers without ``max_grad_norm``), from the one
    builder (:mod:`ds_conadv.config.builders`)."""
    spec = optimizer_spec(cfg.get("optimizer"), allow_torch=True)
    clip = resolve_clipping(cfg.get("gradient_clipping"), spec.max_grad_norm)
    optimizer = build_from_spec(spec, optimizer_params(spec, model), max_grad_norm=clip)
    return optimizer, (None if spec.ours else clip)


def _build_scheduler(optimizer: torch.optim.Optimizer, cfg: Dict[str, Any], total_steps: int) -> Any:
    return build_scheduler(cfg.get("scheduler"), optimizer, total_steps)


def _rank_stream(x: torch.Tensor, y: torch.Tensor, *, rank: int, world: int, micro: int, gas: int, seed: int,
                 start: int = 0) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """This rank's micro-batches, from micro-batch ``start`` on. Every epoch is a permutation drawn from
    ``seed`` and the epoch (the same on every rank); global batch s is cut into ``gas * world`` micro-batches,
    micro-batch i of rank r is part ``i * world + r``. The last partial global batch of an epoch is dropped."""
    gbs = micro * gas * world
    steps = max(1, x.shape[0] // gbs)
    i = start
    while True:
        step, m = divmod(i, gas)
        epoch, s = divmod(step, steps)
        perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        part = m * world + rank
        idx = perm[s * gbs + part * micro: s * gbs + (part + 1) * micro]
        yield x[idx], y[idx]
        i += 1


# ----------------------------------------------------------------------------------------------------------
# the job
# ----------------------------------------------------------------------------------------------------------
#: the checkpoint's manifest says which backend wrote it (a DeepSpeed checkpoint cannot resume this job)
BACKEND = "horovod"


def train_horovod(config: Union[str, Dict[str, Any]], *, max_steps: Optional[int] = None,
                  save_dir: Optional[str] = None, resume: Optional[str] = None, progress: bool = True,
                  model_fn: Optional[Callable[[Any], nn.Module]] = None,
                  data_fn: Optional[Callable[[Any], Tuple[torch.Tensor, ...]]] = None,
                  log: Callable[[str], None] = print, save_every: int = 0, max_skipped: int = 10,
                  overwrite: bool = False, config_name: str = "horovod.json") -> Optional[Dict[str, Any]]:
    """Run the main job on the ranks started by ``horovodrun`` (call it on every rank). Writes the run folder
    (``train.out_dir``, else ``runs/<config>-<time>``) as ``ds-conadv train`` does under DeepSpeed
    (:mod:`ds_conadv.app.run_folder`): ``status.json``, ``metrics.csv``, ``metrics.json``, ``curves.png``,
    ``checkpoints/step<N>``. Returns the summary (what metrics.json holds) on rank 0, None elsewhere. Test
    accuracies are rank 0's model with rank 0's BN running statistics.

    Args:
        config: the JSON config (path or parsed dict; ``"_comment"`` keys are ignored).
        max_steps: overrides ``train.max_steps``.
        save_dir: also write a checkpoint here at the end (committed with its manifest, as ``save_every``'s).
        resume: continue from a checkpoint (a checkpoint folder, a ``checkpoints/`` folder or a run folder; its
            manifest is verified first) written by a run with the same config and ``-np``.
        progress: the progress bar on rank 0 (and a line every ``train.print_every`` steps).
        model_fn: ``model_fn(train_section) -> nn.Module`` (default: :func:`digits_cnn` of ``train.width``).
        data_fn: ``data_fn(train_section) -> (x_train, y_train, x_test, y_test)`` (default: :func:`digits_data`);
            normalised with ``conadv.mean``/``std`` when the config gives them, else used as they are.
        log: where rank 0's lines go.
        save_every: checkpoint every N optimizer steps into ``OUT_DIR/checkpoints/step<N>`` (the newest kept).
        max_skipped: stop as diverged after this many consecutive skipped (non-finite) steps (0: never).
        overwrite: replace an earlier run's results in the output folder (refused otherwise, unless resuming).
        config_name: names the default output folder and the plot.
    """
    from ds_conadv.conadv import prepare_model
    from ds_conadv.integrations.horovod import HorovodConAdvTrainer, require_horovod

    from . import reliability
    from .common import Normalize, default_out_dir

    hvd = require_horovod()
    if isinstance(config, str):
        config_name = os.path.basename(config)
        with open(config, encoding="utf-8") as f:
            config = json.load(f)
    cfg = strip_comments(dict(config))
    hvd.init()
    rank, world = hvd.rank(), hvd.size()
    train = _train_section(cfg)
    # rank 0 names and prepares the folder (refusing another run's), every rank learns the outcome
    problem, out_dir = None, None
    if rank == 0:
        out_dir = train.out_dir or default_out_dir(config_name)
        try:
            reliability.prepare_out_dir(out_dir, overwrite=overwrite, resume=bool(resume))
        except ConfigError as exc:
            problem = str(exc)
    problem, out_dir = hvd.broadcast_object((problem, out_dir), root_rank=0, name="ds_conadv.out_dir")
    if problem:
        raise ConfigError(problem)
    try:
        summary = _train(hvd, cfg, train, rank, world, out_dir, config_name, max_steps=max_steps, save_dir=save_dir,
                         resume=resume, progress=progress, model_fn=model_fn, data_fn=data_fn,
                         log=log if rank == 0 else (lambda *_: None), save_every=save_every, max_skipped=max_skipped,
                         prepare_model=prepare_model, trainer_cls=HorovodConAdvTrainer, normalize_cls=Normalize)
    except BaseException as exc:
        if rank == 0:
            reliability.write_status(out_dir, complete=False, error=f"{type(exc).__name__}: {exc}")
        raise
    if rank == 0:  # every result file is written
        reliability.write_status(out_dir, complete=True)
    return summary


def _train(hvd: Any, cfg: Dict[str, Any], train: Any, rank: int, world: int, out_dir: str, config_name: str, *,
           max_steps: Optional[int], save_dir: Optional[str], resume: Optional[str], progress: bool,
           model_fn: Optional[Callable[[Any], nn.Module]], data_fn: Optional[Callable[[Any], Tuple[torch.Tensor, ...]]],
           log: Callable[[str], None], save_every: int, max_skipped: int, prepare_model: Callable,
           trainer_cls: Any, normalize_cls: Any) -> Optional[Dict[str, Any]]:
    import shutil

    from ds_conadv.checkpointing import CheckpointError, commit_directory, verify_directory

    from .common import attack_description, evaluate, evaluate_untargeted_pgd
    from .run_folder import (RunRecorder, commit_checkpoint, find_checkpoint, job_state, load_job_state,
                             param_checksum, recorder_state)

    threads = train.threads or max(1, (os.cpu_count() or 1) // max(1, hvd.local_size()))
    torch.set_num_threads(threads)
    ignored = [f"{key}.enabled (the run is fp32)" for key in ("fp16", "bf16")
               if isinstance(cfg.get(key), dict) and cfg[key].get("enabled")]
    if (cfg.get("zero_optimization") or {}).get("stage", 0):
        ignored.append("zero_optimization (every rank holds the full model and optimizer state)")
    if ignored:
        log("[horovod] DeepSpeed settings ignored under Horovod: " + "; ".join(ignored))
    tbs, micro, gas = resolve_batch(cfg, world)
    conadv = ConAdvConfig.from_section(cfg.get("conadv"))

    if data_fn is None and train.data != "digits":
        raise ConfigError(f'"train.data" = {train.data!r}: only "digits" is bundled; pass data_fn= for other data')
    x_tr, y_tr, x_te, y_te = (data_fn or (lambda t: digits_data(t.test_fraction, t.split_seed)))(train)
    # as ds-conadv train: the model sees (pixel - mean) / std with conadv's mean/std (the attack's geometry:
    # epsilon and input_range in pixel units); for the bundled digits without them, the training split's
    if conadv.mean is None and data_fn is None:
        conadv = conadv.model_copy(update={"mean": [float(x_tr.mean())], "std": [float(x_tr.std())]})
    normalize = normalize_cls(conadv.mean, conadv.std) if conadv.mean is not None else (lambda x: x)
    x_tr = normalize(x_tr)
    if tbs > x_tr.shape[0]:
        raise ConfigError(f'"train_batch_size" ({tbs}) is larger than the training set ({x_tr.shape[0]} examples)')
    steps_per_epoch = x_tr.shape[0] // tbs
    total = steps_per_epoch * train.epochs
    scheduled = total  # the LR schedule's length ("auto"): the whole run, even when max_steps stops it early
    limit = max_steps or train.max_steps
    if limit is not None:
        total = min(total, limit)
    torch.manual_seed(train.seed)
    model = prepare_model((model_fn or (lambda t: digits_cnn(t.width)))(train), conadv)
    optimizer, clip = _build_optimizer(model, cfg)
    scheduler = _build_scheduler(optimizer, cfg, scheduled)
    smoothing = float(getattr(train, "label_smoothing", 0.0) or 0.0)
    loss_fn = (lambda out, y: F.cross_entropy(out, y, label_smoothing=smoothing)) if smoothing else None
    trainer = trainer_cls(model, optimizer, loss_fn, conadv, lr_scheduler=scheduler, gradient_accumulation_steps=gas,
                          seed=train.seed, steps_per_epoch=steps_per_epoch * gas, max_grad_norm=clip)
    optimizer = trainer.optimizer  # Horovod's rebuild (it counts the skipped steps from now on)
    job: Dict[str, Any] = {}
    if resume:
        ckpt = find_checkpoint(resume)
        meta = verify_directory(ckpt)  # every rank, before anything is loaded: a bad file raises, naming it
        if meta.get("backend", BACKEND) != BACKEND:
            raise CheckpointError(f"checkpoint {ckpt} was written by the {meta['backend']} backend: resume it with "
                                  f"--backend {meta['backend']}")
        if meta.get("world_size", world) != world:
            raise CheckpointError(f"checkpoint {ckpt} was written by {meta['world_size']} ranks, this run has "
                                  f"{world}: resume with the same -np")
        trainer.load_checkpoint(ckpt)
        if os.path.isfile(os.path.join(ckpt, f"job_rank{rank}.pt")):  # this rank's rows, RNG and BN statistics
            job = load_job_state(os.path.join(ckpt, f"job_rank{rank}.pt"), model)
        log(f"ds-conadv train: resumed from {ckpt} at step {trainer.global_step}")
    data = _rank_stream(x_tr, y_tr, rank=rank, world=world, micro=micro, gas=gas, seed=train.seed,
                        start=trainer.schedule.batches_consumed)
    mode = "vanilla" if not conadv.enabled else ("disadv" if conadv.tau == 0 else f"conadv(tau={conadv.tau})")
    rec = RunRecorder(out_dir, rank, total, rows=job.get("rows"), evals=job.get("evals"),
                      step_times=job.get("step_times"), max_skipped=max_skipped, progress=progress,
                      desc=f"{mode} {type(optimizer).__name__} hvd x{world}", print_every=train.print_every,
                      eval_every=train.eval_every, steps_per_epoch=steps_per_epoch)
    log(f"ds-conadv train: horovod, {mode} with {type(optimizer).__name__}, {world} rank(s) x {threads} thread(s), "
        f"global batch {tbs} ({micro} x {gas} x {world}), {steps_per_epoch} steps/epoch, {total} steps; "
        f"outputs in {out_dir}")
    ckpt_root = os.path.join(out_dir, "checkpoints")

    def save(at_step: int, final: Optional[str] = None) -> None:
        staging = f"{final}.staging" if final else os.path.join(ckpt_root, f".staging-step{at_step}")
        if rank == 0 and os.path.exists(staging):  # left by a killed run
            shutil.rmtree(staging)
        trainer._barrier()
        trainer.save_checkpoint(staging)  # model, optimizer, scheduler; every rank its ConAdv schedule (barrier)
        torch.save(job_state(model, **recorder_state(rec)), os.path.join(staging, f"job_rank{rank}.pt"))
        trainer._barrier()  # every rank's files are in the staging folder
        meta = {"step": at_step, "world_size": world, "backend": BACKEND}
        if rank == 0:
            if final:
                commit_directory(staging, final, meta=meta)
            else:
                commit_checkpoint(staging, ckpt_root, at_step, meta)
        trainer._barrier()

    skipped_counter = getattr(optimizer, "skipped_steps", None)  # LAMB/LARS count their non-finite skips
    skipped_before = int(skipped_counter) if torch.is_tensor(skipped_counter) else 0
    t_start = time.perf_counter()
    try:
        while trainer.global_step < total:
            lr = float(optimizer.param_groups[0]["lr"])  # the lr of this step (the scheduler moves on in the step)
            t0 = time.perf_counter()
            m = trainer.train_batch(data)
            dt = time.perf_counter() - t0
            skipped_now = int(optimizer.skipped_steps) if torch.is_tensor(skipped_counter) else 0
            vals = torch.tensor([m["loss"], m["clean_loss"], m["adv_loss"], m["clean_acc"], m["adv_acc"],
                                 float(skipped_now - skipped_before)], dtype=torch.float64)
            skipped_before = skipped_now
            if world > 1:
                vals = hvd.allreduce(vals, op=hvd.Average, name="ds_conadv.step_metrics")
            step = trainer.global_step
            row = rec.make_row(step, (step - 1) // steps_per_epoch, lr, vals.tolist(), dt, m)
            if rec.due_eval(row):  # every rank the whole test set, its own BN statistics; rank 0's are written
                rec.add_eval(row, *evaluate(model, x_te, y_te, normalize, conadv, 0, 1, train.seed, "cpu"))
            rec.commit(row)  # raises after a divergence, the row written
            if save_every and step % save_every == 0:
                save(step)
            rec.show(row)
    finally:
        rec.close()
    wall = time.perf_counter() - t_start
    if save_dir:
        save(trainer.global_step, final=save_dir)

    pgd_steps = 10
    test_pgd_acc = evaluate_untargeted_pgd(model, x_te, y_te, normalize, conadv, 0, 1, train.seed, "cpu",
                                           steps=pgd_steps)
    with torch.no_grad():
        mine = {"rank": rank, "steps": trainer.global_step, "batches_consumed": trainer.schedule.batches_consumed,
                "param_checksum": param_checksum(list(model.parameters()))}
    ranks = hvd.allgather_object(mine, name="ds_conadv.ranks")
    if rank != 0:
        return None
    summary = rec.summary(
        ranks, wall, adversarial_eval=attack_description(conadv), final_test_pgd_acc=test_pgd_acc,
        pgd_eval=f"untargeted PGD-{pgd_steps}, eps={conadv.epsilon} px, random start, eval mode, main BN",
        mode=mode, optimizer=type(optimizer).__name__, epochs=math.ceil(trainer.global_step / steps_per_epoch),
        steps_per_epoch=steps_per_epoch, world_size=world, threads_per_rank=threads, global_batch=tbs,
        train_batch_size=tbs, micro_batch=micro, gradient_accumulation_steps=gas, config_name=config_name,
        config=cfg, device="cpu", backend=BACKEND, resumed_from=resume)
    out = io.StringIO()
    rec.write_results(summary, f"ds-conadv train --backend horovod: {mode}, {type(optimizer).__name__}, "
                               f"global batch {tbs}, {world} rank(s), {config_name}", out)
    for line in out.getvalue().splitlines():
        log(line)
    return summary


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ds_conadv.app.horovod_train",
                                 description="ds-conadv's main job under horovodrun (one process per rank)")
    ap.add_argument("--config", required=True, metavar="PATH", help="the JSON config of ds-conadv train")
    ap.add_argument("--max-steps", type=int, default=None)
    ap.add_argument("--save-dir", default=None, help="checkpoint directory written at the end")
    ap.add_argument("--resume", default=None, help="checkpoint directory to continue from")
    ap.add_argument("--metrics-json", default=None, help="rank 0 also writes the final metrics here")
    ap.add_argument("--out-dir", default=None,
                    help="the run folder (default: train.out_dir, else runs/<config>-<time>)")
    ap.add_argument("--overwrite", action="store_true", help="replace an earlier run's results in the run folder")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    with open(args.config, encoding="utf-8") as f:
        config = json.load(f)
    if args.out_dir:
        config.setdefault("train", {})["out_dir"] = args.out_dir
    try:
        result = train_horovod(config, max_steps=args.max_steps, save_dir=args.save_dir, resume=args.resume,
                               progress=not args.no_progress, overwrite=args.overwrite,
                               config_name=os.path.basename(args.config))
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    if args.metrics_json and result is not None:  # rank 0
        with open(args.metrics_json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
