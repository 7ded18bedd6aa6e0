"""Validated configuration for ds_conadv's JSON sections, in DeepSpeed's style (pydantic models).

* ``"conadv": {...}`` — a top-level section next to DeepSpeed's own (DeepSpeed ignores unknown top-level
  keys, so we validate it ourselves);
* ``"optimizer": {"type": "LAMB" | "LARS", "params": {...}}`` — the params are checked against the
  optimizer's own signature, so the allowed keys are exactly the optimizer's arguments.

Every error names the section, the bad key or value, and what is allowed.
"""
from __future__ import annotations

import inspect
from typing import Any, ClassVar, Dict, List, Literal, Optional, Tuple, Type

from pydantic import (BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator,
                      model_validator)


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
    """The ``"conadv"`` section: concurrent adversarial learning (Liu et al., ICLR 2022). See docs/conadv.md.

    Cross-field rules are checked per key (the error names the key that breaks the rule), at construction
    and again on assignment.
    """

    section_name: ClassVar[str] = "conadv"
    # -- switch and schedule ------------------------------------------------------------------------------
    enabled: bool = False
    tau: int = Field(1, ge=0, description="staleness in steps; 0 = DisAdv (sequential)")
    start_epoch: int = Field(0, ge=0, description="first epoch with adversarial examples")
    stop_epoch: Optional[int] = Field(None, ge=1, description="first epoch without them; null = never stop")
    # -- loss -------------------------------------------------------------------------------------------------
    loss_mode: Literal["clean+adv", "adv"] = "clean+adv"
    adv_weight: float = Field(1.0, ge=0.0, allow_inf_nan=False)
    loss_reduction: Literal["sum", "mean"] = Field(
        "sum", description='"sum": clean + adv_weight * adv (the paper); "mean": the same divided by 1 + adv_weight')
    dual_bn: bool = Field(True, validate_default=True)
    # -- attack -------------------------------------------------------------------------------------------
    attack: Literal["fgsm", "pgd"] = "fgsm"
    epsilon: Optional[float] = Field(None, gt=0.0, allow_inf_nan=False, validate_default=True)
    step_size: Optional[float] = Field(None, gt=0.0, allow_inf_nan=False)
    steps: int = Field(1, ge=1)
    random_start: bool = False
    random_start_prob: Optional[float] = Field(None, ge=0.0, le=1.0)
    target: Literal["untargeted", "random"] = "untargeted"
    # -- what is perturbed, and its valid range ---------------------------------------------------------------
    perturb: Literal["inputs", "embeddings"] = "inputs"
    embedding_module: Optional[str] = Field(None, min_length=1, validate_default=True)
    input_range: Optional[Tuple[float, float]] = None
    mean: Optional[List[float]] = Field(None, min_length=1)
    std: Optional[List[float]] = Field(None, min_length=1, validate_default=True)
    update_bn_stats_in_generation: bool = False

    # ---- resolved values ------------------------------------------------------------------------------------
    @property
    def effective_step_size(self) -> Optional[float]:
        """``step_size``, or ``epsilon`` when it is not given."""
        return self.step_size if self.step_size is not None else self.epsilon

    @property
    def effective_random_start_prob(self) -> float:
        """Per-sample probability of a random start: 0 without random_start, else random_start_prob or 1."""
        if not self.random_start:
            return 0.0
        return 1.0 if self.random_start_prob is None else self.random_start_prob

    # ---- cross-field rules ------------------------------------------------------------------------------
    @staticmethod
    def _rule(key: str, value: Any, data: Dict[str, Any]) -> Optional[str]:
        """The violated rule for ``key`` given the other (already valid) fields in ``data``, or None."""
        get = data.get
        if key == "steps" and get("attack") == "fgsm" and value != 1:
            return 'attack "fgsm" takes exactly 1 step (allowed: 1); use attack "pgd" for more steps'
        if key == "step_size" and get("attack") == "fgsm" and value is not None and get("epsilon") is not None \
                and value != get("epsilon"):
            return ('attack "fgsm" steps by epsilon (allowed: null or the value of "epsilon"); use attack "pgd" '
                    'with steps 1 for another step size')
        if key == "random_start" and get("attack") == "fgsm" and value:
            return 'attack "fgsm" has no random start (allowed: false); use attack "pgd" with steps 1 for one'
        if key == "random_start_prob" and value is not None and not get("random_start", False):
            return 'only applies with "random_start": true (allowed: null when random_start is false)'
        if key == "stop_epoch" and value is not None and get("start_epoch") is not None \
                and value <= get("start_epoch"):
            return f'must be greater than "start_epoch" ({get("start_epoch")}), or null (never stop)'
        if key == "dual_bn" and get("loss_mode") == "adv" and value:
            return ('loss_mode "adv" trains the adversarial branch only, so a main BN would never be trained '
                    '(evaluation uses it); allowed: false with loss_mode "adv"')
        if key == "epsilon" and value is None and get("enabled"):
            return 'is required when "enabled" is true (a positive number, in pixel units when mean/std are given)'
        if key == "embedding_module":
            if get("perturb") == "embeddings" and value is None:
                return 'is required when "perturb" is "embeddings" (the dotted name of the embedding module)'
            if get("perturb") == "inputs" and value is not None:
                return 'only applies with "perturb": "embeddings" (allowed: null with perturb "inputs")'
        if key in ("input_range", "mean", "std") and value is not None and get("perturb") == "embeddings":
            return 'does not apply with "perturb": "embeddings" (only the epsilon-ball; allowed: null)'
        if key == "input_range" and value is not None and not value[0] < value[1]:
            return "must be [lo, hi] with lo < hi"
        if key == "std":
            mean = get("mean")
            if (mean is None) != (value is None):
                return '"mean" and "std" go together: give both or neither'
            if value is not None and mean is not None:
                if len(value) != len(mean):
                    return f'must have as many entries as "mean" ({len(mean)})'
                if any(not (v > 0) for v in value):
                    return "entries must be > 0"
        return None

    @field_validator("steps", "step_size", "random_start", "random_start_prob", "stop_epoch", "dual_bn", "epsilon",
                     "embedding_module", "input_range", "mean", "std")
    @classmethod
    def _check_field(cls, value, info: ValidationInfo):
        message = cls._rule(str(info.field_name), value, info.data)
        if message:
            raise ValueError(message)
        return value

    def __setattr__(self, name: str, value: Any) -> None:
        # pydantic stores an assigned value before the model validator runs: undo it when a rule rejects it
        had = name in self.__dict__
        old = self.__dict__.get(name)
        try:
            super().__setattr__(name, value)
        except ValidationError:
            if had:
                self.__dict__[name] = old
            raise

    @model_validator(mode="after")
    def _check_all(self):
        # construction already checked each key against the earlier ones; an assignment may break a rule of
        # another key, so check all of them again against the whole model
        data = dict(self.__dict__)
        for key in ("steps", "step_size", "random_start", "random_start_prob", "stop_epoch", "dual_bn", "epsilon",
                    "embedding_module", "input_range", "mean", "std"):
            message = self._rule(key, data[key], data)
            if message:
                raise ValueError(f'"{self.section_name}.{key}" = {data[key]!r}: {message}')
        return self


# ----------------------------------------------------------------------------------------------------------
# "optimizer": {"type": "LAMB" | "LARS", "params": {...}}
# ----------------------------------------------------------------------------------------------------------
#: keys of ``optimizer.params`` that are not optimizer arguments but select params (see
#: :func:`ds_conadv.config.builders.build_optimizer`)
GROUPING_KEYS = ("exclude_norm_and_bias",)


def optimizer_class(type_name: str):
    """Our optimizer class for a config ``type`` (case-insensitive): ``"LAMB"``/``"LARS"`` or the names registered
    in ``torch.optim`` (``"ds_conadv.LAMB"``, which mean ours under plain ``deepspeed.initialize`` too); ``None``
    for DeepSpeed's own types."""
    from ds_conadv.optim import LAMB, LARS, TORCH_OPTIM_NAMES

    names = {"lamb": LAMB, "lars": LARS, **{n.lower(): cls for n, cls in TORCH_OPTIM_NAMES.items()}}
    return names.get(str(type_name).lower())


def optimizer_arguments(cls) -> Dict[str, inspect.Parameter]:
    sig = inspect.signature(cls.__init__)
    return {n: p for n, p in sig.parameters.items() if n not in ("self", "params")
            and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def validate_optimizer_params(cls, params: Optional[Dict[str, Any]]) -> Tuple[dict, dict]:
    """Split and check ``optimizer.params``: (optimizer kwargs, grouping options). Types are checked by
    building the optimizer (its own validation names the key); unknown keys are rejected here."""
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise ConfigError(f'"optimizer.params" = {params!r}: must be a JSON object (e.g. {{"lr": 0.1}}), '
                          f"got {type(params).__name__}")
    params = dict(params)
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


# ----------------------------------------------------------------------------------------------------------
# "train": the main job's own section (ds-conadv train); "_comment" keys
# ----------------------------------------------------------------------------------------------------------
#: a key that starts with this is a comment, at any depth of a config file (see :func:`strip_comments`)
COMMENT_PREFIX = "_comment"


def strip_comments(value: Any) -> Any:
    """A copy of a parsed JSON config without its comment keys: every object key that starts with ``"_comment"``
    (``"_comment"``, ``"_comment_lr"``, ...), at any depth. JSON has no comments, and DeepSpeed's own pydantic
    sections (like ours) reject unknown keys, so comments are removed before any validation; any other key that
    starts with ``_`` is still an unknown key."""
    if isinstance(value, dict):
        return {k: strip_comments(v) for k, v in value.items()
                if not (isinstance(k, str) and k.startswith(COMMENT_PREFIX))}
    if isinstance(value, list):
        return [strip_comments(v) for v in value]
    return value


class TrainConfig(SectionModel):
    """The ``"train"`` section of ``ds-conadv train`` (the main job); see docs/index.md.

    Everything about the optimizer, LR schedule, batch size, ZeRO and precision is DeepSpeed's (or our
    ``"optimizer"``) section; this one holds what the job itself decides: data, model, epochs, evaluation and
    outputs. ``model: "resnet50"`` with ``data: "imagenet"`` is accepted so that the 96K recipe config validates,
    but the job only runs the bundled data set (``"digits"``, with ``model: "cnn"``).
    """

    section_name: ClassVar[str] = "train"
    # -- data and model ---------------------------------------------------------------------------------------
    data: Literal["digits", "imagenet"] = "digits"
    model: Literal["cnn", "resnet50"] = Field("cnn", validate_default=True)
    width: int = Field(32, ge=1, description="channels of the CNN's first conv layer (doubled by each next one)")
    test_fraction: float = Field(0.2, gt=0.0, lt=1.0, description="digits: share held out for the test set")
    split_seed: int = Field(0, ge=0, description="digits: seed of the fixed, stratified train/test split")
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    # -- length -------------------------------------------------------------------------------------------------
    epochs: int = Field(30, ge=1)
    max_steps: Optional[int] = Field(None, ge=1, description="stop after this many optimizer steps (null: epochs)")
    seed: int = Field(0, ge=0, description="model init, data order (same on every rank) and attack randomness")
    # -- evaluation and outputs --------------------------------------------------------------------------------
    eval_every: int = Field(5, ge=1, description="epochs between test-set evaluations (the last epoch always)")
    out_dir: Optional[str] = Field(None, min_length=1, description="null: runs/<config name>-<timestamp>")
    print_every: int = Field(0, ge=0, description="steps between text log lines on rank 0 (0: progress bar only)")
    threads: Optional[int] = Field(None, ge=1, description="torch threads per rank; null: cores / local ranks")

    @field_validator("model")
    @classmethod
    def _model_fits_data(cls, value, info: ValidationInfo):
        data = info.data.get("data")
        fits = {"digits": "cnn", "imagenet": "resnet50"}
        if data in fits and value != fits[data]:
            raise ValueError(f'data "{data}" goes with model "{fits[data]}" (allowed: "{fits[data]}")')
        return value
