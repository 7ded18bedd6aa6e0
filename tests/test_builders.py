"""One optimizer builder and one scheduler factory for every path: every config shipped in configs/ and
ds_conadv/configs/ gives the same param groups and hyper-parameters through the DeepSpeed path
(``ds_conadv.initialize``'s use of the builder), the Horovod job's and the single-process ``build_optimizer``."""
from __future__ import annotations

import copy
import glob
import json
import os

import pytest
import torch

from ds_conadv.config import ConfigError, build_optimizer, build_scheduler, resolve_clipping, strip_comments
from ds_conadv.integrations import horovod_train
from ds_conadv.integrations.deepspeed.initialize import build_config_optimizer
from ds_conadv.train import DigitsCNN

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "**", "*.json"), recursive=True)
                 + glob.glob(os.path.join(ROOT, "ds_conadv", "configs", "*.json")))


def _load(path):
    with open(path, encoding="utf-8") as f:
        return strip_comments(json.load(f))


def _describe(optimizer, model):
    """Per group: the names of its params and every setting but the params and the clipping (who clips differs
    by path: DeepSpeed, or the optimizer; compared separately)."""
    names = {id(p): n for n, p in model.named_parameters()}
    out = []
    for g in optimizer.param_groups:
        settings = {k: v for k, v in g.items() if k not in ("params", "max_grad_norm")}
        out.append(([names[id(p)] for p in g["params"]], settings))
    return type(optimizer), out


def _paths(cfg):
    """{path: (optimizer, model, effective clipping)} for the three paths, each on a fresh model (same seed)."""
    built = {}
    torch.manual_seed(0)
    model = DigitsCNN(8)
    ds_cfg = copy.deepcopy(cfg)
    opt, _ = build_config_optimizer(ds_cfg, model)
    built["deepspeed"] = (opt, model, resolve_clipping(ds_cfg.get("gradient_clipping", 1.0), None))
    torch.manual_seed(0)
    model = DigitsCNN(8)
    opt, clip = horovod_train._build_optimizer(model, copy.deepcopy(cfg))
    built["horovod"] = (opt, model, clip if clip is not None else opt.param_groups[0].get("max_grad_norm"))
    torch.manual_seed(0)
    model = DigitsCNN(8)
    clip = resolve_clipping(cfg.get("gradient_clipping"), cfg["optimizer"].get("params", {}).get("max_grad_norm"))
    opt = build_optimizer(cfg["optimizer"], model, max_grad_norm=clip)
    built["single"] = (opt, model, clip)
    return built


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: os.path.relpath(p, ROOT))
def test_every_config_builds_the_same_optimizer_on_every_path(path):
    cfg = _load(path)
    built = _paths(cfg)
    ref = _describe(*built["deepspeed"][:2])
    assert len(ref[1]) >= 1
    for name, (opt, model, clip) in built.items():
        assert _describe(opt, model) == ref, name
        assert clip == built["deepspeed"][2], name


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: os.path.relpath(p, ROOT))
def test_every_config_builds_the_same_scheduler_on_every_path(path):
    cfg = _load(path)
    if not isinstance(cfg.get("scheduler"), dict):
        pytest.skip("no scheduler section")
    lrs = {}
    for name, (opt, _, _) in _paths(cfg).items():
        sched = build_scheduler(copy.deepcopy(cfg["scheduler"]), opt, total_steps=50)
        seq = []
        for _ in range(5):
            seq.append([g["lr"] for g in opt.param_groups])
            sched.step()
        lrs[name] = seq
    assert lrs["horovod"] == lrs["deepspeed"] == lrs["single"]


def test_default_weight_decay_is_the_optimizers_on_every_path():
    """A past divergence between the paths: with exclude_norm_and_bias and no weight_decay, the Horovod path gave
    the decayed group weight_decay 0.0 (no decay, so no trust ratio) while the DeepSpeed path used LAMB's default
    0.01."""
    cfg = {"optimizer": {"type": "LAMB", "params": {"lr": 0.01, "exclude_norm_and_bias": True}},
           "gradient_clipping": 1.0}
    for name, (opt, _, _) in _paths(cfg).items():
        decays = sorted(g["weight_decay"] for g in opt.param_groups)
        assert decays == [0.0, 0.01], name


def test_torch_optimizers_only_where_the_path_runs_them():
    section = {"type": "SGD", "params": {"lr": 0.1, "momentum": 0.9, "exclude_norm_and_bias": True}}
    model = DigitsCNN(8)
    opt = build_optimizer(section, model, allow_torch=True)
    assert isinstance(opt, torch.optim.SGD) and [g["weight_decay"] for g in opt.param_groups] == [0, 0.0]
    assert build_optimizer(section, model) is None  # DeepSpeed's own type: passed through
    with pytest.raises(ConfigError, match="torch.optim"):
        build_optimizer({"type": "NoSuchOpt"}, model, allow_torch=True)


def test_clipping_spellings_must_agree():
    assert resolve_clipping(1.0, None) == 1.0 and resolve_clipping(0.0, 2.0) == 2.0
    assert resolve_clipping(None, None) is None
    with pytest.raises(ConfigError, match="disagree"):
        resolve_clipping(1.0, 2.0)
