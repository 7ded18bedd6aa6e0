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


# -- DeepSpeed < 0.19.8: one inf/NaN verdict per ZeRO step, ZeRO-3 gathers that wait on gloo ---------------------
class DeepSpeedZeroOptimizer_Stage3:  # noqa: N801 - named like DeepSpeed's ZeRO-3 wrapper
    """The parts of the wrapper the repair uses: before 0.19.8 a non-fp16 step reads ``overflow`` but never sets it,
    and steps its (sub-)groups one call at a time."""

    def __init__(self, dtype=torch.float32):
        self.dtype, self.overflow, self.nonfinite, self.applied = dtype, False, False, []

    def check_overflow(self, partition_gradients=True):
        self.overflow = self.nonfinite

    def step(self):
        self.applied.append(not self.overflow)


class DeepSpeedZeroOptimizer(DeepSpeedZeroOptimizer_Stage3):  # ZeRO 1/2 of 0.18 on: DeepSpeed's own switch
    def __init__(self, dtype=torch.bfloat16):
        super().__init__(dtype)
        self.check_grad_overflow = False

    def step(self):
        if self.check_grad_overflow:
            self.check_overflow()
        super().step()


def _as_version(monkeypatch, version):
    monkeypatch.setattr(compat, "_installed_version", lambda: version)


@pytest.mark.parametrize(
    "version,kind,dtype,itself",
    [
        ("0.16.9", "zero3", torch.float32, False),
        ("0.19.7", "zero3", torch.bfloat16, False),
        ("0.19.8", "zero3", torch.float32, True),
        ("0.16.9", "zero3", torch.float16, True),
        ("0.18.0", "zero12", torch.float32, False),
        ("0.19.8", "zero12", torch.float32, True),
        ("0.19.8", "zero12", torch.bfloat16, False),
    ],
)
def test_which_deepspeed_skips_a_nonfinite_step_itself(monkeypatch, version, kind, dtype, itself):
    _as_version(monkeypatch, version)
    wrapper = (DeepSpeedZeroOptimizer_Stage3 if kind == "zero3" else DeepSpeedZeroOptimizer)(dtype)
    assert compat.deepspeed_skips_nonfinite(wrapper) is itself
    if kind == "zero12":
        wrapper.check_grad_overflow = True  # "bf16": {"check_grad_overflow": true}
        assert compat.deepspeed_skips_nonfinite(wrapper)


@pytest.mark.parametrize("cls", [DeepSpeedZeroOptimizer_Stage3, DeepSpeedZeroOptimizer])
def test_old_zero_skips_a_nonfinite_step_whole(monkeypatch, cls):
    """DeepSpeed's overflow check runs before every step while skip_nonfinite is on: the step with a NaN is skipped
    whole (no group applied), the next one applies; with skip_nonfinite off an earlier verdict does not linger."""
    _as_version(monkeypatch, "0.18.0" if cls is DeepSpeedZeroOptimizer else "0.16.9")
    on = [True]
    wrapper = cls()
    assert compat.skip_nonfinite_steps_whole(wrapper, lambda: on[0])
    assert compat.skip_nonfinite_steps_whole(wrapper, lambda: on[0])  # idempotent
    wrapper.nonfinite = True
    wrapper.step()
    wrapper.nonfinite = False
    wrapper.step()
    wrapper.nonfinite, on[0] = True, False
    wrapper.step()
    assert wrapper.applied == [False, True, True]


def test_zero_that_skips_itself_is_left_alone(monkeypatch):
    _as_version(monkeypatch, "0.19.8")
    wrapper = DeepSpeedZeroOptimizer_Stage3()
    assert compat.skip_nonfinite_steps_whole(wrapper, lambda: True)
    assert "step" not in vars(wrapper)


def test_old_zero_without_overflow_check_warns(monkeypatch):
    _as_version(monkeypatch, "0.16.9")
    wrapper = DeepSpeedZeroOptimizer_Stage3()
    monkeypatch.setattr(DeepSpeedZeroOptimizer_Stage3, "check_overflow", None)
    with pytest.warns(compat.DeepSpeedCompatWarning, match="check_overflow.*per param group"):
        assert compat.skip_nonfinite_steps_whole(wrapper, lambda: True) is False


def test_old_zero3_gathers_wait_for_every_param(monkeypatch):
    """Before 0.19.8 ZeRO-3's coalesced gather is followed by a barrier on its gloo groups (which gloo completes
    after every earlier operation), patched once; from 0.19.8 it is left as it is."""
    from deepspeed.runtime.zero.partition_parameters import Init

    calls = []

    def gather(self, param_list, hierarchy=0, quantize=False):
        calls.append(("gather", list(param_list)))

    monkeypatch.setattr(Init, "_allgather_params_coalesced", gather)
    monkeypatch.setattr(compat, "_gloo_groups", lambda init, params: ["dp"] if params else [])
    monkeypatch.setattr(torch.distributed, "barrier", lambda group=None: calls.append(("barrier", group)))
    _as_version(monkeypatch, "0.19.8")
    assert compat.wait_for_coalesced_allgathers() is False
    assert Init._allgather_params_coalesced is gather
    _as_version(monkeypatch, "0.16.9")
    assert compat.wait_for_coalesced_allgathers() and compat.wait_for_coalesced_allgathers()
    Init._allgather_params_coalesced(None, ["w", "b"])
    Init._allgather_params_coalesced(None, [])
    assert calls == [("gather", ["w", "b"]), ("barrier", "dp"), ("gather", [])]


def test_old_zero3_without_coalesced_gather_warns(monkeypatch):
    from deepspeed.runtime.zero.partition_parameters import Init

    monkeypatch.delattr(Init, "_allgather_params_coalesced")
    _as_version(monkeypatch, "0.16.9")
    with pytest.warns(compat.DeepSpeedCompatWarning, match="_allgather_params_coalesced"):
        assert compat.wait_for_coalesced_allgathers() is False
