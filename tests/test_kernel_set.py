"""Every kernel set that loads here satisfies the backend interface (:class:`ds_conadv.optim.KernelSet`)."""
from __future__ import annotations

import inspect

import pytest
import torch

from ds_conadv.optim import BackendUnavailable, KernelSet, get_kernels

METHODS = ("sumsq", "lamb_phase1", "lamb_phase2", "lars_phase1", "lars_phase2")


@pytest.mark.parametrize("backend", ["reference", "foreach", "cpp", "triton"])
def test_kernel_sets_satisfy_the_protocol(backend):
    try:
        kernels = get_kernels(backend, torch.device("cpu"))
    except BackendUnavailable as exc:
        pytest.skip(str(exc))
    assert isinstance(kernels, KernelSet)
    assert kernels.name == backend
    for name in METHODS:
        want = inspect.signature(getattr(KernelSet, name)).parameters
        have = inspect.signature(getattr(kernels, name)).parameters
        assert [p for p in want if p != "self"] == [p for p in have if p != "self"], name
