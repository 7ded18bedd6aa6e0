"""ds_conadv: fused LAMB/LARS optimizers and ConAdv large-batch training for DeepSpeed/Horovod."""

__version__ = "0.1.0"


def initialize(*args, **kwargs):
    """Drop-in for ``deepspeed.initialize`` (see :mod:`ds_conadv.integrations.deepspeed`)."""
    from ds_conadv.integrations.deepspeed import initialize as _initialize

    return _initialize(*args, **kwargs)
