"""Old import path of the main job ``ds-conadv train``: now :mod:`ds_conadv.app.train` (the run),
:mod:`ds_conadv.app.job_config` (its config) and :mod:`ds_conadv.app.common` (data, model, evaluation, plots)."""
from ds_conadv.app.common import (DigitsCNN, Normalize, _distributed, _fmt, _quiet_deepspeed_import,
                                  attack_description, default_out_dir, describe_mode, evaluate, load_digits,
                                  plot_curves, rank_batches)
from ds_conadv.app.job_config import (DEFAULT_CONFIG_NAME, OPTIMIZER_CONFIGS, ResolvedConfig, apply_overrides,
                                      check_runnable, embedded_config_names, load_config_file, load_embedded,
                                      validate_config)
from ds_conadv.app.train import CSV_FIELDS, prepare_data, run

__all__ = ["DEFAULT_CONFIG_NAME", "check_runnable", "embedded_config_names", "load_embedded", "load_config_file",
           "apply_overrides", "validate_config", "ResolvedConfig", "run", "DigitsCNN", "Normalize", "load_digits",
           "rank_batches", "evaluate", "plot_curves", "OPTIMIZER_CONFIGS", "CSV_FIELDS", "prepare_data",
           "attack_description", "default_out_dir", "describe_mode", "_distributed", "_fmt", "_quiet_deepspeed_import"]
