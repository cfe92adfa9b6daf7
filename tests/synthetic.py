"""Seeded synthetic layers: heavy-tailed weights and activations with a few outlier channels."""
import torch

OUTLIER_CHANNELS = (3, 77, 200)


def heavy_tailed_linear(k=256, n=384, seed=0, dtype=torch.float32) -> torch.nn.Linear:
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(k, n)
    # Student-t (3 dof) weights: heavy tails like real transformer weights
    z = torch.randn(n, k, generator=g)
    chi2 = sum(torch.randn(n, k, generator=g) ** 2 for _ in range(3)) / 3
    lin.weight.data = (0.02 * z / chi2.sqrt()).to(dtype)
    lin.bias.data = (0.01 * torch.randn(n, generator=g)).to(dtype)
    return lin


def outlier_inputs(m=130, k=256, seed=1, scale=100.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    for c in OUTLIER_CHANNELS:
        if c < k:
            x[:, c] *= scale
    return x


def randomize_module(module: torch.nn.Module, seed: int) -> None:
    """Seeded small random parameters in place (norm weights and `scale`s near 1)."""
    g = torch.Generator().manual_seed(seed)
    for n, p in module.named_parameters():
        v = torch.randn(p.shape, generator=g) * (0.05 if p.dim() > 1 else 0.1)
        if "norm" in n or n.endswith("scale"):
            v = 1 + v
        p.data = v.to(p.dtype)


def quantize_linears(model: torch.nn.Module, select, rank: int = 16, layer_args=None):
    """(state dict with the selected nn.Linear layers quantized, lowbit.layers) for an in-memory model.

    select(name, module) -> format or None; layer_args(name, fmt) -> extra quantize_linear arguments
    (they may override `rank`). The other state-dict entries are cloned unchanged."""
    from comfyui_lowbit import quant_ops

    sd, layers = {}, {}
    for n, m in model.named_modules():
        fmt = select(n, m) if isinstance(m, torch.nn.Linear) else None
        if not fmt:
            continue
        lin = torch.nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
        lin.weight.data = m.weight.detach().float()
        if m.bias is not None:
            lin.bias.data = m.bias.detach().float()
        kwargs = {"rank": rank, **(layer_args(n, fmt) if layer_args else {})}
        packed = quant_ops.quantize_linear(lin, fmt, dtype=torch.bfloat16, **kwargs).packed()
        layers[n] = packed.config()
        sd.update({f"{n}.{k}": v for k, v in packed.tensors().items()})
    for k, v in model.state_dict().items():
        if k.rsplit(".", 1)[0] not in layers:
            sd[k] = v.clone()
    return sd, layers
