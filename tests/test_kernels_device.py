"""Every Triton launcher runs under its tensors' device: with a mocked CUDA device guard and a mocked
"current device", each kernel launch must happen while the guard for the operand's device is entered."""
import contextlib

import torch

from diffedit_engine.kernels import dispatch, fusion, noise_diff


class _Kernel:
    """Stands in for an interpreted Triton kernel: records the current device at launch."""
    __name__ = "InterpretedFunction"

    def __init__(self, log):
        self.log = log

    def __getitem__(self, grid):
        return lambda *a, **k: self.log.append(("launch", _current[0]))


_current = ["cuda:0"]  # the mocked current device: what torch.cuda.current_device() would say


def _mock_guard(log):
    @contextlib.contextmanager
    def on_device(t):
        prev, _current[0] = _current[0], "cuda:1"  # the operands live on cuda:1
        log.append(("enter", "cuda:1"))
        try:
            yield
        finally:
            _current[0] = prev
    return on_device


def test_launchers_run_under_the_operands_device(monkeypatch):
    log = []
    kernel = type("InterpretedFunction", (_Kernel,), {})(log)
    monkeypatch.setattr(dispatch, "on_device", _mock_guard(log))  # dispatch.launcher, every launcher's guard
    for name in ("_fused_step_kernel",):
        monkeypatch.setattr(fusion, name, kernel)
    for name in ("_noise_maps_kernel", "_map_stats_kernel", "_subtract_kernel", "_overlap_kernel"):
        monkeypatch.setattr(noise_diff, name, kernel)
    monkeypatch.setattr(noise_diff, "triton", type("T", (), {"cdiv": staticmethod(lambda a, b: -(-a // b))}),
                        raising=False)
    monkeypatch.setattr(fusion, "triton", type("T", (), {"cdiv": staticmethod(lambda a, b: -(-a // b))}),
                        raising=False)
    B, N, C, h, w = 1, 2, 4, 4, 4
    fusion.fused_step_triton(torch.randn(B, 1 + N, C, h, w), torch.randn(B, C, h, w), torch.randn(B, C, h, w),
                             torch.rand(B, N, h, w), 7.5, torch.tensor(0.5), torch.tensor(0.6))
    noise_diff.noise_maps_triton(torch.randn(B, 2, 3, C, h, w), 0, [1], [2], 7.5)
    noise_diff.masks_from_maps_triton(torch.rand(B, N, h, w), "clamp:3", "subtract")
    launches = [d for kind, d in log if kind == "launch"]
    assert launches and all(d == "cuda:1" for d in launches), log
    assert _current[0] == "cuda:0"  # restored after each launcher


def test_guard_is_a_no_op_on_cpu():
    with dispatch.on_device(torch.zeros(1)):
        pass
