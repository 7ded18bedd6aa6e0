"""Hessian-vector products of the mean loss of an ``nn.Module`` over one batch or a whole loader, optionally
summed over data-parallel ranks.

:class:`HessianOperator` is the linear operator ``v -> H v`` that the eigenvalue, trace and density routines
use. ``H`` is the Hessian, w.r.t. the chosen parameters, of the *mean loss over every sample the operator sees*:
over the batches of one process, and over the union of all ranks' batches when distributed. Each batch's
Hessian-vector product is computed for that batch's mean loss (the criterion must reduce with ``mean``, as in
PyHessian) and weighted by the batch's number of samples; the weighted sum and the sample count are summed over
ranks in one all-reduce, then divided. Every rank ends with the same vector.

Two ways of computing a product (``backend=``):

``"double"`` (default)
    double backward, ``torch.autograd.grad(grads, params, v)`` on the graph of ``grads =
    torch.autograd.grad(loss, params, create_graph=True)``. For a single batch (``data=``) the first-order graph
    is built once per call of an algorithm and reused by every product (as PyHessian does), so a product then
    costs one double-backward pass. Measured faster than forward-over-reverse on CPU (docs/hessian.md).
``"func"``
    forward-over-reverse with ``torch.func``: ``jvp(grad(f), (params,), (v,))`` where ``f`` runs the model with
    :func:`torch.func.functional_call`. Keeps no graph between products.
"""
from __future__ import annotations

import contextlib
import importlib.util
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ds_conadv.torch_compat import BatchNormBase, DropoutBase

__all__ = ["HessianOperator", "unwrap_model", "select_params", "batch_size_of", "Communicator", "make_communicator",
           "BACKENDS"]

BACKENDS = ("double", "func")
DEFAULT_BACKEND = "double"

Batch = Any
LossFn = Callable[[Callable[..., Any], Batch], torch.Tensor]


# ----------------------------------------------------------------------------------------------------------
# models: DeepSpeed engines, DDP
# ----------------------------------------------------------------------------------------------------------
def _is_deepspeed_engine(obj: Any) -> bool:
    return any(c.__name__ == "DeepSpeedEngine" for c in type(obj).__mro__)


def unwrap_model(model: Any) -> Tuple[nn.Module, Optional[Any]]:
    """``(module, engine)``: the plain module inside a DeepSpeed engine (ZeRO 0/1/2; also the ConAdv engine of
    ``ds_conadv.initialize``, which wraps one) or DDP wrapper.

    Under ZeRO 1/2 every rank holds the full parameters, so plain autograd on ``engine.module`` gives the
    Hessian. ZeRO 3 partitions the parameters and is refused.
    """
    # the ConAdv / ABSA engines wrap one (ds_conadv.integrations.deepspeed.engine.EngineWrapper.wrapped_engine)
    inner = model.wrapped_engine if isinstance(getattr(type(model), "wrapped_engine", None), property) else None
    if not isinstance(model, nn.Module) and _is_deepspeed_engine(inner):
        model = inner
    if _is_deepspeed_engine(model):
        stage_fn = getattr(model, "zero_optimization_stage", None)
        stage = int(stage_fn()) if callable(stage_fn) else 0
        if stage >= 3:
            raise NotImplementedError("ZeRO stage 3 partitions the parameters: Hessian products need the full "
                                      "parameters on every rank (ZeRO 0/1/2)")
        return model.module, model
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model.module, None
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module or a DeepSpeed engine, got {type(model).__name__}")
    return model, None


def select_params(module: nn.Module, params: Any = None) -> Tuple[List[str], List[torch.Tensor]]:
    """``(names, tensors)`` of the parameters to differentiate.

    ``params`` may be ``None`` (every parameter with ``requires_grad``, less the ``adv`` branch of ConAdv's
    :class:`~ds_conadv.conadv.dual_bn.DualBatchNorm` layers routed to ``main``), an ``nn.Module`` (its parameters), an
    iterable of parameter tensors, or an iterable of strings: exact parameter names or module-name prefixes
    (``"layer1"`` selects ``layer1.weight``, ``layer1.bias``, ...). Order follows ``module.named_parameters()``.
    """
    named = list(module.named_parameters())
    if params is None:
        # the adversarial branch of ConAdv's dual BN does not enter the (clean) loss while routing is "main"
        idle = {id(p) for m in module.modules() if type(m).__name__ == "DualBatchNorm"
                and not getattr(m, "adversarial", False) for p in m.adv.parameters()}
        chosen = [(n, p) for n, p in named if p.requires_grad and id(p) not in idle]
    elif isinstance(params, nn.Module):
        ids = {id(p) for p in params.parameters()}
        chosen = [(n, p) for n, p in named if id(p) in ids]
        if len(chosen) != len(ids):
            raise ValueError("params: the given module's parameters are not all parameters of the model")
    else:
        items = list(params)
        if items and all(isinstance(x, str) for x in items):
            chosen = [(n, p) for n, p in named if any(n == s or n.startswith(s + ".") for s in items)]
            unmatched = [s for s in items if not any(n == s or n.startswith(s + ".") for n, _ in named)]
            if unmatched:
                raise ValueError(f"params: no parameter named (or under) {unmatched}")
        elif all(isinstance(x, torch.Tensor) for x in items):
            ids = {id(p) for p in items}
            chosen = [(n, p) for n, p in named if id(p) in ids]
            if len(chosen) != len(ids):
                raise ValueError("params: some tensors are not parameters of the model")
        else:
            raise TypeError("params: expected a module, parameter tensors, or parameter/module names")
    if not chosen:
        raise ValueError("no parameters to differentiate (none selected, or none requires grad)")
    return [n for n, _ in chosen], [p for _, p in chosen]


def batch_size_of(batch: Any) -> int:
    """Number of samples in a batch: dim 0 of the first tensor found (depth-first) in it."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else 1
    if isinstance(batch, dict):
        items: Iterable[Any] = batch.values()
    elif isinstance(batch, (list, tuple)):
        items = batch
    else:
        items = ()
    for x in items:
        try:
            return batch_size_of(x)
        except ValueError:
            continue
    raise ValueError(f"cannot tell the batch size of a {type(batch).__name__}; pass batch_size_fn=")


def _to_device(x: Any, device: torch.device) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, dict):
        return {k: _to_device(v, device) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        out = [_to_device(v, device) for v in x]
        return type(x)(*out) if hasattr(x, "_fields") else type(x)(out)
    return x


# ----------------------------------------------------------------------------------------------------------
# collectives: none, torch.distributed, Horovod
# ----------------------------------------------------------------------------------------------------------
class Communicator:
    """Single process: sums are the identity."""

    kind = "none"
    rank = 0
    world_size = 1

    def allreduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def broadcast_int(self, value: int) -> int:
        return int(value)

    def broadcast_(self, t: torch.Tensor) -> torch.Tensor:
        """In place, from rank 0 of the group."""
        return t


class _TorchDistComm(Communicator):
    kind = "torch.distributed"

    def __init__(self, group: Any = None):
        import torch.distributed as dist

        self.dist, self.group = dist, group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        backend = dist.get_backend(group)
        self.cpu_only = backend == "gloo"

    def allreduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.cpu_only and t.device.type != "cpu":
            host = t.cpu()
            self.dist.all_reduce(host, op=self.dist.ReduceOp.SUM, group=self.group)
            return host.to(t.device)
        self.dist.all_reduce(t, op=self.dist.ReduceOp.SUM, group=self.group)
        return t

    def broadcast_int(self, value: int) -> int:
        t = torch.tensor([int(value)], dtype=torch.int64)
        if not self.cpu_only and torch.cuda.is_available():
            t = t.cuda()
        self.dist.broadcast(t, src=self._src(), group=self.group)
        return int(t.item())

    def _src(self) -> int:
        return self.dist.get_global_rank(self.group, 0) if self.group is not None else 0

    def broadcast_(self, t: torch.Tensor) -> torch.Tensor:
        if self.cpu_only and t.device.type != "cpu":
            host = t.cpu()
            self.dist.broadcast(host, src=self._src(), group=self.group)
            t.copy_(host)
        else:
            self.dist.broadcast(t, src=self._src(), group=self.group)
        return t


class _HorovodComm(Communicator):
    kind = "horovod"

    def __init__(self, hvd: Any):
        self.hvd = hvd
        self.rank, self.world_size = int(hvd.rank()), int(hvd.size())
        self._n = 0

    def allreduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        self._n += 1
        return self.hvd.allreduce(t, op=self.hvd.Sum, name=f"ds_conadv.hessian.{self._n}")

    def broadcast_int(self, value: int) -> int:
        t = torch.tensor([int(value)], dtype=torch.int64)
        return int(self.hvd.broadcast(t, root_rank=0, name="ds_conadv.hessian.seed").item())

    def broadcast_(self, t: torch.Tensor) -> torch.Tensor:
        self._n += 1
        return self.hvd.broadcast_(t, root_rank=0, name=f"ds_conadv.hessian.b{self._n}")


def _horovod_if_running() -> Optional[Any]:
    if importlib.util.find_spec("horovod") is None:
        return None
    try:
        import horovod.torch as hvd
    except Exception:  # not built against this torch
        return None
    try:
        if hvd.is_initialized() and hvd.size() > 1:
            return hvd
    except Exception:
        return None
    return None


def make_communicator(distributed: Optional[Union[bool, str]] = None, process_group: Any = None,
                      engine: Any = None) -> Communicator:
    """Pick how products are summed over ranks.

    ``distributed``: ``False`` single process; ``"torch"``/``"horovod"`` force one; ``None``/``True`` auto:
    the given ``process_group``, else the DeepSpeed engine's data-parallel group, else the default group if
    torch.distributed is initialised with more than one rank, else Horovod if initialised with more than one
    rank, else single process (``True`` then raises).
    """
    if distributed is False:
        return Communicator()
    import torch.distributed as dist

    dist_up = dist.is_available() and dist.is_initialized()
    if distributed == "horovod":
        hvd = _horovod_if_running()
        if hvd is None:
            import horovod.torch as hvd  # raises ImportError when Horovod is missing
        return _HorovodComm(hvd)
    if process_group is not None:
        return _TorchDistComm(process_group)
    if dist_up:
        group = getattr(engine, "data_parallel_group", None) if engine is not None else None
        comm = _TorchDistComm(group)
        if comm.world_size > 1 or distributed in (True, "torch"):
            return comm
    elif distributed == "torch":
        raise RuntimeError("distributed='torch' but torch.distributed is not initialised")
    if distributed != "torch":
        hvd = _horovod_if_running()
        if hvd is not None:
            return _HorovodComm(hvd)
    if distributed is True:
        raise RuntimeError("distributed=True but neither torch.distributed nor Horovod runs more than one rank")
    return Communicator()


# ----------------------------------------------------------------------------------------------------------
# the operator
# ----------------------------------------------------------------------------------------------------------
_BN_TYPES = (BatchNormBase,)
_DROPOUT_TYPES = (DropoutBase,)


class _FunctionalModel:
    """Callable standing in for the module under ``torch.func``: runs it with the given parameter tensors."""

    def __init__(self, module: nn.Module, params: Dict[str, torch.Tensor]):
        self.module, self.params = module, params

    def __call__(self, *args, **kwargs):
        return torch.func.functional_call(self.module, self.params, args, kwargs)


class HessianOperator:
    """``v -> H v`` for the mean loss of ``model`` over the data, w.r.t. the selected parameters.

    Args:
        model: an ``nn.Module``, a DeepSpeed engine (ZeRO 0/1/2: ``engine.module`` is used and the engine's
            data-parallel group sums the products) or a DDP wrapper.
        criterion: ``criterion(model(inputs), targets)`` -> scalar batch-mean loss, for batches
            ``(inputs, targets)``. Not needed with ``loss_fn``.
        data: one batch. ``dataloader``: an iterable of batches, re-iterated for every product.
            Distributed, each rank passes its own share.
        params: which parameters (see :func:`select_params`); default all with ``requires_grad``.
        loss_fn: ``loss_fn(model, batch)`` -> scalar batch-mean loss, for other batch layouts. Under
            ``backend="func"`` ``model`` is a callable that runs the module functionally: only call it.
        backend: ``"double"`` (default) or ``"func"``; ``"auto"`` = the default.
        bn_eval / dropout_eval: put BatchNorm / dropout layers in eval mode during the products (default
            both; PyHessian evaluates the whole model). Each module's mode is restored afterwards. With
            ``bn_eval=False`` BatchNorm in train mode uses batch statistics (per batch, per rank) and its
            running statistics are not updated.
        cache: keep the first-order graph of every batch for the whole algorithm call (``"double"`` only).
            Default: cache for ``data=`` (one batch), not for a loader.
        distributed / process_group: see :func:`make_communicator`.
        sync_buffers: distributed, use rank 0's buffers (BatchNorm running statistics) on every rank during the
            products, and put each rank's own back afterwards. Data-parallel engines (DeepSpeed, Horovod) keep
            the parameters equal but not the BN statistics, which each rank updates from its own batches; with
            this (default) the Hessian is the one of the model as rank 0 holds it, over the union of the data.
        batch_size_fn: ``batch -> number of samples`` (default :func:`batch_size_of`).
    """

    def __init__(self, model: Any, criterion: Optional[Callable] = None, data: Optional[Batch] = None,
                 dataloader: Optional[Iterable[Batch]] = None, *, params: Any = None,
                 loss_fn: Optional[LossFn] = None, backend: str = "auto", bn_eval: bool = True,
                 dropout_eval: bool = True, cache: Optional[bool] = None,
                 distributed: Optional[Union[bool, str]] = None, process_group: Any = None,
                 batch_size_fn: Optional[Callable[[Batch], int]] = None, device: Optional[torch.device] = None,
                 sync_buffers: bool = True):
        if (data is None) == (dataloader is None):
            raise ValueError("pass exactly one of data=(inputs, targets) or dataloader=")
        if criterion is None and loss_fn is None:
            raise ValueError("pass criterion= (loss = criterion(model(inputs), targets)) or loss_fn=")
        backend = DEFAULT_BACKEND if backend in (None, "auto") else backend
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS} or 'auto', got {backend!r}")
        self.module, self.engine = unwrap_model(model)
        self.names, self.params = select_params(self.module, params)
        self.criterion, self.loss_fn = criterion, loss_fn
        self.data, self.dataloader = data, dataloader
        self.backend = backend
        self.bn_eval, self.dropout_eval = bn_eval, dropout_eval
        self.cache = (data is not None) if cache is None else bool(cache)
        self.batch_size_fn = batch_size_fn or batch_size_of
        self.comm = make_communicator(distributed, process_group, self.engine)
        self.sync_buffers = sync_buffers
        self.device = torch.device(device) if device is not None else self.params[0].device
        self.dtype = torch.promote_types(torch.float32, self.params[0].dtype)
        for p in self.params[1:]:
            self.dtype = torch.promote_types(self.dtype, p.dtype)
        self.numels = [p.numel() for p in self.params]
        self.dim = sum(self.numels)
        self.num_samples: Optional[int] = None  # global, known after the first product
        self.num_products = 0
        self._session_depth = 0
        self._cache: Optional[List[Tuple[int, Sequence[Optional[torch.Tensor]]]]] = None

    # ----- flat <-> per-parameter
    def to_list(self, flat: torch.Tensor) -> List[torch.Tensor]:
        """Split a flat vector into tensors shaped (and typed) like the parameters."""
        out, o = [], 0
        for p, n in zip(self.params, self.numels):
            out.append(flat[o:o + n].view(p.shape).to(p.dtype))
            o += n
        return out

    def to_flat(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(tensors) != len(self.params):
            raise ValueError(f"expected {len(self.params)} tensors (one per parameter), got {len(tensors)}")
        return torch.cat([t.reshape(-1).to(self.device, self.dtype) for t in tensors])

    # ----- modes
    @contextlib.contextmanager
    def session(self) -> Iterator["HessianOperator"]:
        """Set BN/dropout modes (restored on exit) and keep cached graphs until exit. Re-entrant."""
        if self._session_depth:
            self._session_depth += 1
            try:
                yield self
            finally:
                self._session_depth -= 1
            return
        saved_modes = [(m, m.training) for m in self.module.modules()]
        saved_tracking = []
        for m in self.module.modules():
            if isinstance(m, _BN_TYPES) and self.bn_eval:
                m.eval()
            if isinstance(m, _DROPOUT_TYPES) and self.dropout_eval:
                m.eval()
            if isinstance(m, _BN_TYPES) and m.training:
                # batch statistics, running statistics left alone (and no in-place update under torch.func)
                saved_tracking.append((m, m.track_running_stats))
                m.track_running_stats = False
        saved_buffers = []
        self._session_depth = 1
        try:
            if self.sync_buffers and self.comm.world_size > 1:
                with torch.no_grad():
                    for b in self.module.buffers():
                        saved_buffers.append((b, b.clone()))
                        self.comm.broadcast_(b)
            yield self
        finally:
            self._session_depth = 0
            self._cache = None
            for m, training in saved_modes:
                m.training = training
            for m, tracking in saved_tracking:
                m.track_running_stats = tracking
            with torch.no_grad():
                for b, value in saved_buffers:
                    b.copy_(value)

    # ----- loss
    def _batches(self) -> Iterator[Batch]:
        if self.data is not None:
            yield self.data
        else:
            yield from self.dataloader

    def _loss(self, model: Callable[..., Any], batch: Batch) -> torch.Tensor:
        batch = _to_device(batch, self.device)
        if self.loss_fn is not None:
            loss = self.loss_fn(model, batch)
        else:
            inputs, targets = batch[0], batch[1]
            loss = self.criterion(model(inputs), targets)
        if loss.dim() != 0:
            raise ValueError(f"the loss must be a scalar (batch mean), got shape {tuple(loss.shape)}")
        return loss

    def _first_order(self, batch: Batch) -> Sequence[Optional[torch.Tensor]]:
        with torch.enable_grad():
            loss = self._loss(self.module, batch)
            return torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)

    def _double(self, grads: Sequence[Optional[torch.Tensor]], vs: List[torch.Tensor],
                retain: bool) -> List[Optional[torch.Tensor]]:
        outs, gouts = [], []
        for g, v in zip(grads, vs):
            if g is not None and g.requires_grad:
                outs.append(g)
                gouts.append(v)
        if not outs:  # the loss is at most linear in the parameters
            return [None] * len(self.params)
        return list(torch.autograd.grad(outs, self.params, gouts, retain_graph=retain, allow_unused=True))

    def _func(self, batch: Batch, vs: List[torch.Tensor]) -> List[Optional[torch.Tensor]]:
        from torch.func import grad, jvp

        primals = {n: p.detach() for n, p in zip(self.names, self.params)}
        tangents = dict(zip(self.names, vs))

        def f(pdict):
            return self._loss(_FunctionalModel(self.module, pdict), batch)

        _, hv = jvp(grad(f), (primals,), (tangents,))
        return [hv[n] for n in self.names]

    # ----- products
    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """``H v`` for a flat vector ``v`` (length :attr:`dim`); the same on every rank."""
        if v.shape != (self.dim,):
            raise ValueError(f"expected a flat vector of length {self.dim}, got shape {tuple(v.shape)}")
        with self.session():
            vs = self.to_list(v.to(self.device))
            acc = torch.zeros(self.dim + 1, dtype=self.dtype, device=self.device)  # last entry: sample count
            views, o = [], 0
            for n in self.numels:
                views.append(acc[o:o + n])
                o += n
            if self.backend == "double" and self.cache:
                if self._cache is None:
                    self._cache = [(self.batch_size_fn(b), self._first_order(b)) for b in self._batches()]
                items: Iterable[Tuple[int, Any]] = self._cache
            else:
                items = ((self.batch_size_fn(b), b) for b in self._batches())
            count = 0
            for n_b, item in items:
                if self.backend == "double":
                    grads = item if self.cache else self._first_order(item)
                    hv = self._double(grads, vs, retain=self.cache)
                else:
                    hv = self._func(item, vs)
                for view, h in zip(views, hv):
                    if h is not None:
                        view.add_(h.detach().reshape(-1).to(self.dtype), alpha=float(n_b))
                count += int(n_b)
            acc[-1] = count
            acc = self.comm.allreduce_sum(acc)
            total = int(round(float(acc[-1])))
            if total <= 0:
                raise ValueError("no samples: the data (on every rank) is empty")
            self.num_samples = total
            self.num_products += 1
            return acc[:-1] / total

    def hvp(self, v: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        """``H v`` for ``v`` given per parameter (PyHessian layout); returns tensors shaped like the params."""
        hv = self.matvec(self.to_flat(v))
        out, o = [], 0
        for p, n in zip(self.params, self.numels):
            out.append(hv[o:o + n].view(p.shape))
            o += n
        return out

    def dense(self) -> torch.Tensor:
        """The full ``dim x dim`` Hessian, column by column (small models and tests only)."""
        cols = []
        with self.session():
            for i in range(self.dim):
                e = torch.zeros(self.dim, dtype=self.dtype, device=self.device)
                e[i] = 1
                cols.append(self.matvec(e))
        return torch.stack(cols, dim=1)
