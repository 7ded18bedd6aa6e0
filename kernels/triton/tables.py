"""Work-item tables for the multi-tensor Triton kernels, built once per tensor set and cached.

A call's tensors are given as columns (e.g. LAMB: params, grads, exp_avgs, exp_avg_sqs, model copies), each a
list with one tensor per segment. One table is a single int64 tensor on the tensors' device with two parts
(each starting at an even index, so 16-byte aligned)::

    items [n_items, 3 + n_cols]   one row per work item: (segment, first element, segment numel, then the raw
                                  data_ptr() of the segment's tensor in each column; 0 for an absent column or a
                                  None entry, e.g. a segment without a model copy)
    begin [n_seg + 1]             the items of segment s are rows begin[s]:begin[s + 1] (for the reductions)

A work item covers ``item_size`` consecutive elements of one segment (the last one of a segment is shorter), so
a launch has one program per work item whatever the number of tensors, and a program reaches its data with
one dependent load (its row). Pointers are byte addresses: a kernel casts them to the column's dtype
(``.to(tl.pointer_type(...))``) and offsets by elements, so views at arbitrary element offsets of a flat buffer
are fine. ``aligned`` records whether every pointer is 16-byte aligned (then the kernels promise the compiler
that alignment, allowing vector loads). An empty set of work items gets one dummy row (segment 0, numel 0: fully
masked), so a launch grid is never empty; ``begin`` does not count it.

The table's content is a pure function of the pointers, dtypes and sizes of the tensors, so it is cached under
them: an unchanged tensor set (the usual case, step after step) costs a key lookup and no upload. A miss builds
the table with numpy and uploads it from pinned memory with ``non_blocking=True`` (no host sync).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["Table", "TableCache", "KIND", "kind_of", "HEADER"]

# dtype codes used as constexpr kernel parameters
KIND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
HEADER = 3  # segment, start, numel


def kind_of(tensors: Sequence[Optional[Tensor]], what: str,
            allowed=(torch.float32, torch.bfloat16, torch.float16)) -> int:
    """The dtype code shared by all ``tensors`` (``None`` entries ignored); TypeError for mixed or unsupported
    dtypes."""
    tensors = [t for t in tensors if t is not None]
    if not tensors:
        return 0
    dtype = tensors[0].dtype
    for t in tensors:
        if t.dtype != dtype:
            raise TypeError(f"the Triton kernels need one dtype per tensor list, but the {what} mix {dtype} and "
                            f"{t.dtype}")
    if dtype not in allowed:
        raise TypeError(f"the Triton kernels do not support {dtype} {what} (supported: "
                        f"{', '.join(map(str, allowed))}); use backend='foreach' or 'reference' for {dtype}")
    return KIND[dtype]


def _even(n: int) -> int:
    return n + (n & 1)


class Table:
    __slots__ = ("data", "items", "begin", "n_seg", "n_items", "grid", "stride", "aligned", "kinds", "_pinned")

    def __init__(self, data: Tensor, n_seg: int, n_items: int, stride: int, aligned: bool, kinds=(), pinned=None):
        self.data = data
        self.kinds = kinds  # dtype code of each column (0 for an absent one)
        self.n_seg = n_seg
        self.n_items = n_items  # real work items
        self.grid = max(n_items, 1)  # rows in ``items`` (a dummy row when there is no work)
        self.stride = stride
        self.aligned = aligned
        o_begin = _even(self.grid * stride)
        self.items = data[: self.grid * stride]
        self.begin = data[o_begin: o_begin + n_seg + 1]
        self._pinned = pinned  # keeps the pinned source of a non_blocking upload alive


def build_table(columns: Sequence[Optional[Sequence[Tensor]]], item_size: int, device: torch.device,
                specs=None) -> Table:
    """``specs``: per column, (name, allowed dtypes) for the dtype checks (TypeError) and codes."""
    kinds = tuple(0 if col is None else kind_of(col, *spec) for col, spec in
                  zip(columns, specs or [("tensors",)] * len(columns)))
    n_seg = len(columns[0])
    n_cols = len(columns)
    stride = HEADER + n_cols
    numels = np.fromiter((t.numel() for t in columns[0]), dtype=np.int64, count=n_seg)
    ptrs = np.zeros((n_seg, n_cols), dtype=np.int64)
    aligned = True
    for c, col in enumerate(columns):
        if col is None:
            continue
        if len(col) != n_seg:
            raise ValueError(f"tensor lists differ in length ({len(col)} vs {n_seg})")
        for s, t in enumerate(col):
            if t is None:  # e.g. no model copy for this segment
                continue
            if t.numel() != numels[s]:
                raise ValueError(f"segment {s}: tensors differ in size ({t.numel()} vs {int(numels[s])} elements)")
            if t.device != device:
                raise ValueError(f"segment {s}: tensor on {t.device}, expected {device}")
            if not t.is_contiguous():
                raise ValueError(f"segment {s}: the Triton kernels need contiguous tensors")
            ptr = t.data_ptr()
            ptrs[s, c] = ptr
            aligned = aligned and ptr % 16 == 0
    counts = (numels + item_size - 1) // item_size
    begin = np.zeros(n_seg + 1, dtype=np.int64)
    np.cumsum(counts, out=begin[1:])
    n_items = int(begin[-1])
    grid = max(n_items, 1)
    items = np.zeros((grid, stride), dtype=np.int64)
    if n_items:
        owner = np.repeat(np.arange(n_seg, dtype=np.int64), counts)
        items[:, 0] = owner
        items[:, 1] = (np.arange(n_items, dtype=np.int64) - begin[owner]) * item_size
        items[:, 2] = numels[owner]
        items[:, HEADER:] = ptrs[owner]
    o_begin = _even(grid * stride)
    flat = np.zeros(o_begin + n_seg + 1, dtype=np.int64)
    flat[: grid * stride] = items.reshape(-1)
    flat[o_begin:] = begin
    host = torch.from_numpy(flat)
    pinned = None
    if device.type == "cuda":
        pinned = host.pin_memory()
        data = pinned.to(device, non_blocking=True)
    else:
        data = host
    return Table(data, n_seg, n_items, stride, aligned, kinds, pinned)


_ptr = Tensor.data_ptr


class TableCache:
    """LRU cache of uploaded tables, keyed by the data pointers and dtypes of every tensor of every column and
    the sizes of the first column (the other columns must match those sizes; checked when a table is built).

    Building the key costs host time per tensor (``data_ptr()`` dominates)."""

    def __init__(self, item_size: int, capacity: int = 64):
        self.item_size = item_size
        self.capacity = capacity
        self._tables: "OrderedDict[tuple, Table]" = OrderedDict()
        self.misses = 0

    @staticmethod
    def _key(columns, device):
        parts = [device, tuple(map(Tensor.numel, columns[0]))]
        for col in columns:
            if col is None:
                parts.append(None)
                continue
            try:
                parts.append(tuple(map(_ptr, col)))
            except TypeError:  # None entries
                parts.append(tuple(None if t is None else t.data_ptr() for t in col))
            parts.append(tuple([None if t is None else t.dtype for t in col]))
        return tuple(parts)

    def get(self, columns: Sequence[Optional[Sequence[Tensor]]], device: torch.device, specs=None) -> Table:
        """The table of ``columns`` (see :func:`build_table`); dtypes are checked when it is built (they are part
        of the key, so a cached table was checked)."""
        key = self._key(columns, device)
        table = self._tables.get(key)
        if table is not None:
            self._tables.move_to_end(key)
            return table
        table = build_table(columns, self.item_size, device, specs)
        self.misses += 1
        self._tables[key] = table
        if len(self._tables) > self.capacity:
            self._tables.popitem(last=False)
        return table

    def clear(self) -> None:
        self._tables.clear()
