"""The small problem shared by the multi-rank tests and their single-process references."""
import torch

GLOBAL_BATCH = 16
IN, HIDDEN, OUT = 13, 37, 11


def make_model() -> torch.nn.Module:
    torch.manual_seed(1234)
    # odd sizes so that ZeRO's partition edges cut through tensors; LayerNorm rather than BatchNorm so the
    # data-parallel run equals the single-process global batch
    return torch.nn.Sequential(torch.nn.Linear(IN, HIDDEN), torch.nn.Tanh(), torch.nn.LayerNorm(HIDDEN),
                               torch.nn.Linear(HIDDEN, OUT))


def batch(step: int, rank: int = 0, world: int = 1):
    gen = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(GLOBAL_BATCH, IN, generator=gen)
    y = torch.randn(GLOBAL_BATCH, OUT, generator=gen)
    per = GLOBAL_BATCH // world
    return x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]


def optimizer_params(name: str) -> dict:
    if name == "lamb":  # two groups (norm weights and biases excluded): the layouts are per group
        return dict(lr=0.02, weight_decay=0.01, max_grad_norm=0.5, backend="foreach", exclude_norm_and_bias=True)
    return dict(lr=2.0, momentum=0.9, weight_decay=1e-3, trust_coefficient=0.02, max_grad_norm=0.5, backend="foreach")
