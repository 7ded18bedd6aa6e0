"""How a DeepSpeed/torchrun rank worker leaves once its results are written (shared by the workers)."""
import os
import sys

import torch


def leave_rank(hard: bool = True) -> None:
    """An orderly shutdown, then (``hard``) an exit that skips interpreter-exit destructors.

    A rank that exits with gloo's threads still alive can abort (seen once in CI: SIGABRT, "terminate called
    without an active exception"), hence barrier + destroy_process_group. DeepSpeed 0.19 on CPU still aborts now
    and then in a C++ destructor at interpreter exit (a joinable std::thread; seen twice in CI after the results
    were written), hence os._exit.
    """
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    if hard:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
