"""The one place that reads or patches DeepSpeed's private internals, with the versions it is known to work with.

Everything ds_conadv needs from DeepSpeed beyond its public API is listed here, each with what breaks without it:

* the ZeRO / fp16 / bf16 optimizer wrappers' private buffers (:func:`wrapper_kind`, :func:`flat_partitions`,
  :func:`hp_fragment`): without them trust ratios cannot be made exact (``attach`` raises, it never guesses);
* ``DeepSpeedEngine._backward_epilogue`` (:func:`hook_backward_epilogue`): the point where the backward compute is
  over and the gradient reduction begins, where the ConAdv engine starts the generation pass. DeepSpeed releases
  without it run ConAdv correctly but start the generation only after the whole ``engine.backward`` (less
  overlap): this module warns when that happens (:class:`DeepSpeedCompatWarning`), it is never silent;
* ``WarmupDecayLR._get_gamma`` (:func:`check_scheduler_hook`): ``WarmupPolyDecayLR`` raises its decay to a power;
* ``deepspeed.ops.__compatible_ops__`` (:func:`skip_shm_op_build`): keeps DeepSpeed from JIT-building an
  inference-only op at the first multi-rank start on CPU (a start-up cost only);
* the engine's and the wrappers' model-parallel unit (``mpu``) and the
  ``tensor_model_parallel`` marker on split weights (:func:`tensor_parallel_group`, :func:`pipeline_parallel_group`,
  :func:`is_tensor_parallel_param`): without them trust ratios of tensor-parallel weights are per shard and our
  own ``max_grad_norm`` under a pipeline at ZeRO 0 is per stage.
* ``DeepSpeedEngine.monitor`` (its ``MonitorMaster``) and ``global_samples`` (:func:`engine_monitor`,
  :func:`global_samples`): where ds_conadv's training metrics go when a ``"tensorboard"``, ``"csv_monitor"``,
  ``"wandb"`` or ``"comet"`` section is enabled. Without them those metrics are not written: this module warns
  when a section asks for them (:class:`DeepSpeedCompatWarning`), it is never silent. Before 0.19 the engine also
  writes its own ``Train/Samples/train_loss``; :func:`leave_out_engine_train_loss` filters it (ds_conadv writes
  one), saying so.
* before DeepSpeed 0.19.8, two repairs of its ZeRO wrappers (:func:`wait_for_coalesced_allgathers`,
  :func:`skip_nonfinite_steps_whole`): ZeRO-3's ``Init._allgather_params_coalesced`` returns on gloo (CPU) while
  some of its all-gathers still write the gathered params, and ZeRO 1-3 step an fp32 (or bf16) step with an
  inf/NaN gradient group by group, so the optimizer's check would decide per group. Without the first, ZeRO-3 runs
  on CPU are intermittently not reproducible; without the second, such a step skips some groups and applies
  others. Each warns (:class:`DeepSpeedCompatWarning`) when the part it needs is missing.

:data:`SUPPORTED` is the range declared in the package metadata (``pyproject.toml``'s ``deepspeed`` extra) and tested
in CI with its oldest and newest release (``scripts/test_deepspeed_oldest.sh``); :func:`check_version` warns,
naming what may break, outside it.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import logging
import os
import re
import warnings
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple

__all__ = [
    "SUPPORTED",
    "MIN_VERSION",
    "MAX_VERSION",
    "DeepSpeedCompatWarning",
    "check_version",
    "quiet_import",
    "skip_shm_op_build",
    "wrapper_kind",
    "WRAPPERS",
    "flat_partitions",
    "offload_device",
    "check_zero3_offload",
    "hp_fragment",
    "find_wrapper",
    "hook_backward_epilogue",
    "has_backward_epilogue",
    "check_scheduler_hook",
    "is_tensor_parallel_param",
    "tensor_parallel_group",
    "pipeline_parallel_group",
    "MONITOR_SECTIONS",
    "monitor_requested",
    "engine_monitor",
    "global_samples",
    "ENGINE_TRAIN_LOSS",
    "engine_writes_train_loss",
    "leave_out_engine_train_loss",
    "write_events",
    "REPAIRED_IN",
    "wait_for_coalesced_allgathers",
    "deepspeed_skips_nonfinite",
    "skip_nonfinite_steps_whole",
]

#: the DeepSpeed releases this module is written and tested against (``pyproject.toml`` declares the same range)
MIN_VERSION = "0.16.9"
MAX_VERSION = "0.20"  # exclusive
SUPPORTED = f">={MIN_VERSION},<{MAX_VERSION}"

#: what each private dependency gives ds_conadv, named in the version warning
PRIVATE_USES = (
    "DeepSpeedEngine._backward_epilogue (ConAdv generation starts when the gradient reduction starts)",
    "ZeRO 1/2/3, FP16_Optimizer and BF16_Optimizer flat partitions and _hp_mapping (exact LAMB/LARS trust ratios)",
    "ZeRO's offload flags cpu_offload, offload_optimizer, swap_optimizer, partial_offload (ZeRO-Offload)",
    "WarmupDecayLR._get_gamma (WarmupPolyDecayLR)",
    "deepspeed.ops.__compatible_ops__ (skip the shm op's JIT build on CPU)",
    "the engine's and wrappers' mpu and the tensor_model_parallel marker (tensor and pipeline parallelism)",
    "DeepSpeedEngine.monitor and global_samples (ds_conadv's metrics in TensorBoard / CSV / W&B)",
    "ZeRO-3's Init._allgather_params_coalesced (before 0.19.8: wait for every gather on gloo)",
    "ZeRO 1-3 check_overflow, overflow and check_grad_overflow (before 0.19.8: one inf/NaN verdict per step)",
)


class DeepSpeedCompatWarning(RuntimeWarning):
    """DeepSpeed is outside the supported range, or a private hook ds_conadv uses is missing."""


def _version_tuple(text: str) -> Tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text.split("+")[0])[:3])


_checked = False


def check_version(version: Optional[str] = None) -> bool:
    """Whether ``version`` (default: the installed DeepSpeed's) is in :data:`SUPPORTED`; warns once if not."""
    global _checked
    if version is None:
        import deepspeed

        version = str(deepspeed.__version__)
        if _checked:
            return _in_range(version)
        _checked = True
    if _in_range(version):
        return True
    warnings.warn(
        f"ds_conadv supports DeepSpeed {SUPPORTED}, this is {version}: these private parts of DeepSpeed "
        f"may have changed: {'; '.join(PRIVATE_USES)}",
        DeepSpeedCompatWarning,
        stacklevel=2,
    )
    return False


def _in_range(version: str) -> bool:
    v = _version_tuple(version)
    return _version_tuple(MIN_VERSION) <= v < _version_tuple(MAX_VERSION)


@contextlib.contextmanager
def log_level(level: int) -> Iterator[None]:
    """DeepSpeed's logger at ``level`` inside the block (e.g. ``logging.ERROR`` around ``initialize``: its
    "untested optimizer" and "lr before the scheduler started" lines would break up a progress bar)."""
    from deepspeed.utils import logger

    before = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(before)


def skip_shm_op_build() -> None:
    """Mark DeepSpeed's inference-only ``deepspeed_shm_comm`` op incompatible, so that the first multi-rank start
    on CPU does not JIT-build it (training never uses it)."""
    import deepspeed.ops

    ops = getattr(deepspeed.ops, "__compatible_ops__", None)
    if isinstance(ops, dict):
        ops["deepspeed_shm_comm"] = False
    else:
        warnings.warn(
            "deepspeed.ops.__compatible_ops__ is missing: DeepSpeed may JIT-build its shm op at the first "
            "multi-rank start on CPU (start-up time only)",
            DeepSpeedCompatWarning,
            stacklevel=2,
        )


def quiet_import() -> Any:
    """Import DeepSpeed for a training run: CPU accelerator without a GPU (else DeepSpeed prints its detection
    warning on stdout), no JIT build of its shm op, the version checked. Returns the module."""
    if "DS_ACCELERATOR" not in os.environ:
        import torch

        if not torch.cuda.is_available():
            os.environ["DS_ACCELERATOR"] = "cpu"
    import deepspeed

    check_version()
    skip_shm_op_build()
    return deepspeed


# ----------------------------------------------------------------------------------------------------------
# config: DeepSpeed's own checks before any rank starts, in one line
# ----------------------------------------------------------------------------------------------------------
class _KeyLog(set):
    """Shared by every copy of a :class:`_ReadTracking` dict (DeepSpeed copies its config)."""

    def __deepcopy__(self, memo: Any) -> "_KeyLog":
        return self

    def __copy__(self) -> "_KeyLog":
        return self


class _KeysView:
    def __init__(self, owner: "_ReadTracking") -> None:
        self.owner = owner

    def __contains__(self, key: Any) -> bool:
        self.owner.read.add(key)
        return dict.__contains__(self.owner, key)

    def __iter__(self) -> Iterator[Any]:
        return iter(dict.keys(self.owner))

    def __len__(self) -> int:
        return len(self.owner)


class _ReadTracking(dict):
    """A config dict that notes every top-level key DeepSpeed asks for (present or not)."""

    read: _KeyLog

    def __getitem__(self, key: Any) -> Any:
        self.read.add(key)
        return super().__getitem__(key)

    def get(self, key: Any, default: Any = None) -> Any:
        self.read.add(key)
        return super().get(key, default)

    def __contains__(self, key: Any) -> bool:
        self.read.add(key)
        return super().__contains__(key)

    def keys(self) -> Any:
        return _KeysView(self)


#: batch keys as DeepSpeedConfig sees them during validation: the relation of the real ones to the world size is
#: checked by the caller, which knows how many ranks will start (DeepSpeedConfig assumes 1 without a process group)
_NEUTRAL_BATCH = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1}
_BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


def _one_line(exc: BaseException, cfg: Dict[str, Any]) -> str:
    errors = getattr(exc, "errors", None)
    if callable(errors):  # a pydantic ValidationError of one of DeepSpeed's sections
        try:
            parts = []
            for e in errors():
                loc = [str(x) for x in e.get("loc", ())]
                section = next((k for k, v in cfg.items() if isinstance(v, dict) and loc and loc[0] in v), None)
                key = ".".join(([section] if section else []) + loc) or "<section>"
                if e.get("type") == "extra_forbidden":
                    parts.append(f'unknown key "{key}"')
                else:
                    parts.append(f'"{key}" = {e.get("input")!r}: {e.get("msg")}')
            if parts:
                return "; ".join(parts)
        except Exception:  # pragma: no cover - fall back to the text
            pass
    text = " ".join(str(exc).split())
    return text[:400] + ("..." if len(text) > 400 else "")


def deepspeed_config_keys() -> frozenset:
    """The top-level keys the installed DeepSpeed reads from a config (asked of DeepSpeedConfig itself, so the
    answer follows the installed release)."""
    global _DS_KEYS
    if _DS_KEYS is None:
        from deepspeed.runtime.config import DeepSpeedConfig

        probe = _ReadTracking(_NEUTRAL_BATCH, train_batch_size=None)
        probe.read = _KeyLog()
        with log_level(logging.ERROR):
            DeepSpeedConfig(probe)
        _DS_KEYS = frozenset(k for k in probe.read if isinstance(k, str)) | _READ_OUTSIDE_CONFIG
    return _DS_KEYS


_DS_KEYS: Optional[frozenset] = None
#: top-level sections DeepSpeed reads outside DeepSpeedConfig (its engine, launcher and autotuner)
_READ_OUTSIDE_CONFIG = frozenset({"optimizer", "scheduler", "autotuning", "zero_allow_untested_optimizer"})


def check_config(cfg: Dict[str, Any], ours: Iterable[str] = ()) -> None:
    """DeepSpeed's checks of ``cfg`` (our sections ``ours`` already removed by the caller or listed here), before
    any rank starts, every failure as one :class:`~ds_conadv.config.ConfigError` line:

    * a top-level key neither DeepSpeed nor ds_conadv reads (DeepSpeed would ignore it silently), with the
      closest known key;
    * DeepSpeed's own pydantic sections (``zero_optimization``, ``bf16``, ...): unknown keys, types, ranges;
    * ``gradient_clipping``: a finite number >= 0 (DeepSpeed takes any number).
    """
    import difflib

    from deepspeed.runtime.config import DeepSpeedConfig

    from ds_conadv.config.sections import ConfigError

    ours = set(ours)
    known = deepspeed_config_keys() | ours
    for key in cfg:
        if key not in known:
            close = difflib.get_close_matches(str(key), sorted(known), n=1, cutoff=0.6)
            hint = f'; did you mean "{close[0]}"?' if close else ""
            raise ConfigError(
                f'unknown top-level key "{key}": neither DeepSpeed {_installed_version()} nor ds_conadv reads it{hint}'
            )
    clip = cfg.get("gradient_clipping")
    if clip is not None and (
        isinstance(clip, bool) or not isinstance(clip, (int, float)) or not clip >= 0 or clip == float("inf")
    ):
        raise ConfigError(f'"gradient_clipping" = {clip!r}: must be a finite number >= 0 (0: no clipping)')
    ds_cfg = {k: copy.deepcopy(v) for k, v in cfg.items() if k not in ours and k not in _BATCH_KEYS}
    ds_cfg.update(_NEUTRAL_BATCH)  # consistent for any world size (DeepSpeed derives train_batch_size)
    try:
        with log_level(logging.ERROR):
            DeepSpeedConfig(ds_cfg)
    except Exception as e:  # pydantic ValidationError, assertions, ValueError, ...
        raise ConfigError(f"DeepSpeed rejects the config: {_one_line(e, ds_cfg)}") from None


# ----------------------------------------------------------------------------------------------------------
# optimizer wrappers (ZeRO, fp16, bf16): what zero_layout needs, and nothing else
# ----------------------------------------------------------------------------------------------------------
#: wrapper class name -> kind; DeepSpeed's wrappers are recognised by name (importing each class would import
#: optional parts of DeepSpeed, and their module paths moved between releases)
WRAPPERS = {
    "DeepSpeedZeroOptimizer": "zero12",
    "BF16_Optimizer": "bf16",
    "FP16_Optimizer": "fp16",
    "FP16_UnfusedOptimizer": "fp16_unfused",
    "DeepSpeedZeroOptimizer_Stage3": "zero3",
}


def wrapper_kind(wrapper: Any) -> Optional[str]:
    """The kind of DeepSpeed optimizer wrapper (``"zero12"``, ``"bf16"``, ``"fp16"``, ``"fp16_unfused"``,
    ``"zero3"``), or None for anything else."""
    return WRAPPERS.get(type(wrapper).__name__)


def _require(obj: Any, name: str) -> Any:
    try:
        return getattr(obj, name)
    except AttributeError:
        raise NotImplementedError(
            f"DeepSpeed's {type(obj).__name__} has no {name!r} (DeepSpeed outside "
            f"{SUPPORTED}?): ds_conadv cannot make LAMB/LARS trust ratios exact"
        ) from None


#: per wrapper kind: (flat fp32 partitions, low-precision params per group, data-parallel groups or "" for none)
_FLAT_PARTITIONS = {
    "zero12": ("single_partition_of_fp32_groups", "bit16_groups", "real_dp_process_group"),
    "bf16": ("fp32_groups_flat_partition", "bf16_groups", "real_dp_process_group"),
    "fp16": ("fp32_groups_flat", "fp16_groups", ""),
}


def flat_partitions(wrapper: Any) -> List[Tuple[Any, List[Any], Any]]:
    """Per param group of a stage-1/2, bf16 or fp16 wrapper: ``(flat fp32 tensor the optimizer steps on, the
    group's low-precision params in flat order, data-parallel process group or None when not partitioned)``."""
    kind = wrapper_kind(wrapper)
    names = _FLAT_PARTITIONS.get(kind or "")
    if names is not None:
        flats, params = _require(wrapper, names[0]), _require(wrapper, names[1])
        if not names[2]:  # fp16/bf16 without ZeRO: nothing is partitioned
            return [(flat, lp, None) for flat, lp in zip(flats, params)]
        return list(zip(flats, params, _require(wrapper, names[2])))
    raise ValueError(f"flat_partitions: not a stage-1/2, bf16 or fp16 wrapper: {type(wrapper).__name__}")


def offload_device(wrapper: Any) -> Optional[str]:
    """``"cpu"`` or ``"nvme"`` when a ZeRO wrapper keeps the fp32 partition and optimizer state off the
    accelerator (``"offload_optimizer"``), else None."""
    kind = wrapper_kind(wrapper)
    if kind == "zero12":
        return "cpu" if getattr(wrapper, "cpu_offload", False) else None
    if kind == "zero3" and getattr(wrapper, "offload_optimizer", False):
        return "nvme" if getattr(wrapper, "swap_optimizer", False) else "cpu"
    return None


def check_zero3_offload(wrapper: Any) -> None:
    """ZeRO 3 with ``"offload_optimizer"`` steps every sub-group on our optimizer when the whole partition is
    offloaded to CPU memory; the other two layouts are refused, with the reason."""
    if offload_device(wrapper) == "nvme":
        raise NotImplementedError(
            'ds_conadv LAMB/LARS under ZeRO stage 3 with "offload_optimizer": {"device": "nvme"} is not supported: '
            "DeepSpeed swaps each sub-group's fp32 partition and optimizer state in and out of NVMe buffers around "
            'its step, and the step\'s cached segment views would not follow them; use "device": "cpu"'
        )
    ratio = getattr(wrapper, "partial_offload", None)
    ratio = 1.0 if ratio is None else float(ratio)
    if ratio != 1.0:
        raise NotImplementedError(
            f'ds_conadv LAMB/LARS under ZeRO stage 3 with "offload_optimizer.ratio" = {ratio} is not supported: '
            "DeepSpeed steps the sub-groups it keeps on the accelerator with its own AdamW backup optimizer, not "
            "with ours; use ratio 1.0 (the whole partition on CPU, stepped by the fused C++ kernels)"
        )


def zero3_partitions(wrapper: Any) -> Tuple[List[Tuple[Any, List[Tuple[int, int]]]], Any]:
    """ZeRO 3: (per sub-group ``(flat fp32 partition, [(partition_numel, ds_numel) per param])``, process group).

    DeepSpeed cuts sub-groups at parameter boundaries, so every parameter's pieces sit in one sub-group and a
    sub-group's step (with offload: one call of our optimizer per sub-group) sees whole-tensor norms after the
    all-reduce."""
    check_zero3_offload(wrapper)
    groups = []
    for sub_group, flat in zip(_require(wrapper, "fp16_groups"), _require(wrapper, "fp32_partitioned_groups_flat")):
        groups.append((flat, [(int(p.partition_numel()), int(p.ds_numel)) for p in sub_group]))
    return groups, _require(wrapper, "dp_process_group")


def hp_fragment(lp_param: Any) -> Optional[Tuple[int, int]]:
    """``(start, numel)`` of a low-precision param's fragment in this rank's flat fp32 partition (DeepSpeed's
    ``_hp_mapping``), or None when this rank holds none of it."""
    mapping = getattr(lp_param, "_hp_mapping", None)
    if mapping is None:
        return None
    address = mapping.get_hp_fragment_address()
    return int(address.start), int(address.numel)


def find_wrapper(optimizer: Any) -> Optional[Any]:
    """The DeepSpeed wrapper that holds ``optimizer`` as its ``.optimizer`` (for an optimizer passed to plain
    ``deepspeed.initialize``, whose engine we are not given), found through the garbage collector's referrers."""
    candidates: List[Any] = []
    for ref in gc.get_referrers(optimizer):
        # the wrapper holds the optimizer in ``self.optimizer``: the referrer is the wrapper or its __dict__
        candidates += [ref] + (gc.get_referrers(ref) if isinstance(ref, dict) else [])
    for obj in candidates:
        if wrapper_kind(obj) is not None and getattr(obj, "optimizer", None) is optimizer:
            return obj
    return None


# ----------------------------------------------------------------------------------------------------------
# the engine's backward epilogue (ConAdv overlap)
# ----------------------------------------------------------------------------------------------------------
EPILOGUE = "_backward_epilogue"


def has_backward_epilogue(engine: Any) -> bool:
    return callable(getattr(engine, EPILOGUE, None))


def hook_backward_epilogue(
    engine: Any, before: Callable[[], None], after: Optional[Callable[[float], None]] = None
) -> bool:
    """Wrap ``engine._backward_epilogue`` (per instance): ``before()`` runs when the backward compute is over and
    DeepSpeed's gradient reduction starts, ``after(seconds)`` with the epilogue's wall time. Idempotent.

    Returns False, with a :class:`DeepSpeedCompatWarning` that says what is lost, when this DeepSpeed has no such
    method: the caller must then treat the end of ``engine.backward`` as the start of the reduction."""
    import time

    original = getattr(engine, EPILOGUE, None)
    if original is None or not callable(original):
        version = _installed_version()
        warnings.warn(
            f"DeepSpeed {version} has no DeepSpeedEngine.{EPILOGUE} (ds_conadv supports {SUPPORTED}): the "
            "ConAdv generation pass cannot start when the gradient reduction starts and waits for the whole "
            "engine.backward instead (correct results, less overlap)",
            DeepSpeedCompatWarning,
            stacklevel=2,
        )
        return False
    if getattr(original, "_ds_conadv_signal", False):
        return True

    def epilogue(*args: Any, **kwargs: Any) -> Any:
        before()
        t = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            if after is not None:
                after(time.perf_counter() - t)

    epilogue._ds_conadv_signal = True  # type: ignore[attr-defined]
    setattr(engine, EPILOGUE, epilogue)
    return True


def _installed_version() -> str:
    try:
        import deepspeed

        return str(deepspeed.__version__)
    except Exception:  # pragma: no cover - DeepSpeed is imported by then
        return "?"


# ----------------------------------------------------------------------------------------------------------
# schedulers
# ----------------------------------------------------------------------------------------------------------
def check_scheduler_hook(base: type) -> None:
    """``WarmupPolyDecayLR`` overrides DeepSpeed's private ``WarmupDecayLR._get_gamma``: raise if it is gone
    (the power would silently not apply)."""
    if not callable(getattr(base, "_get_gamma", None)):
        raise ImportError(
            f"DeepSpeed {_installed_version()}'s {base.__name__} has no _get_gamma (ds_conadv supports "
            f"DeepSpeed {SUPPORTED}): WarmupPolyDecayLR cannot apply its power"
        )


# ----------------------------------------------------------------------------------------------------------
# tensor and pipeline parallelism: the engine's model-parallel unit and the params' tensor-parallel marker
# ----------------------------------------------------------------------------------------------------------
#: the attributes DeepSpeed's AutoTP layers (``module_inject/layers.py``) and Megatron-LM set on split weights
TENSOR_PARALLEL_MARKERS = ("tensor_model_parallel", "model_parallel")


def is_tensor_parallel_param(param: Any) -> bool:
    """Whether ``param`` is one rank's shard of a weight split over the tensor-parallel group (AutoTP's and
    Megatron's marker); replicated params (a row-parallel layer's bias, LayerNorm) are not marked."""
    return any(bool(getattr(param, name, False)) for name in TENSOR_PARALLEL_MARKERS)


def _mpu_group(mpu: Any, getters: Tuple[str, ...], size_getters: Tuple[str, ...]) -> Any:
    import torch.distributed as dist

    for name, size_name in zip(getters, size_getters):
        get = getattr(mpu, name, None)
        if callable(get):
            group = get()
            size = getattr(mpu, size_name, None)
            world = size() if callable(size) else dist.get_world_size(group=group)
            return group if world > 1 else None
    return None


def tensor_parallel_group(owner: Any) -> Any:
    """The tensor-parallel process group of a DeepSpeed engine or optimizer wrapper (from its model-parallel unit
    ``mpu``: AutoTP's ``deepspeed.utils.groups``, a Megatron ``mpu`` passed to ``initialize``, a pipeline grid's
    slice group), or None without tensor parallelism."""
    mpu = getattr(owner, "mpu", None)
    if mpu is None:
        return None
    return _mpu_group(
        mpu,
        ("get_tensor_model_parallel_group", "get_slice_parallel_group"),
        ("get_tensor_model_parallel_world_size", "get_slice_parallel_world_size"),
    )


def pipeline_parallel_group(owner: Any) -> Any:
    """The pipeline-parallel process group (the ranks that hold the other stages of the model) of a DeepSpeed
    engine or optimizer wrapper (a ``PipelineEngine``'s grid, a Megatron ``mpu``), or None with one stage."""
    mpu = getattr(owner, "mpu", None)
    if mpu is None:
        return None
    return _mpu_group(
        mpu,
        ("get_pipe_parallel_group", "get_pipeline_model_parallel_group"),
        ("get_pipe_parallel_world_size", "get_pipeline_model_parallel_world_size"),
    )


def wrapper_model_params(wrapper: Any) -> List[List[Any]]:
    """The model's params per group (ZeRO 3: per sub-group, in the order of :func:`zero3_partitions`) of a ZeRO-3
    or unfused fp16/bf16 wrapper."""
    return [list(sub_group) for sub_group in _require(wrapper, "fp16_groups")]


def default_gradient_clipping() -> float:
    """DeepSpeed's ``"gradient_clipping"`` when a config has none (1.0 in 0.16.9 to 0.19.8)."""
    from deepspeed.runtime import constants

    return float(constants.GRADIENT_CLIPPING_DEFAULT)


# the engine's monitor (TensorBoard, CSV, W&B, Comet): where ds_conadv's training metrics go
# ----------------------------------------------------------------------------------------------------------
#: DeepSpeed's config sections that enable its ``MonitorMaster``
MONITOR_SECTIONS = ("tensorboard", "csv_monitor", "wandb", "comet")


def monitor_requested(config: Any) -> bool:
    """Whether a DeepSpeed config dict enables one of :data:`MONITOR_SECTIONS`."""
    if not isinstance(config, dict):
        return False
    return any(isinstance(config.get(name), dict) and bool(config[name].get("enabled")) for name in MONITOR_SECTIONS)


def engine_monitor(engine: Any) -> Optional[Any]:
    """The engine's ``MonitorMaster`` when a monitor section is enabled and this is the rank that writes (rank 0,
    as DeepSpeed's own events); None otherwise. When this DeepSpeed's engine has no ``monitor`` with
    ``write_events`` or no ``global_samples`` (the x-axis) but its config enables a section, it warns
    (:class:`DeepSpeedCompatWarning`) that ds_conadv's metrics are not written, and returns None."""
    monitor = getattr(engine, "monitor", None)
    if monitor is None or not callable(getattr(monitor, "write_events", None)) or not hasattr(engine, "global_samples"):
        if monitor_requested(getattr(engine, "config", None)):
            warnings.warn(
                f"DeepSpeed {_installed_version()}'s engine has no monitor.write_events or global_samples "
                f"(ds_conadv supports {SUPPORTED}): ds_conadv's training metrics (loss, accuracies, ConAdv, ABSA, "
                "trust ratios) are not written to the enabled TensorBoard / CSV / W&B sections",
                DeepSpeedCompatWarning,
                stacklevel=2,
            )
        return None
    if not getattr(monitor, "enabled", False) or int(getattr(engine, "global_rank", 0) or 0) != 0:
        return None
    return monitor


def global_samples(engine: Any) -> int:
    """The samples trained so far, all ranks together: the x-axis of DeepSpeed's ``Train/Samples/...`` events."""
    return int(engine.global_samples)


#: the event DeepSpeed's engine writes itself before 0.19 (``_backward_prologue``: rank 0, at every accumulation
#: boundary, at the samples trained *before* the step); 0.19.0 to 0.19.8 write no loss (checked in their sources)
ENGINE_TRAIN_LOSS = "Train/Samples/train_loss"
ENGINE_TRAIN_LOSS_UNTIL = "0.19.0"


def engine_writes_train_loss() -> bool:
    """Whether the installed DeepSpeed's engine writes its own :data:`ENGINE_TRAIN_LOSS` (before 0.19)."""
    return _version_tuple(_installed_version()) < _version_tuple(ENGINE_TRAIN_LOSS_UNTIL)


def leave_out_engine_train_loss(monitor: Any) -> bool:
    """ds_conadv writes ``train_loss`` after every optimizer step: where the engine writes its own under the same
    tag (:func:`engine_writes_train_loss`), the engine's events are left out (the monitor's ``write_events``
    filtered per instance, idempotent; ds_conadv's own go through :func:`write_events`), so that a tag holds one
    series on every supported release. Says so once, on the rank that writes. Returns whether filtered."""
    if not engine_writes_train_loss():
        return False
    original = monitor.write_events
    if getattr(original, "_ds_conadv_unfiltered", None) is not None:
        return True

    def write_without_engine_loss(events: Any, *args: Any, **kwargs: Any) -> Any:
        kept = [e for e in events if not (isinstance(e, (tuple, list)) and e and e[0] == ENGINE_TRAIN_LOSS)]
        return original(kept, *args, **kwargs)

    write_without_engine_loss._ds_conadv_unfiltered = original  # type: ignore[attr-defined]
    monitor.write_events = write_without_engine_loss
    from deepspeed.utils import logger

    logger.warning(
        f"ds_conadv: DeepSpeed {_installed_version()}'s engine writes its own {ENGINE_TRAIN_LOSS} in backward (at "
        "the samples before the step); ds_conadv writes train_loss after each optimizer step, and the engine's is "
        "left out (one series per tag)"
    )
    return True


def write_events(monitor: Any, events: List[Tuple[str, float, int]]) -> None:
    """Write ds_conadv's events through the engine's ``MonitorMaster`` (past :func:`leave_out_engine_train_loss`)."""
    write = monitor.write_events
    getattr(write, "_ds_conadv_unfiltered", write)(events)


# ----------------------------------------------------------------------------------------------------------
# ZeRO: two repairs for DeepSpeed releases before 0.19.8
# ----------------------------------------------------------------------------------------------------------
#: the first DeepSpeed release whose ZeRO-3 waits for every all-gather of a coalesced param gather, and whose
#: ZeRO 1-3 skip an fp32 step with an inf/NaN gradient themselves (checked in the 0.16.9 to 0.19.8 sources)
REPAIRED_IN = "0.19.8"
_COALESCED_GATHER = "_allgather_params_coalesced"


def _before_repair() -> bool:
    return _version_tuple(_installed_version()) < _version_tuple(REPAIRED_IN)


def wait_for_coalesced_allgathers() -> bool:
    """DeepSpeed < 0.19.8: make ZeRO-3's blocking gather of several params wait until every one has arrived.

    ``Init._allgather_params_coalesced`` (e.g. the persistent params after every optimizer step and after a
    checkpoint load) starts one async all-gather per param and waits only for the last. NCCL finishes the
    operations of one stream in order; gloo (CPU) runs them on a pool of threads, so the call can return while
    earlier gathers still write their params, and the next forward reads them half-written: results that change
    from run to run. Patched once per process (class level): after the call, a barrier on every gloo group it
    gathered over, which gloo completes only after all earlier operations on that group. Returns whether the
    patch is in place (False where it is not needed, or with a :class:`DeepSpeedCompatWarning` where the method
    is missing)."""
    if not _before_repair():
        return False
    try:
        from deepspeed.runtime.zero.partition_parameters import Init
    except ImportError:  # pragma: no cover - every supported release has it
        Init = None
    original = getattr(Init, _COALESCED_GATHER, None)
    if original is None or not callable(original):
        warnings.warn(
            f"DeepSpeed {_installed_version()} has no ZeRO-3 Init.{_COALESCED_GATHER} (ds_conadv supports "
            f"{SUPPORTED}): ds_conadv cannot make its param gathers wait on gloo; ZeRO-3 runs on CPU may read "
            "params before their all-gather finished",
            DeepSpeedCompatWarning,
            stacklevel=2,
        )
        return False
    if getattr(original, "_ds_conadv_waits", False):
        return True

    def gather(self: Any, param_list: Any, *args: Any, **kwargs: Any) -> Any:
        result = original(self, param_list, *args, **kwargs)
        for group in _gloo_groups(self, param_list):
            import torch.distributed as torch_dist

            torch_dist.barrier(group=group)
        return result

    gather._ds_conadv_waits = True  # type: ignore[attr-defined]
    gather.__wrapped__ = original  # type: ignore[attr-defined]
    setattr(Init, _COALESCED_GATHER, gather)
    return True


def _gloo_groups(init: Any, params: Any) -> List[Any]:
    """The distinct gloo process groups that ZeRO-3 gathers ``params`` over (the order of ``params``, the same
    on every rank: the gather is collective)."""
    import torch.distributed as torch_dist

    groups: List[Any] = []
    for p in params or ():
        get = getattr(init, "get_partition_dp_group", None)
        group = get(p) if callable(get) else getattr(p, "ds_process_group", None)
        if not any(group is g for g in groups):
            groups.append(group)
    return [g for g in groups if str(torch_dist.get_backend(g)) == "gloo"]


def deepspeed_skips_nonfinite(wrapper: Any) -> bool:
    """Whether a ZeRO 1/2 (``"zero12"``) or ZeRO-3 wrapper skips a step with an inf/NaN gradient itself, on every
    rank, before it steps the optimizer: fp16 in every release (its loss-scale check); bf16 with
    ``"bf16": {"check_grad_overflow": true}`` at ZeRO 1/2 (0.18 on); from 0.19.8 every ZeRO-3 step and the
    fp32 ZeRO 1/2 steps (a non-finite global gradient norm)."""
    import torch

    kind = wrapper_kind(wrapper)
    dtype = getattr(wrapper, "dtype", None)
    if dtype == torch.float16:
        return True
    if kind == "zero12" and bool(getattr(wrapper, "check_grad_overflow", False)):
        return True
    if not _before_repair():
        if kind == "zero3":
            return True
        if kind == "zero12":
            return dtype != torch.bfloat16 and bool(getattr(wrapper, "compute_grad_norm", True))
    return False


def skip_nonfinite_steps_whole(wrapper: Any, enabled: Callable[[], bool]) -> bool:
    """One inf/NaN verdict per DeepSpeed step, taken before the optimizer's first call.

    ZeRO 1/2 step the optimizer once per param group and ZeRO 3 once per sub-group, so the optimizer's own
    check (``skip_nonfinite``) decides per call: a NaN in one group would skip that group and apply the others.
    Where DeepSpeed does not skip such a step itself (:func:`deepspeed_skips_nonfinite`), this wraps the
    wrapper's ``step`` (per instance, idempotent) so that, while ``enabled()``, DeepSpeed's own overflow check runs
    first: the one of its fp16 path (``check_overflow``: this rank's gradient partition, one all-reduce; or, where
    the wrapper has it, its ``check_grad_overflow`` switch). A non-finite step is then skipped whole on every rank
    and counted in the engine's ``skipped_steps``, as DeepSpeed 0.19.8 does. Returns whether the wrapper now
    decides once per step (True where DeepSpeed already does); False, with a :class:`DeepSpeedCompatWarning`,
    where the parts it needs are missing."""
    kind = wrapper_kind(wrapper)
    if kind not in ("zero12", "zero3"):
        raise ValueError(f"skip_nonfinite_steps_whole: not a ZeRO wrapper: {type(wrapper).__name__}")
    step = getattr(wrapper, "step", None)
    if getattr(step, "_ds_conadv_whole_step", False) or deepspeed_skips_nonfinite(wrapper):
        return True
    switch = kind == "zero12" and hasattr(wrapper, "check_grad_overflow")  # 0.18 on: DeepSpeed's own switch
    if not callable(step) or not (
        switch or (callable(getattr(wrapper, "check_overflow", None)) and hasattr(wrapper, "overflow"))
    ):
        warnings.warn(
            f"DeepSpeed {_installed_version()}'s {type(wrapper).__name__} has no check_overflow / overflow "
            f"(ds_conadv supports {SUPPORTED}): a step with an inf/NaN gradient is checked per param group by "
            "the optimizer and may be applied to the other groups",
            DeepSpeedCompatWarning,
            stacklevel=2,
        )
        return False
    configured = bool(getattr(wrapper, "check_grad_overflow", False))

    def whole_step(*args: Any, **kwargs: Any) -> Any:
        on = enabled()
        if switch:
            wrapper.check_grad_overflow = configured or on
            if not wrapper.check_grad_overflow:
                wrapper.overflow = False
        elif on:
            wrapper.check_overflow()  # sets wrapper.overflow, which the non-fp16 step then reads
        else:
            wrapper.overflow = False  # a verdict of an earlier step (or a checkpoint) must not skip this one
        return step(*args, **kwargs)

    whole_step._ds_conadv_whole_step = True  # type: ignore[attr-defined]
    wrapper.step = whole_step
    return True
