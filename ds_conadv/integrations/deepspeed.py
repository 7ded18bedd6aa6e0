"""DeepSpeed integration: JSON-selected LAMB/LARS and exact per-tensor trust ratios under ZeRO.

``ds_conadv.initialize(...)`` is a drop-in for ``deepspeed.initialize``. It reads the DeepSpeed config (path,
dict, or ``args.deepspeed_config``), takes ``"optimizer": {"type": "LAMB" | "LARS"}`` to mean *our*
optimizers (DeepSpeed's own types pass through unchanged), ``"scheduler": {"type": "WarmupPolyDecayLR"}`` to mean
ours (:mod:`ds_conadv.lr_schedules`), validates our ``"conadv"`` section, and after
DeepSpeed has wrapped the optimizer, calls :func:`attach` so trust ratios are exact.

Why attach is needed: ZeRO 1/2 (and DeepSpeed's fp16/bf16 wrappers) flatten each param group into one fp32
buffer and hand the optimizer only this rank's slice, cut at arbitrary element offsets. A per-tensor
optimizer then takes its norms over that slice. ``attach`` gives our optimizer a :class:`SegmentLayout` per
group: each original parameter's fragment in the slice (from DeepSpeed's ``_hp_mapping``) is a segment
whose norm id is the parameter's index in the group; the per-id partial sums of squares are all-reduced
over the data-parallel group once per group and step (one small collective), then the trust ratios are
those of the whole tensors. A LAMB/LARS built by the user and passed to plain ``deepspeed.initialize``
attaches itself at its first step (see :func:`auto_attach`).

Gradient clipping: one clipping, done by DeepSpeed. Our ``max_grad_norm`` and DeepSpeed's
``"gradient_clipping"`` are the same knob: give either (both only if equal). DeepSpeed computes the global
norm over all partitions; our optimizer then runs with ``max_grad_norm=None``. If neither is given,
DeepSpeed's own default (1.0 in DeepSpeed 0.19) applies, as it would for any optimizer.
"""
from __future__ import annotations

import argparse
import copy
import gc
import inspect
import json
import os
from typing import Any, Dict, List, Optional

import torch

from ds_conadv.config import (ConAdvConfig, ConfigError, optimizer_class, strip_comments,
                              validate_optimizer_params)
from ds_conadv.conadv.trainer import prepare_model
from ds_conadv.optim import SegmentLayout, TrustRatioOptimizer, param_groups

__all__ = ["initialize", "attach", "auto_attach", "load_config", "validate_config"]


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


def _check_absa(section, cfg: Dict[str, Any], conadv: ConAdvConfig):
    """Validate an ``"absa"`` section against the rest of the config (``cfg``: the DeepSpeed config without our
    sections); returns its :class:`~ds_conadv.absa.ABSAConfig`, or ``None`` without a section. When enabled:
    no ``"conadv.enabled"`` beside it, an epsilon for the adversarial share, ZeRO stage 0-2 (the eigenvalue
    needs the full parameters), and every global batch ABSA can reach a multiple of the micro batch (the number
    of ranks is checked by the driver, which knows it)."""
    if section is None:
        return None
    from ds_conadv.absa import ABSAConfig, accumulation_steps, reachable_batches
    from ds_conadv.absa_driver import attack_config

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


def validate_config(config) -> Dict[str, Any]:
    """Check a config (dict or path) the way :func:`initialize` does, without a model or ranks: our sections
    (``"conadv"``, a LAMB/LARS ``"optimizer"``, our scheduler types), the clipping rule, then DeepSpeed's own
    ``DeepSpeedConfig`` on the rest (batch sizes checked for one rank). Returns the config DeepSpeed would get."""
    from deepspeed.runtime.config import DeepSpeedConfig

    cfg = strip_comments(load_config(config=config))
    conadv = ConAdvConfig.from_section(cfg.pop("conadv", None))
    _check_absa(cfg.pop("absa", None), cfg, conadv)
    cfg.pop("train", None)  # ds-conadv train's own section (validated by ds_conadv.train)
    section = cfg.get("optimizer")
    cls = optimizer_class(section.get("type", "")) if isinstance(section, dict) else None
    if cls is not None:
        unknown = set(section) - {"type", "params"}
        if unknown:
            raise ConfigError(f'unknown key "{sorted(unknown)[0]}" in "optimizer"; allowed keys: type, params')
        kwargs_opt, _ = validate_optimizer_params(cls, section.get("params"))
        _reconcile_clipping(cfg, kwargs_opt.pop("max_grad_norm", None))
        cls([torch.zeros(1, requires_grad=True)], **kwargs_opt)  # the optimizer's own type/range checks
        del cfg["optimizer"]
        cfg.setdefault("zero_allow_untested_optimizer", True)
    sched = cfg.get("scheduler")
    if isinstance(sched, dict):
        from ds_conadv.lr_schedules import scheduler_class

        if scheduler_class(sched.get("type")) is not None:
            del cfg["scheduler"]
    try:
        DeepSpeedConfig(copy.deepcopy(cfg))
    except Exception as e:  # pydantic ValidationError, batch-size assertions, ...
        raise ConfigError(f"DeepSpeed rejects the config: {e}") from None
    return cfg


def initialize(args=None, model=None, optimizer=None, model_parameters=None, training_data=None, lr_scheduler=None,
               mpu=None, dist_init_required=None, collate_fn=None, config=None, config_params=None, **kwargs):
    """``deepspeed.initialize`` with ds_conadv's optimizers and sections. Same arguments, same return values.

    With a ``"conadv"`` section the engine returned is a :class:`DeepSpeedConAdvEngine` (a drop-in for the
    DeepSpeed engine with ``train_batch(data_iter)``); extra keywords for it: ``loss_fn`` (default cross-entropy),
    ``conadv_seed``, ``steps_per_epoch`` (for the adversarial epoch window).

    With ``"absa": {"enabled": true}`` it is a :class:`~ds_conadv.absa_driver.DeepSpeedABSAEngine` instead (also a
    drop-in, with ``train_batch(data_iter)``, ``end_epoch()``, ``steps_per_epoch(samples)``); a ``"conadv"``
    section then only describes ABSA's attack and must not be enabled. Its keywords: ``loss_fn``, ``conadv_seed``
    (the attack's seed) and ``absa_options``, a dict of further :class:`~ds_conadv.absa_driver.ABSADriver`
    arguments (``eig_data``, ``eigenvalue_fn``, ``log_dir``)."""
    import deepspeed

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
    if absa_options is not None and not absa_on:
        raise ConfigError('absa_options= given but the config has no "absa" section with "enabled": true')
    if absa_on and steps_per_epoch is not None:
        raise ConfigError('"absa.enabled": true with steps_per_epoch=: an ABSA run has no fixed epoch length (its '
                          "steps per epoch shrink as the batch grows; use engine.steps_per_epoch(samples)); "
                          "ds-conadv train does not drive ABSA: see docs/hessian.md for the ABSA loop")
    if conadv.enabled and conadv.dual_bn:
        if model is None:
            raise ConfigError('"conadv.dual_bn" needs model= (its BatchNorm layers get an adversarial twin)')
        if optimizer is not None or model_parameters is not None:
            raise ConfigError('"conadv.dual_bn": true adds adversarial BatchNorm parameters to the model, which an '
                              "optimizer= or model_parameters= built beforehand does not hold: let the config's "
                              '"optimizer" section build it, or call ds_conadv.conadv.convert_dual_bn(model) first '
                              'and set "dual_bn": false')
        model = prepare_model(model, conadv)

    section = cfg.get("optimizer")
    cls = optimizer_class(section.get("type", "")) if isinstance(section, dict) else None
    if cls is not None:
        if optimizer is not None:
            raise ConfigError(f'both an optimizer= object and "optimizer": {{"type": "{section["type"]}"}} given; '
                              f"DeepSpeed would silently drop the config one: give one of them")
        unknown = set(section) - {"type", "params"}
        if unknown:
            raise ConfigError(f'unknown key "{sorted(unknown)[0]}" in "optimizer"; allowed keys: type, params')
        kwargs_opt, grouping = validate_optimizer_params(cls, section.get("params"))
        _reconcile_clipping(cfg, kwargs_opt.pop("max_grad_norm", None))
        if model_parameters is None:
            if model is None:
                raise ConfigError("building the optimizer from the config needs model= or model_parameters=")
            if grouping.get("exclude_norm_and_bias"):
                default_wd = inspect.signature(cls).parameters["weight_decay"].default
                model_parameters = param_groups(model, kwargs_opt.get("weight_decay", default_wd))
            else:
                model_parameters = [p for p in model.parameters() if p.requires_grad]
        elif grouping.get("exclude_norm_and_bias"):
            raise ConfigError('"exclude_norm_and_bias" builds the groups from model=; it cannot be combined with '
                              "model_parameters=")
        optimizer = cls(model_parameters, **kwargs_opt)
        del cfg["optimizer"]
    sched_section = cfg.get("scheduler")
    if isinstance(sched_section, dict):
        from ds_conadv.lr_schedules import scheduler_class, scheduler_factory

        if scheduler_class(sched_section.get("type")) is not None:  # ours (DeepSpeed's types pass through)
            if lr_scheduler is not None:
                raise ConfigError(f'both an lr_scheduler= and "scheduler": {{"type": "{sched_section["type"]}"}} '
                                  f"given; DeepSpeed would silently drop the config one: give one of them")
            lr_scheduler = scheduler_factory(sched_section)
            del cfg["scheduler"]
    if isinstance(optimizer, TrustRatioOptimizer):
        _reconcile_clipping(cfg, _strip_own_clipping(optimizer))
        if cfg.get("zero_optimization", {}).get("stage", 0):
            cfg.setdefault("zero_allow_untested_optimizer", True)

    engine, opt, loader, sched = deepspeed.initialize(
        args=args, model=model, optimizer=optimizer, model_parameters=model_parameters, training_data=training_data,
        lr_scheduler=lr_scheduler, mpu=mpu, dist_init_required=dist_init_required, collate_fn=collate_fn,
        config=cfg, **kwargs)
    attach(engine)
    if absa_on:
        from ds_conadv.absa_driver import DeepSpeedABSAEngine

        engine = DeepSpeedABSAEngine(engine, absa, loss_fn, attack=conadv if has_conadv else None, seed=conadv_seed,
                                     **(absa_options or {}))
    elif has_conadv:
        from ds_conadv.integrations.deepspeed_engine import DeepSpeedConAdvEngine

        engine = DeepSpeedConAdvEngine(engine, conadv, loss_fn, seed=conadv_seed, steps_per_epoch=steps_per_epoch)
    return engine, opt, loader, sched


# ----------------------------------------------------------------------------------------------------------
# Exact trust ratios under DeepSpeed's flattening wrappers
# ----------------------------------------------------------------------------------------------------------
def _find_trust_optimizer(obj) -> Optional[TrustRatioOptimizer]:
    seen = set()
    while obj is not None and id(obj) not in seen:
        if isinstance(obj, TrustRatioOptimizer):
            return obj
        seen.add(id(obj))
        obj = getattr(obj, "optimizer", None)
    return None


def _all_reduce_hook(process_group):
    from deepspeed import comm as dist

    def hook(sums: torch.Tensor) -> None:
        dist.all_reduce(sums, group=process_group)

    return hook


def _fragments_from_hp_mapping(lp_params: List[torch.Tensor]) -> List[tuple]:
    frags = []
    for index, lp in enumerate(lp_params):
        mapping = getattr(lp, "_hp_mapping", None)
        if mapping is None:
            continue
        address = mapping.get_hp_fragment_address()
        frags.append((int(address.start), int(address.numel), index))
    return frags


def _contiguous_fragments(lp_params: List[torch.Tensor]) -> List[tuple]:
    frags, offset = [], 0
    for index, lp in enumerate(lp_params):
        frags.append((offset, lp.numel(), index))
        offset += lp.numel()
    return frags


def _set_layout(trust: TrustRatioOptimizer, flat: torch.Tensor, fragments: List[tuple], num_ids: int, hook) -> None:
    # keyed by the flat tensor: DeepSpeed steps one group at a time with ``param_groups`` swapped
    trust.set_segment_layout(flat, SegmentLayout([fragments], num_ids, hook))


def attach(engine_or_optimizer) -> Optional[TrustRatioOptimizer]:
    """Give our optimizer inside a DeepSpeed engine its segment layouts (exact trust ratios). Idempotent.

    Returns the LAMB/LARS found, or ``None`` if the engine runs another optimizer.
    """
    is_engine = hasattr(engine_or_optimizer, "module") and hasattr(engine_or_optimizer, "optimizer")
    wrapper = engine_or_optimizer.optimizer if is_engine else engine_or_optimizer
    trust = _find_trust_optimizer(wrapper)
    if trust is None:
        return None
    name = type(wrapper).__name__
    if wrapper is trust or name == "FP16_UnfusedOptimizer":
        # stage 0: fp32 runs hand our optimizer the real tensors, fp16/bf16 per-tensor fp32 copies
        trust._ds_attached = True
        return trust
    if name == "DeepSpeedZeroOptimizer":  # ZeRO stage 1/2
        for i, lp_params in enumerate(wrapper.bit16_groups):
            _set_layout(trust, wrapper.single_partition_of_fp32_groups[i], _fragments_from_hp_mapping(lp_params),
                        len(lp_params), _all_reduce_hook(wrapper.real_dp_process_group[i]))
    elif name == "BF16_Optimizer":  # bf16 params, fp32 grad accumulation, ZeRO stage 1
        for i, lp_params in enumerate(wrapper.bf16_groups):
            _set_layout(trust, wrapper.fp32_groups_flat_partition[i], _fragments_from_hp_mapping(lp_params),
                        len(lp_params), _all_reduce_hook(wrapper.real_dp_process_group[i]))
    elif name == "FP16_Optimizer":  # fp16/bf16 without ZeRO: one flat fp32 copy per group, not partitioned
        for i, lp_params in enumerate(wrapper.fp16_groups):
            _set_layout(trust, wrapper.fp32_groups_flat[i], _contiguous_fragments(lp_params), len(lp_params), None)
    elif name == "DeepSpeedZeroOptimizer_Stage3":
        if getattr(wrapper, "offload_optimizer", False):
            raise NotImplementedError("ds_conadv LAMB/LARS under ZeRO stage 3 with optimizer offload is not supported "
                                      "(its sub-groups step on a backup optimizer); use it without offload_optimizer")
        from deepspeed import comm as dist

        hook = _all_reduce_hook(wrapper.dp_process_group)
        rank = dist.get_rank(group=wrapper.dp_process_group)
        for sub_group, flat in zip(wrapper.fp16_groups, wrapper.fp32_partitioned_groups_flat):
            # every param is split evenly over the ranks; this rank's piece sits at a running offset in the
            # sub-group's flat buffer, followed by padding on the last rank
            fragments, offset = [], 0
            for index, param in enumerate(sub_group):
                part = param.partition_numel()
                valid = max(0, min(part, param.ds_numel - rank * part))
                if valid:
                    fragments.append((offset, valid, index))
                offset += part
            _set_layout(trust, flat, fragments, len(sub_group), hook)
    else:
        raise NotImplementedError(f"ds_conadv cannot make trust ratios exact under DeepSpeed's {name}; supported: "
                                  "no wrapper (fp32), FP16_Optimizer, BF16_Optimizer, ZeRO stage 1, 2 and 3")
    trust._ds_attached = True
    return trust


def auto_attach(trust: TrustRatioOptimizer) -> Optional[str]:
    """Called by our optimizer's first step when a wrapper has replaced its params by flat buffers (a
    LAMB/LARS passed as ``optimizer=`` to plain ``deepspeed.initialize``): find the engine's wrapper through
    the garbage collector's referrer links and attach. Returns the wrapper's class name, or None."""
    wrappers = ("DeepSpeedZeroOptimizer", "BF16_Optimizer", "FP16_Optimizer", "FP16_UnfusedOptimizer",
                "DeepSpeedZeroOptimizer_Stage3")
    candidates = []
    for ref in gc.get_referrers(trust):
        # the wrapper holds us in ``self.optimizer``: the referrer is the wrapper or its __dict__
        candidates += [ref] + (gc.get_referrers(ref) if isinstance(ref, dict) else [])
    for obj in candidates:
        if type(obj).__name__ in wrappers and getattr(obj, "optimizer", None) is trust:
            attach(obj)
            return type(obj).__name__
    return None
