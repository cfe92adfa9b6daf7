"""Import Nunchaku SVDQuant INT4 FLUX.1 checkpoints (one safetensors file) into the lowbit layout.

Layout facts this module inverts (from deepcompressor backend/nunchaku/utils.py NunchakuWeightPacker,
backend/utils.py MmaWeightPackerBase, backend/tinychat/utils.py, backend/nunchaku/convert.py and
nunchaku src/Linear.cpp, src/FluxModel.cpp, src/kernels/zgemm, src/kernels/awq/gemv_awq.cu):
- W4A4 `qweight` int8 (N, K/2): the int4 values of (N, K) viewed as (N/128, 8, 2, 8, 1, K/64, 1, 2, 4, 8)
  = (n tile, n pack, n pack size, n lane, reg n, k tile, k pack, k pack size, k lane, reg k), permuted to
  (n tile, k tile, k pack, n pack, n lane, k lane, n pack size, k pack size, reg n, reg k) and written
  eight nibbles per int32, element j in bits 4j (little-endian: low nibble first).
- `wscales` (K/64, N) is only a shape: its memory is (N/128, K/64, 1, 8, 4, 2, 2) from channels
  viewed (N/128, 1, 8, 2, 4, 2) = (tile, pack, lane/4, pack/2, 4, 2). `bias` and `smooth` use the same
  channel order within each block of 128.
- `lora_down` (K, r) / `lora_up` (N, r): 16 x 16 fragments; a matrix (n, k) (down: (r, K); up: (N, r)) is
  cut into (n/16, 16, k/16, 16) tiles ordered (k tile, n tile) for down and (n tile, k tile) for up; each
  tile's (2, 8, 1) x (2, 4, 2) indices are permuted to (8, 4, 2, 2, 1, 2).
- The branch reads the raw input (the converter divides lora_down by smooth); `smooth` is what the kernel
  divides by (all ones for out_proj, whose smoothing was fused into the previous layer; `smooth_orig` is
  unused); mlp_fc2 inputs are GELU(x) + 0.171875 quantized unsigned, the branch's share folded into bias.
- Single blocks: qkv_proj and mlp_fc1 share one smoothing vector (deepcompressor takes both from attn.to_q),
  each has its own branch; out_proj reads the attention output (signed), mlp_fc2 the GELU output (unsigned);
  Nunchaku adds the two outputs.
- Modulation linears (`norm1.linear`, `norm1_context.linear`, `norm.linear`) are AWQ W4A16: `qweight` int32
  (N/4, K/2) holding uint16 words of 4 nibbles, k = 8i + j of every 32 in nibble i of word j, words of
  4 rows interleaved per 64 k; `wscales`/`wzeros` (>= K/64, N) with w = q * s + z, q in [0, 15]; output
  channel j*splits + s holds modulation chunk s row j (splits 6 / 3), and the bias of the scale chunks
  (1 and splits-2) carries the +1 of (1 + scale).
"""
import json
import logging
import os

import torch
from safetensors import safe_open

from . import flux
from .errors import CheckpointError
from .lowbit_file import CheckpointInfo, check_path, unreadable_error
from .validate import validate_state_dict
from ..kernels.packing import unpack_int4
from ..quant_ops import FORMAT_VERSION, W4A4Weights, W4A16Weights

log = logging.getLogger("comfyui_lowbit")

SUPPORTED = ("Nunchaku SVDQuant INT4 FLUX.1 single-file checkpoints (svdq-int4_r*-flux.1-*.safetensors, "
             "with 'config' and 'quantization_config' metadata)")
FLUX_CLASS = "NunchakuFluxTransformer2dModel"
BLOCK_PREFIXES = ("transformer_blocks.", "single_transformer_blocks.")
TILE_N, TILE_K = 128, 64

_DOUBLE = {  # nunchaku sub-layer -> (BFL layer, act_unsigned)
    "qkv_proj": ("img_attn.qkv", False), "qkv_proj_context": ("txt_attn.qkv", False),
    "out_proj": ("img_attn.proj", False), "out_proj_context": ("txt_attn.proj", False),
    "mlp_fc1": ("img_mlp.0", False), "mlp_fc2": ("img_mlp.2", True),
    "mlp_context_fc1": ("txt_mlp.0", False), "mlp_context_fc2": ("txt_mlp.2", True),
}
_DOUBLE_MOD = {"norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin"}
_DOUBLE_NORMS = {"norm_q": "img_attn.norm.query_norm", "norm_k": "img_attn.norm.key_norm",
                 "norm_added_q": "txt_attn.norm.query_norm", "norm_added_k": "txt_attn.norm.key_norm"}
_SINGLE_NORMS = {"norm_q": "norm.query_norm", "norm_k": "norm.key_norm"}
_ALIASES = {"lora_down": ("lora_down", "proj_down"), "lora_up": ("lora_up", "proj_up"),
            "smooth": ("smooth", "smooth_factor")}
_IGNORED = ("smooth_orig", "smooth_factor_orig")


class UnsupportedNunchaku(CheckpointError):
    """A Nunchaku file this importer cannot convert (NVFP4, legacy folder part, not FLUX)."""


# ---- reading ----------------------------------------------------------------------------------------------

def _header(path: str) -> tuple[dict, dict]:
    """(metadata, {key: dtype string}) without loading tensors."""
    with safe_open(path, framework="pt") as f:
        return f.metadata() or {}, {k: f.get_slice(k).get_dtype() for k in f.keys()}


def _looks_nunchaku(meta: dict, keys) -> bool:
    if meta.get("model_class", "").startswith("Nunchaku"):
        return True
    if "quantization_config" in meta and "svdquant" in meta["quantization_config"]:
        return True
    return any(k.startswith(BLOCK_PREFIXES) and k.endswith(".qweight") for k in keys)


def is_nunchaku(source) -> bool:
    """True for a Nunchaku SVDQuant file (path, or its metadata dict), supported or not."""
    if isinstance(source, dict):
        return _looks_nunchaku(source, ())
    path = os.fspath(source)
    if os.path.isdir(path):
        return os.path.isfile(os.path.join(path, "transformer_blocks.safetensors"))
    try:
        meta, dtypes = _header(path)
    except Exception:
        return False
    return _looks_nunchaku(meta, dtypes)


def check_supported(meta: dict, dtypes: dict, source: str = "checkpoint") -> None:
    """Raise UnsupportedNunchaku naming the file, what it is and what is supported."""
    def fail(what):
        raise UnsupportedNunchaku(f"{source}: {what}; supported: {SUPPORTED}")

    cls = meta.get("model_class")
    if cls and cls != FLUX_CLASS:
        fail(f"Nunchaku model_class {cls!r} is not FLUX.1 ({FLUX_CLASS})")
    try:
        qcfg = json.loads(meta["quantization_config"]) if "quantization_config" in meta else {}
    except json.JSONDecodeError as e:
        fail(f"quantization_config metadata is not JSON ({e})")
    weight = qcfg.get("weight") if isinstance(qcfg, dict) else None
    if not isinstance(qcfg, dict) or not isinstance(weight or {}, dict):
        fail(f"quantization_config metadata {meta['quantization_config'][:80]!r} is not a JSON object with a 'weight' object")
    wdtype = (weight or {}).get("dtype", "int4")
    fp8 = [k for k, d in dtypes.items() if d.startswith("F8")]
    if wdtype != "int4" or fp8 or any(k.endswith((".wtscale", ".wcscales")) for k in dtypes):
        fail(f"an NVFP4 checkpoint (weight dtype {wdtype!r}{', FP8 scales' if fp8 else ''}); "
             f"only INT4 checkpoints can be converted")
    if "x_embedder.weight" not in dtypes:
        if any(k.startswith(BLOCK_PREFIXES) for k in dtypes):
            fail("the transformer_blocks.safetensors half of Nunchaku's legacy folder format (no unquantized "
                 "layers); merge the folder into one file first with `python -m nunchaku.merge_safetensors`")
        fail("no FLUX transformer tensors (x_embedder.weight, transformer_blocks.N.*) found")
    name = _diffusers_config(meta, source, warn=False).get("_class_name", "FluxTransformer2DModel")
    if "Flux" not in str(name):
        fail(f"diffusers config _class_name {name!r} is not a FLUX transformer")


def _diffusers_config(meta: dict, source: str, warn: bool = True) -> dict:
    """The file's `config` metadata (diffusers config JSON) as a dict; {} when absent. Unreadable, it is only a
    cross-check (the model's shape comes from the tensors): one warning line, then ignored."""
    text = meta.get("config")
    if not text:
        return {}
    try:
        cfg = json.loads(text)
        why = None if isinstance(cfg, dict) else f"a JSON {type(cfg).__name__}, expected an object"
    except json.JSONDecodeError as e:
        why = f"not valid JSON: {e}"
    if why is None:
        return cfg
    if warn:
        log.warning("%s: its 'config' metadata is %s; ignored it (the model's shape is read from the tensors, "
                    "so the file still loads, without that cross-check)", source, why)
    return {}


# ---- layout inversion -------------------------------------------------------------------------------------

def _inverse(perm) -> list:
    return sorted(range(len(perm)), key=lambda i: perm[i])


_W_PERM = (0, 5, 6, 1, 3, 8, 2, 7, 4, 9)   # packer: natural (N, K) tile dims -> stored order
_S_PERM = (0, 6, 1, 2, 4, 3, 5)            # packer: (tile, pack, lane/4, pack/2, 4, 2, group) -> stored
_LR_PERM = (0, 1, 3, 6, 2, 5, 4, 7)        # packer: (tiles..., 2, 8, 1, 2, 4, 2) -> (tiles..., 8, 4, 2, 2, 1, 2)


def w4a4_weight_to_lowbit(qweight: torch.Tensor, name: str = "qweight") -> torch.Tensor:
    """Nunchaku int8 (N, K/2) -> lowbit packed uint8 (N, K/2) (low nibble = even k).

    The eight nibbles of one int32 (reg k) are eight consecutive k in both layouts, in the same nibble
    order, so only whole 32-bit words move."""
    n, k = qweight.shape[0], qweight.shape[1] * 2
    if qweight.dim() != 2 or qweight.element_size() != 1 or n % TILE_N or k % (2 * TILE_K):
        raise ValueError(f"{name}: {tuple(qweight.shape)} {qweight.dtype} is not int8 (N, K/2) with N a multiple of "
                         f"{TILE_N} and K of {2 * TILE_K}")
    words = qweight.contiguous().view(torch.int32).reshape(n // TILE_N, k // TILE_K, 1, 8, 8, 4, 2, 2, 1)
    natural = words.permute(*_inverse(_W_PERM[:-1])).reshape(n, k // 8)
    return natural.contiguous().view(torch.uint8)


def unpack_w4a4_weight(qweight: torch.Tensor, name: str = "qweight") -> torch.Tensor:
    """Nunchaku int8 (N, K/2) -> int8 (N, K) values in [-8, 7], natural order."""
    return unpack_int4(w4a4_weight_to_lowbit(qweight, name))


def unpack_channels(t: torch.Tensor, n: int, name: str = "tensor") -> torch.Tensor:
    """Nunchaku packed per-channel tensor (wscales (G, N) or a vector (N,)) -> (G, N) / (N,) natural order."""
    if n % TILE_N or t.numel() % n:
        raise ValueError(f"{name}: {tuple(t.shape)} does not hold whole blocks of {TILE_N} of {n} channels")
    g = t.numel() // n
    stored = t.contiguous().reshape(n // TILE_N, g, 1, 8, 4, 2, 2)
    out = stored.permute(*_inverse(_S_PERM)).reshape(n, g)
    return out.t().contiguous() if t.dim() == 2 else out.reshape(n)


def unpack_lowrank(t: torch.Tensor, down: bool, name: str = "lora") -> torch.Tensor:
    """Nunchaku lora_down (K, r) -> proj_down (K, r); lora_up (N, r) -> proj_up (N, r), natural order."""
    c, r = t.shape
    if c % 16 or r % 16:
        raise ValueError(f"{name}: shape {tuple(t.shape)} is not made of 16 x 16 fragments")
    outer = (c // 16, r // 16)
    tiles = t.contiguous().reshape(*outer, 8, 4, 2, 2, 1, 2).permute(*_inverse(_LR_PERM)).reshape(*outer, 16, 16)
    if down:  # tiles [K tile, r tile, r in tile, K in tile] of the (r, K) matrix
        return tiles.permute(1, 2, 0, 3).reshape(r, c).t().contiguous()
    return tiles.permute(0, 2, 1, 3).reshape(c, r)  # [N tile, r tile, N in tile, r in tile]


def _awq_nibbles(qweight: torch.Tensor, name: str) -> torch.Tensor:
    """AWQ int32 (N/4, K/2) -> uint8 (N, K) values in [0, 15], rows as stored."""
    n4, k = qweight.shape[0], qweight.shape[1] * 2
    if qweight.dim() != 2 or qweight.dtype != torch.int32 or k % 64:
        raise ValueError(f"{name}: expected int32 (N/4, K/2) with K a multiple of 64, got {tuple(qweight.shape)} {qweight.dtype}")
    words = qweight.contiguous().view(torch.int16).to(torch.int32)                    # (N/4, K) 16-bit words
    words = words.view(n4, k // 64, 4, 16).permute(0, 2, 1, 3).reshape(4 * n4, k // 32, 1, 8)
    nib = (words >> torch.tensor([0, 4, 8, 12], dtype=torch.int32).view(4, 1)) & 0xF  # nibble i of word j: k = 8i + j
    return nib.to(torch.uint8).reshape(4 * n4, k)


def unpack_awq_weight(qweight: torch.Tensor, name: str = "qweight") -> torch.Tensor:
    """AWQ int32 (N/4, K/2) -> int16 (N, K) values in [0, 15], rows as stored (interleaved for modulation)."""
    return _awq_nibbles(qweight, name).to(torch.int16)


def awq_weight_to_lowbit(qweight: torch.Tensor, name: str = "qweight") -> torch.Tensor:
    """AWQ int32 (N/4, K/2), unsigned q -> lowbit packed uint8 (N, K/2) of the signed 7 - q (see _awq)."""
    n4, k = qweight.shape[0], qweight.shape[1] * 2
    if qweight.dim() != 2 or qweight.dtype != torch.int32 or k % 64:
        raise ValueError(f"{name}: expected int32 (N/4, K/2) with K a multiple of 64, got {tuple(qweight.shape)} {qweight.dtype}")
    words = qweight.contiguous().view(torch.int16).view(n4, k // 64, 4, 16).permute(0, 2, 1, 3).reshape(4 * n4, k // 32, 8)
    even, odd = words[..., 0::2].to(torch.int32), words[..., 1::2].to(torch.int32)  # k = 8i + j, j even / odd
    planes = [((even >> (4 * i)) & 0xF) | (((odd >> (4 * i)) & 0xF) << 4) for i in range(4)]  # byte 4i + j/2
    packed = torch.stack(planes, dim=2).to(torch.uint8).reshape(4 * n4, k // 2)
    return packed ^ 0x77  # (7 - v) mod 16 == v ^ 7 on each nibble


# ---- per-layer conversion ---------------------------------------------------------------------------------

class _Reader:
    """Takes tensors from the state dict, tracking what was used; `consume` removes them (frees memory)."""

    def __init__(self, sd: dict, source: str, consume: bool = False):
        self.sd, self.source, self.consume, self.used = sd, source, consume, set()

    def get(self, key: str, required=True):
        if key in self.sd:
            self.used.add(key)
            return self.sd.pop(key) if self.consume else self.sd[key]
        if required:
            raise ValueError(f"{self.source}: tensor {key} is missing")
        return None

    def any_of(self, prefix: str, names, required=True):
        for n in names:
            t = self.get(f"{prefix}.{n}", required=False)
            if t is not None:
                return t
        if required:
            raise ValueError(f"{self.source}: none of {[f'{prefix}.{n}' for n in names]} found")
        return None


def _w4a4_parts(rd: _Reader, prefix: str) -> dict:
    q = rd.get(f"{prefix}.qweight")
    ws = rd.get(f"{prefix}.wscales")
    for extra in _IGNORED:
        rd.get(f"{prefix}.{extra}", required=False)
    if ws.dim() != 2 or not ws.is_floating_point() or ws.element_size() != 2:
        raise ValueError(f"{rd.source}: {prefix}.wscales is {tuple(ws.shape)} {ws.dtype}; expected 16-bit (K/64, N)")
    dtype = ws.dtype
    n, k = q.shape[0], q.shape[1] * 2
    if ws.shape != (k // TILE_K, n):
        raise ValueError(f"{rd.source}: {prefix}.wscales is {tuple(ws.shape)}, expected {(k // TILE_K, n)} for "
                         f"qweight {tuple(q.shape)}")
    parts = {"weight": w4a4_weight_to_lowbit(q, f"{rd.source}: {prefix}.qweight"),
             "wscales": unpack_channels(ws, n, f"{prefix}.wscales").to(dtype),
             "smooth": unpack_channels(rd.any_of(prefix, _ALIASES["smooth"]), k, f"{prefix}.smooth").to(dtype)}
    bias = rd.get(f"{prefix}.bias", required=False)
    parts["bias"] = None if bias is None else unpack_channels(bias, n, f"{prefix}.bias").to(dtype)
    down = rd.any_of(prefix, _ALIASES["lora_down"], required=False)
    up = rd.any_of(prefix, _ALIASES["lora_up"], required=False)
    if (down is None) != (up is None):
        raise ValueError(f"{rd.source}: {prefix} has only one of lora_down / lora_up")
    if down is not None and down.numel():
        if down.shape[0] != k or up.shape[0] != n or down.shape[1] != up.shape[1]:
            raise ValueError(f"{rd.source}: {prefix} low-rank shapes {tuple(down.shape)} / {tuple(up.shape)} do not "
                             f"match K = {k}, N = {n}")
        parts["down"] = unpack_lowrank(down, True, f"{prefix}.lora_down").to(dtype)
        parts["up"] = unpack_lowrank(up, False, f"{prefix}.lora_up").to(dtype)
    else:
        parts["down"] = torch.zeros(k, 0, dtype=dtype)
        parts["up"] = torch.zeros(n, 0, dtype=dtype)
    return parts


def _pack(parts: dict, act_unsigned=False, act_unsigned_from=0) -> W4A4Weights:
    rank = parts["down"].shape[1]
    w = W4A4Weights(parts["weight"], parts["wscales"], parts["smooth"], parts["down"] if rank else None,
                    parts["up"] if rank else None, parts["bias"], act_unsigned, act_unsigned_from)
    w.validate()
    return w


def _block_diag(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(a.shape[0] + b.shape[0], a.shape[1] + b.shape[1], dtype=a.dtype)
    out[: a.shape[0], : a.shape[1]] = a
    out[a.shape[0]:, a.shape[1]:] = b
    return out


def _bias_or_zeros(p, n):
    return p["bias"] if p["bias"] is not None else torch.zeros(n, dtype=p["wscales"].dtype)


def _concat_outputs(a: dict, b: dict, where: str) -> W4A4Weights:
    """linear1 = [qkv_proj; mlp_fc1]: same input and smoothing, outputs stacked, branches side by side."""
    if not torch.equal(a["smooth"], b["smooth"]):
        raise UnsupportedNunchaku(f"{where}: qkv_proj and mlp_fc1 use different smoothing factors, so they cannot "
                                  f"share one input quantization as linear1")
    na, nb = a["weight"].shape[0], b["weight"].shape[0]
    bias = None if a["bias"] is None and b["bias"] is None else torch.cat([_bias_or_zeros(a, na), _bias_or_zeros(b, nb)])
    return _pack({"weight": torch.cat([a["weight"], b["weight"]]), "wscales": torch.cat([a["wscales"], b["wscales"]], dim=1),
                  "smooth": a["smooth"], "bias": bias, "down": torch.cat([a["down"], b["down"]], dim=1),
                  "up": _block_diag(a["up"], b["up"])})


def _concat_inputs(a: dict, b: dict) -> W4A4Weights:
    """linear2 = out_proj(attn) + mlp_fc2(gelu): inputs concatenated along K, the second part unsigned."""
    ka = 2 * a["weight"].shape[1]
    n = a["weight"].shape[0]
    bias = (_bias_or_zeros(a, n).float() + _bias_or_zeros(b, n).float()).to(a["wscales"].dtype)
    return _pack({"weight": torch.cat([a["weight"], b["weight"]], dim=1), "wscales": torch.cat([a["wscales"], b["wscales"]]),
                  "smooth": torch.cat([a["smooth"], b["smooth"]]), "bias": bias,
                  "down": _block_diag(a["down"], b["down"]), "up": torch.cat([a["up"], b["up"]], dim=1)},
                 act_unsigned=True, act_unsigned_from=ka)


def _awq(rd: _Reader, prefix: str, splits: int) -> W4A16Weights:
    qw = rd.get(f"{prefix}.qweight")
    ws, wz, bias = rd.get(f"{prefix}.wscales"), rd.get(f"{prefix}.wzeros"), rd.get(f"{prefix}.bias", required=False)
    packed = awq_weight_to_lowbit(qw, f"{rd.source}: {prefix}.qweight")
    n, k = packed.shape[0], packed.shape[1] * 2
    groups = k // 64
    if ws.dim() != 2 or ws.shape[1] != n or ws.shape[0] < groups or wz.shape != ws.shape:
        raise ValueError(f"{rd.source}: {prefix}.wscales/wzeros are {tuple(ws.shape)}/{tuple(wz.shape)}; expected "
                         f"(>= {groups}, {n})")
    if n % splits:
        raise ValueError(f"{rd.source}: {prefix}: {n} outputs do not split into {splits} modulation chunks")

    def deinterleave(t):  # stored row j*splits + s -> BFL row s*(n/splits) + j (dim 0)
        return t.reshape(n // splits, splits, *t.shape[1:]).transpose(0, 1).reshape(t.shape)

    dtype = ws.dtype
    s = deinterleave(ws[:groups].t()).t().float()
    z = deinterleave(wz[:groups].t()).t().float()
    # w = q_u * s + z with q_u in [0, 15]  ==  (7 - q_u) * (-s) + (z + 7 s); z + 7 s is exact for z = -7 s rounded
    out = W4A16Weights(deinterleave(packed), (-s).to(dtype), (z + 7 * s).to(dtype))
    if bias is not None:
        b = deinterleave(bias.float()).reshape(splits, n // splits).clone()
        b[1] -= 1  # Nunchaku folds the 1 of (1 + scale) into the scale chunks' bias
        if splits > 3:
            b[splits - 2] -= 1
        out.bias = b.reshape(n).to(dtype)
    out.validate(prefix)
    return out


def _count(keys, prefix: str) -> int:
    idx = {int(k[len(prefix):].split(".", 1)[0]) for k in keys if k.startswith(prefix)}
    if idx != set(range(len(idx))):
        raise ValueError(f"{prefix}N indices {sorted(idx)} are not 0..{len(idx) - 1}")
    return len(idx)


def convert_state_dict(sd: dict, metadata: dict | None = None, source: str = "checkpoint", consume: bool = False):
    """Nunchaku FLUX state dict -> (lowbit tensors with BFL names, {layer: packed.config()}, flux config), validated
    like a lowbit file (validate.py). consume: remove the source tensors from `sd` as they are converted (lower
    peak memory). Every error is a CheckpointError naming `source`."""
    try:
        return _convert(sd, metadata or {}, source, consume)
    except CheckpointError:
        raise
    except (ValueError, RuntimeError) as e:  # a damaged file's tensors can fail inside the layout inversion
        msg = str(e) if str(e).startswith(source) else f"{source}: {e}"
        raise CheckpointError(msg) from None


def _convert(sd: dict, metadata: dict, source: str, consume: bool):
    check_supported(metadata, {k: str(v.dtype).replace("torch.float8", "F8") for k, v in sd.items()}, source)
    diffusers_cfg = _diffusers_config(metadata, source)  # before the work: its warning comes first
    rd = _Reader(sd, source, consume)
    tensors, layers = {}, {}

    def put(name, packed):
        layers[name] = packed.config()
        tensors.update({f"{name}.{k}": v for k, v in packed.tensors().items()})

    for i in range(_count(sd, "transformer_blocks.")):
        p, out = f"transformer_blocks.{i}", f"double_blocks.{i}"
        for sub, (bfl, unsigned) in _DOUBLE.items():
            put(f"{out}.{bfl}", _pack(_w4a4_parts(rd, f"{p}.{sub}"), act_unsigned=unsigned))
        for sub, bfl in _DOUBLE_MOD.items():
            put(f"{out}.{bfl}", _awq(rd, f"{p}.{sub}", 6))
        for sub, bfl in _DOUBLE_NORMS.items():
            tensors[f"{out}.{bfl}.scale"] = rd.get(f"{p}.{sub}.weight")
    for i in range(_count(sd, "single_transformer_blocks.")):
        p, out = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        put(f"{out}.linear1", _concat_outputs(_w4a4_parts(rd, f"{p}.qkv_proj"), _w4a4_parts(rd, f"{p}.mlp_fc1"), p))
        put(f"{out}.linear2", _concat_inputs(_w4a4_parts(rd, f"{p}.out_proj"), _w4a4_parts(rd, f"{p}.mlp_fc2")))
        put(f"{out}.modulation.lin", _awq(rd, f"{p}.norm.linear", 3))
        for sub, bfl in _SINGLE_NORMS.items():
            tensors[f"{out}.{bfl}.scale"] = rd.get(f"{p}.{sub}.weight")

    top = [k for k in sd if not k.startswith(BLOCK_PREFIXES)]
    try:
        plan = flux.diffusers_plan(top)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None
    for bfl, (srcs, swap) in plan.items():
        t = torch.cat([rd.get(s) for s in srcs])
        if swap:  # diffusers norm_out is (scale, shift), BFL final_layer.adaLN_modulation.1 is (shift, scale)
            t = torch.cat(t.chunk(2)[::-1])
        tensors[bfl] = t
    unused = sorted(set(sd) - rd.used)
    if unused:
        raise ValueError(f"{source}: {len(unused)} tensors have no FLUX counterpart, e.g. {unused[:3]}")
    config = flux.infer_config({k: tuple(v.shape) for k, v in tensors.items()})
    _check_config(config, diffusers_cfg, source)
    validate_state_dict(source, "flux", layers, config, tensors)
    return tensors, layers, config


def _check_config(config: dict, cfg: dict, source: str) -> None:
    expect = {"depth": cfg.get("num_layers"), "depth_single_blocks": cfg.get("num_single_layers"),
              "guidance_embed": cfg.get("guidance_embeds"), "in_channels": cfg.get("in_channels")}
    bad = {k: (v, config[k]) for k, v in expect.items() if v is not None and v != config[k]}
    if bad:
        raise ValueError(f"{source}: the tensors disagree with the 'config' metadata: "
                         + ", ".join(f"{k} config {a} vs tensors {b}" for k, (a, b) in bad.items()))


def read_nunchaku(path: str) -> tuple[dict, dict]:
    """(state dict, metadata) of a supported Nunchaku file; clear errors for anything else."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise UnsupportedNunchaku(f"{path}: a folder (Nunchaku's legacy format); merge it into one file with "
                                  f"`python -m nunchaku.merge_safetensors` first; supported: {SUPPORTED}")
    check_path(path)
    try:
        meta, dtypes = _header(path)
    except Exception as e:
        raise unreadable_error(path, e) from None
    if not _looks_nunchaku(meta, dtypes):
        raise ValueError(f"{path}: not a Nunchaku checkpoint (no quantization_config / model_class metadata and no "
                         f"transformer_blocks.N.*.qweight tensors); supported: {SUPPORTED}")
    check_supported(meta, dtypes, path)
    with safe_open(path, framework="pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}
    return sd, meta


def load_nunchaku(path: str) -> tuple[dict, CheckpointInfo]:
    """(lowbit state dict, CheckpointInfo) for a Nunchaku INT4 FLUX file, converted in memory."""
    sd, meta = read_nunchaku(path)
    tensors, layers, config = convert_state_dict(sd, meta, source=os.fspath(path), consume=True)
    return tensors, CheckpointInfo(os.fspath(path), "flux", FORMAT_VERSION, layers, config,
                                   {"lowbit.source": f"nunchaku:{os.path.basename(path)}"})


__all__ = ["SUPPORTED", "UnsupportedNunchaku", "is_nunchaku", "check_supported", "convert_state_dict",
           "read_nunchaku", "load_nunchaku", "w4a4_weight_to_lowbit", "awq_weight_to_lowbit", "unpack_w4a4_weight", "unpack_channels", "unpack_lowrank",
           "unpack_awq_weight"]
