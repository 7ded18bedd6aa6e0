"""Argument names users bring from timm, DeepSpeed, apex and torch.optim, mapped onto ours (names only).

A name listed in ``renames`` becomes ours; a torch ``foreach=``/``fused=`` becomes ``backend``; a switch for
behaviour we do not have (``caution``, ``decoupled_decay``, ``amsgrad``, ...) is accepted only at the value
that equals ours and otherwise refused with one line; anything else gets "did you mean". See docs/migrating.md.
"""
from __future__ import annotations

import difflib
from typing import Any, Dict, Iterable, Tuple

# alias -> (our name, where it comes from)
LAMB_RENAMES: Dict[str, Tuple[str, str]] = {
    "max_coeff": ("max_trust_ratio", "DeepSpeed FusedLamb"),
    "min_coeff": ("min_trust_ratio", "DeepSpeed FusedLamb"),
    "use_nvlamb": ("always_adapt", "apex FusedLAMB"),
}
LARS_RENAMES: Dict[str, Tuple[str, str]] = {
    "trust_coeff": ("trust_coefficient", "timm Lars"),
    "eta": ("trust_coefficient", "LARS paper / MLPerf"),
}

# switches accepted at the value that means our behaviour; any other value is refused with the reason
_SAME_AS_OURS_IF: Dict[str, Tuple[Any, str]] = {
    "eps_inside_sqrt": (False, "DeepSpeed FusedLamb's eps under the square root has no equivalent (ours adds eps "
                               "outside it, as its default False does)"),
    "amsgrad": (False, "AMSGrad is not part of LAMB/LARS"),
    "caution": (False, "timm's cautious masking is not implemented"),
    "decoupled_decay": (False, "timm's decoupled_decay=True (p *= 1 - lr * wd outside the trust ratio) is not "
                               "implemented; its default False is our adam_w_mode=True"),
    "corrected_weight_decay": (False, "timm's corrected_weight_decay is not implemented"),
    "maximize": (False, "maximize=True is not supported: negate the loss"),
    "capturable": (False, "capturable is a torch CUDA-graph switch; our steps never sync the host"),
    "differentiable": (False, "differentiable optimizer steps are not supported"),
    # a config key of ds_conadv.initialize, which has the model; a DeepSpeed-built optimizer gets only its params
    "exclude_norm_and_bias": (False, "the norm/bias split needs the model: pass model_parameters=param_groups(model, "
                                     "weight_decay) to deepspeed.initialize, or use ds_conadv.initialize, which "
                                     "reads this key"),
}


def _backend_from_torch(cls_name: str, foreach: Any, fused: Any) -> Any:
    """torch's ``foreach=``/``fused=`` as our ``backend`` (None: not given)."""
    if foreach and fused:
        raise ValueError(f"{cls_name}: foreach=True and fused=True cannot both be set (as in torch.optim)")
    if fused:
        return "auto"            # the fused kernels for the params' device
    if foreach:
        return "foreach"         # torch._foreach_* ops
    if foreach is False:
        return "reference"       # one tensor at a time
    if fused is False:
        return "foreach"
    return None


def resolve(cls_name: str, args: Dict[str, Any], extra: Dict[str, Any], renames: Dict[str, Tuple[str, str]],
            defaults: Dict[str, Any]) -> Dict[str, Any]:
    """``args`` (the constructor's own arguments) updated from ``extra`` (the other keywords given).

    ``defaults`` are the constructor's defaults: an alias may only fill an argument left at its default."""
    args = dict(args)
    extra = dict(extra)

    def assign(target: str, value: Any, alias: str) -> None:
        if args[target] != defaults[target] and args[target] != value:
            raise ValueError(f"{cls_name}: {alias}={value!r} is another name for {target}, which is also given "
                             f"({target}={args[target]!r}): give one of them")
        args[target] = value

    foreach, fused = extra.pop("foreach", None), extra.pop("fused", None)
    backend = _backend_from_torch(cls_name, foreach, fused)
    if backend is not None:
        assign("backend", backend, "foreach" if foreach is not None else "fused")
    for alias in [k for k in extra if k in renames]:
        assign(renames[alias][0], extra.pop(alias), alias)
    for key in [k for k in extra if k in _SAME_AS_OURS_IF]:
        value = extra.pop(key)
        same, reason = _SAME_AS_OURS_IF[key]
        if value != same:
            raise ValueError(f"{cls_name}: {key}={value!r}: {reason}")
    if extra:
        key = next(iter(extra))
        hint = did_you_mean(key, list(args) + list(renames) + ["foreach", "fused"])
        for alias, (ours, origin) in renames.items():
            hint = hint.replace(f"{alias!r}?", f"{ours!r} ({origin}: {alias!r})?")
        raise TypeError(f"{cls_name} got an unexpected keyword argument {key!r}; {hint}")
    return args


def did_you_mean(key: str, allowed: Iterable[str]) -> str:
    allowed = sorted(set(allowed))
    close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
    return f"did you mean {close[0]!r}?" if close else f"allowed: {', '.join(allowed)}"
