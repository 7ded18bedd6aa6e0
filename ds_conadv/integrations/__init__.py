"""Glue to DeepSpeed (``deepspeed``) and Horovod (``horovod``); imported lazily, neither is required."""
