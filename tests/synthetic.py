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
