"""``ds_conadv.initialize``: a drop-in for ``deepspeed.initialize`` with ds_conadv's optimizers and sections.

It reads the DeepSpeed config (path, dict, or ``args.deepspeed_config``), builds ``"optimizer": {"type": "LAMB" |
"LARS"}`` and every ``"scheduler"`` with the one builder and factory of :mod:`ds_conadv.config.builders` (DeepSpeed's
own optimizer types pass through unchanged), validates our ``"conadv"`` and ``"absa"`` sections, and after
DeepSpeed has wrapped the optimizer, calls :func:`~.zero_layout.attach` so trust ratios are exact under ZeRO. With
a ``"conadv"`` or enabled ``"absa"`` section it returns the matching engine (:mod:`.engine`). With a
``"tensorboard"``, ``"csv_monitor"`` or ``"wandb"`` section enabled, every engine it returns writes its training
metrics through DeepSpeed's monitor next to DeepSpeed's own (:mod:`.monitor`).

Gradient clipping: one clipping, done by DeepSpeed. Our ``max_grad_norm`` and DeepSpeed's
``"gradient_clipping"`` are the same knob: give either (both only if equal). DeepSpeed computes the global
norm over all partitions; our optimizer then runs with ``max_grad_norm=None``. If neither is given,
DeepSpeed's own default (1.0 in DeepSpeed 0.19) applies, as it would for any optimizer. Except for a PipelineModule in
fp32 at ZeRO 0, whose DeepSpeed norm misses the later stages: there our optimizer clips, over all stages.
ConAdv and ABSA under a PipelineModule are refused.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import os
from typing import Any, Dict, Optional

import torch

from ds_conadv.config.builders import build_from_spec, optimizer_params, optimizer_spec, scheduler_factory
from ds_conadv.config.sections import ConAdvConfig, ConfigError, strip_comments
from ds_conadv.conadv.trainer import prepare_model
from ds_conadv.optim import TrustRatioOptimizer
from ds_conadv.torch_compat import BatchNormBase

from .zero_layout import attach

__all__ = ["initialize", "load_config", "validate_config"]


def load_config(args=None, config=None, config_params=None) -> Dict[str, Any]:
    """The DeepSpeed config as a fresh dict, from ``config``/``config_params`` (dict or path) or ``args``."""
    source = config if config is not None else config_params
    if source is None and args is not None:
        source = getattr(args, "deepspeed_config", None)
    if source is None:
        raise ConfigError("no DeepSpeed config: pass config= (dict or path) or args.deepspeed_config")
    if isinstance(source, (str, os.PathLike)):
        with open(source, encoding="utf-8") as f:
            text = f.read()
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            import hjson  # DeepSpeed accepts hjson; it is one of its requirements

            return dict(hjson.loads(text))
    if not isinstance(source, dict):
        raise ConfigError(f"config must be a dict or a path, got {type(source).__name__}")
    return copy.deepcopy(source)


def _reconcile_clipping(config: dict, max_grad_norm: Optional[float]) -> None:
    """Make DeepSpeed do the (single) global clipping that our max_grad_norm asks for."""
    ds_clip = config.get("gradient_clipping")
    if max_grad_norm is None:
        return
    if ds_clip is not None and float(ds_clip) != float(max_grad_norm):
        raise ConfigError(f'"optimizer.params.max_grad_norm" = {max_grad_norm} and "gradient_clipping" = {ds_clip} '
                          f"disagree; they are the same knob under DeepSpeed: give one, or equal values")
    config["gradient_clipping"] = float(max_grad_norm)


def _strip_own_clipping(optimizer: TrustRatioOptimizer) -> Optional[float]:
    values = {g.get("max_grad_norm") for g in optimizer.param_groups}
    if len(values) > 1:
        raise ConfigError(f"max_grad_norm differs between param groups: {values}")
    for g in optimizer.param_groups:
        g["max_grad_norm"] = None
    return values.pop() if values else None


#: the backends that step tensors in CPU memory (ZeRO-Offload's partition); "auto" picks the fused C++ kernels
_CPU_BACKENDS = ("auto", "cpp", "foreach", "reference")


def _offload_for_trust_optimizer(cfg: Dict[str, Any], backends: Any) -> Optional[str]:
    """ZeRO-Offload with our LAMB/LARS: its step runs on the CPU copy of the partition, with the fused C++ kernels
    (backend "auto" or "cpp"). DeepSpeed refuses any optimizer but its own CPU ones there unless
    ``"zero_force_ds_cpu_optimizer"`` is false (it knows no fused CPU LAMB/LARS): set it. Returns the offload
    device, or None without offload."""
    zero = cfg.get("zero_optimization")
    if not isinstance(zero, dict) or not isinstance(zero.get("offload_optimizer"), dict):
        return None
    section: Dict[str, Any] = zero["offload_optimizer"]
    device = section.get("device")
    if device not in ("cpu", "nvme"):
        return None
    stage = zero.get("stage", 0)
    if device == "nvme":
        raise ConfigError('"zero_optimization.offload_optimizer.device" = "nvme" with LAMB/LARS is not supported: '
                          "DeepSpeed swaps each sub-group's fp32 partition and optimizer state in and out of NVMe "
                          'buffers around its step; use "cpu"')
    ratio = section.get("ratio", 1.0)
    if stage == 3 and ratio != 1.0:
        raise ConfigError(f'"zero_optimization.offload_optimizer.ratio" = {ratio} with LAMB/LARS is not supported: '
                          "DeepSpeed steps the sub-groups it keeps on the accelerator with its own AdamW backup "
                          "optimizer; use 1.0")
    wrong = sorted(set(backends) - set(_CPU_BACKENDS))
    if wrong:
        raise ConfigError(f'"optimizer.params.backend" = {wrong[0]!r} cannot step ZeRO-Offload\'s partition, which '
                          f"lives in CPU memory; allowed: {', '.join(_CPU_BACKENDS)} (auto: the fused C++ CPU kernels)")
    if cfg.get("zero_force_ds_cpu_optimizer") is True:
        raise ConfigError('"zero_force_ds_cpu_optimizer": true refuses every optimizer but DeepSpeed\'s own CPU ones '
                          "under ZeRO-Offload; ds_conadv's LAMB/LARS step the offloaded partition with fused C++ "
                          "kernels: remove the key or set it false")
    cfg["zero_force_ds_cpu_optimizer"] = False
    return device


def _check_absa(section, cfg: Dict[str, Any], conadv: ConAdvConfig):
    """Validate an ``"absa"`` section against the rest of the config (``cfg``: the DeepSpeed config without our
    sections); returns its :class:`~ds_conadv.absa.ABSAConfig`, or ``None`` without a section. When enabled:
    no ``"conadv.enabled"`` beside it, an epsilon for the adversarial share, ZeRO stage 0-2 (the eigenvalue
    needs the full parameters), and every global batch ABSA can reach a multiple of the micro batch (the number
    of ranks is checked by the driver, which knows it)."""
    if section is None:
        return None
    from ds_conadv.absa.driver import attack_config
    from ds_conadv.absa.policy import ABSAConfig, accumulation_steps, reachable_batches

    absa = ABSAConfig.from_section(section)
    if not absa.enabled:
        return absa
    attack_config(absa, conadv)
    zero = cfg.get("zero_optimization")
    stage = zero.get("stage", 0) if isinstance(zero, dict) else 0
    if isinstance(stage, int) and stage >= 3:
        raise ConfigError(f'"absa.enabled": true needs "zero_optimization.stage" 0, 1 or 2, got {stage}: the top '
                          "eigenvalue needs the full parameters on every rank")
    start, micro = cfg.get("train_batch_size"), cfg.get("train_micro_batch_size_per_gpu")
    if isinstance(start, int) and isinstance(micro, int) and micro > 0:
        if start > absa.max_batch:
            raise ConfigError(f'"train_batch_size" = {start} is larger than "absa.max_batch" = {absa.max_batch}')
        sizes = reachable_batches(start, absa)
        for batch in sizes:
            try:
                accumulation_steps(batch, micro, 1)
            except ConfigError:
                raise ConfigError(f'"absa" grows "train_batch_size" {start} through {sizes} ("factor" {absa.factor}, '
                                  f'"max_batch" {absa.max_batch}); {batch} is not a multiple of '
                                  f'"train_micro_batch_size_per_gpu" = {micro}') from None
    return absa


def build_config_optimizer(cfg: Dict[str, Any], model: Any = None, model_parameters: Any = None,
                           optimizer: Any = None) -> Optional[tuple]:
    """The DeepSpeed path's use of the one builder: for our ``"optimizer"`` type, ``(optimizer, model_parameters)``
    with the section removed from ``cfg`` and the clipping moved to DeepSpeed's ``"gradient_clipping"`` (DeepSpeed
    clips: one global norm over all partitions); None for DeepSpeed's own types (they pass through)."""
    section = cfg.get("optimizer")
    spec = optimizer_spec(section)
    if spec is None or not isinstance(section, dict):
        return None
    if optimizer is not None:
        raise ConfigError(f'both an optimizer= object and "optimizer": {{"type": "{section["type"]}"}} given; '
                          f"DeepSpeed would silently drop the config one: give one of them")
    _reconcile_clipping(cfg, spec.max_grad_norm)
    model_parameters = optimizer_params(spec, model, model_parameters)
    optimizer = build_from_spec(spec, model_parameters, max_grad_norm=None)
    del cfg["optimizer"]
    return optimizer, model_parameters


def validate_config(config) -> Dict[str, Any]:
    """Check a config (dict or path) the way :func:`initialize` does, without a model or ranks: our sections
    (``"conadv"``, a LAMB/LARS ``"optimizer"``, our scheduler types), the clipping rule, then DeepSpeed's own
    ``DeepSpeedConfig`` on the rest (:func:`compat.check_config`). Returns the config DeepSpeed would get."""
    from . import compat

    cfg = strip_comments(load_config(config=config))
    conadv = ConAdvConfig.from_section(cfg.pop("conadv", None))
    _check_absa(cfg.pop("absa", None), cfg, conadv)
    cfg.pop("train", None)  # ds-conadv train's own section (validated by ds_conadv.train)
    spec = optimizer_spec(cfg.get("optimizer"))
    if spec is not None:  # ours (DeepSpeed's own types pass through)
        _reconcile_clipping(cfg, spec.max_grad_norm)
        probe = spec.cls([torch.zeros(1, requires_grad=True)], **spec.kwargs)  # its own type/range checks
        del cfg["optimizer"]
        cfg.setdefault("zero_allow_untested_optimizer", True)
        _offload_for_trust_optimizer(cfg, [g["backend"] for g in probe.param_groups])
    if isinstance(cfg.get("scheduler"), dict):
        scheduler_factory(cfg.pop("scheduler"), total_steps=1)  # built by our factory (every type)
    compat.check_config(cfg)  # DeepSpeed's sections, unknown top-level keys, gradient_clipping: one line each
    return cfg


def _norm_buffers_follow_params(module: torch.nn.Module) -> None:
    """Under bf16/fp16 DeepSpeed casts a model's parameters, not its buffers: a BatchNorm then holds bf16 weights
    and fp32 running statistics, and its forward fails on a bf16 input (on CPU). Give the floating buffers of each
    normalisation layer its parameters' dtype, as ``model.bfloat16()`` does."""
    for layer in module.modules():
        params = list(layer.parameters(recurse=False))
        if not params or not isinstance(layer, BatchNormBase):
            continue
        dtype = params[0].dtype
        for name, buf in list(layer.named_buffers(recurse=False)):
            if buf is not None and buf.is_floating_point() and buf.dtype != dtype:
                setattr(layer, name, buf.to(dtype))


def _pipeline_clipping_in_optimizer(model: Any, cfg: Dict[str, Any], optimizer: TrustRatioOptimizer) -> None:
    """A PipelineModule in fp32 at ZeRO 0: DeepSpeed's clipping there counts only the first stage's gradients (its
    grid's model-parallel group spans the stages and only model-parallel rank 0 adds replicated params), so our
    optimizer clips instead, with the norm summed over the stages (:func:`~.zero_layout.attach`); DeepSpeed's
    ``"gradient_clipping"`` (or its default) becomes our ``max_grad_norm`` and DeepSpeed's is set to 0."""
    from deepspeed.pipe import PipelineModule

    from . import compat

    zero = cfg.get("zero_optimization")
    stage = zero.get("stage", 0) if isinstance(zero, dict) else 0
    low_precision = any(isinstance(cfg.get(k), dict) and cfg[k].get("enabled") for k in ("bf16", "fp16"))
    if not isinstance(model, PipelineModule) or stage or low_precision:
        return
    clip = cfg.get("gradient_clipping")
    clip = compat.default_gradient_clipping() if clip is None else float(clip)
    cfg["gradient_clipping"] = 0.0
    for group in optimizer.param_groups:
        group["max_grad_norm"] = clip if clip > 0 else None


def _refuse_pipeline_adversarial(model: Any, has_conadv: bool, absa_on: bool) -> None:
    """ConAdv (and ABSA's attack and eigenvalue) need the input gradient and a Hessian-vector product through the
    whole network per step: a PipelineModule holds only this rank's stage and is driven by its own schedule."""
    from deepspeed.pipe import PipelineModule

    if isinstance(model, PipelineModule) and (has_conadv or absa_on):
        section = '"absa"' if absa_on else '"conadv"'
        raise ConfigError(f"{section} with a PipelineModule is not supported: adversarial generation needs a forward "
                          "and backward pass through the whole network per step, which pipeline parallelism "
                          "spreads over its stages; remove the section or train without PipelineModule")


def initialize(args=None, model=None, optimizer=None, model_parameters=None, training_data=None, lr_scheduler=None,
               mpu=None, dist_init_required=None, collate_fn=None, config=None, config_params=None, **kwargs):
    """``deepspeed.initialize`` with ds_conadv's optimizers and sections. Same arguments, same return values.

    With a ``"conadv"`` section the engine returned is a :class:`DeepSpeedConAdvEngine` (a drop-in for the
    DeepSpeed engine with ``train_batch(data_iter)``); extra keywords for it: ``loss_fn`` (default cross-entropy),
    ``conadv_seed``, ``steps_per_epoch`` (micro-batches per epoch, for the adversarial epoch window).

    With ``"absa": {"enabled": true}`` it is a :class:`~ds_conadv.integrations.deepspeed.engine.DeepSpeedABSAEngine`
    instead (also a
    drop-in, with ``train_batch(data_iter)``, ``end_epoch()``, ``steps_per_epoch(samples)``); a ``"conadv"``
    section then only describes ABSA's attack and must not be enabled. Its keywords: ``loss_fn``, ``conadv_seed``
    (the attack's seed) and ``absa_options``, a dict of further :class:`~ds_conadv.absa.driver.ABSADriver`
    arguments (``eig_data``, ``eigenvalue_fn``, ``log_dir``)."""
    import deepspeed

    from . import compat

    compat.check_version()
    loss_fn = kwargs.pop("loss_fn", None)
    conadv_seed = kwargs.pop("conadv_seed", 0)
    steps_per_epoch = kwargs.pop("steps_per_epoch", None)
    absa_options = kwargs.pop("absa_options", None)
    cfg = strip_comments(load_config(args, config, config_params))  # "_comment..." keys, at any depth
    if args is not None and getattr(args, "deepspeed_config", None) is not None:
        args = argparse.Namespace(**{**vars(args), "deepspeed_config": None})  # we pass the config ourselves
    has_conadv = "conadv" in cfg
    conadv = ConAdvConfig.from_section(cfg.pop("conadv", None))
    absa = _check_absa(cfg.pop("absa", None), cfg, conadv)
    absa_on = absa is not None and absa.enabled
    # DeepSpeed's sections and unknown top-level keys in one line here, not as a traceback from inside deepspeed
    compat.check_config(cfg, ours=("train", "optimizer"))
    if absa_options is not None and not absa_on:
        raise ConfigError('absa_options= given but the config has no "absa" section with "enabled": true')
    if absa_on and steps_per_epoch is not None:
        raise ConfigError('"absa.enabled": true with steps_per_epoch=: an ABSA run has no fixed epoch length (its '
                          "steps per epoch shrink as the batch grows; use engine.steps_per_epoch(samples)); "
                          "ds-conadv train does not drive ABSA: see docs/hessian.md for the ABSA loop")
    _refuse_pipeline_adversarial(model, has_conadv, absa_on)
    if conadv.enabled and conadv.dual_bn:
        if model is None:
            raise ConfigError('"conadv.dual_bn" needs model= (its BatchNorm layers get an adversarial twin)')
        if optimizer is not None or model_parameters is not None:
            raise ConfigError('"conadv.dual_bn": true adds adversarial BatchNorm parameters to the model, which an '
                              "optimizer= or model_parameters= built beforehand does not hold: let the config's "
                              '"optimizer" section build it, or call ds_conadv.conadv.convert_dual_bn(model) first '
                              'and set "dual_bn": false')
        model = prepare_model(model, conadv)

    built = build_config_optimizer(cfg, model, model_parameters, optimizer)
    if built is not None:
        optimizer, model_parameters = built
    sched_section = cfg.get("scheduler")
    if isinstance(sched_section, dict):  # every type through the one factory, as under Horovod
        if lr_scheduler is not None:
            raise ConfigError(f'both an lr_scheduler= and "scheduler": {{"type": "{sched_section.get("type")}"}} '
                              f"given; DeepSpeed would silently drop one of them: give one of them")
        lr_scheduler = scheduler_factory(sched_section)
        del cfg["scheduler"]
    if isinstance(optimizer, TrustRatioOptimizer):
        _reconcile_clipping(cfg, _strip_own_clipping(optimizer))
        _pipeline_clipping_in_optimizer(model, cfg, optimizer)
        if cfg.get("zero_optimization", {}).get("stage", 0):
            cfg.setdefault("zero_allow_untested_optimizer", True)
        offload = _offload_for_trust_optimizer(cfg, [g["backend"] for g in optimizer.param_groups])
        if offload is not None:
            from deepspeed.utils import log_dist

            # at warning level: DeepSpeed 0.19 shows only warnings by default, and a changed setting must be seen
            log_dist(f"ds_conadv: ZeRO-Offload ({offload}) steps {type(optimizer).__name__} with ds_conadv's fused "
                     'CPU kernels; "zero_force_ds_cpu_optimizer": false set for DeepSpeed', ranks=[0],
                     level=logging.WARNING)

    if not torch.distributed.is_initialized():
        # DeepSpeed's communication start-up would JIT-build its inference-only shm all-reduce op on CPU (minutes,
        # once); training never uses it (DeepSpeed's inference all-reduce falls back to the process group)
        compat.skip_shm_op_build()
    if cfg.get("zero_optimization", {}).get("stage", 0) == 3:
        compat.wait_for_coalesced_allgathers()  # DeepSpeed < 0.19.8 on gloo: before the engine gathers params
    engine, opt, loader, sched = deepspeed.initialize(
        args=args, model=model, optimizer=optimizer, model_parameters=model_parameters, training_data=training_data,
        lr_scheduler=lr_scheduler, mpu=mpu, dist_init_required=dist_init_required, collate_fn=collate_fn,
        config=cfg, **kwargs)
    attach(engine)
    _norm_buffers_follow_params(engine.module)
    if absa_on:
        from .engine import DeepSpeedABSAEngine

        engine = DeepSpeedABSAEngine(engine, absa, loss_fn, attack=conadv if has_conadv else None, seed=conadv_seed,
                                     **(absa_options or {}))
    elif has_conadv:
        from .engine import DeepSpeedConAdvEngine

        engine = DeepSpeedConAdvEngine(engine, conadv, loss_fn, seed=conadv_seed, steps_per_epoch=steps_per_epoch)
    else:  # with an enabled monitor section: the loss, skips and trust ratios next to DeepSpeed's own lr
        from .monitor import attach_step_metrics

        attach_step_metrics(engine)
    return engine, opt, loader, sched
