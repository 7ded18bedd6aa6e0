"""The tensor-parallel problem shared by the multi-rank tests and their single-process references.

A Megatron-style block: a column-parallel Linear (weight rows and bias split over the tensor-parallel ranks), Tanh,
a row-parallel Linear (weight columns split, bias replicated), then LayerNorm and a head, both replicated.
"""
import torch

GLOBAL_BATCH = 16
IN, HIDDEN, MID, OUT = 13, 36, 20, 11
COLUMN = ("0.weight", "0.bias")  # split along dim 0
ROW = ("2.weight",)  # split along dim 1


def make_model() -> torch.nn.Module:
    torch.manual_seed(4321)
    return torch.nn.Sequential(torch.nn.Linear(IN, HIDDEN), torch.nn.Tanh(), torch.nn.Linear(HIDDEN, MID),
                               torch.nn.LayerNorm(MID), torch.nn.Linear(MID, OUT))


def batch(step: int):
    gen = torch.Generator().manual_seed(2000 + step)
    return torch.randn(GLOBAL_BATCH, IN, generator=gen), torch.randn(GLOBAL_BATCH, OUT, generator=gen)


def optimizer_params(name: str) -> dict:
    """Our own clipping (``max_grad_norm``) small enough to act at every step."""
    if name == "lamb":
        return dict(lr=0.02, weight_decay=0.01, max_grad_norm=0.5, backend="foreach", exclude_norm_and_bias=True)
    return dict(lr=2.0, momentum=0.9, weight_decay=1e-3, trust_coefficient=0.02, max_grad_norm=0.5, backend="foreach")


def build_optimizer(name: str, model: torch.nn.Module, params: dict):
    from ds_conadv.optim import LAMB, LARS, param_groups

    params = dict(params)
    groups = (param_groups(model, params["weight_decay"]) if params.pop("exclude_norm_and_bias", False)
              else model.parameters())
    return (LAMB if name == "lamb" else LARS)(groups, **params)


def single_process(name: str, steps: int = 6) -> dict:
    """The unsplit model with our optimizer (and its own clipping) in one process."""
    model = make_model()
    opt = build_optimizer(name, model, optimizer_params(name))
    for step in range(steps):
        x, y = batch(step)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return {n: p.detach().double().reshape(-1) for n, p in model.named_parameters()}
