"""runtime.onednn: fp32 linears through oneDNN's packed inner product, swapped in from outside the model (issue 23
item 0). The swapped UNet computes the plain one's output to fp32 rounding, eager and under inductor's freezing;
nothing changes where the swap does not apply (bf16, not CPU, switched off)."""
import copy

import pytest
import torch
import torch.nn as nn

from diffedit_engine.engine.runtime import onednn
from diffedit_engine.engine.runtime.optimize import EditorOptions, optimize
from diffedit_engine.weights import load_model

pytestmark = pytest.mark.skipif(onednn.onednn_skip_reason("cpu", torch.float32) is not None,
                                reason="oneDNN not available in this torch")


def _call(unet, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, unet.config.in_channels, 8, 8, generator=g).to(dtype)
    ctx = torch.randn(2, 7, unet.config.cross_attention_dim, generator=g).to(dtype)
    with torch.no_grad():
        return unet(x, torch.tensor(500), ctx)


def _rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def _n_linears(module, cls):
    return sum(type(c) is cls for c in module.modules())


def test_swapped_unet_equals_the_plain_one(tiny_folder):
    m = load_model(tiny_folder("sd1"))
    plain = _call(m.unet)
    n_plain = _n_linears(m.unet, nn.Linear)
    n = onednn.use_onednn_linears(m.unet)
    assert n == n_plain > 0 and _n_linears(m.unet, nn.Linear) == 0
    assert _rel(_call(m.unet), plain) <= 1e-5
    # readers of .weight, state_dict and deepcopy see the plain weights; restore gives the plain modules back
    ref = load_model(tiny_folder("sd1")).unet.state_dict()
    sd = m.unet.state_dict()
    assert sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k]) for k in ref)
    dup = copy.deepcopy(m.unet)
    assert _n_linears(dup, onednn.OneDNNLinear) == n and _rel(_call(dup), plain) <= 1e-5
    assert onednn.restore_linears(m.unet) == n and _n_linears(m.unet, nn.Linear) == n_plain
    assert torch.equal(_call(m.unet), plain)


def test_conversions_keep_cpu_fp32_or_refuse():
    lin = nn.Linear(16, 8)
    x = torch.randn(3, 16)
    swapped = onednn.OneDNNLinear(copy.deepcopy(lin))
    swapped.to(memory_format=torch.channels_last).float()  # what optimize does to a UNet: repacked, same numbers
    assert _rel(swapped(x).detach(), lin(x).detach()) <= 1e-5
    with pytest.raises(ValueError, match="restore_linears"):
        swapped.to(torch.bfloat16)
    assert _rel(swapped(x).detach(), lin(x).detach()) <= 1e-5  # the refused cast left it whole


def test_compiled_with_freezing_equals_eager():
    import torch._inductor.config as inductor_config

    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32)).eval()
    swapped = copy.deepcopy(plain)
    assert onednn.use_onednn_linears(swapped) == 2
    x = torch.randn(2, 5, 32)
    with torch.no_grad(), inductor_config.patch(freezing=True):
        torch._dynamo.reset()
        out = torch.compile(swapped, fullgraph=True, dynamic=False)(x)
    with torch.no_grad():
        assert _rel(out, plain(x)) <= 1e-5


def test_not_applied_outside_cpu_fp32(tiny_folder):
    assert "not CPU" in onednn.onednn_skip_reason("cuda", torch.float32)
    assert "not fp32" in onednn.onednn_skip_reason("cpu", torch.bfloat16)
    lp = nn.Linear(4, 4).to(torch.bfloat16)
    assert onednn.use_onednn_linears(nn.Sequential(lp)) == 0
    m = load_model(tiny_folder("sd1"), dtype=torch.bfloat16)
    plain = _call(m.unet, dtype=torch.bfloat16)
    out, info = optimize(m, EditorOptions(compile=False, threads=1, onednn_linear=True))
    assert info["onednn_linears"].startswith("not applied: not fp32")
    assert _n_linears(m.unet, onednn.OneDNNLinear) == 0
    assert torch.equal(_call(m.unet, dtype=torch.bfloat16), plain)


def test_optimize_swaps_compiled_cpu_fp32_and_eager_on_request(tiny_folder):
    # torch.compile is lazy: optimize only wraps the UNet, nothing is compiled here
    for opts, swapped in ((EditorOptions(compile=True, threads=1), True),
                          (EditorOptions(compile=True, threads=1, onednn_linear=False), False),
                          (EditorOptions(compile=False, threads=1), False),  # eager stays bit-exact by default
                          (EditorOptions(compile=False, threads=1, onednn_linear=True), True)):
        m = load_model(tiny_folder("sd1"))
        _, info = optimize(m, opts)
        n = _n_linears(m.unet, onednn.OneDNNLinear)
        assert (info["onednn_linears"] == n > 0) if swapped else ("onednn_linears" not in info and n == 0), opts
    # compiled without freezing inductor cannot lower the packed linear: left alone (torch.compile is lazy here)
    m = load_model(tiny_folder("sd1"))
    _, info = optimize(m, EditorOptions(compile=True, freeze=False, threads=1, onednn_linear=True))
    assert info["onednn_linears"] == "not applied: compiled without freezing"
    assert _n_linears(m.unet, onednn.OneDNNLinear) == 0
