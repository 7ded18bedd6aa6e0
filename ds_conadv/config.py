"""Validated configuration for ds_conadv's JSON sections, in DeepSpeed's style (pydantic models).

* ``"conadv": {...}`` — a top-level section next to DeepSpeed's own (DeepSpeed ignores unknown top-level
  keys, so we validate it ourselves);
* ``"optimizer": {"type": "LAMB" | "LARS", "params": {...}}`` — the params are checked against the
  optimizer's own signature, so the allowed keys are exactly the optimizer's arguments.

Every error names the section, the bad key or value, and what is allowed.
"""
from __future__ import annotations

import inspect
from typing import Any, ClassVar, Dict, Optional, Tuple, Type

from pydantic import BaseModel, ConfigDict, ValidationError


class ConfigError(ValueError):
    """A ds_conadv config section is invalid; the message names the key and the allowed values."""


def _format_errors(section: str, model: Type[BaseModel], err: ValidationError) -> str:
    allowed = ", ".join(model.model_fields)
    lines = []
    for e in err.errors():
        key = ".".join(str(x) for x in e["loc"]) or "<section>"
        if e["type"] == "extra_forbidden":
            lines.append(f'unknown key "{key}" in "{section}"; allowed keys: {allowed}')
        else:
            lines.append(f'"{section}.{key}" = {e.get("input")!r}: {e["msg"]}')
    return "; ".join(lines)


class SectionModel(BaseModel):
    """Base of our config sections: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=False)
    section_name: ClassVar[str] = "section"

    @classmethod
    def from_section(cls, value: Optional[Dict[str, Any]]):
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(f'"{cls.section_name}" must be a JSON object, got {type(value).__name__}')
        try:
            return cls(**value)
        except ValidationError as err:
            raise ConfigError(_format_errors(cls.section_name, cls, err)) from None


class ConAdvConfig(SectionModel):
    """The ``"conadv"`` section. Its training fields arrive with the ConAdv engine; ``enabled`` exists now."""

    section_name: ClassVar[str] = "conadv"
    enabled: bool = False


# ----------------------------------------------------------------------------------------------------------
# "optimizer": {"type": "LAMB" | "LARS", "params": {...}}
# ----------------------------------------------------------------------------------------------------------
#: keys of ``optimizer.params`` that are not optimizer arguments but select params (see ``build_optimizer``)
GROUPING_KEYS = ("exclude_norm_and_bias",)


def optimizer_class(type_name: str):
    """Our optimizer class for a config ``type`` (case-insensitive), or ``None`` for DeepSpeed's own types."""
    from ds_conadv.optim import LAMB, LARS

    return {"lamb": LAMB, "lars": LARS}.get(str(type_name).lower())


def optimizer_arguments(cls) -> Dict[str, inspect.Parameter]:
    sig = inspect.signature(cls.__init__)
    return {n: p for n, p in sig.parameters.items() if n not in ("self", "params")
            and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def validate_optimizer_params(cls, params: Optional[Dict[str, Any]]) -> Tuple[dict, dict]:
    """Split and check ``optimizer.params``: (optimizer kwargs, grouping options). Types are checked by
    building the optimizer (its own validation names the key); unknown keys are rejected here."""
    params = dict(params or {})
    if not isinstance(params, dict):
        raise ConfigError(f'"optimizer.params" must be a JSON object, got {type(params).__name__}')
    allowed = optimizer_arguments(cls)
    grouping = {k: params.pop(k) for k in GROUPING_KEYS if k in params}
    unknown = [k for k in params if k not in allowed]
    if unknown:
        raise ConfigError(f'unknown key "{unknown[0]}" in "optimizer.params" for type {cls.__name__}; allowed keys: '
                          f'{", ".join(list(allowed) + list(GROUPING_KEYS))}')
    if "betas" in params and isinstance(params["betas"], list):
        params["betas"] = tuple(params["betas"])
    for key, value in grouping.items():
        if not isinstance(value, bool):
            raise ConfigError(f'"optimizer.params.{key}" = {value!r}: must be true or false')
    return params, grouping
