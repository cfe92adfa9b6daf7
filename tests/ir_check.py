"""Compile Triton kernels for a GPU on a machine without one, with the JIT's runtime specialization (pointers
and integer arguments divisible by 16 get `tt.divisibility`, or nothing is vectorised or pipelined), and
count what the main loop (the first loop holding a tensor-core op) does.

`python tests/ir_check.py ARCH [CASE ...]` compiles the cases of ir_cases.py for ARCH (sm90, sm80, sm86, sm89, sm120,
gfx942)
and prints one JSON line per case; tests/test_kernels_ir.py runs it in a subprocess without TRITON_INTERPRET.
"""
import json
import os
import re
import subprocess
import sys

TC_OP = r"wgmma\.mma_async|mma\.sync|v_mfma"
BYTE_LOAD = r"ld\.global(?:\.\w+)*\.(?:b8|u8|s8)\b"
INT_TO_FLOAT = r"cvt\.rn\.(?:f32|f16|bf16)\.[su]32"


def _jit(kernel):
    import triton

    while not isinstance(kernel, triton.runtime.jit.JITFunction):  # unwrap autotune / heuristics
        kernel = kernel.fn
    return kernel


def compile_kernel(kernel, types: dict, consts: dict, num_warps: int, num_stages: int, arch: str, not_divisible=()):
    """triton.compile of `kernel` for arch ("sm90", "sm80", "sm120", "gfx942", ...): every non-constexpr argument needs a type
    in `types` ("*bf16", "i32", ...); pointers and ints are marked divisible by 16 except `not_divisible`."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _jit(kernel)
    sig = {a: "constexpr" if a in consts else types[a] for a in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names)
             if sig[a] != "constexpr" and a not in not_divisible and (sig[a].startswith("*") or sig[a] == "i32")}
    target = GPUTarget("hip", arch, 64) if arch.startswith("gfx") else GPUTarget("cuda", int(arch[2:]), 32)
    # target_info.is_cuda() & co. (inline PTX guards) ask the active driver; here the target is not this machine's
    import triton.language.target_info as target_info

    def current_target():
        return target

    current_target.__triton_builtin__ = True
    active, target_info.current_target = target_info.current_target, current_target
    try:
        return triton.compile(ASTSource(fn, sig, consts, attrs), target=target,
                              options={"num_warps": num_warps, "num_stages": num_stages})
    finally:
        target_info.current_target = active


def ptx_loops(ptx: str) -> list:
    """Loop bodies in code order: the PTX lines from a label to the last backward branch to it."""
    lines = ptx.splitlines()
    start, end = {}, {}
    for i, line in enumerate(lines):
        m = re.match(r"\s*(\$L\w+):", line)
        if m:
            start[m.group(1)] = i
        b = re.search(r"\bbra(?:\.uni)?\s+(\$L\w+);", line)
        if b and b.group(1) in start:
            end[b.group(1)] = i
    return ["\n".join(lines[start[k]:end[k] + 1]) for k in sorted(end, key=start.get)]


def ttgir_loops(ttgir: str) -> list:
    """scf.for bodies in code order (outermost text of each, nested loops included)."""
    lines, loops = ttgir.splitlines(), []
    for i, line in enumerate(lines):
        if "scf.for" in line and line.rstrip().endswith("{"):
            depth = 0
            for j in range(i, len(lines)):
                depth += lines[j].count("{") - lines[j].count("}")
                if depth <= 0:
                    loops.append("\n".join(lines[i:j + 1]))
                    break
    return loops


def _first(loops, pattern):
    return next((l for l in loops if re.search(pattern, l)), "")


SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")


def sass_loop(sass: str) -> list:
    """(address, opcode) of the SASS main loop: the first loop (a label up to the first branch back to it) holding a
    tensor-core op (HGMMA/IGMMA/QGMMA/HMMA/IMMA)."""
    ins = [(int(m.group(1), 16), m.group(2), m.group(3)) for m in map(SASS_LINE.search, sass.splitlines()) if m]
    for addr, op, rest in ins:
        target = re.search(r"0x([0-9a-f]+)", rest) if op in ("BRA", "BRA.U") else None  # BRA.U UP0: sm_120
        if target and int(target.group(1), 16) < addr:
            body = [(a, o) for a, o, _ in ins if int(target.group(1), 16) <= a <= addr]
            if any(re.match(r"[HIQ]GMMA|HMMA|IMMA", o) for _, o in body):
                return body
    return []


def _sass_counts(cubin: bytes, arch: str) -> dict:
    """Registers and spills (cuobjdump -res-usage) and the SASS main loop's instruction counts (cuobjdump -sass)."""
    from triton.backends.nvidia.compiler import get_ptxas

    tool = os.path.join(os.path.dirname(get_ptxas(int(arch[2:])).path), "cuobjdump")
    path = f"/tmp/ir_check_{os.getpid()}.cubin"
    with open(path, "wb") as f:
        f.write(cubin)
    try:
        out = subprocess.run([tool, "-res-usage", path], capture_output=True, text=True).stdout
        sass = subprocess.run([tool, "-sass", path], capture_output=True, text=True).stdout
    finally:
        os.remove(path)
    got = {k: int(v) for k, v in re.findall(r"\b(REG|STACK|LOCAL):(\d+)", out)}
    loop = [op for _, op in sass_loop(sass)]
    count = lambda pattern: sum(bool(re.match(pattern, op)) for op in loop)
    return {"registers": got.get("REG"), "spill_bytes": got.get("STACK", 0) + got.get("LOCAL", 0),
            "sass_loop": len(loop), "sass_loop_mma": count(r"[HIQ]GMMA|HMMA|IMMA"),
            "sass_loop_int8_mma": count(r"IMMA|IGMMA"), "sass_loop_mma_waits": count(r"WARPGROUP\.DEPBAR"), "sass_loop_fp32": count(r"F(?:ADD|MUL|FMA)\b"),
            "sass_loop_moves": count(r"(?:IMAD\.)?MOV\b|CS2R\b"), "sass_loop_byte_permutes": count(r"PRMT\b")}


def analyze(compiled, arch: str) -> dict:
    """Counts for the kernel and its main loop (`loop_*`)."""
    asm = compiled.asm
    info = {"arch": arch, "shared_bytes": compiled.metadata.shared}
    if arch.startswith("gfx"):
        info["mfma"] = len(re.findall(r"v_mfma", asm.get("amdgcn", "")))
        return info
    ptx, ttgir = asm["ptx"], asm["ttgir"]
    loop = _first(ptx_loops(ptx), TC_OP)
    tloop = _first(ttgir_loops(ttgir), r"tt\.dot|warp_group_dot")
    info.update({
        "loop_tc": len(re.findall(TC_OP, loop)),
        "loop_wgmma": len(re.findall(r"wgmma\.mma_async", loop)),
        "loop_wait_group": [int(n) for n in re.findall(r"wgmma\.wait_group\.sync\.aligned (\d+)", loop)],
        "loop_ld_global_b8": len(re.findall(BYTE_LOAD, loop)),
        "loop_cvt_int_to_float": len(re.findall(INT_TO_FLOAT, loop)),
        "loop_cp_async": len(re.findall(r"cp\.async\.c[ag]\.shared", loop)),
        "loop_16B_loads": len(re.findall(r"ld\.global(?:\.\w+)*\.v4\.[bfu]32|cp\.async\.c[ag]\.shared[^\n]*, 0x10[,;]", loop)),
        "loop_ld_global_b16": len(re.findall(r"ld\.global(?:\.\w+)*\.b16\b", loop)),
        "loop_div": len(re.findall(r"\bdiv\.(?:rn|full|approx)\S*\.f32", loop)),
        "loop_cvt_bf16_to_f32": len(re.findall(r"cvt\.f32\.bf16", loop)),
        "loop_tma": len(re.findall(r"cp\.async\.bulk\.tensor", loop)),
        # the dot's left operand from registers (a decoded tile), and no tile written to shared memory by the loop
        "loop_dot_reg_a": len(re.findall(r"warp_group_dot %\S+, %\S+, %\S+[^\n]*: tensor<", tloop)),
        "loop_local_alloc_tensor": len(re.findall(r"ttg\.local_alloc %", tloop)),
        "loop_st_shared": len(re.findall(r"\bst\.shared", loop)),  # a layout conversion through shared memory
        # synchronous loads of 2-D tiles (both dims >= 4), i.e. not of per-row vectors such as (rows, 1-2) scales
        "loop_sync_tile_loads": len(re.findall(r"= tt\.load [^\n]*: tensor<(?:[4-9]|\d\d+)x(?:[4-9]|\d\d+)x!tt\.ptr", tloop)),
        "ld_global_b8": len(re.findall(BYTE_LOAD, ptx)),
        "cvt_int_to_float": len(re.findall(INT_TO_FLOAT, ptx)),
        "st_global_16B": len(re.findall(r"st\.global(?:\.\w+)*\.v4\.[bfu]32", ptx)),
        "st_global_narrow": len(re.findall(r"st\.global(?:\.\w+)*\.(?:b16|b8|u16|u8)\b", ptx)),
        # operands of the main dot loaded asynchronously: copies into shared memory, no 2-D synchronous loads
        "loop_async_copies": len(re.findall(r"async_copy_global_to_local|async_tma_copy_global_to_local", tloop)),
        "loop_sync_2d_loads": len(re.findall(r"= tt\.load [^\n]*: tensor<\d+x\d+x!tt\.ptr", tloop)),
        "cp_async_bytes": sorted({int(b, 16) for b in re.findall(r"cp\.async\.c[ag]\.shared\.global[^\n]*, (0x[0-9a-f]+)", ptx)}),
    })
    info.update(_sass_counts(asm["cubin"], arch))
    return info


def _one(arch, case):
    try:
        info = analyze(compile_kernel(case.kernel(), case.types, case.consts, case.num_warps, case.num_stages, arch), arch)
    except Exception as e:  # reported per case, the others still compile
        info = {"error": f"{type(e).__name__}: {str(e)[-1500:]}"}
    return json.dumps({"case": case.name, **info})


def main(arch: str, names=()):
    from concurrent.futures import ProcessPoolExecutor

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import ir_cases

    todo = [c for c in ir_cases.cases(arch) if not names or c.name in names]
    jobs = int(os.environ.get("IR_CHECK_JOBS", min(4, os.cpu_count() or 1)))
    with ProcessPoolExecutor(jobs) as pool:
        for line in pool.map(_one, [arch] * len(todo), todo):
            print(line, flush=True)


if __name__ == "__main__":
    try:
        from triton.backends import backends
    except ImportError as e:
        print(e)
        sys.exit(3)
    if ("amd" if sys.argv[1].startswith("gfx") else "nvidia") not in backends:
        print(f"no {sys.argv[1]} toolchain in this Triton build (backends: {sorted(backends)})")
        sys.exit(3)
    main(sys.argv[1], sys.argv[2:])
