"""Kernel tests run the Triton kernels on CUDA when there is a GPU, else on CPU tensors through
Triton's interpreter. The interpreter must be on before Triton is first imported (torch imports it
with ``torch.nn.attention``), so a whole-suite run needs tests/conftest.py to set it first;
``pytest tests/kernels`` alone is covered by the line below."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def device() -> str:
    """Where the Triton kernels can run here: "cuda", or "cpu" through the interpreter."""
    from hbmplan.kernels import launch

    backend = launch.detect()
    if not backend.triton:
        pytest.skip("the triton package is not installed")
    if backend.cuda and not backend.interpret:
        return "cuda"
    if backend.interpret:  # tests/conftest.py gives the interpreter the GPU's bf16 arithmetic
        return "cpu"
    pytest.fail(
        "Triton was imported before TRITON_INTERPRET=1 was set, so its kernels cannot run on this "
        "CPU-only machine; set it before anything imports torch.nn.attention (tests/conftest.py: "
        "`if not torch.cuda.is_available(): os.environ.setdefault('TRITON_INTERPRET', '1')`)"
    )
