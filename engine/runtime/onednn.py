"""fp32 linears through oneDNN's packed inner product on CPU: a model transform applied from outside the model code
(runtime.optimize calls it after the q/k/v fusion), the model's modules stay plain nn.Linear.

Why: on x86 inductor's freezing packs fp32 linears for MKL (`mkl::_mkl_linear`; fx_passes/mkldnn_fusion.py picks
MKL for fp32 with no config switch, oneDNN only for bf16/fp16, AOT or dynamic batch) and eager runs them through
MKL's sgemm. On this AMD EPYC oneDNN's packed linear did the SD 1.5 UNet's 12 linear shapes in 1.25-1.36x less CPU
time than either (benchmarks/unet_cpu_profile.py linears). So every fp32 nn.Linear becomes OneDNNLinear, which holds
the weight prepacked by `mkldnn::_reorder_linear_weight` and calls `mkldnn::_linear_pointwise` — the op freezing
itself emits for bf16, so under torch.compile inductor lowers it to the same extern call and its linear+unary /
linear+add fusions match it; in eager it is the same kernel without the fusions.

The packed weight replaces the plain one (no second copy of the linear weights: +0.9 GB on SD 1.5, more on SD-XL);
`weight` reads it back densely, state_dict and deepcopy write the plain weight, and `restore_linears` undoes the
swap. Inference only: the op has no autograd formula.
"""
import torch
import torch.nn as nn


def onednn_skip_reason(device, dtype) -> str | None:
    """Why the swap does not apply to a model on (device, dtype), or None when it does: CPU fp32 with oneDNN."""
    if torch.device(device).type != "cpu":
        return f"not CPU ({device})"
    if dtype != torch.float32:
        return f"not fp32 ({str(dtype).replace('torch.', '')}: inductor's freezing already packs it for oneDNN)"
    if not (torch.backends.mkldnn.enabled and torch.backends.mkldnn.is_available()):
        return "oneDNN not available in this torch"
    return None


def _pack(weight: torch.Tensor) -> torch.Tensor:
    # batch size None: a layout for any M (the UNet's calls run at several token counts)
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)


class OneDNNLinear(nn.Module):
    """nn.Linear with its fp32 weight prepacked for oneDNN; the same y = x Wᵀ + b to fp32 rounding."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("packed", _pack(linear.weight), persistent=False)
        self.bias = linear.bias

    @property
    def weight(self) -> torch.Tensor:
        return self.packed.to_dense()

    def forward(self, x):
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def to_linear(self) -> nn.Linear:
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        lin.weight = nn.Parameter(self.weight, requires_grad=False)
        lin.bias = self.bias
        return lin

    def _apply(self, fn, recurse=True):
        # an opaque oneDNN tensor cannot be cast or moved; a conversion that keeps CPU fp32 (memory format, .float())
        # repacks, anything else asks for the plain module back
        dense = fn(self.weight)
        if dense.device.type != "cpu" or dense.dtype != torch.float32:
            raise ValueError(f"OneDNNLinear stays CPU fp32 (asked for {dense.device} {dense.dtype}); "
                             "call runtime.onednn.restore_linears first")
        del self._buffers["packed"]
        try:
            return super()._apply(fn, recurse)
        finally:
            self.register_buffer("packed", _pack(dense), persistent=False)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "weight"] = self.weight

    def __deepcopy__(self, memo):
        # the oneDNN tensor has no storage to copy: rebuild from the plain weight
        import copy

        return OneDNNLinear(copy.deepcopy(self.to_linear(), memo))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def _swap(module: nn.Module, match, make) -> int:
    n = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if match(child):
                setattr(parent, name, make(child))
                n += 1
    return n


def use_onednn_linears(module: nn.Module) -> int:
    """Replace, in place, every fp32 CPU nn.Linear in module by OneDNNLinear; returns how many. Linears on another
    device or in another dtype are left alone (onednn_skip_reason says why a whole model would be)."""
    return _swap(module, lambda c: type(c) is nn.Linear and onednn_skip_reason(c.weight.device, c.weight.dtype)
                 is None, OneDNNLinear)


def restore_linears(module: nn.Module) -> int:
    """Undo use_onednn_linears in place: every OneDNNLinear becomes a plain nn.Linear again; returns how many."""
    return _swap(module, lambda c: isinstance(c, OneDNNLinear), OneDNNLinear.to_linear)

