"""Tensors split over a process group (tensor parallelism): which norms are partial sums, and how they are completed.

Under Megatron-style tensor parallelism (DeepSpeed AutoTP, Megatron-LM, a hand-written column/row split) each rank
of the tensor-parallel group holds a shard of a weight: a column-parallel ``Linear`` a block of output rows (and of
its bias), a row-parallel one a block of input columns. A per-tensor optimizer would take ``‖p‖``, ``‖u‖``, ``‖g‖``
over the shard, not the layer. :func:`mark_sharded` records the process group a param is split over; the step then

* all-reduces the per-tensor partial sums of squares of the marked params over that group before the trust ratios
  are taken (replicated params, e.g. a row-parallel layer's bias or a LayerNorm, hold the same values on every
  rank of the group and are not summed), after the data-parallel all-reduce of a ZeRO segment layout;
* takes the global gradient norm (``max_grad_norm``, the inf/NaN check) as the replicated params' squares counted
  once plus the marked params' squares summed over their group, so every rank of the group clips and skips alike.

The formulas are unchanged (:mod:`ds_conadv.optim.functional`); this module only completes the sums, with
``torch.distributed`` and one small collective per shard group, group and step.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["mark_sharded", "unmark_sharded", "shard_group", "is_sharded", "ShardedNorms"]

_ATTR = "_ds_conadv_shard"
_marked = 0  # marks and unmarks so far in this process: 0 keeps the step free of any look-up


class _Shard:
    __slots__ = ("group",)

    def __init__(self, group: Any) -> None:
        self.group = group


def mark_sharded(param: Tensor, group: Any = None) -> Tensor:
    """Record that ``param`` is one rank's shard of a tensor split over the process group ``group``
    (``None``: the default group). Returns ``param``. Mark only split tensors: a replicated one would be counted
    once per rank of the group."""
    global _marked
    if not isinstance(param, Tensor):
        raise TypeError(f"mark_sharded expects a tensor, got {type(param).__name__}")
    setattr(param, _ATTR, _Shard(group))
    _marked += 1
    return param


def unmark_sharded(param: Tensor) -> None:
    global _marked
    if hasattr(param, _ATTR):
        delattr(param, _ATTR)
        _marked += 1  # a new generation: optimizers rebuild what they cached


def generation() -> int:
    """Changes whenever a param is marked or unmarked (what an optimizer cached is then rebuilt)."""
    return _marked


def is_sharded(param: Tensor) -> bool:
    return isinstance(getattr(param, _ATTR, None), _Shard)


def shard_group(param: Tensor) -> Any:
    """The process group ``param`` is split over (``None`` for the default group); raises if it is not marked."""
    shard = getattr(param, _ATTR, None)
    if not isinstance(shard, _Shard):
        raise ValueError("param is not marked as sharded (ds_conadv.optim.mark_sharded)")
    return shard.group


def any_marked() -> bool:
    return _marked > 0


def groups_of(params: Sequence[Tensor]) -> Optional[List[Optional[_Shard]]]:
    """Per param: its shard marker or None; None when no param is marked."""
    shards = [getattr(p, _ATTR, None) for p in params]
    return shards if any(s is not None for s in shards) else None


class ShardedNorms:
    """The norm ids of one param group that are partial sums over a process group.

    ``shards[i]``: the marker of norm id ``i`` (None: replicated). Built once per parameter set (or segment layout)
    and cached by the optimizer."""

    def __init__(self, shards: Sequence[Optional[Any]]) -> None:
        order: Dict[int, int] = {}
        groups: List[Any] = []
        rows: List[List[int]] = []
        bucket = []
        for i, shard in enumerate(shards):
            if shard is None:
                bucket.append(0)
                continue
            group = shard.group if isinstance(shard, _Shard) else shard
            k = order.setdefault(id(group) if group is not None else 0, len(groups))
            if k == len(groups):
                groups.append(group)
                rows.append([])
            rows[k].append(i)
            bucket.append(1 + k)
        self.groups = groups
        self.rows = [torch.tensor(r, dtype=torch.int64) for r in rows]
        self.bucket_of_id = torch.tensor(bucket, dtype=torch.int64)
        self._device_rows: Dict[str, Tuple[List[Tensor], Tensor]] = {}
        self._buckets: Optional[Tuple[tuple, Tensor]] = None

    def _on(self, device: torch.device) -> Tuple[List[Tensor], Tensor]:
        key = str(device)
        cached = self._device_rows.get(key)
        if cached is None:
            cached = ([r.to(device) for r in self.rows], self.bucket_of_id.to(device))
            self._device_rows[key] = cached
        return cached

    def reduce_rows(self, sums: Tensor) -> None:
        """All-reduce the rows of the sharded ids of ``sums`` (``[num_ids, C]``) over their groups, in place."""
        import torch.distributed as dist

        rows, _ = self._on(sums.device)
        for group, idx in zip(self.groups, rows):
            part = sums.index_select(0, idx)
            dist.all_reduce(part, group=group)
            sums.index_copy_(0, idx, part)

    def compose(self, hook: Optional[Callable[[Tensor], None]]) -> Callable[[Tensor], None]:
        """A norm hook: ``hook`` (e.g. the data-parallel all-reduce of a ZeRO layout) first, then the shard groups."""

        def completed(sums: Tensor) -> None:
            if hook is not None:
                hook(sums)
            self.reduce_rows(sums)

        return completed

    def buckets(self, seg_ids: Sequence[int], device: torch.device) -> Tensor:
        """Per segment (of norm id ``seg_ids[s]``): 0 for replicated, ``1 + k`` for shard group ``k``."""
        key = (tuple(seg_ids), str(device))
        if self._buckets is None or self._buckets[0] != key:
            _, bucket_of_id = self._on(device)
            ids = torch.tensor(list(seg_ids), dtype=torch.int64, device=device)
            self._buckets = (key, bucket_of_id.index_select(0, ids))
        return self._buckets[1]

    @property
    def num_buckets(self) -> int:
        return 1 + len(self.groups)

    def total(self, per_bucket: Tensor) -> Tensor:
        """The squared norm of the whole tensors from ``[1 + K]`` local sums: the replicated ones counted once, each
        shard group's sum all-reduced over its group."""
        import torch.distributed as dist

        total = per_bucket[0]
        for k, group in enumerate(self.groups):
            part = per_bucket[1 + k].clone()
            dist.all_reduce(part, group=group)
            total = total + part
        return total
