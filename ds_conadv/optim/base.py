"""What LAMB and LARS share: state, master weights, global clipping, GradScaler, segments, dispatch."""
from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import repeat
from operator import is_not
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch
from torch import Tensor
from torch.optim import Optimizer

from ds_conadv._registry import wrapper_resolvers

from . import functional as F
from . import sharding as _sharding
from ._step_plan import collect as _collect_planned
from ._step_plan import cut_fragments as _cut_fragments
from ._step_plan import layout_segments as _layout_segments
from .backends import check_backend_name, get_kernels

_LOW_PRECISION = (torch.float16, torch.bfloat16)
_SUPPORTED_DTYPES = (torch.float32, torch.float64) + _LOW_PRECISION


@dataclass
class SegmentLayout:
    """How one param group's (flat) params are cut into norm segments, e.g. by DeepSpeed ZeRO.

    ``fragments[k] = [(offset, numel, norm_id), ...]`` for the k-th param of the group: that param is viewed
    as a flat tensor and each fragment is one segment. ``norm_hook`` (e.g. an all-reduce over data-parallel
    ranks) receives the ``[num_ids, 2]`` partial sums of squares in place before the trust ratios are taken.
    ``shard_groups`` (tensor parallelism, :mod:`ds_conadv.optim.sharding`): per norm id, the shard marker of the
    original param (:func:`~ds_conadv.optim.sharding.groups_of`) or None for a replicated one.
    """

    fragments: List[List[tuple]]
    num_ids: int
    norm_hook: Optional[Callable[[Tensor], None]] = None
    shard_groups: Optional[List[Any]] = None
    _ids_cache: Optional[tuple] = None

    def device_ids(self, ids: List[int], device: torch.device) -> Tensor:
        """The segment -> id table on ``device``, uploaded once (a fresh upload every step would be a copy)."""
        key = (tuple(ids), str(device))
        if self._ids_cache is None or self._ids_cache[0] != key:
            table = torch.tensor(ids, dtype=torch.int64)
            if device.type == "cuda":
                table = table.pin_memory()
            self._ids_cache = (key, table.to(device, non_blocking=True))
        return self._ids_cache[1]


def _is_dense(t: Tensor) -> bool:
    """Whether ``t`` covers its storage span exactly once (contiguous, channels_last, any permuted layout)."""
    expected = 1
    for stride, size in sorted((st, sz) for sz, st in zip(t.shape, t.stride()) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _flat(t: Tensor) -> Tensor:
    """A 1-D view of a dense tensor in *memory* order: elementwise updates and norms do not care about the order,
    so tensors that share one layout (a param, its gradient, state and master) can go to the kernels this way."""
    return t.as_strided((t.numel(),), (1,), t.storage_offset())


def _check_float(name: str, value, low=None, high=None, low_open=False):
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name}={value!r} must be a number")
    if not math.isfinite(value):
        raise ValueError(f"{name}={value!r} must be a finite number")
    if low is not None and (value < low or (low_open and value == low)):
        raise ValueError(f"{name}={value!r} must be {'>' if low_open else '>='} {low}")
    if high is not None and value >= high:
        raise ValueError(f"{name}={value!r} must be < {high}")


def _check_bool(name: str, value):
    if not isinstance(value, bool):
        raise TypeError(f"{name}={value!r} must be True or False")


class TrustRatioOptimizer(Optimizer):
    """Base of :class:`LAMB` and :class:`LARS`; not used directly.

    Every setting is stored in the param groups (not on the instance), so that wrappers that re-run
    ``__init__`` with only ``param_groups`` (``hvd.DistributedOptimizer``) keep them all.
    """

    # GradScaler hands us ``grad_scale``/``found_inf`` as attributes and lets the step unscale and skip.
    _step_supports_amp_scaling = True
    _state_names: Sequence[str] = ()

    def __init__(self, params, defaults: dict):
        defaults["backend"] = check_backend_name(defaults["backend"])
        if defaults["max_grad_norm"] is not None:
            _check_float("max_grad_norm", defaults["max_grad_norm"], low=0.0, low_open=True)
        _check_bool("master_weights", defaults["master_weights"])
        _check_bool("skip_nonfinite", defaults.setdefault("skip_nonfinite", True))
        super().__init__(params, defaults)
        self._skipped_steps: Optional[Tensor] = None
        self._reset_runtime_state()
        for group in self.param_groups:
            self._validate_group(group)

    def _reset_runtime_state(self) -> None:
        """What lives on the instance besides torch's state and groups: nothing a copy or a pickle can carry
        (layouts and the attachment belong to the wrapper the original was attached to)."""
        self.trust_ratios: List[Optional[Tensor]] = []
        #: opt-in (e.g. by a metrics writer): each step also keeps min / sum / max of the trust ratios it applied
        self.collect_trust_ratio_stats = False
        self._trust_ratio_stats: Optional[List] = None  # [device tensor (min, sum, max), count]
        self._layouts: Dict[int, tuple] = {}  # id(first param) -> (param, layout)
        self._own_params = {id(p) for g in self.param_groups for p in g["params"]}
        self._ds_attached = False
        self._global_norm_hook: Optional[Callable[[Tensor], None]] = None

    # -- copy / pickle -------------------------------------------------------------------------------------
    def __getstate__(self):
        state = super().__getstate__()
        state["_skipped_steps"] = self._skipped_steps
        return state

    def __setstate__(self, state):
        # two callers: unpickling / copy.deepcopy (a fresh object: its runtime state starts empty) and torch's
        # load_state_dict (this object: its segment layouts and attachment to a wrapper must survive)
        fresh = "_layouts" not in self.__dict__
        state = dict(state)
        skipped = state.pop("_skipped_steps", None)
        super().__setstate__(state)
        if fresh:
            self._skipped_steps = skipped
            self._reset_runtime_state()
        for group in self.param_groups:
            group.setdefault("skip_nonfinite", True)

    # -- validation ----------------------------------------------------------------------------------------
    def _validate_group(self, group: dict) -> None:
        group["backend"] = check_backend_name(group["backend"])
        _check_bool("skip_nonfinite", group.setdefault("skip_nonfinite", True))  # absent in older checkpoints
        devices = {p.device for p in group["params"]}
        if len(devices) > 1:
            raise ValueError(f"a param group mixes devices {sorted(map(str, devices))}; use one group per device")
        for p in group["params"]:
            if p.is_complex() or p.dtype not in _SUPPORTED_DTYPES:
                raise TypeError(f"{type(self).__name__} supports float params ({', '.join(map(str, _SUPPORTED_DTYPES))}),"
                                f" got {p.dtype}")
        self._validate_hyperparameters(group)

    def _validate_hyperparameters(self, group: dict) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        if hasattr(self, "_layouts"):  # during __init__ the groups are validated once at the end
            self._validate_group(self.param_groups[-1])
            self._own_params.update(id(p) for p in self.param_groups[-1]["params"])

    # -- public extras -------------------------------------------------------------------------------------
    @property
    def skipped_steps(self) -> Tensor:
        """Steps skipped because of inf/NaN gradients (GradScaler or the clipping pass), as a device tensor."""
        if self._skipped_steps is None:
            device = self.param_groups[0]["params"][0].device if self.param_groups[0]["params"] else "cpu"
            self._skipped_steps = torch.zeros((), dtype=torch.int64, device=device)
        return self._skipped_steps

    def take_trust_ratio_stats(self) -> Optional[Tensor]:
        """``(min, mean, max)`` of the trust ratios applied since the last call, over the tensors of the groups the
        trust ratio applies to (``weight_decay != 0`` or ``always_adapt``), as one fp32 device tensor (no host
        sync), then forgets them. NaN for a skipped step (no ratio was applied); ``None`` when nothing was
        recorded. Recorded only while :attr:`collect_trust_ratio_stats` is True; a wrapper that steps one group
        at a time (ZeRO 3) contributes every group of its step."""
        stats, self._trust_ratio_stats = self._trust_ratio_stats, None
        if stats is None:
            return None
        acc, count = stats
        return torch.stack([acc[0], acc[1] / count, acc[2]])

    def _record_trust_ratio_stats(self, group: dict, ratio: Tensor, skip: Optional[Tensor]) -> None:
        if not (group["weight_decay"] != 0 or group.get("always_adapt", False)) or ratio.numel() == 0:
            return
        r = ratio.detach().float()
        part = torch.stack([r.min(), r.sum(), r.max()])
        if skip is not None:
            part = torch.where(skip, torch.full_like(part, float("nan")), part)
        if self._trust_ratio_stats is None:
            self._trust_ratio_stats = [part, r.numel()]
            return
        acc, count = self._trust_ratio_stats
        part = part.to(acc.device)
        merged = torch.stack([torch.minimum(acc[0], part[0]), acc[1] + part[1], torch.maximum(acc[2], part[2])])
        self._trust_ratio_stats = [merged, count + r.numel()]

    def set_segment_layout(self, group: Union[int, Tensor], layout: Optional[SegmentLayout]) -> None:
        """Cut a group's params into norm segments (used by the DeepSpeed ZeRO integration).

        ``group`` is a group index, or the (flat) tensor that will be the group's first param when it steps
        (ZeRO 3 puts its flat partitions into the groups only for the duration of the step).
        """
        params = [group] if isinstance(group, Tensor) else self.param_groups[group]["params"]
        key = id(params[0])
        if layout is None:
            self._layouts.pop(key, None)
            return
        if len(layout.fragments) != len(params):
            raise ValueError(f"layout has {len(layout.fragments)} fragment lists for {len(params)} params")
        for p, frags in zip(params, layout.fragments):
            for offset, numel, norm_id in frags:
                if offset < 0 or numel < 0 or offset + numel > p.numel() or not 0 <= norm_id < layout.num_ids:
                    raise ValueError(f"fragment (offset={offset}, numel={numel}, id={norm_id}) does not fit a "
                                     f"param of {p.numel()} elements and {layout.num_ids} ids")
        # keyed by the group's first param, not its index: DeepSpeed's ZeRO steps one group at a time by
        # swapping ``param_groups`` for a one-element list
        self._layouts[key] = (params[0], layout)

    # -- state ---------------------------------------------------------------------------------------------
    def _init_state(self, p: Tensor, group: dict) -> dict:
        state = self.state[p]
        if "step" not in state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            state_dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
            # state and master take the param's layout (e.g. channels_last), so all of them can be flattened alike
            for name in self._state_names:
                state[name] = torch.zeros_like(p, dtype=state_dtype, memory_format=torch.preserve_format)
            if group["master_weights"] and p.dtype in _LOW_PRECISION:
                state["master"] = torch.empty_like(p, dtype=torch.float32).copy_(p.detach())
        return state

    def _flat_members(self, p: Tensor, state: dict) -> Tensor:
        """For a param that is not contiguous: check it is dense (e.g. channels_last), give its gradient, state
        and master its layout where they differ (a gradient set by hand, state loaded from a contiguous run:
        copied once, stored back), and return the gradient. The caller then passes flat views (:func:`_flat`).
        :meth:`_check_grad` has made sure that ``p`` is dense."""
        g = p.grad
        if g.stride() != p.stride():
            g = p.grad = torch.empty_like(p, dtype=g.dtype).copy_(g)
        for name in list(self._state_names) + ["master"]:
            t = state.get(name)
            if t is not None and t.stride() != p.stride():
                state[name] = torch.empty_like(p, dtype=t.dtype).copy_(t)
        return g

    def _check_grad(self, p: Tensor) -> None:
        g = p.grad
        if g.is_sparse:
            raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
        if g.is_complex() or g.dtype not in _SUPPORTED_DTYPES:
            raise TypeError(f"{type(self).__name__} does not support {g.dtype} gradients")
        if g.device != p.device or g.shape != p.shape:
            raise ValueError(f"gradient {tuple(g.shape)}@{g.device} does not match param {tuple(p.shape)}@{p.device}")
        if not _is_dense(p):
            raise ValueError(f"{type(self).__name__} needs dense params (contiguous, channels_last or another "
                             f"permutation of dims); got shape {tuple(p.shape)} with strides {p.stride()}")

    def _collect(self, index: int, group: dict):
        """(params, grads, states, masters-or-None, step tensors) for the params of a group that have grads.

        This loop is most of the step's host time on a GPU (it runs per tensor): torch already guarantees a
        ``.grad``'s shape and device, so only what it does not guarantee is checked here, cheaply. Params that are
        not contiguous but dense (channels_last convolution weights) go to the kernels as flat views of param,
        gradient, state and master in one shared layout."""
        params, grads, states, models, steps = [], [], [[] for _ in self._state_names], [], []
        names = self._state_names
        state_of = self.state
        for p in group["params"]:
            g = p.grad
            if g is None:
                continue
            contiguous = g.is_contiguous() and p.is_contiguous()
            if g.is_sparse or g.dtype not in _SUPPORTED_DTYPES or not contiguous:
                self._check_grad(p)  # raises the precise error
            state = state_of[p]
            if "step" not in state:
                self._check_grad(p)
                state = self._init_state(p, group)
            master = state.get("master")
            if contiguous:
                params.append(p if master is None else master)
                models.append(None if master is None else p)
                grads.append(g)
                for lst, name in zip(states, names):
                    lst.append(state[name])
            else:
                g = self._flat_members(p, state)
                master = state.get("master")
                params.append(_flat(p if master is None else master))
                models.append(None if master is None else _flat(p))
                grads.append(_flat(g))
                for lst, name in zip(states, names):
                    lst.append(_flat(state[name]))
            steps.append(state["step"])
        return params, grads, states, models, steps

    def _segments(self, index: int, group: dict, params, grads, states, models, steps) -> tuple:
        """Turn a group's tensors into :class:`Segments` (+ norm hook), honouring a segment layout."""
        model_params = models if any(map(is_not, models, repeat(None))) else None  # C-level loop: host time
        entry = self._layouts.get(id(group["params"][0])) if group["params"] else None
        layout = entry[1] if entry is not None and entry[0] is group["params"][0] else None
        if layout is None:
            steps = steps if isinstance(steps, Tensor) else torch.stack(steps)
            return F.Segments(params, grads, states, steps, model_params), None
        if len(params) != len(group["params"]):
            raise RuntimeError("a group with a segment layout needs a gradient on every param")
        # the fragment views are cut once per layout and plan (ds_conadv/optim/_step_plan.py)
        seg = _layout_segments(self, layout, params, grads, states, models, model_params, steps, F.Segments)
        return seg, layout.norm_hook

    # -- step ----------------------------------------------------------------------------------------------
    def _max_grad_norm(self) -> Optional[float]:
        values = {g["max_grad_norm"] for g in self.param_groups}
        if len(values) > 1:
            raise ValueError(f"max_grad_norm is global (one norm over all groups) but groups set {values}")
        return values.pop()

    def _global_setting(self, key: str):
        values = {g[key] for g in self.param_groups}
        if len(values) > 1:
            raise ValueError(f"{key} is global (one decision over all groups) but groups set {values}")
        return values.pop()

    def _grad_coefficient(self, collected, kernels_per_group):
        """(coefficient applied to every grad, skip flag): GradScaler unscale x global clip, inf/NaN check.

        The global gradient norm is taken when clipping asks for it, or (``skip_nonfinite``) only to see
        whether any gradient holds inf/NaN: then the whole step is skipped, params and state untouched. With a
        segment layout (ZeRO) each rank holds a part of the gradients: the partial sums go through the layout's
        norm hook (an all-reduce), so every rank takes the same decision."""
        grad_scale: Optional[Tensor] = getattr(self, "grad_scale", None)
        found_inf: Optional[Tensor] = getattr(self, "found_inf", None)
        max_grad_norm = self._max_grad_norm()
        coef = None if grad_scale is None else grad_scale.double().reciprocal().float()
        skip = None if found_inf is None else found_inf > 0
        if max_grad_norm is not None or (found_inf is None and self._global_setting("skip_nonfinite")):
            device = None
            total = None
            for index, ((params, grads, *_), kernels) in enumerate(zip(collected, kernels_per_group)):
                group = self.param_groups[index]
                layout = self._layout_of(group)
                if not grads and layout is None:
                    continue
                shard = self._sharded_norms(group, layout)
                if shard is not None:  # tensor parallelism: per bucket (replicated, each shard group)
                    part = self._sharded_grad_sumsq(kernels, grads, layout, shard, group["params"][0].device)
                elif grads:
                    part = F.grad_sumsq(kernels, grads)
                else:  # this rank owns no gradient of the group, but the ranks that do sum with it
                    part = torch.zeros((), dtype=torch.float32, device=group["params"][0].device)
                if layout is not None and layout.norm_hook is not None:
                    shape = part.shape
                    part = part.reshape(-1, 1).clone()
                    layout.norm_hook(part)
                    part = part.reshape(shape)
                if shard is not None:
                    part = shard.total(part)
                device = device or part.device
                total = part if total is None else total + part.to(device)
            if self._global_norm_hook is not None:  # e.g. pipeline stages: the other layers' gradients
                total = torch.zeros(1, device=device) if total is None else total.reshape(1).clone()
                self._global_norm_hook(total)
                total = total.reshape(())
                device = total.device
            if total is not None and coef is None and max_grad_norm is None and device.type == "cpu":
                # only the finiteness check: on CPU a host read is free, and a finite step then carries no flag
                # (no flag ops in the rest of the step)
                if not math.isfinite(total.item()):
                    skip = torch.ones((), dtype=torch.bool)
                total = None
            if total is not None:
                norm = total.sqrt()
                if coef is not None:
                    norm = norm * coef.to(device)
                nonfinite = ~torch.isfinite(norm)
                skip = nonfinite if skip is None else (skip.to(device) | nonfinite)
                if max_grad_norm is not None:
                    clip = F.clip_coefficient(norm, max_grad_norm)
                    coef = clip if coef is None else coef.to(device) * clip
        if skip is not None and skip.device.type == "cpu" and not skip.item():
            skip = None  # (GradScaler or clipping on CPU): a step that is applied needs no flag
        return coef, skip

    def _sharded_norms(self, group: dict, layout: Optional[SegmentLayout]) -> Optional[_sharding.ShardedNorms]:
        """Which norm ids of a group are shards of tensors split over a process group (tensor parallelism), built
        once per parameter set or layout; None when none is (the usual case costs one check)."""
        if layout is not None:
            if layout.shard_groups is None:
                return None
            key: Any = ("layout", id(layout))
            members: Any = layout
        else:
            if not _sharding.any_marked():
                return None
            members = [p for p in group["params"] if p.grad is not None]  # the norm ids of the step
            key = tuple(map(id, members))
        cache = self.__dict__.setdefault("_sharded_norms_cache", {})
        entry = cache.get(key)
        generation = _sharding.generation()
        if entry is not None and entry[0] is layout and entry[2] == generation:
            return entry[1]
        shards = layout.shard_groups if layout is not None else _sharding.groups_of(members)
        norms = None if shards is None or not any(s is not None for s in shards) else _sharding.ShardedNorms(shards)
        if len(cache) >= 16:
            cache.clear()
        cache[key] = (layout, norms, generation)
        return norms

    @staticmethod
    def _sharded_grad_sumsq(kernels, grads, layout: Optional[SegmentLayout], shard: _sharding.ShardedNorms,
                            device) -> Tensor:
        """``[1 + K]`` local sums of squared gradients: replicated params, then each shard group's."""
        dtype = torch.float64 if grads and grads[0].dtype == torch.float64 else torch.float32
        if not grads:
            return torch.zeros(shard.num_buckets, dtype=dtype, device=device)
        if layout is None:
            tensors, ids = list(grads), list(range(len(grads)))
        else:
            tensors = _cut_fragments(grads, layout.fragments)
            ids = [norm_id for frags in layout.fragments for _, _, norm_id in frags]
        if not tensors:
            return torch.zeros(shard.num_buckets, dtype=dtype, device=device)
        return kernels.sumsq(tensors, shard.buckets(ids, tensors[0].device), shard.num_buckets, None, dtype)

    def _layout_of(self, group: dict) -> Optional[SegmentLayout]:
        entry = self._layouts.get(id(group["params"][0])) if group["params"] else None
        return entry[1] if entry is not None and entry[0] is group["params"][0] else None

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        state_init_only = self._check_wrapped()
        # a cached plan per parameter set (ds_conadv/optim/_step_plan.py); steps: one vector per group
        collected = [_collect_planned(self, i, g) for i, g in enumerate(self.param_groups)]
        if state_init_only:
            return loss
        kernels_per_group = [self._kernels(g, c[0]) for g, c in zip(self.param_groups, collected)]
        if self._checks_in_pass1(collected):
            self._step_checked_in_pass1(collected, kernels_per_group)
            return loss
        coef, skip = self._grad_coefficient(collected, kernels_per_group)
        self.trust_ratios = []
        for index, (group, data, kernels) in enumerate(zip(self.param_groups, collected, kernels_per_group)):
            params, grads, states, models, steps = data
            if not params:
                self.trust_ratios.append(None)
                continue
            device = params[0].device
            g_coef = None if coef is None else coef.to(device)
            g_skip = None if skip is None else skip.to(device)
            # the step counter only advances on steps that are applied
            increment = 1 if g_skip is None else (~g_skip).to(torch.float32)  # a device tensor: no host sync
            if isinstance(steps, Tensor):  # a plan's vector, viewed by every state["step"]
                steps.add_(increment)
            elif g_skip is None:
                torch._foreach_add_(steps, 1)
            else:  # a list of 0-d device tensors: the single-tensor-scalar overload syncs on CUDA
                torch._foreach_add_(steps, [increment] * len(steps))
            seg, hook = self._segments(index, group, params, grads, states, models, steps)
            shard = self._sharded_norms(group, self._layout_of(group))
            if shard is not None:  # tensor parallelism: complete the shards' sums over their groups
                hook = shard.compose(hook)
            self.trust_ratios.append(self._update(group, seg, kernels, g_coef, g_skip, hook))
            if self.collect_trust_ratio_stats:
                self._record_trust_ratio_stats(group, self.trust_ratios[-1], g_skip)
        if skip is not None:
            counter = self.skipped_steps
            counter.add_(skip.to(counter.device, torch.int64))
        return loss

    def _checks_in_pass1(self, collected) -> bool:
        """Whether skip_nonfinite can take its verdict from pass 1 (LARS: pass 1 sums every gradient's squares and
        writes nothing) instead of a pass of its own: the check is all that needs a gradient norm (no clipping, no
        GradScaler), no segment layout (its all-reduce would have to run for empty groups too), no sharded param
        or pipeline-stage norm (their sums are completed over other ranks), CPU params (the verdict is read on the
        host)."""
        if (not getattr(self, "_pass1_sums_grads", False) or self._layouts or getattr(self, "found_inf", None)
                is not None or getattr(self, "grad_scale", None) is not None or self._max_grad_norm() is not None
                or not self._global_setting("skip_nonfinite") or self._global_norm_hook is not None
                or (_sharding.any_marked() and any(self._sharded_norms(g, None) is not None
                                                   for g in self.param_groups))):
            return False
        return all(c[0][0].device.type == "cpu" for c in collected if c[0])

    def _step_checked_in_pass1(self, collected, kernels_per_group) -> None:
        """A step whose inf/NaN check reads pass 1's gradient sums: pass 1 of every group, the verdict, then pass 2
        of every group (or, for a non-finite step, the usual skipped step: nothing written, counters kept)."""
        entries = []
        total = None
        for index, (group, data, kernels) in enumerate(zip(self.param_groups, collected, kernels_per_group)):
            params, grads, states, models, steps = data
            if not params:
                entries.append(None)
                continue
            if isinstance(steps, Tensor):  # advanced now (pass 2 reads them), taken back if the step is skipped
                steps.add_(1)
            else:
                torch._foreach_add_(steps, 1)
            seg, _ = self._segments(index, group, params, grads, states, models, steps)
            sums = self._pass1(seg, kernels)
            part = sums[:, 0].sum()
            total = part if total is None else total + part
            entries.append((seg, sums))
        finite = total is None or math.isfinite(total.item())
        skip = None if finite else torch.ones((), dtype=torch.bool)
        self.trust_ratios = []
        for group, data, kernels, entry in zip(self.param_groups, collected, kernels_per_group, entries):
            if entry is None:
                self.trust_ratios.append(None)
                continue
            seg, sums = entry
            if not finite:
                steps = data[4]
                if isinstance(steps, Tensor):
                    steps.sub_(1)
                else:
                    torch._foreach_sub_(steps, 1)
            self.trust_ratios.append(self._update(group, seg, kernels, None, skip, None, sums=sums if finite else None))
            if self.collect_trust_ratio_stats:
                self._record_trust_ratio_stats(group, self.trust_ratios[-1], skip)
        if not finite:
            counter = self.skipped_steps
            counter.add_(1)

    def _check_wrapped(self) -> bool:
        """A wrapper (DeepSpeed ZeRO, fp16/bf16) that swapped our params for flat buffers would make every
        trust ratio a ratio of slices: attach to it once (exact ratios) or refuse to step.

        Returns True for DeepSpeed's fp16/bf16 (unfused) wrapper's state-initialisation call, a step with all-zero
        gradients made inside its constructor: under a trust ratio it would shrink every tensor by ``lr``
        (u = wd * p, r = 1 / wd), so that call only creates the state."""
        if self._ds_attached:
            return False
        foreign = [g for g in self.param_groups if g["params"] and id(g["params"][0]) not in self._own_params
                   and id(g["params"][0]) not in self._layouts]
        if not foreign:
            return False
        for resolver in wrapper_resolvers():  # registered by integrations (DeepSpeed: ds_conadv/__init__.py)
            outcome = resolver(self)
            if outcome is not None:
                return outcome == "init_only"
        raise RuntimeError(
            f"{type(self).__name__}'s params were replaced by tensors it was not built with (a flattening wrapper "
            "such as DeepSpeed ZeRO?): trust ratios would be taken over flat slices. Call "
            "ds_conadv.integrations.deepspeed.attach(engine) after deepspeed.initialize, or use "
            "ds_conadv.initialize.")

    def set_global_norm_hook(self, hook: Optional[Callable[[Tensor], None]]) -> None:
        """``hook`` completes the global sum of squared gradients (``max_grad_norm``, the inf/NaN check) in place,
        e.g. an all-reduce over pipeline stages, which hold the other layers (set by the DeepSpeed integration)."""
        self._global_norm_hook = hook

    def mark_attached(self) -> None:
        """Called by an integration once it has given this optimizer the segment layouts of the wrapper that
        flattened its params (or found that none are needed): steps no longer look for a wrapper."""
        self._ds_attached = True

    @staticmethod
    def _kernels(group: dict, params: List[Tensor]):
        if not params:
            return None
        backend = group["backend"]
        if backend == "auto" and params[0].dtype == torch.float64:
            backend = "foreach"  # the fused kernels are fp32-compute; fp64 params get fp64 math
        return get_kernels(backend, params[0].device)

    def _update(self, group, seg, kernels, coef, skip, hook) -> Tensor:  # pragma: no cover - overridden
        raise NotImplementedError

    # -- checkpoints ---------------------------------------------------------------------------------------
    def state_dict(self):
        sd = super().state_dict()
        sd["ds_conadv"] = {"skipped_steps": self.skipped_steps.detach().cpu().clone()}
        return sd

    def load_state_dict(self, state_dict) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop("ds_conadv", {})
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        super().load_state_dict(state_dict)  # through __setstate__, which keeps this instance's layouts
        # torch casts every float state tensor to its param's dtype; ours stay fp32 (bf16 params, fp32 moments
        # and master weights), so put the saved tensors back with their own dtype, on the param's device.
        params = [p for g in self.param_groups for p in g["params"]]
        for saved_id, p in zip(saved_ids, params):
            saved = state_dict["state"].get(saved_id)
            if saved is None:
                continue
            for key, value in saved.items():
                if isinstance(value, Tensor):
                    if value.shape == p.shape and value.dim() > 1 and value.stride() != p.stride():
                        # saved from a model in another memory layout (channels_last vs contiguous): take p's
                        value = torch.empty_like(p, dtype=value.dtype).copy_(value)
                    self.state[p][key] = value.detach().to(device=p.device, copy=True)
        for group in self.param_groups:
            self._validate_group(group)
        if "skipped_steps" in extra:
            self.skipped_steps.copy_(extra["skipped_steps"])
