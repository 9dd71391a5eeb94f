import os

import numpy as np
import pytest
import torch
from hypothesis import settings

from tools.cpus import threads_per_process

if not torch.cuda.is_available():  # before anything imports Triton (torch.nn.attention does)
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _test_threads() -> int:
    """Torch threads per test process: the usable CPUs shared among pytest-xdist's workers, so
    that workers x threads never exceeds them (oversubscribed, every test waits on the others). An
    OMP_NUM_THREADS set by the caller may lower it, never raise it."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    threads = threads_per_process(workers)
    asked = os.environ.get("OMP_NUM_THREADS", "")
    if asked.isdigit() and int(asked) >= 1:
        threads = min(threads, int(asked))
    return threads


_THREADS = _test_threads()
torch.set_num_threads(_THREADS)
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # subprocesses and spawned ranks
    os.environ[_var] = str(_THREADS)

settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True)
settings.register_profile("dev", max_examples=25, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")


def pytest_collection_modifyitems(config, items):
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # the longest tests first, so that no worker starts one while the others sit idle
        items.sort(key=lambda item: "slow" not in item.keywords)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; none is visible on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _patch_interpreter_bf16() -> None:
    """Give Triton 3.9's interpreter the GPU's bf16 arithmetic. It stores bf16 as uint16 and
    (1) its tl.dot multiplies those raw integers, (2) its fp32 -> bf16 cast truncates instead of
    rounding to nearest even. Without this the bf16 tests would measure the interpreter."""
    import triton.language as tl
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    if getattr(builder, "_hbmplan_bf16", False):
        return

    def as_fp32(handle):
        if handle.dtype.scalar == tl.bfloat16:
            return (handle.data.astype(np.uint32) << 16).view(np.float32)
        return handle.data

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if tl.bfloat16 not in (a.dtype.scalar, b.dtype.scalar):
            return dot(self, a, b, d, input_precision, max_num_imprecise_acc)
        out = np.matmul(as_fp32(a), as_fp32(b), dtype=d.data.dtype) + d.data
        return interpreter.TensorHandle(out, d.dtype.scalar)

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            bits = src.data.astype(np.float32).view(np.uint32)
            rounded = (bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16
            return interpreter.TensorHandle(rounded.astype(np.uint16), tl.bfloat16)
        return cast(self, src, dst_type)

    dot, cast = builder.create_dot, builder.cast_impl
    builder.create_dot, builder.cast_impl = create_dot, cast_impl
    builder._hbmplan_bf16 = True


@pytest.fixture(scope="session", autouse=True)
def _interpreter_bf16():
    """Every test that runs a Triton kernel in the interpreter gets the GPU's bf16 arithmetic."""
    from hbmplan.kernels import launch

    if launch.detect().interpret:
        _patch_interpreter_bf16()
