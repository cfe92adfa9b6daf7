"""What the IR check compiles: every shipped config of every Triton kernel (sm90), one config per kernel variant on
sm80 and gfx942, the int8 tensor-core GEMMs' first config on sm86, sm89 and sm120 (the consumer GPUs), the
properties asserted, and the known gaps (strict xfails with their reason).

A kernel module lists its shipped configs as plain dicts (meta-parameters + num_warps/num_stages); add a kernel
here with its argument types, its constexpr variant(s) and the properties it must meet.
"""
import importlib
from dataclasses import dataclass, field

BF, U8, I8, F32, I32 = "*bf16", "*u8", "*i8", "*fp32", "i32"
ARCHES = ("sm90", "sm80", "gfx942", "sm86", "sm89", "sm120")
MMA_SYNC_ARCHES = ("sm80", "sm86", "sm89", "sm120")  # int8 mma.sync (IMMA): Ampere, Ada, GeForce Blackwell

# property -> (description, predicate over ir_check.analyze's counts)
PROPERTIES = {
    "no_byte_loads": ("no ld.global of single bytes in the main loop", lambda r: r["loop_ld_global_b8"] == 0),
    "async_operands": ("both dot operands copied asynchronously (cp.async/TMA) in the main loop, no 2-D sync load",
                       lambda r: r["loop_async_copies"] >= 2 and r["loop_sync_2d_loads"] == 0
                       and r["loop_cp_async"] + r["loop_tma"] > 0),
    "wgmma": ("the main loop's dot is a wgmma", lambda r: r["loop_wgmma"] > 0),
    "no_int_to_float": ("no cvt int -> float in the main loop", lambda r: r["loop_cvt_int_to_float"] == 0),
    "no_spills": ("no spilled registers (ptxas local memory / stack 0)", lambda r: r["spill_bytes"] == 0),
    "int8_mma": ("int8 tensor-core MMAs (IMMA / IGMMA) in the SASS main loop", lambda r: r["sass_loop_int8_mma"] > 0),
    "vector_loads": ("16-byte loads or copies of the input in the main loop, no scalar ones",
                     lambda r: r["loop_16B_loads"] > 0 and r["loop_ld_global_b16"] == 0),
    "no_div_per_element": ("divisions per group or channel only: at most one per 4 input elements converted",
                           lambda r: r["loop_div"] * 4 <= r["loop_cvt_bf16_to_f32"]),
    "register_weight": ("the dot's left operand (the decoded weight) from registers; nothing stored to shared "
                        "memory by the main loop but async copies (no tile, no layout conversion)",
                        lambda r: r["loop_dot_reg_a"] > 0 and r["loop_local_alloc_tensor"] == 0
                        and r["loop_st_shared"] == 0),
    "register_weight_scaled": ("register_weight, except one shared-memory store per per-row scale/zero vector "
                               "changing layout (at most 2): the decoded tile itself never goes through shared memory",
                               lambda r: r["loop_dot_reg_a"] > 0 and r["loop_local_alloc_tensor"] == 0
                               and r["loop_st_shared"] <= 2),
    "async_tiles": ("both dot operands copied asynchronously in the main loop; plain loads only of per-row vectors "
                    "(scales, prefetched a step ahead)", lambda r: r["loop_async_copies"] >= 2
                    and r["loop_cp_async"] + r["loop_tma"] > 0 and r["loop_sync_tile_loads"] == 0),
    "weight_16B": ("16-byte copies (the packed weight) in the main loop", lambda r: r["loop_16B_loads"] > 0),
    "vector_stores": ("no byte loads or int -> float conversions, 16-byte stores and no narrow ones",
                      lambda r: r["ld_global_b8"] == 0 and r["cvt_int_to_float"] == 0 and r["st_global_16B"] > 0
                      and r["st_global_narrow"] == 0),
}
GEMM_CHECKS = ("no_byte_loads", "async_operands", "wgmma", "no_spills")
WONLY_CHECKS = {"ternary": GEMM_CHECKS + ("register_weight", "weight_16B", "no_int_to_float"),
                "w4a16": ("no_byte_loads", "async_tiles", "wgmma", "no_spills", "register_weight_scaled", "weight_16B",
                          "no_int_to_float")}
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
    tiles += f" kb{m['KB']}" if "KB" in m else ""
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


def cases(arch: str) -> list:
    first = arch != "sm90"  # other architectures: compile one config per variant
    int8_gemms_only = arch in ("sm86", "sm89", "sm120")
    sizes = dict(M=I32, N=I32, K=I32, R=I32, M_KEY=I32, W_ROW=I32)
    lowrank = dict(lr_ptr=F32, up_ptr=BF, bias_ptr=BF)  # lr float32 (reference.lora_down)
    act, rowquant, w4a4 = _mod("triton_act"), _mod("triton_rowquant"), _mod("triton_w4a4")
    ternary, wonly = _mod("triton_ternary"), _mod("triton_wonly")
    act_types = dict(x_ptr=BF, rsmooth_ptr=F32, down_ptr=BF, q_ptr=I8, s_ptr=F32, lr_ptr=F32, M=I32, K=I32, R=I32, M_KEY=I32)
    wonly_types = dict(x_ptr=BF, w_ptr=U8, ws_ptr=BF, wz_ptr=BF, out_ptr=BF, **lowrank, **sizes)
    out = []
    out += _family("act_int4", "triton_act", "_act_int4_kernel",
                   dict(act_types, part_ptr=F32, cnt_ptr="*i32", U_FROM=I32, NSPLIT=I32),
                   {"lr mixed": dict(HAS_SMOOTH=True, HAS_LR=True, UNSIGNED=2, GS=64, BLOCK_R=32)}, act.CONFIGS, ACT_CHECKS,
                   only_first=first)
    rowquant_types = dict({k: v for k, v in act_types.items() if k != "rsmooth_ptr"}, smooth_ptr=BF)
    rowquant_flags = dict(HAS_LR=True, BLOCK_R=32)
    out += _family("act_int8", "triton_rowquant", "_row_quant_kernel", rowquant_types,
                   {"lr": dict(rowquant_flags, CODES=rowquant.INT8, HAS_SMOOTH=False)}, rowquant.CONFIGS,
                   ("no_spills",), only_first=first)
    out += _family("act_int8", "triton_rowquant", "_row_quant_kernel", rowquant_types,  # W4A8's: one config (as fp8's)
                   {"smooth lr": dict(rowquant_flags, CODES=rowquant.INT8, HAS_SMOOTH=True)}, rowquant.CONFIGS,
                   ("no_spills",), only_first=True)
    w4a4_types = dict(qx_ptr=I8, as_ptr=F32, w_ptr=U8, ws_ptr=BF, out_ptr=BF, part_ptr=F32, cnt_ptr="*i32",
                      STRIDE_AG=I32, NSPLIT=I32, **lowrank, **sizes)
    flags = dict(HAS_LR=True, HAS_BIAS=True, GS=64, BLOCK_R=32, STRIDE_AM=1)  # scales stored (G, M)
    out += _family("w4a4", "triton_w4a4", "_w4a4_kernel", w4a4_types,
                   {"lr+bias": dict(flags, NSPLIT=1, EVEN_M=True), "lr+bias ragged": dict(flags, NSPLIT=1, EVEN_M=False)},
                   w4a4.CONFIGS, GEMM_CHECKS + ("no_int_to_float",), only_first=first)
    out += _family("w4a4", "triton_w4a4", "_w4a4_kernel", w4a4_types, {"lr+bias splitk": dict(flags, EVEN_M=False)},
                   [c for c in w4a4.CONFIGS if c["BLOCK_M"] <= w4a4.SMALL_M], GEMM_CHECKS + ("no_int_to_float",),
                   only_first=first)
    w4a8 = _mod("triton_w4a8")
    w4a8_types = dict(qx_ptr=I8, xs_ptr=F32, w_ptr=U8, s0_ptr=F32, out_ptr=BF, cnt_ptr="*i32", NSPLIT=I32, **lowrank,
                      **sizes)
    w4a8_flags = dict(HAS_LR=True, HAS_BIAS=True, GS=64, BLOCK_R=32, NSPLIT=1, EVEN_M=True)
    w4a8_checks = GEMM_CHECKS + ("no_int_to_float",)
    out += _family("w4a8", "triton_w4a8", "_w4a8_kernel", dict(w4a8_types, ws_ptr=BF, part_ptr=F32),
                   {"float": dict(w4a8_flags, PROGRESSIVE=False)}, w4a8.CONFIGS, w4a8_checks, only_first=first)
    out += _family("w4a8", "triton_w4a8", "_w4a8_kernel", dict(w4a8_types, ws_ptr="*i16", part_ptr="*i32"),
                   {"progressive": dict(w4a8_flags, PROGRESSIVE=True)}, w4a8.CONFIGS, w4a8_checks, only_first=first)
    int8_types = dict(qx_ptr=I8, xs_ptr=F32, w_ptr=U8, ws_ptr=BF, out_ptr=BF, part_ptr="*i32", cnt_ptr="*i32",
                      NSPLIT=I32, **lowrank, **sizes)
    int8_flags = dict(HAS_LR=True, HAS_BIAS=True, BLOCK_R=32, EVEN_K=True)
    out += _family("ternary_int8", "triton_ternary", "_ternary_int8_kernel", int8_types,
                   {"lr+bias": dict(int8_flags, NSPLIT=1)}, ternary.CONFIGS, WONLY_CHECKS["ternary"], only_first=first)
    if int8_gemms_only:  # the W4A4, W4A8 (both inner loops) and ternary_int8 main loops
        return [c for c in out if "splitk" not in c.name and "ragged" not in c.name and c.module != "triton_act"
                and c.module != "triton_rowquant"]
    out += _family("ternary_int8", "triton_ternary", "_ternary_int8_kernel", int8_types, {"lr+bias splitk": int8_flags},
                   [c for c in ternary.CONFIGS if c["BLOCK_M"] <= ternary.SMALL_M], WONLY_CHECKS["ternary"],
                   only_first=first)
    wonly_types = dict(wonly_types, part_ptr=F32, cnt_ptr="*i32", NSPLIT=I32)
    w4 = dict(EVEN_K=True, TERNARY=False, HAS_LR=False, HAS_BIAS=True, BLOCK_R=16)
    variants = {"w4a16": {"w4a16 z": dict(w4, HAS_Z=True, GS=64), "w4a16 z g128": dict(w4, HAS_Z=True, GS=128),
                          "w4a16": dict(w4, HAS_Z=False, GS=64), "w4a16 g128": dict(w4, HAS_Z=False, GS=128)},
                "ternary": {"ternary": dict(EVEN_K=True, TERNARY=True, HAS_Z=False, HAS_LR=True, HAS_BIAS=True, GS=64,
                                            BLOCK_R=32)}}
    for fmt, by_size in wonly.CONFIGS.items():
        out += _family("wonly_small", "triton_wonly", "_wonly_kernel", wonly_types, variants[fmt], by_size["small"],
                       WONLY_CHECKS[fmt], only_first=first)
        out += _family("wonly_large", "triton_wonly", "_wonly_kernel", wonly_types,
                       {k: dict(v, NSPLIT=1) for k, v in variants[fmt].items()}, by_size["large"], WONLY_CHECKS[fmt],
                       only_first=first)
    if arch == "sm90":  # FP8 tensor cores: sm_89+ (the fp8 activation mode is off elsewhere)
        fp8 = _mod("triton_fp8")
        fp8_types = dict(x_ptr="*fp8e4nv", xs_ptr=F32, w_ptr="*i32", ws_ptr=BF, out_ptr=BF, **lowrank,
                         **sizes)
        fp8_flags = dict(SUBNORMAL=True, HAS_LR=True, HAS_BIAS=True, BLOCK_K=64, BLOCK_R=32)
        out += _family("act_fp8", "triton_rowquant", "_row_quant_kernel", dict(rowquant_types, q_ptr="*fp8e4nv"),
                       {"smooth lr": dict(rowquant_flags, CODES=rowquant.E4M3, HAS_SMOOTH=True)}, rowquant.CONFIGS,
                       ("no_spills",))
        out += _family("fp8_int4", "triton_fp8", "_int4_kernel", fp8_types, {"lr+bias": dict(fp8_flags, TERNARY=False)},
                       fp8.INT4_CONFIGS)
        out += _family("fp8_ternary", "triton_fp8", "_ternary_kernel", fp8_types,
                       {"lr+bias": dict(fp8_flags, TERNARY=True)}, fp8.TERNARY_CONFIGS)
    out += _family("dequant", "triton_wonly", "_dequant_kernel",
                   dict(w_ptr=U8, ws_ptr=BF, wz_ptr=BF, up_ptr=BF, out_ptr=BF, N=I32, K=I32, R=I32, W_ROW=I32,
                        OUT_ROW=I32),
                   {"w4a16 z": dict(TERNARY=False, HAS_Z=True, HAS_UP=False, GS=64, BLOCK_R=16),
                    "ternary up": dict(TERNARY=True, HAS_Z=False, HAS_UP=True, GS=64, BLOCK_R=32)},
                   [wonly.DEQUANT_CONFIG], ("vector_stores", "no_spills"),
                   only_first=first)
    return out
