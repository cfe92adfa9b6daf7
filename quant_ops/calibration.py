"""Recording what the calibrated quantizers need: per linear, the input's running absmax and a uniform random
sample of at most `tokens` input rows (kept on the input's device; no host sync per call)."""
import torch
from torch import nn

DEFAULT_TOKENS = 256
SAMPLE_DTYPE = torch.bfloat16  # wide range: FLUX's residual stream has channels in the thousands


def sample_bytes(in_features: list[int], tokens: int) -> int:
    """Memory the samples of layers with these input widths take at `tokens` rows each."""
    return sum(in_features) * tokens * torch.finfo(SAMPLE_DTYPE).bits // 8


class InputRecorder:
    """Running absmax and a uniform sample without replacement of every recorded layer's input rows.

    The sample is a priority sample: each row gets a uniform random key, the `tokens` rows with the smallest
    keys are kept, so it stays uniform over every row seen whatever the call sizes. tokens=0 records the
    absmax only (the old calibration files)."""

    def __init__(self, tokens: int = DEFAULT_TOKENS, seed: int = 0):
        if tokens < 0:
            raise ValueError(f"tokens per layer must be >= 0, got {tokens}")
        self.tokens, self.seed = tokens, seed
        self.absmax: dict[str, torch.Tensor] = {}
        self._rows: dict[str, torch.Tensor] = {}
        self._keys: dict[str, torch.Tensor] = {}
        self._gens: dict[torch.device, torch.Generator] = {}

    def _generator(self, device) -> torch.Generator:
        # a private generator: recording never moves the global RNG that samplers draw noise from
        g = self._gens.get(device)
        if g is None:
            g = self._gens[device] = torch.Generator(device=device).manual_seed(self.seed)
        return g

    @torch.no_grad()
    def record(self, name: str, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1])
        am = x.abs().amax(dim=0).float()
        prev = self.absmax.get(name)
        self.absmax[name] = am if prev is None else torch.maximum(prev.to(am.device), am)
        if not self.tokens or not x.shape[0]:
            return
        keys = torch.rand(x.shape[0], generator=self._generator(x.device), device=x.device)
        rows = x.to(SAMPLE_DTYPE)
        if name in self._keys:
            keys = torch.cat([self._keys[name].to(x.device), keys])
            rows = torch.cat([self._rows[name].to(x.device), rows])
        if keys.numel() > self.tokens:
            keys, idx = torch.topk(keys, self.tokens, largest=False, sorted=False)
            rows = rows[idx]
        self._keys[name], self._rows[name] = keys, rows

    def hook(self, name: str):
        def pre_hook(module, args):
            self.record(name, args[0])
        return pre_hook

    def attach(self, model: nn.Module, select) -> list:
        """Forward pre-hooks on every nn.Linear whose name passes select(name); returns the handles."""
        return [m.register_forward_pre_hook(self.hook(n)) for n, m in model.named_modules()
                if isinstance(m, nn.Linear) and select(n)]

    def sample(self, name: str) -> torch.Tensor | None:
        """The layer's sampled input rows (tokens, K) in random order, or None."""
        if name not in self._keys:
            return None
        order = torch.argsort(self._keys[name])
        return self._rows[name][order]

    def tensors(self) -> dict:
        """CPU tensors under the calibration file's keys: `<layer>.input_absmax`, `<layer>.input_sample`."""
        out = {}
        for name in sorted(self.absmax):
            out[f"{name}.input_absmax"] = self.absmax[name].cpu().contiguous()
            s = self.sample(name)
            if s is not None:
                out[f"{name}.input_sample"] = s.cpu().contiguous()
        return out


class ItemSampler:
    """A uniform sample without replacement of at most `items` batch items seen by record(): each item is a dict
    of tensors (batch dimension first in every call), copied to the CPU only when it is kept."""

    def __init__(self, items: int, seed: int = 0):
        if items < 0:
            raise ValueError(f"items must be >= 0, got {items}")
        self.items, self.gen = items, torch.Generator().manual_seed(seed)
        self._kept: list[tuple[float, dict]] = []

    @torch.no_grad()
    def record(self, tensors: dict) -> None:
        batch = next(iter(tensors.values())).shape[0]
        keys = torch.rand(batch, generator=self.gen).tolist()  # CPU generator: no device sync to decide
        for b, key in enumerate(keys):
            if len(self._kept) < self.items or key < self._kept[-1][0]:
                item = {k: v[b:b + 1].detach().to("cpu", copy=True) for k, v in tensors.items()}
                self._kept = sorted(self._kept + [(key, item)], key=lambda t: t[0])[: self.items]

    def samples(self) -> list[dict]:
        return [item for _, item in self._kept]

    def tensors(self, prefix: str) -> dict:
        """`<prefix>.<i>.<name>` for every kept item i, contiguous CPU tensors."""
        return {f"{prefix}.{i}.{k}": v.contiguous() for i, item in enumerate(self.samples()) for k, v in item.items()}
