"""Shared helpers of the kernel tests: where the Triton kernels can run, poisoned outputs, comparisons.

Import this before anything that imports triton: it turns the interpreter on (as CI does) when no GPU is
present, so impl="triton" runs the kernels on CPU tensors.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def require_triton(kernel):
    """Skip when the Triton path cannot run here (no triton, or triton imported before the interpreter)."""
    if kernel is None:
        pytest.skip("triton is not installed")
    if DEVICE == "cpu" and type(kernel).__name__ != "InterpretedFunction":
        pytest.skip("kernels were built without TRITON_INTERPRET=1; run with TRITON_INTERPRET=1")


def poisoned(like: torch.Tensor) -> torch.Tensor:
    """An output buffer filled with NaN, so an element the kernel never writes fails the comparison."""
    return torch.full_like(like, float("nan"))


def assert_same(got: torch.Tensor, ref: torch.Tensor, exact: bool = False, rtol=None, atol=None):
    """Every element written (no NaN left from the poison) and equal to the reference: bit for bit when
    `exact`, else within a few fp32 ulps of the operands (torch's CPU sqrt is not always correctly rounded,
    the interpreter's NumPy one is; GPUs contract to FMA) and one ulp of a half-precision output."""
    assert got.shape == ref.shape and got.dtype == ref.dtype, (got.shape, got.dtype, ref.shape, ref.dtype)
    nan = torch.isnan(got) & ~torch.isnan(ref)
    assert not nan.any(), f"{int(nan.sum())} elements not written (still NaN), first at {nan.nonzero()[0].tolist()}"
    if exact:
        bad = (got != ref) & ~(torch.isnan(got) & torch.isnan(ref))
        assert not bad.any(), (f"{int(bad.sum())} elements differ, max |d| = "
                               f"{(got.double() - ref.double())[bad].abs().max().item()}")
        return
    rt = {torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}.get(got.dtype, 1e-6)
    torch.testing.assert_close(got, ref, rtol=rtol or rt, atol=atol or 1e-5, equal_nan=True)
