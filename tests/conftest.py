import os

import torch

if not torch.cuda.is_available():
    # the Triton kernels then run in Triton's interpreter on CPU tensors; must be set before @triton.jit runs
    os.environ.setdefault("TRITON_INTERPRET", "1")
