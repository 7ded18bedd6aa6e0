"""Step plans: what a group's step needs that depends only on its parameter set, built once.

A step has to hand the kernels lists of params (or fp32 masters), grads, optimizer state, low-precision model
params and step counters. Building those lists from the param groups and ``optimizer.state`` costs a Python loop
with dict look-ups per tensor, which is most of a step's host time when the kernels are short (ResNet-50 on a GPU).
Only the grads change from step to step, so a :class:`GroupPlan` keeps the rest:

* the kernel-side params, state and master lists (flat views for dense non-contiguous params, e.g. channels_last);
* the per-param step counters as views into one vector, so that a step advances them with one op and the kernels
  get them without a ``torch.stack``;
* what the fast path must re-check every step, in one C++ call where the CPU extension is built (else a loop;
  for GPU params the extension is used only when an earlier build exists, never compiled for this):
  every param still has its dtype, data pointer and device, and every grad is present, dense, and has its param's
  dtype, sizes and strides.

A plan is used only while the group holds the same param objects in the same order, ``optimizer.state`` is the same
object with as many entries (``load_state_dict`` replaces it; deleting a param's state shrinks it) and the params
without a grad are the same ones as when it was built.
Anything else -- a param that gets ``grad=None``, a dtype or layout change, a moved param, a sparse grad, new
groups -- takes the slow path (:meth:`TrustRatioOptimizer._collect`, which validates, creates state and raises
the precise errors) and builds a new plan. Optimizer state tensors are bound when the plan is built: replace them
through ``load_state_dict``, not by assigning into ``optimizer.state[p]``.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
from torch import Tensor

_MAX_PLANS = 8  # per optimizer: DeepSpeed steps its groups one at a time, each a different parameter set

_checker = None  # the C++ extension (plan_meta / plan_mismatch), False when it cannot be loaded


def _ext(params_on_cpu: bool):
    """The C++ CPU extension for the per-step check: for CPU params (their default backend builds it anyway), or
    when it is loaded or built already; never a first-time build for a GPU run (that would stall its first step)."""
    global _checker
    if _checker is None:
        try:
            from ds_conadv.kernels.cpu import built, load

            if not params_on_cpu and not built():
                return None

            _checker = load()
            if not hasattr(_checker, "plan_mismatch"):
                _checker = False
        except Exception:  # noqa: BLE001 - the Python check below does the same, slower
            _checker = False
    return _checker or None


def _flat(t: Tensor) -> Tensor:
    return t.as_strided((t.numel(),), (1,), t.storage_offset())


class GroupPlan:
    __slots__ = ("ids", "positions", "absent", "with_grad", "meta", "checker", "params", "states", "models", "steps",
                 "flat_positions", "state_obj", "state_len", "group_check")

    def mismatch(self, grads: List[Optional[Tensor]]) -> bool:
        if self.checker is not None:
            return self.checker.plan_mismatch(self.with_grad, grads, self.meta) != -1
        for p, g, (dtype, ptr, device) in zip(self.with_grad, grads, self.meta):
            if (g is None or p.dtype != dtype or p.data_ptr() != ptr or p.device != device
                    or g.layout != torch.strided or g.dtype != dtype or g.device != device
                    or g.shape != p.shape or g.stride() != p.stride()):
                return True
        return False


def collect(opt, index: int, group: dict):
    """``(params, grads, states, models, steps)`` of a group for the kernels, ``steps`` one float32 vector (the
    counters of the params with a grad, viewed by their ``state["step"]``). Same contract as
    :meth:`TrustRatioOptimizer._collect`, whose slow path it takes when no plan fits."""
    params = group["params"]
    if not params:
        return opt._collect(index, group)
    # fastest path: the plan last used with this very list, whose C++ check compares the list's items by identity
    # and collects the grads in the same call (no per-param Python work at all)
    by_list: Dict[int, GroupPlan] = opt.__dict__.setdefault("_step_plan_by_list", {})
    plan = by_list.get(id(params))
    if (plan is not None and plan.group_check is not None and plan.state_obj is opt.state
            and plan.state_len == len(opt.state)):
        fast = plan.group_check.grads(params)
        if fast is not None:
            if plan.flat_positions:
                for j in plan.flat_positions:
                    fast[j] = _flat(fast[j])
            return plan.params, fast, plan.states, plan.models, plan.steps
    plans: Dict[tuple, GroupPlan] = opt.__dict__.setdefault("_step_plans", {})
    ids = tuple(map(id, params))
    plan = plans.get(ids)
    grads = [p.grad for p in params]
    if plan is not None and plan.state_obj is opt.state and plan.state_len == len(opt.state):
        if plan.positions is None:
            with_grad = grads
        else:
            with_grad = [grads[i] for i in plan.positions]
            if any(grads[i] is not None for i in plan.absent):
                with_grad = None
        if with_grad is not None and not plan.mismatch(with_grad):
            _remember_list(opt, params, plan)
            if plan.flat_positions:
                with_grad = list(with_grad)
                for j in plan.flat_positions:
                    with_grad[j] = _flat(with_grad[j])
            return plan.params, with_grad, plan.states, plan.models, plan.steps
    # slow path: validate, create state, fix layouts (it may re-lay a grad out), then plan for the next step
    kparams, kgrads, states, models, steps = opt._collect(index, group)
    steps = _build(opt, ids, params, kparams, states, models, steps, plans)
    plan = plans.get(ids)
    if plan is not None:
        _remember_list(opt, params, plan)
    return kparams, kgrads, states, models, steps


def _drop(plans: Dict[tuple, GroupPlan], key: tuple) -> None:
    """Forget a plan, also for the fast path (which finds plans by their params list, not in ``plans``)."""
    plan = plans.pop(key, None)
    if plan is not None:
        plan.group_check = None


def _remember_list(opt, params: list, plan: GroupPlan) -> None:
    """Let the next step with this params list take the fast path, where the plan has a C++ check (all params with
    a grad, a list object)."""
    if plan.group_check is None or not isinstance(params, list):
        return
    by_list: Dict[int, GroupPlan] = opt.__dict__.setdefault("_step_plan_by_list", {})
    if by_list.get(id(params)) is plan:
        return
    if len(by_list) >= _MAX_PLANS:
        by_list.clear()
    by_list[id(params)] = plan


def _build(opt, ids, params, kparams, states, models, steps: List[Tensor], plans) -> Tensor:
    if not steps:
        _drop(plans, ids)
        return torch.zeros(0)
    positions = [i for i, p in enumerate(params) if p.grad is not None]
    with_grad = [params[i] for i in positions]
    vector = torch.stack(steps)
    for j, p in enumerate(with_grad):  # every counter becomes a view of one vector: one op advances them all
        opt.state[p]["step"] = vector[j]
    # a param's counter now lives in this plan's vector: a plan that also holds this param is stale
    owners: Dict[int, tuple] = opt.__dict__.setdefault("_step_plan_owner", {})
    for p in with_grad:
        old = owners.get(id(p))
        if old is not None and old != ids:
            _drop(plans, old)
        owners[id(p)] = ids
    plan = GroupPlan()
    plan.ids = ids
    plan.positions = None if len(positions) == len(params) else positions
    plan.absent = [i for i, p in enumerate(params) if p.grad is None]
    plan.with_grad = with_grad
    plan.checker = _ext(with_grad[0].device.type == "cpu")  # the same checker for the plan's whole life
    plan.meta = (plan.checker.plan_meta(with_grad) if plan.checker is not None
                 else [(p.dtype, p.data_ptr(), p.device) for p in with_grad])
    plan.params, plan.states, plan.models, plan.steps = kparams, states, models, vector
    plan.flat_positions = [j for j, p in enumerate(with_grad) if not p.is_contiguous()]
    plan.state_obj, plan.state_len = opt.state, len(opt.state)
    plan.group_check = None
    if plan.positions is None and plan.checker is not None and hasattr(plan.checker, "GroupCheck"):
        plan.group_check = plan.checker.GroupCheck(list(params), plan.meta)
    if plan.mismatch([p.grad for p in with_grad]):  # e.g. a dense grad in another layout: no plan
        _drop(plans, ids)
        return vector
    _drop(plans, ids)
    while plans and len(plans) >= _MAX_PLANS:  # the oldest first
        _drop(plans, next(iter(plans)))
    if _MAX_PLANS > 0:
        plans[ids] = plan
    return vector


class _LayoutCut:
    """A segment layout applied to one plan's lists: the fragment views of params, state and model params, the
    per-segment step indices, and the last grads' fragment views (reused while the same grad tensors come)."""

    __slots__ = ("fragments", "params", "states", "models", "seg_params", "seg_states", "seg_models", "ids",
                 "positions", "step_index", "grads_key", "seg_grads", "keep", "seg_ids")


def cut_fragments(tensors, fragments):
    """The fragment views of a group's (flat) tensors, in segment order."""
    return _cut(tensors, fragments)


def _cut(tensors, fragments):
    out = []
    for k, frags in enumerate(fragments):
        flat = tensors[k].view(-1)
        for offset, numel, _ in frags:
            out.append(flat[offset:offset + numel])
    return out


def layout_segments(opt, layout, params, grads, states, models, model_params, steps, segments_cls):
    """:class:`Segments` of a group cut by a segment layout (DeepSpeed ZeRO). The views depend only on the layout
    and the plan's lists, so they are cut once; only the grads are re-cut, and only when other grad tensors come."""
    cache = opt.__dict__.setdefault("_layout_cuts", {})
    cut = cache.get(id(layout))
    if (cut is None or cut.fragments is not layout.fragments or cut.params is not params or cut.states is not states
            or cut.models is not models or cut.keep is not layout):
        cut = _LayoutCut()
        cut.fragments, cut.params, cut.states, cut.models, cut.keep = layout.fragments, params, states, models, layout
        cut.seg_params = _cut(params, layout.fragments)
        cut.seg_states = [_cut(s, layout.fragments) for s in states]
        cut.seg_models = _cut(models, layout.fragments) if model_params else None
        cut.ids = [norm_id for frags in layout.fragments for _, _, norm_id in frags]
        cut.positions = [k for k, frags in enumerate(layout.fragments) for _ in frags]
        cut.step_index = torch.tensor(cut.positions, dtype=torch.int64).to(params[0].device)
        cut.grads_key = None
        cut.seg_ids = layout.device_ids(cut.ids, params[0].device)
        if len(cache) >= _MAX_PLANS:
            cache.clear()
        cache[id(layout)] = cut
    grads_key = tuple((id(g), g.data_ptr()) for g in grads)
    if cut.grads_key != grads_key:
        cut.seg_grads = _cut(grads, layout.fragments)
        cut.grads_key = grads_key
        cut.keep = layout  # (and the grads stay referenced through seg_grads)
    if not cut.ids:
        seg_steps = torch.zeros(0, device=params[0].device)
    elif isinstance(steps, Tensor):
        seg_steps = steps.index_select(0, cut.step_index)
    else:
        seg_steps = torch.stack([steps[k] for k in cut.positions])
    seg = segments_cls(list(cut.seg_params), list(cut.seg_grads), [list(s) for s in cut.seg_states], seg_steps,
                       None if cut.seg_models is None else list(cut.seg_models))
    seg.seg_ids = cut.seg_ids
    seg.num_ids = layout.num_ids
    return seg
