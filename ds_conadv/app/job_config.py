"""The job config of ``ds-conadv train`` (and ``ds-conadv hessian``): one JSON file holding DeepSpeed's config, our
``"optimizer"``, ``"conadv"``, ``"absa"`` and the job's own ``"train"`` section. Embedded configs, overrides from the
command line, validation (:class:`ResolvedConfig`)."""
from __future__ import annotations

import copy
import json
from importlib import resources
from typing import Any, Dict, List, Optional, Tuple

import torch

from ds_conadv.config.builders import AUTO as _AUTO
from ds_conadv.config.builders import optimizer_spec, scheduler_factory
from ds_conadv.config.sections import ConAdvConfig, ConfigError, TrainConfig, strip_comments
from ds_conadv.integrations.deepspeed import compat

__all__ = ["DEFAULT_CONFIG_NAME", "OPTIMIZER_CONFIGS", "embedded_config_names", "load_embedded", "load_config_file",
           "apply_overrides", "ResolvedConfig", "validate_config", "check_runnable"]

#: the embedded default of ``ds-conadv train`` (inside the package, and as configs/conadv_digits.json)
DEFAULT_CONFIG_NAME = "conadv_digits.json"
#: the embedded config per optimizer type, used when ``--optimizer`` switches the type of a config
OPTIMIZER_CONFIGS = {"lars": "conadv_digits.json", "lamb": "conadv_digits_lamb.json"}


# ----------------------------------------------------------------------------------------------------------
# config: load, override, validate
# ----------------------------------------------------------------------------------------------------------
def embedded_config_names() -> List[str]:
    return sorted(p.name for p in resources.files("ds_conadv").joinpath("configs").iterdir()
                  if p.name.endswith(".json"))


def load_embedded(name: str = DEFAULT_CONFIG_NAME) -> Dict[str, Any]:
    """A config shipped inside the package (``ds_conadv/configs/<name>``), as parsed JSON."""
    path = resources.files("ds_conadv").joinpath("configs", name)
    if not path.is_file():
        raise ConfigError(f"no embedded config {name!r}; embedded: {', '.join(embedded_config_names())}")
    return json.loads(path.read_text(encoding="utf-8"))


def load_config_file(path: str) -> Dict[str, Any]:
    """Parse a config file (JSON; hjson as DeepSpeed accepts it)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e}") from e
    if not text.strip():
        raise ConfigError(f"config {path} is empty: expected one JSON object (DeepSpeed's keys plus the "
                          '"optimizer", "conadv" and "train" sections; see configs/conadv_digits.json)')
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        try:
            import hjson

            data = hjson.loads(text)
        except Exception:
            raise ConfigError(f"{path}: invalid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text  # a bare string


def apply_overrides(cfg: Dict[str, Any], *, mode: Optional[str] = None, epochs: Optional[int] = None,
                    optimizer: Optional[str] = None, zero_stage: Optional[int] = None, out_dir: Optional[str] = None,
                    seed: Optional[int] = None, max_steps: Optional[int] = None,
                    sets: Optional[List[str]] = None) -> Tuple[Dict[str, Any], List[str]]:
    """The command-line overrides on a copy of ``cfg``; returns (config, notes for the user)."""
    cfg = copy.deepcopy(cfg)
    notes: List[str] = []
    train = cfg.setdefault("train", {})
    if not isinstance(train, dict):
        raise ConfigError(f'"train" must be a JSON object, got {type(train).__name__}')
    if optimizer is not None:
        current = str((cfg.get("optimizer") or {}).get("type", "")).lower()
        if current != optimizer.lower():
            # the params (and the peak LR in the scheduler) belong to the type: take both from the embedded
            # config of that optimizer
            other = load_embedded(OPTIMIZER_CONFIGS[optimizer.lower()])
            cfg["optimizer"] = other["optimizer"]
            if "scheduler" in other:
                cfg["scheduler"] = other["scheduler"]
            for key in ("gradient_clipping",):
                if key in other:
                    cfg[key] = other[key]
            notes.append(f"--optimizer {optimizer}: optimizer, scheduler and gradient_clipping taken from the "
                         f"embedded {OPTIMIZER_CONFIGS[optimizer.lower()]}")
    if mode is not None:
        conadv = cfg.setdefault("conadv", {})
        if mode == "vanilla":
            conadv["enabled"] = False
        else:
            conadv["enabled"] = True
            tau = conadv.get("tau", 1)
            conadv["tau"] = 0 if mode == "disadv" else (tau if isinstance(tau, int) and tau >= 1 else 1)
    if zero_stage is not None:
        zero = cfg.setdefault("zero_optimization", {})
        if not isinstance(zero, dict):
            raise ConfigError('"zero_optimization" must be a JSON object')
        zero["stage"] = int(zero_stage)
    for key, value in (("epochs", epochs), ("out_dir", out_dir), ("seed", seed), ("max_steps", max_steps)):
        if value is not None:
            train[key] = value
    for item in sets or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY.PATH=VALUE (VALUE as JSON, e.g. train.epochs=3)")
        path, value = item.split("=", 1)
        keys = [k for k in path.split(".") if k]
        if not keys:
            raise ConfigError(f"--set {item!r}: empty key")
        node = cfg
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {k!r} is not a JSON object in the config")
        node[keys[-1]] = _parse_value(value)
    return cfg, notes


class ResolvedConfig:
    """A validated config: ``raw`` (comments stripped, overrides applied), ``train``, ``conadv``, and
    ``deepspeed`` (what goes to ``ds_conadv.initialize``: everything but ``"train"``)."""

    def __init__(self, raw: Dict[str, Any], train: TrainConfig, conadv: ConAdvConfig):
        self.raw = raw
        self.train = train
        self.conadv = conadv

    @property
    def deepspeed(self) -> Dict[str, Any]:
        cfg = copy.deepcopy(self.raw)
        cfg.pop("train", None)
        return cfg

    @property
    def optimizer_type(self) -> str:
        return str((self.raw.get("optimizer") or {}).get("type", "?"))

    @property
    def absa_enabled(self) -> bool:
        section = self.raw.get("absa")
        return isinstance(section, dict) and bool(section.get("enabled", False))

    @property
    def mode(self) -> str:
        if self.absa_enabled:
            return "absa"
        if not self.conadv.enabled:
            return "vanilla"
        return "disadv" if self.conadv.tau == 0 else "conadv"


def _validate_scheduler(section: Any) -> None:
    if section is None:
        return
    if not isinstance(section, dict):
        raise ConfigError(f'"scheduler" must be a JSON object, got {type(section).__name__}')
    compat.quiet_import()
    params = section.get("params") or {}
    if not isinstance(params, dict):
        raise ConfigError('"scheduler.params" must be a JSON object')
    for key, value in params.items():
        if value == _AUTO and key != "total_num_steps":
            raise ConfigError(f'"scheduler.params.{key}" = "auto": only total_num_steps may be "auto"')
    from ds_conadv.config.schedulers import scheduler_class

    if scheduler_class(section.get("type")) is not None:  # ours: keys and values checked (DeepSpeed's at build)
        probe = dict(section, params={k: (1 if v == _AUTO else v) for k, v in params.items()})
        scheduler_factory(probe)


def validate_config(cfg: Dict[str, Any], check_deepspeed: bool = True,
                    world_size: Optional[int] = None) -> ResolvedConfig:
    """Validate a whole job config: comments stripped, then our sections (``train``, ``conadv``, our optimizer
    types' params, our scheduler types) with their models. Errors name the key and the allowed keys.
    ``check_deepspeed`` also runs DeepSpeed's own checks (:func:`compat.check_config`: its pydantic sections,
    unknown top-level keys, ``gradient_clipping``); with ``world_size`` the batch keys are checked for that many
    ranks."""
    if not isinstance(cfg, dict):
        raise ConfigError(f"a config is a JSON object, got {type(cfg).__name__}")
    raw = strip_comments(cfg)
    train = TrainConfig.from_section(raw.get("train"))
    conadv = ConAdvConfig.from_section(raw.get("conadv"))
    if conadv.enabled and conadv.start_epoch >= train.epochs:
        raise ConfigError(f'"conadv.start_epoch" = {conadv.start_epoch} with "train.epochs" = {train.epochs}: no '
                          "epoch would have adversarial examples; give a start epoch below the epochs, or "
                          '"conadv.enabled": false (--mode vanilla)')
    if raw.get("absa") is not None:
        from ds_conadv.absa.policy import ABSAConfig

        if ABSAConfig.from_section(raw.get("absa")).enabled:  # the rest (batch sizes, conadv) at initialize
            params = (raw.get("scheduler") or {}).get("params") if isinstance(raw.get("scheduler"), dict) else None
            if isinstance(params, dict) and params.get("total_num_steps") == _AUTO:
                raise ConfigError('"scheduler.params.total_num_steps" = "auto" with "absa.enabled": an ABSA run has '
                                  "no step count known in advance (its epochs shrink as the batch grows): give a "
                                  "number")
    section = raw.get("optimizer")
    if section is None:
        raise ConfigError('an "optimizer" section is required, e.g. {"type": "LARS", "params": {...}}')
    if not isinstance(section, dict):
        raise ConfigError(f'"optimizer" must be a JSON object, got {type(section).__name__}')
    spec = optimizer_spec(section)  # the one builder's checks; None for DeepSpeed's own types
    if spec is not None:
        try:  # types and ranges: the optimizer's own checks, on a dummy parameter
            kwargs = {k: v for k, v in spec.kwargs.items() if k != "backend"}
            if spec.max_grad_norm is not None:
                kwargs["max_grad_norm"] = spec.max_grad_norm
            spec.cls([torch.nn.Parameter(torch.zeros(1))], **kwargs)
        except (TypeError, ValueError) as e:
            raise ConfigError(f'"optimizer.params" for type {spec.cls.__name__}: {e}') from None
    _validate_scheduler(raw.get("scheduler"))
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        value = raw.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f'"{key}" = {value!r}: must be a positive integer')
    if check_deepspeed:
        _check_with_deepspeed(raw, world_size)
    return ResolvedConfig(raw, train, conadv)


#: the top-level sections ds_conadv reads (DeepSpeed reads the rest; "optimizer" is both)
OUR_SECTIONS = ("train", "conadv", "absa", "optimizer")


def _check_with_deepspeed(raw: Dict[str, Any], world_size: Optional[int]) -> None:
    """DeepSpeed's own sections and unknown top-level keys (one line each, before any rank starts); the batch
    keys against the number of ranks when it is known."""
    compat.quiet_import()
    compat.check_config(raw, ours=OUR_SECTIONS)
    if world_size is not None:
        from ds_conadv.app.horovod_train import resolve_batch

        resolve_batch(raw, world_size)  # DeepSpeed's rule train_batch_size = micro x accumulation x ranks


def check_runnable(resolved: ResolvedConfig, backend: str = "deepspeed") -> None:
    """Valid configs that the job cannot run here (the 96K recipe, a missing package of the ``train`` extra) fail
    early, with the reason, before any rank starts (not at the plot, after training)."""
    import importlib.util

    needed = {"sklearn": "scikit-learn", "matplotlib": "matplotlib"}
    if backend == "deepspeed":
        needed["deepspeed"] = "deepspeed"
    missing = [package for module, package in needed.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise ConfigError(f"ds-conadv train needs {', '.join(missing)}, not installed here: "
                          "pip install 'ds_conadv[train]' (or the packages themselves)")
    if resolved.train.data != "digits" or resolved.train.model != "cnn":
        raise ConfigError(f'"train.data" = "{resolved.train.data}" with "train.model" = "{resolved.train.model}": '
                          "a valid config, but it documents a recipe: ds-conadv train only runs the bundled "
                          'data set ("data": "digits" with "model": "cnn")')
