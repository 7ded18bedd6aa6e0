"""ds_conadv's configuration: the JSON sections (:mod:`.sections`: ``"conadv"``, ``"train"``, ``"optimizer"``
params), the one optimizer builder and scheduler factory every path uses (:mod:`.builders`), and the LR schedules
DeepSpeed lacks (:mod:`.schedulers`, imported on first use: it imports DeepSpeed)."""
from .builders import (OptimizerSpec, build_optimizer, build_scheduler, optimizer_params, optimizer_spec,
                       resolve_clipping, scheduler_factory)
from .sections import (COMMENT_PREFIX, GROUPING_KEYS, ConAdvConfig, ConfigError, SectionModel, TrainConfig,
                       optimizer_arguments, optimizer_class, strip_comments, validate_optimizer_params)

__all__ = ["ConfigError", "SectionModel", "ConAdvConfig", "TrainConfig", "GROUPING_KEYS", "COMMENT_PREFIX",
           "optimizer_class", "optimizer_arguments", "validate_optimizer_params", "strip_comments", "OptimizerSpec",
           "optimizer_spec", "optimizer_params", "build_optimizer", "resolve_clipping", "scheduler_factory",
           "build_scheduler"]
