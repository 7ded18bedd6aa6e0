"""ds_conadv: fused LAMB/LARS optimizers and ConAdv large-batch training for DeepSpeed/Horovod.

Layout (docs/index.md): ``optim`` (optimizer core), ``conadv``, ``absa``, ``hessian``, ``config`` (sections,
the one optimizer builder, schedulers), ``integrations.deepspeed`` / ``integrations.horovod`` (the only modules that
know those libraries; their ``compat`` modules the only ones that touch private internals), ``app`` (the jobs and
the ``ds-conadv`` CLI on top). This module is the composition root: it wires the DeepSpeed wrapper resolver into
the optimizer core lazily, so that neither imports the other, and registers LAMB/LARS in ``torch.optim`` as
``"ds_conadv.LAMB"`` / ``"ds_conadv.LARS"`` (:data:`ds_conadv.optim.TORCH_OPTIM_NAMES`), the names a DeepSpeed
config's ``"optimizer.type"`` can give under plain ``deepspeed.initialize``.
"""
import sys as _sys

from ds_conadv._registry import register_wrapper_resolver as _register
from ds_conadv.optim import TORCH_OPTIM_NAMES as _TORCH_OPTIM_NAMES
from ds_conadv.torch_compat import register_optimizer as _register_optimizer

__version__ = "0.1.0"


def initialize(args=None, model=None, optimizer=None, model_parameters=None, training_data=None, lr_scheduler=None,
               mpu=None, dist_init_required=None, collate_fn=None, config=None, config_params=None, **kwargs):
    """Drop-in for ``deepspeed.initialize``: same arguments, same four return values, with ds_conadv's
    ``"optimizer"`` types, ``"conadv"`` / ``"absa"`` sections and exact ZeRO trust ratios (see
    :func:`ds_conadv.integrations.deepspeed.initialize.initialize` for the extra keywords ``loss_fn``,
    ``conadv_seed``, ``steps_per_epoch``, ``absa_options``)."""
    from ds_conadv.integrations.deepspeed.initialize import initialize as _initialize

    return _initialize(args=args, model=model, optimizer=optimizer, model_parameters=model_parameters,
                       training_data=training_data, lr_scheduler=lr_scheduler, mpu=mpu,
                       dist_init_required=dist_init_required, collate_fn=collate_fn, config=config,
                       config_params=config_params, **kwargs)


def _deepspeed_wrapper_resolver(optimizer):
    """Find the DeepSpeed wrapper that flattened ``optimizer``'s params (only when DeepSpeed is loaded)."""
    if "deepspeed" not in _sys.modules:
        return None
    from ds_conadv.integrations.deepspeed.zero_layout import resolve_wrapper

    return resolve_wrapper(optimizer)


_register(_deepspeed_wrapper_resolver)
for _name, _cls in _TORCH_OPTIM_NAMES.items():
    _register_optimizer(_name, _cls)
