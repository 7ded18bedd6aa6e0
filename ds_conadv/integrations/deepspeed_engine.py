"""Old import path of :class:`~ds_conadv.integrations.deepspeed.engine.DeepSpeedConAdvEngine`."""
from ds_conadv.integrations.deepspeed.engine import DeepSpeedConAdvEngine

__all__ = ["DeepSpeedConAdvEngine"]
