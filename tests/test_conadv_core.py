"""ConAdv's algorithmic core in one process: attacks, dual BN, the tau schedule, the trainer, the config."""
import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ds_conadv.config import ConAdvConfig, ConfigError
from ds_conadv.conadv import (ConAdvSchedule, ConAdvTrainer, DualBatchNorm, adversarial_forward, convert_dual_bn,
                              fgsm, generate, pgd, prepare_model, random_wrong_labels, use_adversarial_bn)
from ds_conadv.optim import LAMB, LARS


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # tiny models: intra-op threads only add contention on a shared machine (and cost ~100x here)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------------------------------------
# fixtures
# ----------------------------------------------------------------------------------------------------------
def cnn(seed=0, input_bn=False):
    torch.manual_seed(seed)
    layers = [nn.BatchNorm2d(3)] if input_bn else []
    layers += [nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
               nn.Conv2d(8, 16, 3, padding=1, stride=2), nn.BatchNorm2d(16), nn.ReLU(),
               nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)]
    return nn.Sequential(*layers)


def data(n=12, batch=16, seed=1):
    """Random images whose labels follow a fixed linear rule of the channel means (learnable)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(3, 10, generator=g)
    out = []
    for _ in range(n):
        x = torch.rand(batch, 3, 8, 8, generator=g) * 2 - 1
        out.append((x, (x.mean((2, 3)) @ w).argmax(1)))
    return out


def conf(**kw):
    base = dict(enabled=True, epsilon=0.1, attack="pgd", steps=2, step_size=0.06, random_start=True,
                random_start_prob=0.5, target="random", input_range=(-1.0, 1.0))
    base.update(kw)
    return ConAdvConfig(**base)


def states_equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)


def no_time(m):
    return {k: v for k, v in m.items() if not k.startswith("time")}


def same_metrics(a, b):
    assert a.keys() == b.keys()
    for k in a:
        va, vb = a[k], b[k]
        assert (isinstance(va, float) and math.isnan(va) and math.isnan(vb)) or va == vb, (k, va, vb)


# ----------------------------------------------------------------------------------------------------------
# the tau schedule
# ----------------------------------------------------------------------------------------------------------
def test_tau1_example_comes_from_previous_weights():
    cfg = conf(tau=1)
    model = prepare_model(cnn(), cfg)
    trainer = ConAdvTrainer(model, sgd(model), cfg=cfg)
    it = iter(data(8))
    prev = None  # (copy of w_{t-1}, generator state when step t-1 generated x̂_t)
    for t in range(7):
        w_t, gen_t = copy.deepcopy(model), trainer.schedule.generator.get_state()
        m = trainer.train_batch(it)
        batch = trainer.last_batch
        assert m["generated_ahead"] == 1
        if t == 0:
            assert m["generated_now"] == 1 and batch.stale_by == 0   # nothing older than w_0 exists
        else:
            assert m["generated_now"] == 0 and batch.stale_by == 1 and batch.gen_step == t - 1
        if prev is not None:
            w_prev, gen_prev = prev
            g = torch.Generator()
            g.set_state(gen_prev)
            assert torch.equal(batch.x_adv, generate(w_prev, batch.x, batch.y, cfg, generator=g))  # exact, fp32
            g.set_state(gen_prev)
            assert not torch.equal(batch.x_adv, generate(w_t, batch.x, batch.y, cfg, generator=g))  # not w_t's
        # from t = 1 on, nothing draws from the generator before step t's look-ahead generation
        prev = (w_t, gen_t) if t >= 1 else None


@pytest.mark.parametrize("tau", [1, 2])
def test_tau_counts_optimizer_steps_under_accumulation(tau):
    """2 micro-batches per optimizer step: every micro-batch of optimizer step s trains on examples generated
    during optimizer step s - tau (before its update: with w_{s-tau}), never with the weights it is about to
    update, and stale_by says so."""
    mbs = 2
    cfg = conf(tau=tau)
    model = prepare_model(cnn(), cfg)
    trainer = ConAdvTrainer(model, sgd(model), cfg=cfg, micro_batches_per_step=mbs)
    it = iter(data(mbs * (2 * tau + 3)))
    for k in range(mbs * (tau + 3)):
        m = trainer.train_batch(it)
        batch = trainer.last_batch
        s = k // mbs
        assert batch.optimizer_step == s and len(trainer.schedule.pending) == tau * mbs
        if s < tau:   # nothing older than w_0 exists
            assert batch.gen_step // mbs == 0
        else:
            assert batch.stale_by == tau and m["stale_by"] == tau and not batch.generated_now
            assert k - batch.gen_step == tau * mbs


def test_accumulated_micro_batches_equal_one_big_batch_when_vanilla():
    cfg = conf(enabled=False)
    model = cnn()
    ref = copy.deepcopy(model)
    trainer = ConAdvTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1), cfg=cfg, micro_batches_per_step=2)
    batches = data(4)
    it = iter(batches)
    for _ in range(4):
        trainer.train_batch(it)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for i in range(0, 4, 2):
        opt.zero_grad()
        for x, y in batches[i:i + 2]:
            (torch.nn.functional.cross_entropy(ref(x), y) / 2).backward()
        opt.step()
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b)


def test_tau0_equals_handwritten_disadv_loop():
    cfg = conf(tau=0, adv_weight=0.5)
    batches = data(6)
    model = prepare_model(cnn(), cfg)
    ref = copy.deepcopy(model)
    trainer = ConAdvTrainer(model, LARS(model.parameters(), lr=0.5, momentum=0.9), cfg=cfg)
    it = iter(batches)
    for _ in batches:
        m = trainer.train_batch(it)
        assert m["generated_now"] == 1 and m["generated_ahead"] == 0 and m["stale_by"] == 0

    opt = LARS(ref.parameters(), lr=0.5, momentum=0.9)
    gen = torch.Generator().manual_seed(0)   # the trainer's default seed
    for x, y in batches:
        ref.train()
        x_adv = generate(ref, x, y, cfg, generator=gen)          # with w_t, before the forward
        opt.zero_grad()
        clean = F.cross_entropy(ref(x), y)
        with use_adversarial_bn(ref):
            adv = F.cross_entropy(ref(x_adv), y)
        (clean + 0.5 * adv).backward()
        opt.step()
    assert states_equal(model, ref)

    # and ConAdv (tau=1) is a different algorithm on the same data
    other = prepare_model(cnn(), cfg)
    tr1 = ConAdvTrainer(other, LARS(other.parameters(), lr=0.5, momentum=0.9), cfg=cfg.model_copy(update={"tau": 1}))
    it = iter(batches)
    for _ in batches:
        tr1.train_batch(it)
    assert not states_equal(other, model)


def plain_loop(model, opt, batches):
    losses = []
    for x, y in batches:
        model.train()
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("opt_cls", ["sgd", "lars"])
def test_disabled_equals_plain_loop(opt_cls):
    make = (lambda p: torch.optim.SGD(p, lr=0.2, momentum=0.9)) if opt_cls == "sgd" else \
        (lambda p: LARS(p, lr=1.0, momentum=0.9))
    batches = data(5)
    plain = cnn()
    model = copy.deepcopy(plain)
    trainer = ConAdvTrainer(model, make(model.parameters()), cfg={"enabled": False})
    it = iter(batches)
    metrics = [trainer.train_batch(it) for _ in batches]
    losses = plain_loop(plain, make(plain.parameters()), batches)
    assert states_equal(model, plain)
    assert [m["loss"] for m in metrics] == [pytest.approx(v, abs=0, rel=0) for v in losses]
    assert all(not m["adversarial"] and math.isnan(m["adv_loss"]) for m in metrics)
    with pytest.raises(StopIteration):
        trainer.train_batch(it)


@pytest.mark.parametrize("opt_name", ["sgd", "lars"])
def test_epoch_window_vanilla_outside_adversarial_inside(opt_name):
    make = (lambda p: torch.optim.SGD(p, lr=0.2, momentum=0.9)) if opt_name == "sgd" else \
        (lambda p: LARS(p, lr=1.0, momentum=0.9))
    cfg = conf(tau=1, start_epoch=1, stop_epoch=2)
    batches = data(10)
    plain = cnn()
    model = prepare_model(copy.deepcopy(plain), cfg)
    adv_before = {k: v.clone() for k, v in model.state_dict().items() if ".adv." in k}
    trainer = ConAdvTrainer(model, make(model.parameters()), cfg=cfg, steps_per_epoch=4)
    it = iter(batches)
    metrics = [trainer.train_batch(it) for _ in range(4)]            # epoch 0: before the window
    plain_loop(plain, make(plain.parameters()), batches[:4])
    ps, ms = plain.state_dict(), model.state_dict()
    for k, v in ps.items():                                            # main branch == the plain model, bitwise
        prefix, leaf = k.rsplit(".", 1)
        k2 = f"{prefix}.main.{leaf}" if f"{prefix}.main.{leaf}" in ms else k
        assert torch.equal(ms[k2], v), k
    for k, v in adv_before.items():                                    # adversarial BN untouched so far
        assert torch.equal(ms[k], v), k
    assert [m["adversarial"] for m in metrics] == [False] * 4
    assert [m["generated_ahead"] for m in metrics] == [0, 0, 0, 1]   # x̂ of step 4 made at step 3 with w_3
    more = [trainer.train_batch(it) for _ in range(6)]
    assert [m["adversarial"] for m in more] == [True] * 4 + [False] * 2  # epoch 1 in, epoch 2 out
    assert [m["stale_by"] for m in more[:4]] == [1, 1, 1, 1] and sum(m["generated_now"] for m in more) == 0
    assert [m["generated_ahead"] for m in more] == [1, 1, 1, 0, 0, 0]


def test_set_epoch_and_per_epoch_iterators():
    cfg = conf(tau=1, start_epoch=1, attack="fgsm", steps=1, step_size=None, random_start=False,
               random_start_prob=None)
    batches = data(6)
    model = prepare_model(cnn(), cfg)
    trainer = ConAdvTrainer(model, sgd(model), cfg=cfg)
    seen = []
    for epoch in range(2):
        trainer.set_epoch(epoch)
        it = iter(batches[3 * epoch:3 * epoch + 3])
        while True:
            try:
                seen.append(trainer.train_batch(it))
            except StopIteration:
                break
    assert [m["adversarial"] for m in seen] == [False] * 3 + [True] * 3
    # epoch 1 on a fresh iterator: the first step generates synchronously, then the look-ahead takes over
    assert [m["generated_now"] for m in seen[3:]] == [1, 0, 0]
    assert [m["stale_by"] for m in seen[3:]] == [0, 1, 1]
    assert trainer.schedule.batches_consumed == 6
    with pytest.raises(TypeError, match="iterator"):
        trainer.train_batch(batches)


@pytest.mark.parametrize("opt_name", ["lamb", "lars"])
def test_resume_mid_run_matches_uninterrupted(opt_name):
    cfg = conf(tau=2, start_epoch=1)
    batches = data(10)

    def build(seed):
        model = prepare_model(cnn(seed), cfg)
        opt = LAMB(model.parameters(), lr=0.01) if opt_name == "lamb" else LARS(model.parameters(), lr=0.5)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
        return model, ConAdvTrainer(model, opt, cfg=cfg, lr_scheduler=sched, steps_per_epoch=3, seed=7)

    model_a, tr_a = build(0)
    it = iter(batches)
    full = [no_time(tr_a.train_batch(it)) for _ in range(9)]

    model_b, tr_b = build(0)
    it = iter(batches)
    first = [no_time(tr_b.train_batch(it)) for _ in range(5)]
    buf = io.BytesIO()
    torch.save(tr_b.state_dict(), buf)
    assert len(tr_b.schedule.pending) == 2 and all(p.adv is not None for p in tr_b.schedule.pending)
    consumed = tr_b.schedule.batches_consumed
    assert consumed == 7
    del model_b, tr_b

    model_c, tr_c = build(123)                      # other init: everything must come from the checkpoint
    buf.seek(0)
    tr_c.load_state_dict(torch.load(buf, weights_only=True))
    it = iter(batches[consumed:])
    rest = [no_time(tr_c.train_batch(it)) for _ in range(4)]
    assert states_equal(model_c, model_a)
    for a, b in zip(full, first + rest):
        same_metrics(a, b)
    assert tr_c.schedule.generator.get_state().equal(tr_a.schedule.generator.get_state())

    # the pending adversarial batches matter: dropping them (and the RNG state) changes the continuation
    model_d, tr_d = build(123)
    state = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    state["conadv"]["pending"] = []
    state["conadv"]["generator"] = torch.Generator().manual_seed(99).get_state()
    tr_d.load_state_dict(state)
    it = iter(batches[consumed - 2:])
    for _ in range(4):
        tr_d.train_batch(it)
    assert not states_equal(model_d, model_a)


def test_schedule_guards():
    cfg = conf()
    sched = ConAdvSchedule(cfg)
    it = iter(data(3))
    gen = (lambda x, y, g: x + 0)
    b = sched.next_batch(it, gen)
    assert b.step == 0 and len(sched.pending) == 1
    with pytest.raises(RuntimeError, match="twice"):
        sched.next_batch(it, gen)
    with pytest.raises(RuntimeError, match="middle of a step"):
        sched.state_dict()
    sched.end_step()
    with pytest.raises(ValueError, match="set_epoch"):
        ConAdvSchedule(cfg, steps_per_epoch=3).set_epoch(1)


def test_drop_lookahead_makes_the_next_step_generate_now():
    sched = ConAdvSchedule(conf())  # tau = 1
    it = iter(data(6))
    gen = (lambda x, y, g: x + 1)
    with pytest.raises(RuntimeError, match="middle of a step"):
        sched.next_batch(it, gen)
        sched.drop_lookahead()
    sched.generate_ahead(gen)
    sched.end_step()
    assert len(sched.pending) == 1 and sched.batches_consumed == 2
    assert sched.drop_lookahead() == 1
    assert sched.pending == () and sched.batches_consumed == 1  # only the batch trained on
    b = sched.next_batch(it, gen)
    assert b.step == 1 and b.generated_now and b.stale_by == 0


@pytest.mark.parametrize("cfg", [conf(tau=1, start_epoch=1, stop_epoch=2), conf(tau=2), conf(tau=0),
                                 conf(enabled=False)], ids=["tau1-window", "tau2", "disadv", "vanilla"])
def test_ahead_due_says_whether_the_reduction_has_a_generation_beside_it(cfg):
    """Engines hand the backward to a worker thread only when a look-ahead generation will run beside the
    reduction: ahead_due() must be True exactly on the steps where generate_ahead() generates."""
    sched = ConAdvSchedule(cfg, steps_per_epoch=4)
    it = iter(data(12))
    gen = (lambda x, y, g: x + 1)
    due, made = [], []
    for _ in range(12):
        sched.next_batch(it, gen)
        due.append(sched.ahead_due())
        made.append(sched.generate_ahead(gen))
        sched.end_step()
    assert due == [m > 0 for m in made]
    assert any(due) == (cfg.enabled and cfg.tau > 0)


# ----------------------------------------------------------------------------------------------------------
# dual BN
# ----------------------------------------------------------------------------------------------------------
def test_dual_bn_running_stats_separate_and_eval_uses_main():
    cfg = conf(tau=0)
    model = prepare_model(cnn(input_bn=True), cfg)
    duals = [m for m in model.modules() if isinstance(m, DualBatchNorm)]
    assert len(duals) == 3
    trainer = ConAdvTrainer(model, sgd(model), cfg=cfg)
    (x, y), = data(1)
    trainer.train_batch(iter([(x, y)]))
    x_adv = trainer.last_batch.x_adv
    first = duals[0]
    # the input BN sees x (main) and x_adv (adv) directly: momentum 0.1 from (0, 1)
    for branch, inp in ((first.main, x), (first.adv, x_adv)):
        torch.testing.assert_close(branch.running_mean, 0.1 * inp.mean((0, 2, 3)), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(branch.running_var, 0.9 + 0.1 * inp.var((0, 2, 3), unbiased=True),
                                   rtol=1e-5, atol=1e-6)
    assert not torch.allclose(first.main.running_mean, first.adv.running_mean)
    # one clean and one adversarial training forward; the (3-step PGD) generation counted nowhere
    for d in duals:
        assert int(d.main.num_batches_tracked) == 1 and int(d.adv.num_batches_tracked) == 1

    # eval uses main BN: scrambling the adv branch changes nothing unless routed to it
    model.eval()
    out = model(x)
    for d in duals:
        d.adv.running_mean.add_(3.0)
    assert torch.equal(model(x), out)
    with use_adversarial_bn(model):
        assert not torch.allclose(model(x), out)
    assert all(not d.adversarial for d in duals)                      # routing restored


def test_dual_bn_gradients_come_from_own_branch():
    cfg = conf(adv_weight=0.7)
    model = prepare_model(cnn(), cfg)
    trainer = ConAdvTrainer(model, sgd(model), cfg=cfg)
    (x, y), = data(1)
    x_adv = generate(model, x, y, cfg, generator=torch.Generator().manual_seed(3))
    ref = copy.deepcopy(model)
    trainer.forward_backward(x, y, x_adv)
    (0.7 * F.cross_entropy(adversarial_forward(ref, x, x_adv, cfg), y)).backward()
    for d, r in zip([m for m in model.modules() if isinstance(m, DualBatchNorm)],
                    [m for m in ref.modules() if isinstance(m, DualBatchNorm)]):
        assert d.main.weight.grad is not None and r.main.weight.grad is None   # main: clean branch only
        torch.testing.assert_close(d.adv.weight.grad, r.adv.weight.grad, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(d.adv.bias.grad, r.adv.bias.grad, rtol=1e-6, atol=1e-7)
    # a vanilla step leaves the adversarial branch without gradients
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.forward_backward(x, y, None)
    assert all(m.adv.weight.grad is None for m in model.modules() if isinstance(m, DualBatchNorm))


def test_mean_loss_reduction_divides_the_summed_loss():
    (x, y), = data(1)
    grads = {}
    for reduction in ("sum", "mean"):
        cfg = conf(adv_weight=0.5, loss_reduction=reduction)
        model = prepare_model(cnn(), cfg)
        x_adv = generate(model, x, y, cfg, generator=torch.Generator().manual_seed(3))
        out = ConAdvTrainer(model, sgd(model), cfg=cfg).forward_backward(x, y, x_adv)
        grads[reduction] = [p.grad.clone() for p in model.parameters()]
        expected = out["clean_loss"] + 0.5 * out["adv_loss"]
        torch.testing.assert_close(out["loss"], expected / 1.5 if reduction == "mean" else expected)
    for s, m in zip(grads["sum"], grads["mean"]):
        torch.testing.assert_close(m, s / 1.5, rtol=1e-5, atol=1e-7)


def test_dual_bn_state_dict_keys_and_plain_checkpoint():
    plain = cnn(seed=5)
    with torch.no_grad():
        plain[1].running_mean.uniform_()
    dual = convert_dual_bn(copy.deepcopy(plain))
    assert convert_dual_bn(dual) is dual and sum(isinstance(m, DualBatchNorm) for m in dual.modules()) == 2
    keys = set(dual.state_dict())
    assert {"1.main.weight", "1.adv.weight", "1.main.running_var", "1.adv.num_batches_tracked"} <= keys
    fresh = convert_dual_bn(cnn(seed=6))
    fresh.load_state_dict(dual.state_dict())                           # strict, stable keys
    assert states_equal(fresh, dual)
    other = convert_dual_bn(cnn(seed=6))
    other.load_state_dict(plain.state_dict())                          # a plain checkpoint feeds both branches
    assert torch.equal(other[1].main.running_mean, plain[1].running_mean)
    assert torch.equal(other[1].adv.running_mean, plain[1].running_mean)
    assert torch.equal(other[4].adv.weight, plain[4].weight)
    with pytest.raises(ConfigError, match="convert_dual_bn"):
        ConAdvTrainer(plain, sgd(plain), cfg=conf())
    half = convert_dual_bn(cnn())
    opt = torch.optim.SGD([p for n, p in half.named_parameters() if ".adv." not in n], lr=0.1)
    with pytest.raises(ValueError, match="adversarial BN parameters"):
        ConAdvTrainer(half, opt, cfg=conf())


# ----------------------------------------------------------------------------------------------------------
# generation: no weight gradients, no BN statistics, adversarial BN
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("update_stats", [False, True])
def test_generation_leaves_grads_and_bn_stats(update_stats):
    cfg = conf(steps=3, update_bn_stats_in_generation=update_stats)
    model = convert_dual_bn(cnn())
    (x, y), = data(1)
    params = dict(model.named_parameters())
    params["0.weight"].grad = torch.full_like(params["0.weight"], 0.25)
    params["1.main.weight"].grad = torch.arange(8.0)
    grads = {n: (None if p.grad is None else p.grad.clone()) for n, p in params.items()}
    fired = []
    for n, p in params.items():
        p.register_post_accumulate_grad_hook(lambda p, n=n: fired.append(n))
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    model.train()
    x_adv = generate(model, x, y, cfg, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(x_adv, x)
    assert fired == []
    for n, p in params.items():
        assert (p.grad is None) if grads[n] is None else torch.equal(p.grad, grads[n]), n
    for n, b in model.named_buffers():
        if update_stats and ".adv." in n:                              # only the attacked (adv) branch moves
            assert not torch.equal(b, buffers[n]), n
        else:
            assert torch.equal(b, buffers[n]), n
    if update_stats:
        assert int(model[1].adv.num_batches_tracked) == 3
    assert model.training and all(m.track_running_stats for m in model.modules() if hasattr(m, "running_mean"))


def test_generation_attacks_the_adversarial_branch():
    cfg = conf(dual_bn=True)
    dual = convert_dual_bn(cnn())
    with torch.no_grad():
        for m in dual.modules():
            if isinstance(m, DualBatchNorm):
                m.adv.weight.mul_(-1.5)
                m.adv.bias.add_(0.3)
    # a plain model whose BNs are the adv branches
    plain = cnn()
    plain.load_state_dict({k.replace(".adv.", "."): v for k, v in dual.state_dict().items() if ".main." not in k})
    (x, y), = data(1)
    a = generate(dual, x, y, cfg, generator=torch.Generator().manual_seed(1))
    b = generate(plain, x, y, cfg.model_copy(update={"dual_bn": False}), generator=torch.Generator().manual_seed(1))
    c = generate(dual, x, y, cfg.model_copy(update={"dual_bn": False}), generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, c)


# ----------------------------------------------------------------------------------------------------------
# attack geometry
# ----------------------------------------------------------------------------------------------------------
def fgsm_by_hand(model, x, y, eps, lo, hi, target=None):
    x = x.clone().requires_grad_(True)
    loss = F.cross_entropy(model(x), y if target is None else target)
    (g,) = torch.autograd.grad(loss, [x])
    step = eps * g.sign() if target is None else -eps * g.sign()
    return torch.clamp(x.detach() + step, lo, hi)


@pytest.mark.parametrize("target", ["untargeted", "random"])
def test_fgsm_matches_formula_and_pgd1(target):
    model = cnn()
    model.train()
    (x, y), = data(1)
    cfg = ConAdvConfig(enabled=True, epsilon=0.05, attack="fgsm", target=target, input_range=(-1.0, 1.0),
                       dual_bn=False)
    g = torch.Generator().manual_seed(4)
    state = g.get_state()
    got = fgsm(model, x, y, cfg, generator=g)
    g.set_state(state)
    wrong = random_wrong_labels(y, 10, g) if target == "random" else None
    assert torch.equal(got, fgsm_by_hand(model, x, y, 0.05, -1.0, 1.0, wrong))
    assert (got - x).abs().max() <= 0.05 + 1e-7 and got.min() >= -1 and got.max() <= 1
    # PGD with one step of epsilon and no random start is FGSM, bit for bit
    g.set_state(state)
    one = pgd(model, x, y, cfg.model_copy(update={"attack": "pgd", "steps": 1}), generator=g)
    assert torch.equal(one, got)


def test_random_target_is_a_wrong_label():
    y = torch.randint(0, 10, (4000,), generator=torch.Generator().manual_seed(0))
    t = random_wrong_labels(y, 10, torch.Generator().manual_seed(1))
    assert (t != y).all() and t.min() >= 0 and t.max() <= 9
    assert set(torch.unique(t - y).remainder(10).tolist()) == set(range(1, 10))   # every wrong class is drawn
    assert torch.equal(t, random_wrong_labels(y, 10, torch.Generator().manual_seed(1)))
    with pytest.raises(ValueError, match="2 classes"):
        random_wrong_labels(y, 1)


def test_pgd_ball_range_and_pixel_space_clipping():
    model = cnn()
    model.train()
    (x, y), = data(1)
    cfg = conf(steps=4, step_size=0.04, random_start_prob=1.0, dual_bn=False)
    adv = pgd(model, x, y, cfg, generator=torch.Generator().manual_seed(0))
    d = (adv - x).abs()
    assert d.max() <= 0.1 + 1e-6 and d.max() >= 0.1 - 1e-6 and adv.min() >= -1 and adv.max() <= 1
    assert (adv == 1).any() or (adv == -1).any()                      # the range clip was active

    mean, std = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]
    pix = torch.rand(16, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    pix[:, :, 0, 0] = 1.0                                              # on the border of the range
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    xn = (pix - m) / s
    ncfg = conf(epsilon=8 / 255, step_size=3 / 255, steps=3, input_range=(0.0, 1.0), mean=mean, std=std,
                dual_bn=False)
    adv_n = pgd(model, xn, y, ncfg, generator=torch.Generator().manual_seed(0))
    adv_pix = adv_n * s + m
    assert adv_pix.min() >= -1e-6 and adv_pix.max() <= 1 + 1e-6
    dp = (adv_pix - pix).abs()
    assert dp.max() <= 8 / 255 + 1e-6 and dp.max() >= 8 / 255 - 1e-5  # epsilon in pixel units
    assert (dp / s).amax((0, 2, 3)).sub(8 / 255 / torch.tensor(std)).abs().max() < 1e-4  # per-channel eps/std
    # FGSM == PGD-1 also holds with normalisation
    fcfg = ncfg.model_copy(update={"attack": "fgsm", "steps": 1, "step_size": None, "random_start": False,
                                   "random_start_prob": None, "target": "untargeted"})
    assert torch.equal(fgsm(model, xn, y, fcfg), pgd(model, xn, y, fcfg.model_copy(update={"attack": "pgd"})))


def test_random_start_per_sample_and_determinism():
    model = cnn()
    model.train()
    (x, y), = data(1, batch=32)
    cfg = conf(steps=1, epsilon=0.2, step_size=0.02, random_start_prob=0.5, input_range=None, dual_bn=False)
    adv = pgd(model, x, y, cfg, generator=torch.Generator().manual_seed(0))
    moved = (adv - x).abs().amax((1, 2, 3))
    started = moved > 0.02 + 1e-6                                       # beyond one step: a random start
    assert 4 <= int(started.sum()) <= 28                                # per sample, about half
    assert torch.allclose(moved[~started], torch.tensor(0.02))
    assert torch.equal(adv, pgd(model, x, y, cfg, generator=torch.Generator().manual_seed(0)))
    assert not torch.equal(adv, pgd(model, x, y, cfg, generator=torch.Generator().manual_seed(1)))
    # probability 0 starts nowhere: identical to no random start (untargeted: the start draws are the only ones)
    zero = cfg.model_copy(update={"random_start_prob": 0.0, "target": "untargeted"})
    none = zero.model_copy(update={"random_start": False, "random_start_prob": None})
    assert torch.equal(pgd(model, x, y, zero, generator=torch.Generator().manual_seed(0)),
                       pgd(model, x, y, none, generator=torch.Generator().manual_seed(0)))


class TinyText(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(50, 16)
        self.mix = nn.Linear(16, 16)
        self.norm = nn.BatchNorm1d(16)
        self.head = nn.Linear(16, 4)

    def forward(self, ids):
        h = torch.tanh(self.mix(self.emb(ids))).mean(1)
        return self.head(self.norm(h))


def test_embedding_perturbation():
    cfg = ConAdvConfig(enabled=True, epsilon=0.05, attack="pgd", steps=2, step_size=0.03, random_start=True,
                       perturb="embeddings", embedding_module="emb")
    model = prepare_model(TinyText(), cfg)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 50, (8, 12), generator=g)
    y = torch.randint(0, 4, (8,), generator=g)
    model.train()
    delta = generate(model, ids, y, cfg, generator=torch.Generator().manual_seed(0))
    assert delta.shape == (8, 12, 16) and delta.abs().max() <= 0.05 + 1e-7 and delta.abs().max() > 0.04
    assert all(p.grad is None for p in model.parameters())
    # the training forward adds delta to the embedding output, through the adversarial BN
    out = adversarial_forward(model, ids, delta, cfg)
    with use_adversarial_bn(model):
        h = torch.tanh(model.mix(model.emb(ids) + delta)).mean(1)
        manual = model.head(model.norm(h))
    assert torch.equal(out, manual)
    trainer = ConAdvTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1), cfg=cfg)
    batches = [(torch.randint(0, 50, (8, 12), generator=g), torch.randint(0, 4, (8,), generator=g))
               for _ in range(3)]
    it = iter(batches)
    ms = [trainer.train_batch(it) for _ in range(3)]
    assert all(m["adversarial"] and math.isfinite(m["loss"]) for m in ms) and ms[2]["stale_by"] == 1
    with pytest.raises(ConfigError, match="embedding_module"):
        generate(model, ids, y, cfg.model_copy(update={"embedding_module": "nope"}))


# ----------------------------------------------------------------------------------------------------------
# end to end with our optimizers
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("opt_name", ["lamb", "lars"])
def test_trains_with_lamb_and_lars(opt_name):
    cfg = conf(epsilon=0.03, step_size=0.02)
    model = prepare_model(cnn(), cfg)
    opt = LAMB(model.parameters(), lr=0.02) if opt_name == "lamb" else LARS(model.parameters(), lr=2.0,
                                                                             momentum=0.9)
    trainer = ConAdvTrainer(model, opt, cfg=cfg)
    batches = data(6, batch=64) * 6
    it = iter(batches)
    ms = [trainer.train_batch(it) for _ in batches]
    assert all(math.isfinite(m["loss"]) for m in ms)
    first = sum(m["clean_loss"] for m in ms[:6]) / 6
    last = sum(m["clean_loss"] for m in ms[-6:]) / 6
    assert last < first - 0.1, (first, last)
    assert all(m["adversarial"] and 0 <= m["adv_acc"] <= 1 for m in ms)
    assert sum(m["adv_acc"] for m in ms[-6:]) < sum(m["clean_acc"] for m in ms[-6:])  # the attack bites


def test_adv_only_loss_mode():
    cfg = conf(loss_mode="adv", dual_bn=False, tau=0)
    model = cnn()
    trainer = ConAdvTrainer(model, sgd(model), cfg=cfg)
    (x, y), = data(1)
    m = trainer.train_batch(iter([(x, y)]))
    assert math.isnan(m["clean_loss"]) and m["loss"] == m["adv_loss"]
    assert int(model[1].num_batches_tracked) == 1                      # one (adversarial) training forward


# ----------------------------------------------------------------------------------------------------------
# config validation
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("section, needles", [
    ({"enabled": True, "epsilon": 0.1, "atack": "pgd"}, ['unknown key "atack" in "conadv"', "attack", "epsilon"]),
    ({"attack": "bim"}, ['"conadv.attack" = \'bim\'', "'fgsm' or 'pgd'"]),
    ({"attack": "fgsm", "steps": 2}, ['"conadv.steps" = 2', 'attack "fgsm"', "allowed: 1"]),
    ({"attack": "fgsm", "random_start": True}, ['"conadv.random_start"', "allowed: false"]),
    ({"attack": "fgsm", "epsilon": 0.1, "step_size": 0.05}, ['"conadv.step_size" = 0.05']),
    ({"perturb": "embeddings"}, ['"conadv.embedding_module"', "required", '"embeddings"']),
    ({"embedding_module": "emb"}, ['"conadv.embedding_module"', 'perturb "inputs"']),
    ({"perturb": "embeddings", "embedding_module": "e", "input_range": [0, 1]}, ['"conadv.input_range"']),
    ({"start_epoch": 5, "stop_epoch": 3}, ['"conadv.stop_epoch" = 3', '"start_epoch" (5)']),
    ({"tau": -1}, ['"conadv.tau" = -1', "greater than or equal to 0"]),
    ({"loss_mode": "both"}, ['"conadv.loss_mode"', "'clean+adv' or 'adv'"]),
    ({"loss_mode": "adv"}, ['"conadv.dual_bn" = True', 'allowed: false with loss_mode "adv"']),
    ({"enabled": True}, ['"conadv.epsilon" = None', "required"]),
    ({"mean": [0.5, 0.5, 0.5]}, ['"conadv.std" = None', "give both"]),
    ({"mean": [0.5], "std": [0.0]}, ['"conadv.std" = [0.0]', "> 0"]),
    ({"random_start_prob": 0.5}, ['"conadv.random_start_prob" = 0.5', "random_start"]),
    ({"attack": "pgd", "random_start": True, "random_start_prob": 1.5}, ['"conadv.random_start_prob" = 1.5']),
    ({"input_range": [1, 0]}, ['"conadv.input_range"', "lo < hi"]),
    ({"target": "least_likely"}, ['"conadv.target"', "'untargeted' or 'random'"]),
])
def test_config_errors_name_the_key(section, needles):
    with pytest.raises(ConfigError) as err:
        ConAdvConfig.from_section(section)
    for needle in needles:
        assert needle in str(err.value), (needle, str(err.value))


def test_config_defaults_and_assignment():
    c = ConAdvConfig.from_section({"enabled": True, "epsilon": 9 / 255, "attack": "pgd", "random_start": True,
                                   "random_start_prob": 0.8, "target": "random", "input_range": [-1, 1]})
    assert c.tau == 1 and c.loss_mode == "clean+adv" and c.adv_weight == 1.0 and c.dual_bn
    assert c.effective_step_size == 9 / 255 and c.effective_random_start_prob == 0.8 and c.steps == 1
    assert ConAdvConfig(attack="pgd", random_start=True).effective_random_start_prob == 1.0
    assert ConAdvConfig().effective_random_start_prob == 0.0 and not ConAdvConfig().enabled
    c.steps = 3
    with pytest.raises(Exception, match='"conadv.steps" = 3'):
        c.attack = "fgsm"                                               # would break the steps rule
    assert c.attack == "pgd" and c.steps == 3                           # rejected assignment is undone
