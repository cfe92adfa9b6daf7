"""PyTorch reference of every kernel: the exact semantics the Triton kernels reproduce.

Conventions shared with the Triton kernels:
- Activation quantization runs in float32 with no division by a constant (backends round those
  differently): xs = (x + shift) * (1 / smooth); per token and group, scale = absmax * RCP[qmax] (RCP:
  float32 constants), q = round_half_even(clamp(xs * (1 / scale), qmin, qmax)); 1 / v is one IEEE
  reciprocal per channel or group; a group whose scale is 0 (or below FLT_MIN) gets codes 0. Signed int4:
  qmax 7, qmin -8. Unsigned int4: qmax 15, qmin 0. Int8 (ternary): one group spanning K, +-127.
- "compute dtype" is the 16-bit dtype of the layer's 16-bit tensors; 16-bit matmuls take operands in
  it and accumulate in float32. Integer dots are exact; W4A4 rescales them in float32 group by group:
  acc += (dot * w_scale) * a_scale.
- Float dots (dot32) are summed here in float64 and rounded once to float32, so a row's result does not
  depend on the other rows of the call: float32 GEMMs pick their kernel, and so their summation order, by
  the row count (on the CPU one row takes another kernel than four), and an int4 or int8 activation code
  downstream flips on a float32 difference of one unit. The Triton kernels sum in float32; only the
  float32 summation order is left to them.
- The low-rank branch reads the raw input: lr = x (rounded to the compute dtype) @ proj_down, kept in
  float32 (as Nunchaku keeps it). The up projection takes it as two 16-bit halves, hi = round16(lr) and
  lo = round16(lr - hi) (split16: hi + lo is lr to 17 significant bits in bfloat16, 22 in float16), on
  16-bit tensor cores: out += (hi + lo) @ proj_up^T in float32, then + bias, then cast to the output dtype.
  A float32 difference in lr (another batch size, another K split) stays a float32 difference in out;
  rounding lr itself to 16 bits turned it into a 16-bit one, which flipped activation codes downstream.
- FP8 activations (e4m3, torch.float8_e4m3fn): per token over all of K, after smoothing, no shift;
  scale = absmax * RCP[448], codes = e4m3(clamp(xs * (1 / scale), -448, 448)) rounded to nearest even
  (the clamp keeps a product just above 448 from becoming NaN). An unsigned (post-GELU) svdq_w4a4
  layer is quantized the same way, unshifted (e4m3 is signed); its caller adds back the shift's share
  that the checkpoint folded out of the bias (quant_ops SVDQW4A4Linear.float_bias). Int4 and ternary
  weight values are exact in e4m3 and products of two e4m3 values are exact in float32, so the FP8
  GEMMs are float32 dots of the codes: only the float32 summation order is left to the backend.
"""
import torch

from .packing import unpack_int4, unpack_ternary

ACT_SHIFT = 0.171875  # shift for the unsigned (post-GELU) activation variant
RCP = {7: 0.1428571492433548, 15: 0.06666667014360428, 127: 0.007874015718698502,
       448: 0.0022321429569274187}  # float32(1 / qmax)
E4M3_MAX = 448.0
FLT_MIN = 2.0 ** -126


def reciprocal(v: torch.Tensor) -> torch.Tensor:
    """float32 1 / v, correctly rounded on every backend (torch.reciprocal is an IEEE division)."""
    return torch.reciprocal(v.float())


def _quantize_groups(xs: torch.Tensor, group_size: int, qmin: int, qmax: int):
    m, k = xs.shape
    g = xs.reshape(m, k // group_size, group_size)
    scale = g.abs().amax(dim=-1) * RCP[qmax]
    rscale = torch.where(scale >= FLT_MIN, reciprocal(scale), torch.zeros_like(scale))
    q = torch.round((g * rscale.unsqueeze(-1)).clamp_(qmin, qmax))  # torch.round: half to even
    return q.reshape(m, k).to(torch.int8), scale


def dot32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b of float tensors, summed in float64 and rounded once to float32 (see the module docstring)."""
    return (a.double() @ b.double()).float()


def lora_down(x: torch.Tensor, proj_down: torch.Tensor | None) -> torch.Tensor | None:
    """x (M, K) -> lr float32 (M, r) = round16(x) @ proj_down, or None without a branch."""
    if proj_down is None:
        return None
    return dot32(x.to(proj_down.dtype), proj_down)


def split16(lr: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 lr -> (hi, lo) in the 16-bit dtype: hi = lr rounded to nearest even, lo = (lr - hi) rounded."""
    lr = lr.float()
    hi = lr.to(dtype)
    return hi, (lr - hi.float()).to(dtype)


def unsigned_from(unsigned, k: int, group_size: int) -> int:
    """First channel of the unsigned variant: False -> K (none), True -> 0, or a group-aligned channel index."""
    u = k if unsigned is False else 0 if unsigned is True else int(unsigned)
    if not 0 <= u <= k or u % group_size:
        raise ValueError(f"quantize_act_int4: unsigned={unsigned!r} must be a bool or a channel index in [0, {k}] "
                         f"that is a multiple of group_size {group_size}")
    return u


def quantize_act_int4(x, smooth, proj_down=None, group_size=64, unsigned=False):
    """x (M, K) -> (q int8 (M, K) in int4 range, scales float32 (M, K/group), lr (M, r) or None).
    unsigned: False, True, or a channel index u: channels [u, K) take the unsigned variant, [0, u) the signed."""
    m, k = x.shape
    u = unsigned_from(unsigned, k, group_size)
    xs = x.float()
    rsmooth = None if smooth is None else reciprocal(smooth)
    qs, scales = [], []
    for lo, hi, uns in ((0, u, False), (u, k, True)):
        if hi > lo:
            part = xs[:, lo:hi] + ACT_SHIFT if uns else xs[:, lo:hi]
            if rsmooth is not None:
                part = part * rsmooth[lo:hi]
            q, scale = _quantize_groups(part, group_size, 0 if uns else -8, 15 if uns else 7)
            qs.append(q)
            scales.append(scale)
    return torch.cat(qs, 1), torch.cat(scales, 1), lora_down(x, proj_down)


def quantize_act_int8(x, proj_down=None, smooth=None):
    """x (M, K) -> (q int8 (M, K) in [-127, 127], scales float32 (M,), lr (M, r) or None); smooth: codes of
    x * (1 / smooth) (the int8 mode of svdq_w4a4 layers; ternary has none)."""
    xs = x.float() if smooth is None else x.float() * reciprocal(smooth)
    q, scale = _quantize_groups(xs, x.shape[1], -127, 127)
    return q, scale[:, 0], lora_down(x, proj_down)


def to_e4m3(v: torch.Tensor) -> torch.Tensor:
    """float32 -> float8_e4m3fn, round to nearest even, clamped to the finite range first."""
    return v.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


def quantize_act_fp8(x, smooth=None, proj_down=None):
    """x (M, K) -> (q float8_e4m3fn (M, K), scales float32 (M,), lr (M, r) or None): one scale per token."""
    xs = x.float()
    if smooth is not None:
        xs = xs * reciprocal(smooth)
    scale = xs.abs().amax(dim=1) * RCP[448]
    rscale = torch.where(scale >= FLT_MIN, reciprocal(scale), torch.zeros_like(scale))
    return to_e4m3(xs * rscale.unsqueeze(1)), scale, lora_down(x, proj_down)


def _epilogue(acc, lr, proj_up, bias, out_dtype):
    if lr is not None:
        hi, lo = split16(lr, proj_up.dtype)
        acc = acc + dot32(hi.double() + lo.double(), proj_up.t())
    if bias is not None:
        acc = acc + bias.float()
    return acc.to(out_dtype)


def w4a4_gemm(qx, ascales, qweight, wscales, lr=None, proj_up=None, bias=None, out_dtype=torch.bfloat16):
    """qx int8 (M, K), ascales f32 (M, G), qweight uint8 (N, K/2), wscales (G, N) -> (M, N)."""
    m, k = qx.shape
    groups = wscales.shape[0]
    gs = k // groups
    qw = unpack_int4(qweight).float()
    xf = qx.float()
    acc = torch.zeros(m, qw.shape[0], dtype=torch.float32, device=qx.device)
    for g in range(groups):
        sl = slice(g * gs, (g + 1) * gs)
        dot = xf[:, sl] @ qw[:, sl].t()  # exact: |values| < 2^24
        acc = acc + (dot * wscales[g].float().unsqueeze(0)) * ascales[:, g : g + 1]
    return _epilogue(acc, lr, proj_up, bias, out_dtype)


def progressive_limit(k: int) -> int:
    """Largest integer group scale for K input channels: |sum_g s1_g (qx_g . qw_g)| <= K * 127 * 8 * limit < 2^31,
    so the W4A8 kernel's int32 accumulator is exact (127 up to K = 16640)."""
    return max(1, min(127, (2 ** 31 - 1) // (k * 127 * 8)))


def progressive_scales(wscales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Group scales (G, N) -> (s1 int16 (G, N) in [0, limit], s0 float32 (N,)) with s1 * s0 ~ wscales (QServe's
    progressive group quantization: the groups' scales become integers under one float scale per channel, so the
    W4A8 GEMM applies them in integer arithmetic). s0 = max_g wscales / limit: the largest group keeps its scale,
    a group at 1/10 of it is off by up to 1/25 (limit 127)."""
    g, _ = wscales.shape
    limit = progressive_limit(g * 64)
    s = wscales.float()
    s0 = s.amax(dim=0) / limit
    s1 = torch.where(s0 > 0, torch.round(s / torch.where(s0 > 0, s0, 1.0)), torch.zeros_like(s))
    return s1.clamp_(0, limit).to(torch.int16), s0


def w4a8_gemm(qx, xscales, qweight, wscales, lr=None, proj_up=None, bias=None, out_dtype=torch.bfloat16, s0=None):
    """int8 activations x int4 weights (W4A8): qx int8 (M, K), xscales f32 (M,), qweight uint8 (N, K/2) -> (M, N).
    wscales 16-bit float (G, N): per-group float rescale, acc = sum_g float(qx_g . qw_g) * wscales_g in group
    order, out = acc * xscales. wscales int16 (G, N) with s0 float32 (N,) (progressive_scales): the group scales
    in integer arithmetic, acc = sum_g s1_g (qx_g . qw_g) exact, out = float(acc) * (xscales * s0). Then the
    branch and bias."""
    m, k = qx.shape
    groups = wscales.shape[0]
    gs = k // groups
    qw = unpack_int4(qweight).float()
    xf = qx.float()
    progressive = not wscales.is_floating_point()
    acc = torch.zeros(m, qw.shape[0], dtype=torch.int64 if progressive else torch.float32, device=qx.device)
    for g in range(groups):
        sl = slice(g * gs, (g + 1) * gs)
        dot = xf[:, sl] @ qw[:, sl].t()  # exact: |values| < 2^24
        if progressive:
            acc = acc + dot.long() * wscales[g].long().unsqueeze(0)
        else:
            acc = acc + dot * wscales[g].float().unsqueeze(0)
    if progressive:
        out = acc.float() * (xscales.unsqueeze(1) * s0.float().unsqueeze(0))
    else:
        out = acc * xscales.unsqueeze(1)
    return _epilogue(out, lr, proj_up, bias, out_dtype)


def dequant_int4(qweight, wscales, wzeros=None, dtype=None):
    """(N, K/2) int4 + (G, N) scales [+ (G, N) zeros] -> (N, K) weight: q * s + z, rounded to dtype."""
    q = unpack_int4(qweight).float()
    n, k = q.shape
    gs = k // wscales.shape[0]
    w = q * wscales.float().t().repeat_interleave(gs, dim=1)
    if wzeros is not None:
        w = w + wzeros.float().t().repeat_interleave(gs, dim=1)
    return w.to(dtype or wscales.dtype)


def w4a16_gemm(x, qweight, wscales, wzeros=None, bias=None, out_dtype=None, lr=None, proj_up=None):
    """x (M, K) -> (M, N): x @ dequant(W)^T with both operands in the compute dtype [+ a run-time low-rank
    branch lr @ proj_up^T (LoRAs on W4A16 layers)] + bias."""
    cdt = wscales.dtype
    w = dequant_int4(qweight, wscales, wzeros, cdt)
    return _epilogue(dot32(x.to(cdt), w.t()), lr, proj_up, bias, out_dtype or x.dtype)


def ternary_gemm(x, qweight, wscales, lr=None, proj_up=None, bias=None, out_dtype=None):
    """16-bit activations: x (M, K), qweight uint8 (N, K/4), wscales (N,) -> (M, N)."""
    cdt = wscales.dtype
    t = unpack_ternary(qweight).float()
    acc = dot32(x.to(cdt), t.t()) * wscales.float().unsqueeze(0)
    return _epilogue(acc, lr, proj_up, bias, out_dtype or x.dtype)


def ternary_int8_gemm(qx, xscales, qweight, wscales, lr=None, proj_up=None, bias=None, out_dtype=torch.bfloat16):
    """int8 activations: qx int8 (M, K), xscales f32 (M,) -> (M, N)."""
    t = unpack_ternary(qweight).float()
    dot = qx.float() @ t.t()  # exact while K * 127 < 2^24
    acc = dot * (xscales.unsqueeze(1) * wscales.float().unsqueeze(0))
    return _epilogue(acc, lr, proj_up, bias, out_dtype)


def int4_fp8_gemm(qx, xscales, qweight, wscales, lr=None, proj_up=None, bias=None, out_dtype=torch.bfloat16):
    """FP8 activations x int4 weights: qx float8_e4m3fn (M, K), xscales f32 (M,), qweight uint8 (N, K/2),
    wscales (G, N) -> (M, N) = (sum_g (qx_g @ qw_g^T) * wscales_g) * xscales + branch + bias."""
    m, k = qx.shape
    groups = wscales.shape[0]
    gs = k // groups
    qw = unpack_int4(qweight).float()
    xf = qx.float()
    acc = torch.zeros(m, qw.shape[0], dtype=torch.float32, device=qx.device)
    for g in range(groups):
        sl = slice(g * gs, (g + 1) * gs)
        acc = acc + dot32(xf[:, sl], qw[:, sl].t()) * wscales[g].float().unsqueeze(0)
    return _epilogue(acc * xscales.unsqueeze(1), lr, proj_up, bias, out_dtype)


def ternary_fp8_gemm(qx, xscales, qweight, wscales, lr=None, proj_up=None, bias=None, out_dtype=torch.bfloat16):
    """FP8 activations x ternary weights: qx float8_e4m3fn (M, K), xscales f32 (M,) -> (M, N)."""
    t = unpack_ternary(qweight).float()
    acc = dot32(qx.float(), t.t()) * (xscales.unsqueeze(1) * wscales.float().unsqueeze(0))
    return _epilogue(acc, lr, proj_up, bias, out_dtype)
