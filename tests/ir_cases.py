"""What the IR check compiles: every shipped config of every Triton kernel (sm90), one config per kernel variant on
the other architectures, the properties asserted on sm90, and the known gaps (strict xfails with their reason).

A kernel module lists its shipped configs as plain dicts (meta-parameters + num_warps/num_stages); add a kernel
here with its argument types, its constexpr variant(s) and the properties it must meet.
"""
import importlib
from dataclasses import dataclass, field

BF, U8, I8, F32, I32 = "*bf16", "*u8", "*i8", "*fp32", "i32"
ARCHES = ("sm90", "sm89", "sm80", "gfx942")
FP8_ARCHES = ("sm90", "sm89")  # FP8 tensor cores: the fp8 kernels compile there only

# property -> (description, predicate over ir_check.analyze's counts)
PROPERTIES = {
    "no_byte_loads": ("no ld.global of single bytes in the main loop", lambda r: r["loop_ld_global_b8"] == 0),
    "async_operands": ("both dot operands copied asynchronously (cp.async/TMA) in the main loop, no 2-D sync load",
                       lambda r: r["loop_async_copies"] >= 2 and r["loop_sync_2d_loads"] == 0
                       and r["loop_cp_async"] + r["loop_tma"] > 0),
    "wgmma": ("the main loop's dot is a wgmma", lambda r: r["loop_wgmma"] > 0),
    "no_int_to_float": ("no cvt int -> float in the main loop", lambda r: r["loop_cvt_int_to_float"] == 0),
    "no_spills": ("no spilled registers (ptxas local memory / stack 0)", lambda r: r["spill_bytes"] == 0),
    "fp8_tc": ("the main loop's tensor-core op multiplies e4m3 by e4m3", lambda r: r["loop_fp8_tc"] > 0),
    "async_copies": ("the main loop copies its operands with cp.async/TMA", lambda r: r["loop_cp_async"] + r["loop_tma"] > 0
                     and r["loop_async_copies"] >= 2 and r["loop_sync_2d_loads"] == 0),
    "vector_loads": ("16-byte loads or copies of the input in the main loop, no scalar ones",
                     lambda r: r["loop_16B_loads"] > 0 and r["loop_ld_global_b16"] == 0),
    "no_div_per_element": ("divisions per group or channel only: at most one per 4 input elements converted",
                           lambda r: r["loop_div"] * 4 <= r["loop_cvt_bf16_to_f32"]),
}
FP8_CHECKS = ("fp8_tc", "async_copies", "no_byte_loads", "no_spills")
GEMM_CHECKS = ("no_byte_loads", "async_operands", "wgmma", "no_spills")
ACT_CHECKS = ("vector_loads", "no_div_per_element", "no_spills")


@dataclass(frozen=True)
class Case:
    name: str
    module: str
    attr: str
    types: dict
    consts: dict
    num_warps: int
    num_stages: int
    checks: tuple = GEMM_CHECKS
    xfail: dict = field(default_factory=dict)  # property -> reason

    def kernel(self):
        return getattr(importlib.import_module(f"comfyui_lowbit.kernels.{self.module}"), self.attr)


def _mod(name):
    return importlib.import_module(f"comfyui_lowbit.kernels.{name}")


def _meta(cfg):
    return {k: v for k, v in cfg.items() if k not in ("num_warps", "num_stages", "pre_hook")}


def _label(cfg):
    m = _meta(cfg)
    tiles = "x".join(str(m[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "SPLIT_K") if k in m)
    return f"{tiles} w{cfg.get('num_warps', 4)} s{cfg.get('num_stages', 2)}"


def _family(label, module, attr, types, variants, cfgs, checks=GEMM_CHECKS, xfail=None, only_first=False):
    """Cases for each (variant, config); xfail(variant, cfg) -> {property: reason}."""
    out = []
    for vname, flags in variants.items():
        for cfg in cfgs[:1] if only_first else cfgs:
            out.append(Case(f"{label}[{vname} {_label(cfg)}]", module, attr, types, {**flags, **_meta(cfg)},
                            cfg.get("num_warps", 4), cfg.get("num_stages", 2), checks,
                            (xfail or (lambda v, c: {}))(vname, cfg)))
    return out


def fp8_cases(arch: str) -> list:
    """The FP8 kernels (triton_fp8.py), every shipped config, on sm_90 (wgmma) and sm_89 (mma.sync)."""
    fp8 = _mod("triton_fp8")
    gemm = dict(x_ptr="*fp8e4nv", xs_ptr=F32, w_ptr="*i32", ws_ptr=BF, out_ptr=BF, lr_ptr=BF, up_ptr=BF, bias_ptr=BF,
                M=I32, N=I32, K=I32, R=I32, M_KEY=I32, W_ROW=I32)
    flags = dict(HAS_LR=True, HAS_BIAS=True, BLOCK_K=64, BLOCK_R=32)
    checks = FP8_CHECKS + (("wgmma",) if arch == "sm90" else ())
    ada_spill = lambda v, c: ({"no_spills": "sm_89: mma.sync keeps both token halves' operands in registers; the "
                                            "tuner measures it and the per-GPU table leaves it out"}
                              if arch == "sm89" and c["SPLIT_M"] == 2 else {})
    out = _family("fp8_int4", "triton_fp8", "_fp8_gemm_kernel", gemm,
                  {"subnormal": dict(TERNARY=False, SUBNORMAL=True, **flags)}, fp8.INT4_CONFIGS, checks, xfail=ada_spill)
    out += _family("fp8_int4", "triton_fp8", "_fp8_gemm_kernel", gemm,
                   {"float16": dict(TERNARY=False, SUBNORMAL=False, **flags)}, fp8.INT4_CONFIGS[1:2], checks)
    out += _family("fp8_ternary", "triton_fp8", "_fp8_gemm_kernel", gemm,
                   {"lr+bias": dict(TERNARY=True, SUBNORMAL=True, **flags)}, fp8.TERNARY_CONFIGS, checks)
    out += _family("act_fp8", "triton_fp8", "_act_fp8_kernel",
                   dict(x_ptr=BF, smooth_ptr=BF, down_ptr=BF, q_ptr="*fp8e4nv", s_ptr=F32, lr_ptr=BF, M=I32, K=I32, R=I32,
                        M_KEY=I32), {"lr": dict(HAS_SMOOTH=True, HAS_LR=True, BLOCK_R=32)}, fp8.ACT_CONFIGS,
                   ("no_spills",))
    return out


def cases(arch: str) -> list:
    if arch == "sm89":
        return fp8_cases(arch)
    first = arch != "sm90"  # other architectures: compile one config per variant
    sizes = dict(M=I32, N=I32, K=I32, R=I32, M_KEY=I32, W_ROW=I32)
    lowrank = dict(lr_ptr=BF, up_ptr=BF, bias_ptr=BF)
    act, act8, w4a4 = _mod("triton_act"), _mod("triton_act8"), _mod("triton_w4a4")
    ternary, wonly = _mod("triton_ternary"), _mod("triton_wonly")
    act_types = dict(x_ptr=BF, rsmooth_ptr=F32, down_ptr=BF, q_ptr=I8, s_ptr=F32, lr_ptr=BF, M=I32, K=I32, R=I32, M_KEY=I32)
    wonly_types = dict(x_ptr=BF, w_ptr=U8, ws_ptr=BF, wz_ptr=BF, out_ptr=BF, **lowrank, **sizes)
    small_rows = lambda v, c: {"wgmma": "tiles under 64 token rows take mma.sync (issue 16)"} if c["BLOCK_M"] < 64 else {}
    out = []
    out += _family("act_int4", "triton_act", "_act_int4_kernel",
                   dict(act_types, part_ptr=F32, cnt_ptr="*i32", U_FROM=I32, NSPLIT=I32),
                   {"lr mixed": dict(HAS_SMOOTH=True, HAS_LR=True, UNSIGNED=2, GS=64, BLOCK_R=32)}, act.CONFIGS, ACT_CHECKS,
                   only_first=first)
    out += _family("act_int8", "triton_act8", "_act_int8_kernel",
                   {k: v for k, v in act_types.items() if k != "rsmooth_ptr"},
                   {"lr": dict(QUANT=True, HAS_LR=True, BLOCK_K=64, BLOCK_R=32)}, act8.CONFIGS, ("no_spills",),
                   only_first=first)
    w4a4_types = dict(qx_ptr=I8, as_ptr=F32, w_ptr=U8, ws_ptr=BF, out_ptr=BF, part_ptr=F32, cnt_ptr="*i32",
                      STRIDE_AG=I32, NSPLIT=I32, **lowrank, **sizes)
    flags = dict(HAS_LR=True, HAS_BIAS=True, GS=64, BLOCK_R=32, STRIDE_AM=1)  # scales stored (G, M)
    out += _family("w4a4", "triton_w4a4", "_w4a4_kernel", w4a4_types, {"lr+bias": dict(flags, NSPLIT=1)},
                   w4a4.CONFIGS, GEMM_CHECKS + ("no_int_to_float",), only_first=first)
    out += _family("w4a4", "triton_w4a4", "_w4a4_kernel", w4a4_types, {"lr+bias splitk": flags},
                   [c for c in w4a4.CONFIGS if c["BLOCK_M"] <= w4a4.SMALL_M], GEMM_CHECKS + ("no_int_to_float",),
                   only_first=first)
    out += _family("ternary_int8", "triton_ternary", "_ternary_int8_kernel",
                   dict(qx_ptr=I8, xs_ptr=F32, w_ptr=U8, ws_ptr=BF, out_ptr=BF, **lowrank, **sizes),
                   {"lr+bias": dict(HAS_LR=True, HAS_BIAS=True, BLOCK_R=32)}, ternary.CONFIGS, only_first=first,
                   xfail=small_rows)
    variants = {"w4a16": dict(TERNARY=False, HAS_Z=True, HAS_LR=False, HAS_BIAS=True, GS=64, BLOCK_R=16),
                "ternary": dict(TERNARY=True, HAS_Z=False, HAS_LR=True, HAS_BIAS=True, GS=64, BLOCK_R=32)}
    out += _family("wonly_small", "triton_wonly", "_wonly_kernel", dict(wonly_types, out_ptr=F32),
                   {k: dict(v, ATOMIC=True) for k, v in variants.items()}, wonly.SMALL_CONFIGS, only_first=first,
                   xfail=small_rows)
    out += _family("wonly_large", "triton_wonly", "_wonly_kernel", wonly_types,
                   {k: dict(v, ATOMIC=False) for k, v in variants.items()}, wonly.LARGE_CONFIGS, only_first=first,
                   xfail=small_rows)
    if arch in FP8_ARCHES:
        out += fp8_cases(arch)
    return out
