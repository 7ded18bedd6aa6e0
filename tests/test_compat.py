"""The compat modules: the only readers/patchers of DeepSpeed's and Horovod's private internals. Outside the
supported range they warn naming what may break; a missing hook warns or raises, never degrades silently."""

from __future__ import annotations

import os
import re
import types
import warnings

import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")

from ds_conadv.integrations.deepspeed import compat  # noqa: E402
from ds_conadv.integrations.horovod import compat as hvd_compat  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_declared_range_matches_the_package_metadata():
    import tomllib

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        extras = tomllib.load(f)["project"]["optional-dependencies"]
    assert extras["deepspeed"] == [f"deepspeed{compat.SUPPORTED}"]
    assert f"deepspeed{compat.SUPPORTED}" in extras["train"]
    assert extras["horovod"] == [f"horovod{hvd_compat.SUPPORTED}"]


def test_installed_deepspeed_is_in_range():
    import deepspeed

    with warnings.catch_warnings():
        warnings.simplefilter("error", compat.DeepSpeedCompatWarning)
        assert compat.check_version(str(deepspeed.__version__))


@pytest.mark.parametrize("version", ["0.14.4", "0.20.0", "1.0.0"])
def test_out_of_range_version_warns_naming_what_may_break(version):
    with pytest.warns(compat.DeepSpeedCompatWarning, match=re.escape(version)) as record:
        assert not compat.check_version(version)
    message = str(record[0].message)
    assert "_backward_epilogue" in message and "_hp_mapping" in message and "_get_gamma" in message


def test_horovod_out_of_range_warns():
    with pytest.warns(hvd_compat.HorovodCompatWarning, match="0.20.0"):
        assert not hvd_compat.check_version("0.20.0")
    assert hvd_compat.check_version("0.28.1")


class _Engine:
    def __init__(self):
        self.calls = []

    def _backward_epilogue(self):
        self.calls.append("epilogue")


def test_epilogue_hook_wraps_once():
    engine = _Engine()
    seen = []
    assert compat.hook_backward_epilogue(engine, lambda: seen.append("before"), lambda s: seen.append(s >= 0))
    assert compat.hook_backward_epilogue(engine, lambda: seen.append("again"))  # idempotent
    engine._backward_epilogue()
    assert seen == ["before", True] and engine.calls == ["epilogue"]


def test_missing_epilogue_hook_warns_loudly(monkeypatch):
    engine = _Engine()
    monkeypatch.delattr(_Engine, "_backward_epilogue")
    with pytest.warns(compat.DeepSpeedCompatWarning, match="_backward_epilogue.*waits for the whole"):
        assert compat.hook_backward_epilogue(engine, lambda: None) is False


def test_conadv_engine_says_when_the_epilogue_hook_is_missing(monkeypatch):
    """The ConAdv engine on a DeepSpeed engine without ``_backward_epilogue``: a warning, ``epilogue_hooked``
    False, and the overlap still correct (the generation waits for the whole backward)."""
    from ds_conadv.config import ConAdvConfig
    from ds_conadv.integrations.deepspeed.engine import DeepSpeedConAdvEngine

    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    fake = types.SimpleNamespace(
        module=model,
        device=torch.device("cpu"),
        zero_optimization=lambda: False,
        zero_optimization_stage=lambda: 0,
        parameters=model.parameters,
        train=model.train,
        gradient_accumulation_steps=lambda: 1,
        eval=model.eval,
    )
    cfg = ConAdvConfig(enabled=True, epsilon=0.1, dual_bn=False)
    with pytest.warns(compat.DeepSpeedCompatWarning, match="_backward_epilogue"):
        engine = DeepSpeedConAdvEngine(fake, cfg)
    assert engine.epilogue_hooked is False


def test_missing_wrapper_attribute_raises_not_guesses():
    class DeepSpeedZeroOptimizer:  # named like the wrapper, without its private buffers
        bit16_groups = []

    with pytest.raises(NotImplementedError, match="single_partition_of_fp32_groups"):
        compat.flat_partitions(DeepSpeedZeroOptimizer())


def test_missing_scheduler_hook_raises():
    class NoGamma:
        pass

    with pytest.raises(ImportError, match="_get_gamma"):
        compat.check_scheduler_hook(NoGamma)


def test_missing_shm_op_table_warns(monkeypatch):
    import deepspeed.ops

    monkeypatch.setattr(deepspeed.ops, "__compatible_ops__", None, raising=False)
    with pytest.warns(compat.DeepSpeedCompatWarning, match="__compatible_ops__"):
        compat.skip_shm_op_build()
