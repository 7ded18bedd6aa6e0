"""Lightning: ``configure_optimizers`` returning our LARS/LAMB steps exactly as a plain loop (fp32, bf16-mixed)."""
import pytest
import torch

L = pytest.importorskip("lightning")

from ds_conadv.optim import LAMB, LARS  # noqa: E402

OPTIMIZERS = {"lars": (LARS, {"lr": 0.1}), "lamb": (LAMB, {"lr": 1e-2})}


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))


def _loader():
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(64, 8, generator=g), torch.randint(0, 3, (64,), generator=g))
    return torch.utils.data.DataLoader(data, batch_size=16)


class Classifier(L.LightningModule):
    def __init__(self, name):
        super().__init__()
        self.net = _net()
        self.name = name

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        cls, kwargs = OPTIMIZERS[self.name]
        return cls(self.parameters(), **kwargs)


def _plain_loop(name, bf16):
    net = _net()
    cls, kwargs = OPTIMIZERS[name]
    optimizer = cls(net.parameters(), **kwargs)
    for x, y in _loader():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = torch.nn.functional.cross_entropy(net(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return net


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
@pytest.mark.parametrize("name", ["lars", "lamb"])
def test_configure_optimizers_returns_ours(name, precision):
    module = Classifier(name)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=1, precision=precision, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, _loader())
    assert type(trainer.optimizers[0]) is OPTIMIZERS[name][0]
    expected = _plain_loop(name, bf16=precision == "bf16-mixed")
    initial = _net()
    for (key, got), want, start in zip(module.net.state_dict().items(), expected.state_dict().values(),
                                       initial.state_dict().values()):
        assert not torch.equal(got, start), key  # it trained
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=key)


def test_deepspeed_strategy_needs_cuda():
    """Lightning 2.6's DeepSpeed strategy refuses the CPU accelerator (docs/integrations.md says so)."""
    pytest.importorskip("deepspeed")
    trainer_kwargs = dict(accelerator="cpu", devices=1, max_steps=1, logger=False, enable_checkpointing=False,
                          enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(RuntimeError, match="only supported on CUDA GPUs"):
        L.Trainer(strategy="deepspeed", **trainer_kwargs).fit(Classifier("lamb"), _loader())
