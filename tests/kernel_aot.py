"""Compile every Triton kernel variant for an H100 (sm_90) without a GPU: GPU-only type and lowering errors
that the interpreter lets through. Run as a script with TRITON_INTERPRET unset (tests/test_kernels_compile.py)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import checkout  # noqa: E402,F401  (diffedit_engine = this checkout)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from diffedit_engine.kernels import fusion, noise_diff as nd  # noqa: E402

F32, F16, I32 = "*fp32", "*fp16", "i32"


def sig(fn, types):
    """Signature dict in the kernel's argument order; constexpr for the upper-case (meta) parameters."""
    names = fn.arg_names
    return {n: ("constexpr" if n.isupper() and n not in ("N", "C", "HW", "P") else types.get(n, I32)) for n in names}


def variants():
    fz = dict(eps_ptr=F16, x_ptr=F16, bg_ptr=F16, w_ptr=F32, out_ptr=F16, g_ptr=F32, at_ptr=F32, ap_ptr=F32,
              g_val="fp32")
    for pred in (0, 1, 2):
        yield fusion._fused_step_kernel, fz, dict(PRED=pred, G_IS_PTR=pred == 1, BLOCK=512)
    nm = dict(eps_ptr=F16, src_ptr="*i32", tgt_ptr="*i32", out_ptr=F32, g_ptr=F32, g_val="fp32", n_f="fp32",
              C_f="fp32")
    for l2 in (False, True):
        yield nd._noise_maps_kernel, nm, dict(L2=l2, G_IS_PTR=l2, BLOCK=256)
    st = dict(x_ptr=F32, s_ptr=F32, t_ptr=F32, norm_param="fp32", t_param="fp32", q_g="fp32", q_g1="fp32")
    for norm, stat in [(0, 0), (1, 1), (0, 2), (2, 3), (0, 4), (2, 4)]:
        yield nd._map_stats_kernel, st, dict(NORM=norm, STAT=stat, WRITE_S=norm != 2, BLOCK=1024, HBLOCK=64)
    yield nd._subtract_kernel, dict(s_ptr=F32, sp_ptr=F32), dict(LOW=0.5, BLOCK=1024)
    for pol in (0, 1, 2):
        yield nd._overlap_kernel, dict(s_ptr=F32, t_ptr=F32, w_ptr=F32), dict(POLICY=pol, BLOCK=1024)


def main():
    target = GPUTarget("cuda", 90, 32)
    for fn, types, consts in variants():
        k = triton.compile(ASTSource(fn=fn, signature=sig(fn, types), constexprs=consts), target=target,
                           options=dict(enable_fp_fusion=False))
        assert "ptx" in k.asm and "cubin" in k.asm, fn.__name__
        print(fn.__name__, consts, "ok")


if __name__ == "__main__":
    main()
