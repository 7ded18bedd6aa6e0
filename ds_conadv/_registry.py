"""Hooks that integrations register with the library core, so that the core never imports an integration.

:func:`register_wrapper_resolver`: an optimizer wrapper (DeepSpeed ZeRO, fp16/bf16) may replace a
:class:`~ds_conadv.optim.TrustRatioOptimizer`'s params by flat buffers; at its first step the optimizer asks each
registered resolver to find the wrapper and attach (give it segment layouts). A resolver returns ``None`` (no
wrapper of its kind holds the optimizer), ``"step"`` (attached, step normally) or ``"init_only"`` (attached; this
call only creates the optimizer state). The DeepSpeed resolver is registered lazily by :mod:`ds_conadv` (it runs
only when ``deepspeed`` has been imported), so a LAMB/LARS handed to plain ``deepspeed.initialize`` attaches itself
without the user importing the integration.
"""

from __future__ import annotations

from typing import Any, Callable, List, Optional

WrapperResolver = Callable[[Any], Optional[str]]

_WRAPPER_RESOLVERS: List[WrapperResolver] = []


def register_wrapper_resolver(resolver: WrapperResolver) -> WrapperResolver:
    """Add ``resolver`` (idempotent); returns it, so it can be used as a decorator."""
    if resolver not in _WRAPPER_RESOLVERS:
        _WRAPPER_RESOLVERS.append(resolver)
    return resolver


def wrapper_resolvers() -> List[WrapperResolver]:
    return list(_WRAPPER_RESOLVERS)
