"""Bad configs are refused before any rank starts, each with one line naming the key and what is allowed:
the job's validation (ds-conadv train, --print-config) and ds_conadv.initialize's, for our sections and for
DeepSpeed's own."""
from __future__ import annotations

import copy
import math
import re

import pytest

pytest.importorskip("deepspeed", reason="DeepSpeed is not installed")

from ds_conadv.app import job_config  # noqa: E402
from ds_conadv.config.sections import ConfigError  # noqa: E402
from ds_conadv.integrations.deepspeed import validate_config as initialize_validate_config  # noqa: E402

BASE = job_config.load_embedded(job_config.DEFAULT_CONFIG_NAME)


def _with(path, value):
    cfg = copy.deepcopy(BASE)
    node = cfg
    keys = path.split(".")
    for k in keys[:-1]:
        node = node.setdefault(k, {})
    node[keys[-1]] = value
    return cfg


BAD = [
    ("optimizer.params", [1, 2], re.escape('"optimizer.params" = [1, 2]: must be a JSON object')),
    ("optimizer.params", "lr=1", "\"optimizer.params\" = 'lr=1': must be a JSON object"),
    ("optimizer.params.lr", math.nan, "lr=nan must be a finite number"),
    ("optimizer.params.lr", math.inf, "lr=inf must be a finite number"),
    ("optimizer.params.momentum", math.nan, "momentum=nan must be a finite number"),
    ("optimizer.params.momentum", 5.0, "momentum=5.0 must be < 1"),
    ("optimizer.params.weight_decay", math.inf, "weight_decay=inf must be a finite number"),
    ("gradient_clipping", -1, '"gradient_clipping" = -1: must be a finite number >= 0'),
    ("trian", {"epochs": 3}, 'unknown top-level key "trian".*did you mean "train"'),
    ("gradient_clipin", 1.0, 'unknown top-level key "gradient_clipin".*did you mean "gradient_clipping"'),
    ("zero_optimization.stage", 7, '"zero_optimization.stage" = 7'),
    ("zero_optimization.stagee", 1, 'unknown key "zero_optimization.stagee"'),
    ("bf16.enabled", "maybe", "\"bf16.enabled\" = 'maybe'"),
    ("conadv.epsilon", math.nan, "conadv.epsilon"),
]


@pytest.mark.parametrize("path,value,match", BAD, ids=[f"{p}={v!r}" for p, v, _ in BAD])
def test_job_config_refuses_in_one_line(path, value, match):
    with pytest.raises(ConfigError, match=match) as info:
        job_config.validate_config(_with(path, value))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("path,value,match", [b for b in BAD if not b[0].startswith("trian")],
                         ids=[f"{p}={v!r}" for p, v, _ in BAD if not p.startswith("trian")])
def test_initialize_validation_refuses_in_one_line(path, value, match):
    cfg = _with(path, value)
    cfg.pop("train")
    with pytest.raises((ConfigError, TypeError, ValueError), match=match) as info:
        initialize_validate_config(cfg)
    assert "\n" not in str(info.value)


def test_batch_keys_checked_for_the_ranks_that_will_start():
    cfg = copy.deepcopy(BASE)
    cfg.update(train_batch_size=256, train_micro_batch_size_per_gpu=128, gradient_accumulation_steps=1)
    job_config.validate_config(cfg, world_size=2)
    with pytest.raises(ConfigError, match=r"must equal train_micro_batch_size_per_gpu \(128\) x .* x ranks \(3\)"):
        job_config.validate_config(cfg, world_size=3)


def test_every_shipped_config_still_passes():
    import json
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1]
    for path in sorted((root / "configs").rglob("*.json")):
        cfg = json.loads(path.read_text())
        if "train" in cfg:
            job_config.validate_config(cfg)
        else:
            initialize_validate_config(cfg)
