"""What this CPU computes natively, for choosing a precision before a model is loaded.

bf16 pays on a CPU only where the GEMMs and convolutions run on bf16 dot-product instructions (AVX512_BF16's
vdpbf16ps, or AMX tiles): measured on this project's 2-core AVX512_BF16 machine, the SD 1.5 UNet call ran 1.9x
faster in bf16 than in fp32 (issue 23). Without them oneDNN emulates bf16 through fp32 and it is slower than fp32,
so the answer needs both torch's vector path (AVX-512, which oneDNN's bf16 kernels use) and the CPU's flags.
The flags are x86 Linux's (/proc/cpuinfo); elsewhere the answer is False and the engine stays in fp32.
"""
from pathlib import Path

import torch

BF16_FLAGS = ("avx512_bf16", "amx_bf16")
CPUINFO = Path("/proc/cpuinfo")


def cpu_flags(cpuinfo: Path | None = None) -> frozenset:
    """The first processor's flags in /proc/cpuinfo (all processors share them); empty where there is none."""
    try:
        text = Path(cpuinfo or CPUINFO).read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


def cpu_capability() -> str:
    """torch's CPU kernel level ("DEFAULT", "AVX2", "AVX512", ...); "DEFAULT" on a torch without the query."""
    get = getattr(torch.backends.cpu, "get_cpu_capability", None)
    return get() if get is not None else "DEFAULT"


def cpu_has_native_bf16() -> bool:
    """True when this CPU multiplies bf16 natively (AVX512_BF16 or AMX-BF16 in its flags) and torch runs its
    AVX-512 kernels (a torch limited to AVX2 leaves bf16 emulated, slower than fp32)."""
    if not cpu_capability().upper().startswith("AVX512"):
        return False
    return any(f in cpu_flags() for f in BF16_FLAGS)
