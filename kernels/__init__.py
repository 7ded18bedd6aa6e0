"""Compute kernels (Triton, CUDA) for ds_conadv optimizers; imported as ds_conadv.kernels."""
