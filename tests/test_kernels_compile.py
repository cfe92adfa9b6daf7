"""The Triton kernels compile (no GPU needed): every kernel, at small tiles, through Triton's own
compiler down to PTX (sm_80, sm_90) and AMDGCN (gfx942) with the toolchain shipped in the Triton wheel.
Catches compiled-only breakage (dtypes, layouts, dots) that the interpreter tests cannot see. Runs in a
subprocess without TRITON_INTERPRET (the kernels in this process may be interpreted)."""
import os
import subprocess
import sys

import pytest

BF, U8, I8, F32, I32 = "*bf16", "*u8", "*i8", "*fp32", "i32"
_SIZES = dict(M=I32, N=I32, K=I32, R=I32, M_KEY=I32)


def _cases():
    from comfyui_lowbit.kernels import triton_act as A, triton_ternary as T, triton_w4a4 as W, triton_wonly as O

    gemm = dict(lr_ptr=BF, up_ptr=BF, bias_ptr=BF, W_ROW=I32, **_SIZES)
    wonly = dict(x_ptr=BF, w_ptr=U8, ws_ptr=BF, wz_ptr=BF, **gemm)
    tiles = dict(BLOCK_M=16, BLOCK_N=64, GROUP_M=4)
    return {
        "act_int4": (A._act_int4_kernel, dict(x_ptr=BF, smooth_ptr=BF, down_ptr=BF, q_ptr=I8, s_ptr=F32, lr_ptr=BF,
                                              M=I32, K=I32, R=I32, M_KEY=I32),
                     dict(HAS_SMOOTH=True, HAS_LR=True, UNSIGNED=True, GS=64, BLOCK_R=64, BLOCK_M=16)),
        "act_int8": (A._act_int8_kernel, dict(x_ptr=BF, down_ptr=BF, q_ptr=I8, s_ptr=F32, lr_ptr=BF,
                                              M=I32, K=I32, R=I32, M_KEY=I32),
                     dict(QUANT=True, HAS_LR=True, BLOCK_K=64, BLOCK_R=32, BLOCK_M=16)),
        "w4a4": (W._w4a4_kernel, dict(qx_ptr=I8, as_ptr=F32, w_ptr=U8, ws_ptr=BF, out_ptr=BF, **gemm),
                 dict(HAS_LR=True, HAS_BIAS=True, GS=64, BLOCK_R=32, **tiles)),
        "w4a16_splitk": (O._wonly_kernel, dict(wonly, out_ptr=F32),
                         dict(TERNARY=False, HAS_Z=True, HAS_LR=False, HAS_BIAS=True, ATOMIC=True, GS=128, BLOCK_R=16,
                              BLOCK_K=64, SPLIT_K=4, **tiles)),
        "ternary_lowrank": (O._wonly_kernel, dict(wonly, out_ptr=BF),
                            dict(TERNARY=True, HAS_Z=False, HAS_LR=True, HAS_BIAS=True, ATOMIC=False, GS=64,
                                 BLOCK_R=32, BLOCK_K=64, SPLIT_K=1, **tiles)),
        "ternary_int8": (T._ternary_int8_kernel, dict(qx_ptr=I8, xs_ptr=F32, w_ptr=U8, ws_ptr=BF, out_ptr=BF, **gemm),
                         dict(HAS_LR=True, HAS_BIAS=True, BLOCK_R=32, BLOCK_K=64, **tiles)),
    }


def _compile_all(arch: str) -> None:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("hip", arch, 64) if arch.startswith("gfx") else GPUTarget("cuda", int(arch[2:]), 32)
    for name, (kernel, types, consts) in _cases().items():
        fn = kernel
        while not isinstance(fn, triton.runtime.jit.JITFunction):
            fn = fn.fn
        sig = {a: "constexpr" if a in consts else types[a] for a in fn.arg_names}
        triton.compile(ASTSource(fn, sig, consts), target=target, options={"num_warps": 4, "num_stages": 2})
        print(f"{arch} {name}: ok", flush=True)


@pytest.mark.parametrize("arch", ["sm90", "sm80", "gfx942"])
def test_kernels_compile(arch):
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    p = subprocess.run([sys.executable, __file__, arch], env=env, capture_output=True, text=True, timeout=600)
    if p.returncode == 3:
        pytest.skip(f"no {arch} toolchain in this Triton build: {p.stdout.strip()[-300:]}")
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]


if __name__ == "__main__":
    try:
        from triton.backends import backends
        if ("amd" if sys.argv[1].startswith("gfx") else "nvidia") not in backends:
            print(f"backends: {sorted(backends)}")
            sys.exit(3)
    except ImportError as e:
        print(e)
        sys.exit(3)
    _compile_all(sys.argv[1])
