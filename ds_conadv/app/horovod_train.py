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


@torch.no_grad()
def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 512) -> float:
    was = model.training
    model.eval()
    correct = sum(int((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum()) for i in range(0, len(x), batch))
    model.train(was)
    return correct / max(1, len(x))


# ----------------------------------------------------------------------------------------------------------
# the job
# ----------------------------------------------------------------------------------------------------------
def train_horovod(config: Union[str, Dict[str, Any]], *, max_steps: Optional[int] = None,
                  save_dir: Optional[str] = None, resume: Optional[str] = None, progress: bool = True,
                  model_fn: Optional[Callable[[Any], nn.Module]] = None,
                  data_fn: Optional[Callable[[Any], Tuple[torch.Tensor, ...]]] = None,
                  log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Run the main job on the ranks started by ``horovodrun`` (call it on every rank). Returns the metrics;
    accuracies use each rank's own BN running statistics (rank 0's are the ones printed and written).

    Args:
        config: the JSON config (path or parsed dict; ``"_comment"`` keys are ignored).
        max_steps: overrides ``train.max_steps``.
        save_dir: write a checkpoint here at the end (see :meth:`HorovodConAdvTrainer.save_checkpoint`).
        resume: continue from a checkpoint written by a run with the same config and ``-np``.
        progress: print a line per epoch on rank 0 (and every ``train.print_every`` steps).
        model_fn: ``model_fn(train_section) -> nn.Module`` (default: :func:`digits_cnn` of ``train.width``).
        data_fn: ``data_fn(train_section) -> (x_train, y_train, x_test, y_test)`` (default: :func:`digits_data`);
            normalised with ``conadv.mean``/``std`` when the config gives them, else used as they are.
        log: where rank 0's lines go.
    """
    from ds_conadv.conadv import prepare_model
    from ds_conadv.integrations.horovod import HorovodConAdvTrainer, require_horovod

    hvd = require_horovod()
    if isinstance(config, str):
        with open(config, encoding="utf-8") as f:
            config = json.load(f)
    cfg = strip_comments(dict(config))
    hvd.init()
    rank, world = hvd.rank(), hvd.size()
    say = log if rank == 0 else (lambda *_: None)
    train = _train_section(cfg)
    threads = train.threads or max(1, (os.cpu_count() or 1) // max(1, hvd.local_size()))
    torch.set_num_threads(threads)
    ignored = [f"{key}.enabled (the run is fp32)" for key in ("fp16", "bf16")
               if isinstance(cfg.get(key), dict) and cfg[key].get("enabled")]
    if (cfg.get("zero_optimization") or {}).get("stage", 0):
        ignored.append("zero_optimization (every rank holds the full model and optimizer state)")
    if ignored:
        say("[horovod] DeepSpeed settings ignored under Horovod: " + "; ".join(ignored))
    tbs, micro, gas = resolve_batch(cfg, world)
    conadv = ConAdvConfig.from_section(cfg.get("conadv"))

    if data_fn is None and train.data != "digits":
        raise ConfigError(f'"train.data" = {train.data!r}: only "digits" is bundled; pass data_fn= for other data')
    x_tr, y_tr, x_te, y_te = (data_fn or (lambda t: digits_data(t.test_fraction, t.split_seed)))(train)
    # as ds-conadv train: the model sees (pixel - mean) / std with conadv's mean/std (the attack's geometry:
    # epsilon and input_range in pixel units); for the bundled digits without them, the training split's
    if conadv.mean is None and data_fn is None:
        conadv = conadv.model_copy(update={"mean": [float(x_tr.mean())], "std": [float(x_tr.std())]})
    if conadv.mean is not None:
        shape = (1, len(conadv.mean), 1, 1) if len(conadv.mean) > 1 else (1,)
        mean = torch.tensor(conadv.mean, dtype=x_tr.dtype).view(shape)
        std = torch.tensor(conadv.std, dtype=x_tr.dtype).view(shape)
        x_tr, x_te = (x_tr - mean) / std, (x_te - mean) / std
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
    trainer = HorovodConAdvTrainer(model, optimizer, loss_fn, conadv, lr_scheduler=scheduler,
                                   gradient_accumulation_steps=gas, seed=train.seed,
                                   steps_per_epoch=steps_per_epoch * gas, max_grad_norm=clip)
    if resume:
        trainer.load_checkpoint(resume)
    data = _rank_stream(x_tr, y_tr, rank=rank, world=world, micro=micro, gas=gas, seed=train.seed,
                        start=trainer.schedule.batches_consumed)
    mode = "vanilla" if not conadv.enabled else ("disadv" if conadv.tau == 0 else f"conadv(tau={conadv.tau})")
    say(f"[horovod] ranks={world} batch={tbs} (micro {micro} x accumulation {gas} x {world}) "
        f"steps={total} ({steps_per_epoch}/epoch) optimizer={type(optimizer).__name__} mode={mode}")
    t0 = time.perf_counter()
    losses, step_times, history = [], [], []
    metrics: Dict[str, Any] = {}
    while trainer.global_step < total:
        metrics = trainer.train_batch(data)
        losses.append(metrics["loss"])
        step_times.append(metrics["time_total"])
        step = trainer.global_step
        if not math.isfinite(metrics["loss"]):
            raise FloatingPointError(f"training diverged at step {step} (loss {metrics['loss']})")
        if progress and train.print_every and step % train.print_every == 0:
            say(f"step {step}/{total} loss {metrics['loss']:.4f} adv_loss {metrics['adv_loss']:.4f}")
        epoch_done = step % steps_per_epoch == 0
        epoch = step // steps_per_epoch
        if step == total or (epoch_done and epoch % train.eval_every == 0):
            acc = _accuracy(model, x_te, y_te)
            history.append({"step": step, "epoch": epoch, "loss": metrics["loss"], "test_accuracy": acc})
            if progress:
                say(f"epoch {epoch} step {step}/{total} loss {metrics['loss']:.4f} test accuracy {acc:.4f}")
    seconds = time.perf_counter() - t0
    if save_dir:
        trainer.save_checkpoint(save_dir)
    result = {
        "backend": "horovod", "ranks": world, "optimizer": type(optimizer).__name__, "conadv": mode,
        "train_batch_size": tbs, "micro_batch": micro, "gradient_accumulation_steps": gas,
        "steps": trainer.global_step, "steps_per_epoch": steps_per_epoch,
        "final_loss": losses[-1] if losses else float("nan"),
        "train_accuracy": _accuracy(model, x_tr, y_tr), "test_accuracy": _accuracy(model, x_te, y_te),
        "seconds": seconds, "step_time_mean": sum(step_times) / max(1, len(step_times)),
        "history": history, "threads": threads,
    }
    say(f"train accuracy: {result['train_accuracy']:.4f}")
    say(f"test accuracy:  {result['test_accuracy']:.4f}")
    out_dir = getattr(train, "out_dir", None)
    if rank == 0 and out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "metrics_horovod.json"), "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ds_conadv.app.horovod_train",
                                 description="ds-conadv's main job under horovodrun (one process per rank)")
    ap.add_argument("--config", required=True, metavar="PATH", help="the JSON config of ds-conadv train")
    ap.add_argument("--max-steps", type=int, default=None)
    ap.add_argument("--save-dir", default=None, help="checkpoint directory written at the end")
    ap.add_argument("--resume", default=None, help="checkpoint directory to continue from")
    ap.add_argument("--metrics-json", default=None, help="rank 0 writes the final metrics here")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    try:
        result = train_horovod(args.config, max_steps=args.max_steps, save_dir=args.save_dir, resume=args.resume,
                               progress=not args.no_progress)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    if args.metrics_json:
        import horovod.torch as hvd

        if hvd.rank() == 0:
            with open(args.metrics_json, "w", encoding="utf-8") as f:
                json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
