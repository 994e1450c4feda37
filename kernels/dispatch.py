"""Which implementation a kernel call runs: the Triton kernel or its torch reference.

`impl="auto"` (the default everywhere) defers to the environment variable DIFFEDIT_KERNELS
("auto" | "triton" | "torch"); "auto" then means Triton for CUDA tensors and the reference otherwise.
An explicit impl="triton" / "torch" argument wins over the environment variable. Forcing Triton on CPU
tensors works only under the Triton interpreter (TRITON_INTERPRET=1 set before `triton` is imported),
which is how the tests and CI exercise the kernels without a GPU.
"""
import contextlib
import os

import torch

try:
    import triton  # noqa: F401
    HAS_TRITON = True
except ImportError:  # e.g. macOS wheels: the torch references still work
    HAS_TRITON = False

IMPLS = ("auto", "triton", "torch")


def choose(impl: str, t: torch.Tensor) -> str:
    """'triton' or 'torch' for a call whose main operand is `t`."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        impl = os.environ.get("DIFFEDIT_KERNELS", "auto").strip().lower() or "auto"
        if impl not in IMPLS:
            raise ValueError(f"DIFFEDIT_KERNELS must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        impl = "triton" if HAS_TRITON and t.is_cuda else "torch"
    if impl == "triton" and not HAS_TRITON:
        raise RuntimeError("impl='triton' but triton is not installed")
    return impl


def check_launchable(kernel, t: torch.Tensor) -> None:
    """A Triton kernel runs on CUDA tensors, or on CPU tensors when it was built by the interpreter."""
    if t.is_cuda:
        return
    if type(kernel).__name__ != "InterpretedFunction":
        raise RuntimeError("Triton kernels need CUDA tensors; for CPU tensors set TRITON_INTERPRET=1 before "
                           "importing triton (correctness only) or use impl='torch'")


def on_device(t: torch.Tensor):
    """The context every Triton launch runs in: the tensor's CUDA device made current (a kernel launches on
    the current device; on a multi-GPU machine that is not necessarily the tensors'). CPU: nothing to do."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()
