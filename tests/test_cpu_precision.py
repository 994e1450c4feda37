"""issue 23 item 1: bf16 on CPUs that multiply it natively (engine.runtime.cpu), and the VAE's fp32 retry for a
non-finite low-precision decode applying to a bf16 CPU model as it does to fp16 on CUDA."""
import torch

from diffedit_engine.engine.runtime import cpu, family
from diffedit_engine.engine.runtime.editor import Editor
from diffedit_engine.engine.runtime.optimize import EditorOptions
from diffedit_engine.weights import load_model

ZEN4 = "fpu vme avx2 avx512f avx512bw avx512vl avx512_bf16 avx512_vnni"
SPR = "fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8"
SKYLAKE = "fpu avx2 avx512f avx512bw avx512vl"


def _cpuinfo(tmp_path, flags: str):
    p = tmp_path / "cpuinfo"
    p.write_text(f"processor\t: 0\nmodel name\t: X\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n")
    return p


def test_native_bf16_needs_the_flag_and_torch_avx512(tmp_path, monkeypatch):
    cases = [(ZEN4, "AVX512", True), (SPR, "AVX512", True), (SKYLAKE, "AVX512", False),
             (ZEN4, "AVX2", False), (ZEN4, "DEFAULT", False), (SKYLAKE, "AVX2", False)]
    for flags, capability, expected in cases:
        monkeypatch.setattr(cpu, "CPUINFO", _cpuinfo(tmp_path, flags))
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda c=capability: c)
        assert cpu.cpu_has_native_bf16() is expected, (flags, capability)


def test_cpu_flags_read_and_missing(tmp_path, monkeypatch):
    assert cpu.cpu_flags(_cpuinfo(tmp_path, SPR)) >= {"amx_bf16", "avx512_bf16"}
    assert cpu.cpu_flags(tmp_path / "absent") == frozenset()
    (tmp_path / "arm").write_text("processor\t: 0\nFeatures\t: fp asimd bf16\n")
    assert cpu.cpu_flags(tmp_path / "arm") == frozenset()
    monkeypatch.setattr(cpu, "CPUINFO", tmp_path / "absent")
    assert cpu.cpu_has_native_bf16() is False


def test_cpu_default_dtype_stays_fp32():
    """The exact preset keeps fp32 on every CPU; presets choose bf16 through cpu_has_native_bf16."""
    assert family.default_dtype("sd", "cpu") == torch.float32
    assert family.default_dtype("sd3", "cpu") == torch.float32


def _poison_bf16_decodes(vae):
    """A forward hook on the decoder's last convolution that makes every bf16 output infinite (a stand-in for an
    overflowing decode). The fp32 retry deep-copies the VAE, hook included: its fp32 output passes untouched."""
    def hook(module, args, out):
        return torch.full_like(out, float("inf")) if out.dtype == torch.bfloat16 else out

    vae.decoder.conv_out.register_forward_hook(hook)


def test_bf16_cpu_editor_edits_and_its_vae_falls_back_to_fp32(tiny_folder):
    m = load_model(tiny_folder("sd1"), device="cpu", dtype=torch.bfloat16)
    assert next(m.vae.parameters()).dtype == torch.bfloat16 and next(m.unet.parameters()).dtype == torch.bfloat16
    img = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0))
    ed = Editor(m, EditorOptions(compile=False, threads=1))
    assert ed.info["dtype"] == "bfloat16" and ed.info["vae_dtype"] == "bfloat16"
    clean = ed.edit(img, [("a cat", "a dog")], steps=2, num_maps=1, seed=3)
    assert clean.image.shape == (3, 32, 32) and torch.isfinite(clean.image).all() and clean.vae_fallbacks == 0

    _poison_bf16_decodes(m.vae)
    redone = ed.edit(img, [("a cat", "a dog")], steps=2, num_maps=1, seed=3)
    assert redone.vae_fallbacks == 1                       # the one final decode, redone by the fp32 copy
    assert torch.isfinite(redone.image).all() and redone.image.dtype == torch.float32
    assert next(m.vae.parameters()).dtype == torch.bfloat16  # the bf16 VAE is kept; the fp32 copy is separate
    # Same latents, decoded in fp32 instead of bf16: close to the clean edit's image, not a different picture
    assert (redone.image - clean.image).abs().mean() < 0.05
