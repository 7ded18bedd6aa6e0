"""The robustness evaluation: untargeted PGD-k next to the configured attack."""
import torch
from torch import nn

from ds_conadv.config import ConAdvConfig
from ds_conadv.conadv import convert_dual_bn, dual_bn_layers
from ds_conadv.conadv.robustness import robust_accuracy, robustness_report, untargeted_pgd_config


class Linear2(nn.Module):
    """Logits [-z/2, z/2] with z = w.x: an L-inf attack of radius eps lowers the margin by exactly eps*||w||_1."""

    def __init__(self, w):
        super().__init__()
        self.w = nn.Parameter(w)

    def forward(self, x):
        z = x @ self.w
        return torch.stack([-z / 2, z / 2], dim=1)


def test_pgd_matches_the_exact_linear_robust_accuracy():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, generator=g)
    x = torch.randn(400, 8, generator=g)
    y = (x @ w > 0).long()
    model = Linear2(w)
    eps = 0.1
    cfg = ConAdvConfig(enabled=True, epsilon=eps, target="random")
    exact = int(((x @ w).abs() > eps * w.abs().sum()).sum()) / len(y)
    rep = robustness_report(model, x, y, cfg, pgd_steps=10, batch_size=128)
    assert rep["clean_acc"] == 1.0
    assert abs(rep["pgd_acc"] - exact) < 1e-9
    # two classes: the random wrong target is the other class, so the configured attack is as strong as FGSM
    assert abs(rep["configured_attack_acc"] - exact) < 1e-9
    assert rep["pgd"]["steps"] == 10 and abs(rep["pgd"]["step_size"] - 2.5 * eps / 10) < 1e-12


def test_untargeted_pgd_is_stronger_than_random_target_on_many_classes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 10))
    x = torch.rand(256, 1, 4, 4)
    with torch.no_grad():
        y = model(x).argmax(1)
    cfg = ConAdvConfig(enabled=True, epsilon=0.25, target="random", input_range=(0.0, 1.0))
    rep = robustness_report(model, x, y, cfg, pgd_steps=10)
    assert rep["clean_acc"] == 1.0
    assert rep["pgd_acc"] <= rep["configured_attack_acc"] <= rep["clean_acc"]
    assert rep["pgd_acc"] < rep["configured_attack_acc"]


def test_dual_bn_model_is_attacked_through_its_main_bn_and_left_as_it_was():
    torch.manual_seed(0)
    model = convert_dual_bn(nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)))
    layer = dual_bn_layers(model)[0]
    with torch.no_grad():
        layer.adv.weight.mul_(-5.0)                  # a very different adversarial branch
        model.train()
        model(torch.randn(64, 6))                    # main running stats != init
    x = torch.randn(50, 6)
    model.eval()
    with torch.no_grad():
        y = model(x).argmax(1)
    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = ConAdvConfig(enabled=True, epsilon=1e-6, dual_bn=True)
    assert robust_accuracy(model, x, y, untargeted_pgd_config(cfg, 10)) == 1.0   # tiny eps: main-BN predictions
    assert model.training and not layer.adversarial
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
