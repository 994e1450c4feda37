"""Which implementation a kernel call runs: the Triton kernel or its torch reference, and the one way every
kernel is launched (`launcher`) and dispatched (`run`).

`impl="auto"` (the default everywhere) defers to the environment variable DIFFEDIT_KERNELS
("auto" | "triton" | "torch"); "auto" then means Triton for CUDA tensors and the reference otherwise.
An explicit impl="triton" / "torch" argument wins over the environment variable. Forcing Triton on CPU
tensors works only under the Triton interpreter (TRITON_INTERPRET=1 set before `triton` is imported),
which is how the tests and CI exercise the kernels without a GPU.
"""
import contextlib
import functools
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


def launcher(fn):
    """A Triton launcher that runs under its first argument's device (on_device): every launcher of the package
    is wrapped by this one decorator, so none can forget the guard."""
    @functools.wraps(fn)
    def launch(t, *args, **kwargs):
        with on_device(t):
            return fn(t, *args, **kwargs)
    return launch


def run(impl: str, triton_fn, reference, args: tuple, out=None):
    """The one dispatch of the public kernel functions: triton_fn(*args, out=out) when `choose` picks Triton for
    args[0] (the launcher writes into `out` itself), else reference(*args), copied into `out` when given (a
    tensor, or the buffers of a NamedTuple result, returned as that NamedTuple)."""
    if choose(impl, args[0]) == "triton":
        return triton_fn(*args, out=out)
    res = reference(*args)
    if out is None:
        return res
    if torch.is_tensor(out):
        return out.copy_(res)
    for o, v in zip(out, res):
        o.copy_(v)
    return type(res)(*out)
