"""The ConAdv engine on real DeepSpeed ranks (gloo, CPU): stages agree, vanilla is plain DeepSpeed, resume."""
from __future__ import annotations

import json
import math

import pytest
import torch

pytest.importorskip("deepspeed", reason="DeepSpeed is not installed")

from dist_harness import spawn, torchrun_nodes  # noqa: E402


def run(tmp_path, tag, *args):
    prefix = str(tmp_path / tag)
    spawn("conadv_train.py", ["--out", prefix, *args], world_size=2, timeout=300)
    ranks = [json.load(open(f"{prefix}.rank{r}")) for r in range(2)]
    for name, value in ranks[0]["params"].items():
        if not name.startswith("buffer:"):  # BN running stats are per rank (local batches), as in DeepSpeed
            assert value == ranks[1]["params"][name], f"{tag}: ranks disagree on {name}"
    return ranks[0]


def tensors(result, buffers=True):
    return {k: torch.tensor(v, dtype=torch.float64) for k, v in result["params"].items()
            if buffers or not k.startswith("buffer:")}


def assert_same(a, b, what, rtol=2e-5, atol=2e-6):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=lambda m: f"{what}: {k}: {m}")


def test_zero_stages_agree_and_generation_overlaps(tmp_path):
    results = {s: run(tmp_path, f"conadv{s}", "--stage", str(s)) for s in (0, 1, 2)}
    for s in (0, 1, 2):
        r = results[s]
        assert r["engine"] == "DeepSpeedConAdvEngine" and r["overlap"] is True
        m = r["metrics"]
        assert [x["stale_by"] for x in m] == [0, 1, 1, 1]  # step 0 has no earlier weights; then tau = 1
        assert [x["generated_now"] for x in m] == [1, 0, 0, 0] and all(x["generated_ahead"] == 1 for x in m)
        assert all(math.isfinite(x["adv_loss"]) and x["adv_loss"] > 0 for x in m)
    assert_same(tensors(results[1]), tensors(results[0]), "ZeRO-1 vs ZeRO-0")
    assert_same(tensors(results[2]), tensors(results[0]), "ZeRO-2 vs ZeRO-0")
    assert "buffer:1.adv.running_mean" in results[0]["params"]  # dual BN


@pytest.mark.parametrize("start", ["reduction", "backward"])
def test_generation_starts_when_the_reduction_begins(tmp_path, start):
    """Default: the look-ahead generation waits until engine.backward reaches DeepSpeed's epilogue (the autograd
    pass is over, the reduction starts); with generation_start="backward" it runs during the (slowed) backward."""
    r = run(tmp_path, f"start_{start}", "--stage", "2", "--steps", "3", "--generation-start", start,
            "--slow-backward", "0.3")
    events = r["events"]
    # step 0 generates x̂_0 before its forward (nothing to overlap); every later generate_start is step k's
    # look-ahead, to be compared with step k's epilogue (the first layer's backward hook sleeps 0.3 s in each of
    # the clean, adversarial and generation passes, so "during the backward" and "after it" are far apart)
    gens = [t for what, t in events if what == "generate_start"][1:]
    epilogues = [t for what, t in events if what == "epilogue_start"]
    assert len(gens) == len(epilogues) == 3
    for gen, epi in zip(gens, epilogues):
        if start == "reduction":
            assert gen >= epi
        else:
            assert gen < epi - 0.2


def test_two_nodes_on_localhost_equal_one_node(tmp_path):
    """The ConAdv engine launched as on two nodes (torchrun --nnodes 2 --node_rank 0/1, one rank each, static
    rendezvous at 127.0.0.1): every global rank writes its own file, and params and BN statistics equal the 2-rank
    single-node run bit for bit."""
    one_node = run(tmp_path, "one_node", "--stage", "2")
    prefix = str(tmp_path / "two_nodes")
    torchrun_nodes("conadv_train.py", ["--stage", "2", "--out", prefix], nnodes=2, nproc=1, timeout=300)
    for rank in range(2):
        result = json.load(open(f"{prefix}.rank{rank}"))
        assert result["rank"] == rank and result["overlap"] is True
        reference = one_node if rank == 0 else json.load(open(str(tmp_path / "one_node") + ".rank1"))
        assert_same(tensors(result), tensors(reference), f"two nodes, rank {rank}", rtol=0, atol=0)


def test_vanilla_is_plain_deepspeed(tmp_path):
    vanilla = run(tmp_path, "vanilla", "--stage", "2", "--mode", "vanilla")
    plain = run(tmp_path, "plain", "--stage", "2", "--mode", "plain")
    assert_same(tensors(vanilla), tensors(plain), "vanilla engine vs plain DeepSpeed loop", rtol=0, atol=0)
    assert all(math.isnan(m["adv_loss"]) for m in vanilla["metrics"])


def test_disadv_generates_before_every_step(tmp_path):
    r = run(tmp_path, "disadv", "--stage", "1", "--mode", "disadv")
    assert [m["stale_by"] for m in r["metrics"]] == [0, 0, 0, 0]
    assert all(m["generated_now"] == 1 and m["generated_ahead"] == 0 for m in r["metrics"])


@pytest.mark.parametrize("stage", [0, 2])
def test_resume_mid_run_equals_uninterrupted(tmp_path, stage):
    full = run(tmp_path, f"full{stage}", "--stage", str(stage), "--steps", "5")
    ckpt = str(tmp_path / f"ckpt{stage}")
    run(tmp_path, f"first{stage}", "--stage", str(stage), "--steps", "5", "--save-at", "2", "--ckpt", ckpt)
    resumed = run(tmp_path, f"resumed{stage}", "--stage", str(stage), "--steps", "5", "--resume", ckpt)
    assert_same(tensors(resumed), tensors(full), f"ZeRO-{stage} resumed vs uninterrupted", rtol=0, atol=0)
    assert resumed["metrics"] == full["metrics"][2:]


def test_gradient_accumulation_and_bf16(tmp_path):
    r = run(tmp_path, "gas_bf16", "--stage", "2", "--dtype", "bf16", "--gas", "2", "--steps", "3", "--norm", "ln")
    assert len(r["metrics"]) == 3
    assert all(math.isfinite(m["loss"]) for m in r["metrics"])
    fp32 = run(tmp_path, "gas_fp32", "--stage", "2", "--gas", "2", "--steps", "3", "--norm", "ln")
    # bf16 follows the fp32 run (same data, same adversarial schedule) within bf16 precision
    a, b = tensors(r, buffers=False), tensors(fp32, buffers=False)
    for k in a:
        assert (a[k] - b[k]).abs().max() <= 0.05 * b[k].abs().max() + 1e-3, k


def _fake_engine(model, gas=1):
    import types

    return types.SimpleNamespace(module=model, device=torch.device("cpu"), zero_optimization=lambda: False,
                                 zero_optimization_stage=lambda: 0, parameters=model.parameters, train=model.train,
                                 eval=model.eval, gradient_accumulation_steps=lambda: gas)


def test_sync_batchnorm_with_overlap_is_refused():
    """SyncBatchNorm's all-reduces on the generation thread and the gradient reduction on the backward thread
    would share one process group in no agreed order: refused with the layer named; fine without overlap."""
    from ds_conadv.config.sections import ConAdvConfig, ConfigError
    from ds_conadv.integrations.deepspeed.engine import DeepSpeedConAdvEngine

    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.SyncBatchNorm(4), torch.nn.Flatten(),
                                torch.nn.LazyLinear(3))
    cfg = ConAdvConfig(enabled=True, epsilon=0.1, dual_bn=False)
    with pytest.raises(ConfigError, match=r"SyncBatchNorm layers \(1\)"):
        DeepSpeedConAdvEngine(_fake_engine(model), cfg)
    engine = DeepSpeedConAdvEngine(_fake_engine(model), cfg, overlap=False)
    assert not engine.overlap


def test_engine_counts_tau_in_optimizer_steps():
    from ds_conadv.config.sections import ConAdvConfig
    from ds_conadv.integrations.deepspeed.engine import DeepSpeedConAdvEngine

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    engine = DeepSpeedConAdvEngine(_fake_engine(model, gas=4), ConAdvConfig(enabled=True, epsilon=0.1,
                                                                             dual_bn=False, tau=2), overlap=False)
    assert engine.schedule.micro_batches_per_step == 4 and engine.schedule.lookahead == 8
