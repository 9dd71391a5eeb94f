"""Pure-PyTorch references and (with CUDA) Triton kernels for the schedules."""
