"""DeepSpeed integration: JSON-selected LAMB/LARS, exact per-tensor trust ratios under ZeRO, the ConAdv and ABSA
engines.

* :mod:`.initialize` — ``initialize`` (drop-in for ``deepspeed.initialize``), ``load_config``, ``validate_config``;
* :mod:`.zero_layout` — ``attach`` / ``auto_attach``: segment layouts from ZeRO's partitions;
* :mod:`.engine` — ``DeepSpeedConAdvEngine`` (and the delegation base of the engines);
* :mod:`.compat` — the only module that reads or patches DeepSpeed's private internals, with the supported range.

Importing this package does not import DeepSpeed.
"""
from .initialize import initialize, load_config, validate_config
from .zero_layout import _find_trust_optimizer as _find_trust_optimizer  # the old private name (test workers)
from .zero_layout import attach, auto_attach, find_trust_optimizer

__all__ = ["initialize", "attach", "auto_attach", "load_config", "validate_config", "find_trust_optimizer",
           "DeepSpeedConAdvEngine"]


def __getattr__(name):
    if name == "DeepSpeedConAdvEngine":
        from .engine import DeepSpeedConAdvEngine

        return DeepSpeedConAdvEngine
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
