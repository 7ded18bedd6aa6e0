"""create_optimizer by name, the argument aliases users bring, and the default differences docs/migrating.md
states (checked against timm where it is installed)."""
import pytest
import torch

from ds_conadv.optim import LAMB, LARS, FusedLAMB, create_optimizer


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 3))


def _run(optimizer, model, scales=(30.0, 0.3, 30.0, 0.3)):
    """One step per input scale: gradient norms above and below 1 (clipping changes how steps mix in the moments;
    a constant clip factor would cancel in m / sqrt(v))."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)
    for scale in scales:
        loss = torch.nn.functional.cross_entropy(model(x * scale), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("name, cls, implied", [
    ("lamb", LAMB, {}), ("LAMB", LAMB, {}), ("lambc", LAMB, {"trust_clip": True}),
    ("fused_lamb", FusedLAMB, {"max_grad_norm": 1.0}), ("FusedLAMB", FusedLAMB, {}),
    ("lars", LARS, {}), ("larc", LARS, {"trust_clip": True}), ("nlars", LARS, {"nesterov": True}),
    ("n-larc", LARS, {"nesterov": True, "trust_clip": True})])
def test_names(name, cls, implied):
    opt = create_optimizer(name, _model(), lr=0.01)
    assert type(opt) is cls and opt.defaults["lr"] == 0.01
    for key, value in implied.items():
        assert opt.defaults[key] == value


def test_module_gets_the_decay_and_no_decay_groups():
    model = _model()
    opt = create_optimizer("lamb", model, weight_decay=0.05)
    decay, no_decay = opt.param_groups
    assert [p.shape for p in decay["params"]] == [(8, 6), (3, 8)]  # weights; biases and LayerNorm excluded
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert len(create_optimizer("lamb", model, filter_bias_and_norm=False).param_groups) == 1
    params = list(model.parameters())
    assert create_optimizer("lars", params).param_groups[0]["params"] == params


def test_unknown_names_and_conflicts_are_one_line():
    with pytest.raises(ValueError, match=r"unknown optimizer 'lamm'; did you mean 'lamb'\? allowed: lamb, lambc"):
        create_optimizer("lamm", _model())
    with pytest.raises(ValueError, match="'larc' means trust_clip=True"):
        create_optimizer("larc", _model(), trust_clip=False)


def test_aliases_map_onto_our_names():
    params = lambda: [torch.zeros(2, requires_grad=True)]  # noqa: E731
    lamb = LAMB(params(), max_coeff=10.0, min_coeff=0.01, use_nvlamb=True, foreach=True)
    assert (lamb.defaults["max_trust_ratio"], lamb.defaults["min_trust_ratio"]) == (10.0, 0.01)
    assert lamb.defaults["always_adapt"] and lamb.defaults["backend"] == "foreach"
    assert LAMB(params(), fused=True).defaults["backend"] == "auto"
    assert LAMB(params(), foreach=False).defaults["backend"] == "reference"
    assert LARS(params(), trust_coeff=0.02).defaults["trust_coefficient"] == 0.02
    assert LARS(params(), eta=0.02).defaults["trust_coefficient"] == 0.02
    # switches that equal our behaviour are accepted, the others refused with the reason
    LAMB(params(), decoupled_decay=False, caution=False, amsgrad=False, eps_inside_sqrt=False)
    with pytest.raises(ValueError, match="caution=True: timm's cautious masking is not implemented"):
        LAMB(params(), caution=True)
    with pytest.raises(ValueError, match="eps_inside_sqrt=True"):
        create_optimizer("lamb", params(), eps_inside_sqrt=True)
    with pytest.raises(ValueError, match="max_coeff=3.0 is another name for max_trust_ratio"):
        LAMB(params(), max_coeff=3.0, max_trust_ratio=4.0)
    with pytest.raises(ValueError, match="foreach=True and fused=True"):
        LAMB(params(), foreach=True, fused=True)
    with pytest.raises(TypeError, match=r"'trust_coef'; did you mean 'trust_coefficient' \(timm Lars: 'trust_coeff'\)"):
        LARS(params(), trust_coef=0.02)
    with pytest.raises(TypeError, match=r"'weight_decy'; did you mean 'weight_decay'\?"):
        LAMB(params(), weight_decy=0.1)


def test_aliases_reach_the_json_config_only_by_our_names():
    """The DeepSpeed JSON path lists only our names (its own one-line error); aliases are for Python callers."""
    from ds_conadv.config import ConfigError, validate_optimizer_params

    with pytest.raises(ConfigError, match='unknown key "max_coeff"'):
        validate_optimizer_params(LAMB, {"max_coeff": 10.0})


# ---- against timm (loaded without importing the timm package, as the benchmarks do) ---------------------------
def _timm(module):
    from benchmarks.optim_step import Skip, load_timm_optim

    try:
        return load_timm_optim(module)
    except Skip as exc:
        pytest.skip(str(exc))


def test_timm_lamb_clips_at_one_by_default_ours_does_not():
    timm_lamb = _timm("lamb").Lamb
    model = _model()
    reference = _run(timm_lamb(model.parameters(), lr=1e-2), model)
    model = _model()
    same = _run(create_optimizer("lamb", model.parameters(), lr=1e-2, max_grad_norm=1.0), model)
    model = _model()
    ours_default = _run(create_optimizer("lamb", model.parameters(), lr=1e-2), model)
    for a, b in zip(reference, same):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert any(not torch.allclose(a, b, rtol=1e-4, atol=1e-5) for a, b in zip(reference, ours_default))


def test_timm_lars_trust_coeff_alias_matches():
    timm_lars = _timm("lars").Lars
    kwargs = dict(lr=0.1, momentum=0.9, weight_decay=1e-4, trust_clip=True)
    model = _model()
    reference = _run(timm_lars(model.parameters(), trust_coeff=0.02, **kwargs), model, scales=(1.0, 1.0, 1.0))
    model = _model()
    ours = _run(create_optimizer("lars", model.parameters(), trust_coeff=0.02, **kwargs), model, scales=(1.0, 1.0, 1.0))
    for a, b in zip(reference, ours):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_registered_in_torch_optim_for_deepspeed_configs():
    """``import ds_conadv`` puts LAMB/LARS into torch.optim under names DeepSpeed does not own, so a DeepSpeed
    config's ``"type": "ds_conadv.LAMB"`` builds ours; ``ds_conadv.initialize`` reads the same names as ours."""
    import ds_conadv  # noqa: F401
    from ds_conadv.config import optimizer_class
    from ds_conadv.config.builders import optimizer_spec
    from ds_conadv.torch_compat import register_optimizer

    assert getattr(torch.optim, "ds_conadv.LAMB") is LAMB and getattr(torch.optim, "ds_conadv.LARS") is LARS
    assert optimizer_class("DS_CONADV.lars") is LARS
    spec = optimizer_spec({"type": "ds_conadv.LAMB", "params": {"lr": 0.01}}, allow_torch=True)
    assert spec.cls is LAMB and spec.ours
    register_optimizer("ds_conadv.LAMB", LAMB)  # idempotent
    with pytest.raises(RuntimeError, match="torch.optim already has 'AdamW'"):
        register_optimizer("AdamW", LAMB)


def test_exclude_norm_and_bias_outside_initialize_says_what_to_do():
    """DeepSpeed passes a config's params to the class as keywords; the grouping key needs the model."""
    p = [torch.nn.Parameter(torch.zeros(2))]
    LAMB(p, exclude_norm_and_bias=False)
    with pytest.raises(ValueError, match=r"model_parameters=param_groups\(model, weight_decay\)"):
        LAMB(p, exclude_norm_and_bias=True)


def test_initialize_shows_its_signature():
    import inspect

    import ds_conadv

    params = inspect.signature(ds_conadv.initialize).parameters
    assert list(params)[:4] == ["args", "model", "optimizer", "model_parameters"]
    assert "config" in params and params["kwargs"].kind is inspect.Parameter.VAR_KEYWORD
