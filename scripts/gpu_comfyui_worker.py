"""One ComfyUI configuration, in-process: load FLUX files (BF16 and lowbit) through ComfyUI's and our loaders,
sample, time a LoRA's apply / strength change / removal, write JSON lines. Started by gpu_comfyui_full.py.

--stream-cards 16,12,8 (issue 27) times DynamicVRAM's streaming instead: each model (a lowbit file, or `flux2`:
a FLUX.2 [dev]-shaped lowbit model built in memory, gpu_stream_models.py) samples with the whole GPU, then on
emulated cards of those sizes: torch.cuda.set_per_process_memory_fraction, plus what --reserve-vram sets
(ComfyUI's reserved VRAM and comfy-aimdo's VRAM headroom) so ComfyUI and its VBAR see that card. --stream-te
adds FLUX.1's text encoders (a lowbit T5-XXL-shaped T5 and a 16-bit CLIP-L), encoding under the same card.

ComfyUI is set up as its main.py 0.29 does (arguments from --comfy-args, then comfy-aimdo and, on NVIDIA,
ModelPatcherDynamic as CoreModelPatcher), without the server. --force-dynamic-cpu builds ModelPatcherDynamic
on a CPU the way tests/test_comfyui_dynamic.py does (dry runs only).
"""
import argparse
import gc
import json
import os
import resource
import sys
import time

GB = 1024 ** 3


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--comfyui", required=True, help="ComfyUI source folder")
    p.add_argument("--comfy-args", default="", help="ComfyUI command-line arguments, e.g. '--disable-dynamic-vram'")
    p.add_argument("--config", required=True, help="name of this configuration in the results")
    p.add_argument("--models", required=True, help="name=path,... (bf16 files go through ComfyUI's loader)")
    p.add_argument("--results", required=True, help="JSON lines file to append to")
    p.add_argument("--latents", required=True, help="folder for the latents the orchestrator compares")
    p.add_argument("--res", type=int, default=1024)
    p.add_argument("--steps", type=int, default=4, help="timed sampling steps")
    p.add_argument("--tokens", type=int, default=512, help="text tokens of the (random) conditioning")
    p.add_argument("--check-steps", type=int, default=2, help="steps of the latents compared across runs")
    p.add_argument("--lora-rank", type=int, default=32)
    p.add_argument("--lowvram-fraction", type=float, default=0.0,
                   help="> 0: reserve VRAM (what --reserve-vram sets) so only this fraction of each model fits")
    p.add_argument("--deadline", type=float, default=0.0, help="epoch seconds; models not started by then are skipped")
    p.add_argument("--force-dynamic-cpu", action="store_true")
    p.add_argument("--autotune-first", action="store_true", help="every lowbit Triton kernel keeps only its first config")
    p.add_argument("--stream-cards", default="", help="emulated card sizes in GB (e.g. 16,12,8): time DynamicVRAM "
                                                       "streaming against the whole GPU instead of the default runs")
    p.add_argument("--stream-te", action="store_true", help="with --stream-cards: FLUX.1 models also load and encode "
                                                             "with a lowbit T5-XXL-shaped T5 and a CLIP-L")
    p.add_argument("--small", action="store_true", help="reduced in-memory models (flux2, text encoders): dry runs")
    return p.parse_args(argv)


class Results:
    def __init__(self, path, config):
        self.path, self.config = path, config

    def write(self, **row):
        row = {"config": self.config, "t": round(time.time(), 3), **row}
        with open(self.path, "a") as f:
            f.write(json.dumps(row, default=str) + "\n")
        print(json.dumps(row, default=str), flush=True)


def setup_comfyui(comfyui: str, comfy_args: str, force_dynamic_cpu: bool) -> dict:
    """Import ComfyUI as main.py does; {'dynamic_vram': bool, ...}."""
    sys.argv = ["main.py", *comfy_args.split()]
    sys.path.insert(0, comfyui)
    import comfy.options

    comfy.options.enable_args_parsing()
    from comfy.cli_args import args, enables_dynamic_vram
    import comfy_aimdo.control

    if enables_dynamic_vram() or force_dynamic_cpu:  # main.py: before torch and comfy.model_management
        comfy_aimdo.control.init(simple_vram_headroom=None if args.reserve_vram is None else int(args.reserve_vram * GB))
    import torch

    import comfy.memory_management
    import comfy.model_management as mm
    import comfy.model_patcher as mpm

    info = {"dynamic_vram": False, "aimdo": False}
    if args.enable_dynamic_vram or (enables_dynamic_vram() and mm.is_nvidia() and not mm.is_wsl()):
        if args.enable_dynamic_vram or mm.torch_version_numeric >= (2, 8):
            ok = comfy_aimdo.control.init_devices((d.index, int(args.vram_headroom * GB)) for d in mm.get_all_torch_devices())
            info["aimdo"] = bool(ok)
            if ok:
                mpm.CoreModelPatcher = mpm.ModelPatcherDynamic
                comfy.memory_management.aimdo_enabled = True
                info["dynamic_vram"] = True
    elif force_dynamic_cpu:
        import importlib

        import comfy_aimdo.host_buffer
        if comfy_aimdo.host_buffer.lib is None:
            importlib.reload(comfy_aimdo.host_buffer)
        mpm.ModelPatcherDynamic.__new__ = staticmethod(lambda cls, *a, **k: object.__new__(cls))
        mpm.CoreModelPatcher = mpm.ModelPatcherDynamic
        comfy.memory_management.aimdo_enabled = True
        info["dynamic_vram"] = "forced on cpu"
    info["device"] = str(mm.get_torch_device())
    info["torch"] = torch.__version__
    return info


def autotune_first() -> int:
    """Trim every lowbit Triton autotuner to its first config (no benchmarking, one compile per shape); the count."""
    import importlib

    from triton.runtime.autotuner import Autotuner

    n = 0
    for name in ("triton_act", "triton_w4a4", "triton_ternary", "triton_wonly"):
        mod = importlib.import_module(f"comfyui_lowbit.kernels.{name}")
        for obj in vars(mod).values():
            if isinstance(obj, Autotuner) and len(obj.configs) > 1:
                obj.configs = obj.configs[:1]
                n += 1
    return n


def sync(torch, device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def vram_used(torch, device) -> float:
    """GB in use on the device by everything (this process, aimdo's VBAR, other processes)."""
    if device.type != "cuda":
        return 0.0
    free, total = torch.cuda.mem_get_info(device)
    return (total - free) / GB


def conditioning(torch, tokens: int, context_dim: int, pooled_dim: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, tokens, context_dim, generator=g), {"pooled_output": torch.randn(1, pooled_dim, generator=g),
                                                             "guidance": 3.5}]]


def make_lora(torch, config: dict, rank: int, seed: int = 7) -> dict:
    """A kohya-format LoRA of `rank` on every block linear of a FLUX with `config` (seeded, bf16)."""
    from comfyui_lowbit.checkpoint import flux

    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, (n, k) in ((k, s) for k, s in flux.expected_shapes(config).items() if k.endswith(".weight") and len(s) == 2):
        layer = key[: -len(".weight")]
        if flux.layer_format(layer, "svdq_w4a4") != "svdq_w4a4":
            continue
        name = "lora_unet_" + layer.replace(".", "_")
        sd[f"{name}.lora_up.weight"] = (torch.randn(n, rank, generator=g) * 0.5 / rank ** 0.5).to(torch.bfloat16)
        sd[f"{name}.lora_down.weight"] = (torch.randn(rank, k, generator=g) / k ** 0.5).to(torch.bfloat16)
        sd[f"{name}.alpha"] = torch.tensor(float(rank))
    return sd


class Runner:
    def __init__(self, a, info, out: Results):
        import torch

        import comfy.model_management as mm

        self.a, self.info, self.out, self.torch, self.mm = a, info, out, torch, mm
        self.device = mm.get_torch_device()

    def sample(self, mp, steps, cond, timings=None, channels=16, downscale=8):
        import comfy.sample

        torch, dev = self.torch, self.device
        h = w = self.a.res // downscale
        g = torch.Generator().manual_seed(0)
        noise = torch.randn(1, channels, h, w, generator=g)
        latent = torch.zeros(1, channels, h, w)
        marks = []

        def callback(step, x0, x, total):
            sync(torch, dev)
            marks.append((time.perf_counter(), vram_used(torch, dev)))

        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        t0 = time.perf_counter()
        out = comfy.sample.sample(mp, noise, steps, 1.0, "euler", "simple", cond, cond, latent, disable_pbar=True,
                                  seed=0, callback=callback)
        sync(torch, dev)
        if timings is not None:
            times = [b[0] - a[0] for a, b in zip([(t0, 0.0)] + marks[:-1], marks)]
            timings.update(first_step_s=times[0], step_s=sorted(times[1:])[len(times[1:]) // 2] if len(times) > 1 else None,
                           steps_s=[round(t, 4) for t in times], total_s=time.perf_counter() - t0,
                           device_used_peak_gb=max((m[1] for m in marks), default=0.0),
                           torch_peak_gb=torch.cuda.max_memory_allocated(dev) / GB if dev.type == "cuda" else None)
        return out.float().cpu()

    def save(self, model, kind, latent):
        self.torch.save(latent, os.path.join(self.a.latents, f"{self.a.config}__{model}__{kind}.pt"))

    def load(self, name, path):
        import comfy.sd

        from comfyui_lowbit.nodes.loaders import load_lowbit_diffusion_model

        t0 = time.perf_counter()
        mp = comfy.sd.load_diffusion_model(path) if name == "bf16" else load_lowbit_diffusion_model(path)
        return mp, time.perf_counter() - t0

    def packed_ptrs(self, mp):
        from comfyui_lowbit.nodes.patcher import lowbit_layers

        return {p: m.weight.data_ptr() for p, m in lowbit_layers(mp.model).items()}

    def reserve_for_lowvram(self, mp):
        """Set ComfyUI's reserved VRAM (what --reserve-vram sets) so that about lowvram_fraction of the model fits."""
        mm = self.mm
        h = w = self.a.res // 8
        need = max(mp.model.memory_required([1, 16, h, w]), mm.minimum_inference_memory() - mm.EXTRA_RESERVED_VRAM)
        free = mm.get_free_memory(self.device)
        reserve = max(0.0, free - self.a.lowvram_fraction * mp.model_size() - need)
        mm.EXTRA_RESERVED_VRAM = reserve
        if self.info.get("aimdo"):
            import comfy_aimdo.control
            comfy_aimdo.control.init(simple_vram_headroom=int(reserve))
        return reserve / GB

    def unload(self):
        mm = self.mm
        if self.info.get("dynamic_vram") == "forced on cpu":  # ModelPatcherDynamic cannot unload from a CPU
            mm.current_loaded_models[:] = [m for m in mm.current_loaded_models if m.model is not None and not m.model.is_dynamic()]
        else:
            mm.unload_all_models()
        gc.collect()
        mm.soft_empty_cache(True)

    def run_model(self, name, path, cond, lora):
        """Load, warm up, time `steps` steps, then the LoRA: apply, change strength, remove."""
        a, torch, mm, dev, out = self.a, self.torch, self.mm, self.device, self.out
        self.unload()
        before = vram_used(torch, dev)
        mp, t_file = self.load(name, path)
        row = dict(model=name, event="load", file_s=t_file, patcher=type(mp).__name__, dynamic=mp.is_dynamic(),
                   model_size_gb=mp.model_size() / GB, device_used_before_gb=before)
        if a.lowvram_fraction:
            row["reserve_vram_gb"] = self.reserve_for_lowvram(mp)
        t0 = time.perf_counter()
        mm.load_models_gpu([mp])
        sync(torch, dev)
        row.update(to_device_s=time.perf_counter() - t0, loaded_gb=mp.loaded_size() / GB,
                   lowvram=bool(getattr(mp.model, "model_lowvram", False)), host_rss_peak_gb=rss_peak_gb())
        out.write(**row)
        warm = {}
        self.sample(mp, 1, cond, warm)
        out.write(model=name, event="warmup", first_step_s=warm["first_step_s"])
        timed = {}
        self.sample(mp, a.steps, cond, timed)
        out.write(model=name, event="sample", res=a.res, lowvram=bool(getattr(mp.model, "model_lowvram", False)),
                  loaded_gb=mp.loaded_size() / GB, transformer_vram_gb=timed["device_used_peak_gb"] - before, **timed)
        base = self.sample(mp, a.check_steps, cond)
        self.save(name, "base", base)
        self.lora_cycle(name, mp, cond, lora, base)
        del mp
        self.unload()

    def lora_cycle(self, name, mp, cond, lora, base):
        import comfy.sd

        a, torch, mm, dev = self.a, self.torch, self.mm, self.device
        ptrs = self.packed_ptrs(mp)
        rows, lats = {}, {}
        for what, strength in (("apply", 1.0), ("strength", 0.5)):
            t0 = time.perf_counter()
            lq, _ = comfy.sd.load_lora_for_models(mp, None, lora, strength, 0)
            t1 = time.perf_counter()
            mm.load_models_gpu([lq])
            sync(torch, dev)
            t2 = time.perf_counter()
            st = {}
            lats[what] = self.sample(lq, a.check_steps, cond, st)
            rows[what] = dict(map_s=t1 - t0, load_s=t2 - t1, step_s=st["step_s"], first_step_s=st["first_step_s"],
                              lowvram=bool(getattr(lq.model, "model_lowvram", False)))
            self.save(name, f"lora{strength}", lats[what])
            del lq
        t0 = time.perf_counter()
        mm.load_models_gpu([mp])
        sync(torch, dev)
        t_remove = time.perf_counter() - t0
        after = self.sample(mp, a.check_steps, cond)
        self.out.write(model=name, event="lora", rank=a.lora_rank, layers=len(lora) // 3, apply=rows["apply"],
                       strength=rows["strength"], remove_load_s=t_remove,
                       removal_bit_identical=bool(torch.equal(after, base)),
                       packed_weights_unmoved=(self.packed_ptrs(mp) == ptrs) if ptrs else None,
                       lora_effect_rel=float((lats["apply"] - base).norm() / base.norm()))


class StreamStats:
    """Counts what DynamicVRAM copies in: every cast of a castable layer whose VBAR copy was not resident
    (comfy.ops.resolve_cast_module_with_vbar), split into our quantized layers (Streamed) and ComfyUI's own."""

    def __init__(self):
        import comfy.memory_management
        import comfy.ops

        from comfyui_lowbit.nodes.stream import Streamed

        self.reset()
        real = comfy.ops.resolve_cast_module_with_vbar

        def resolve(s, *args, **kwargs):
            prefetch = getattr(s, "_prefetch", None) or {}
            kind = "quant" if isinstance(s, Streamed) else "other"
            self.casts[kind] += 1
            if not prefetch.get("resident", True):
                self.bytes[kind] += comfy.memory_management.vram_aligned_size([s.weight, s.bias])
                self.misses[kind] += prefetch.get("signature") is None
            return real(s, *args, **kwargs)

        comfy.ops.resolve_cast_module_with_vbar = resolve

    def reset(self):
        self.casts, self.bytes, self.misses = {"quant": 0, "other": 0}, {"quant": 0, "other": 0}, {"quant": 0, "other": 0}


def quantized_bytes(model) -> int:
    """Bytes of a model's quantized layers as DynamicVRAM streams them."""
    import comfy.memory_management

    from comfyui_lowbit.nodes.patcher import lowbit_layers

    return sum(comfy.memory_management.vram_aligned_size([t for t in m._buffers.values() if t is not None])
               for m in lowbit_layers(model).values())


class StreamRunner(Runner):
    """--stream-cards: s/step on the whole GPU, then on emulated smaller cards, for one model at a time."""

    def __init__(self, a, info, out):
        super().__init__(a, info, out)
        self.stats = StreamStats()
        self.extra_reserved = self.mm.EXTRA_RESERVED_VRAM

    def set_card(self, gb):
        """Emulate a card of `gb` GB (None: the whole GPU); the GB hidden from ComfyUI, or None on a CPU."""
        torch, mm, dev = self.torch, self.mm, self.device
        if dev.type != "cuda":
            return None
        total = torch.cuda.get_device_properties(dev).total_memory
        hidden = 0 if gb is None else max(0, total - gb * GB)
        torch.cuda.set_per_process_memory_fraction(1.0 if gb is None else min(1.0, gb * GB / total), dev)
        mm.EXTRA_RESERVED_VRAM = self.extra_reserved + hidden  # what --reserve-vram sets (on top of the default)
        if self.info.get("aimdo"):
            import comfy_aimdo.control
            comfy_aimdo.control.init(simple_vram_headroom=int(hidden))  # main.py passes --reserve-vram here
        return hidden / GB

    def load(self, name, path):
        if name != "flux2":
            mp, secs = super().load(name, path)
            return mp, secs, {"latent_channels": 16, "downscale": 8}
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import gpu_stream_models

        t0 = time.perf_counter()
        mp, info = gpu_stream_models.load_flux2(small=self.a.small)
        return mp, time.perf_counter() - t0, info

    def encode(self, clip):
        torch = self.torch
        t0 = time.perf_counter()
        cond, pooled = clip.encode_from_tokens(clip.tokenize("a lighthouse on a cliff at dusk"), return_pooled=True)
        sync(torch, self.device)
        return [[cond, {"pooled_output": pooled, "guidance": 3.5}]], time.perf_counter() - t0

    def stream_run(self, name, mp, clip, cond, card, quant, before, shape, resident, resident_latent):
        """One emulated card (None: the whole GPU): encode (with text encoders), load, 1 warm-up step, timed steps."""
        a, torch, mm, dev, out = self.a, self.torch, self.mm, self.device, self.out
        self.unload()
        hidden = self.set_card(card)
        row = dict(model=name, event="stream", card_gb=card, hidden_gb=hidden, quantized_gb=quant / GB)
        if clip is not None:
            cond, row["te_encode_s"] = self.encode(clip)
        t0 = time.perf_counter()
        mm.load_models_gpu([mp])
        sync(torch, dev)
        row["to_device_s"] = time.perf_counter() - t0
        warm = {}
        self.sample(mp, 1, cond, warm, **shape)
        row["first_step_s"] = warm["first_step_s"]
        self.stats.reset()
        timed = {}
        latent = self.sample(mp, a.steps, cond, timed, **shape)
        st = self.stats
        row.update(step_s=timed["step_s"], steps_s=timed["steps_s"], device_used_peak_gb=timed["device_used_peak_gb"] - before,
                   torch_peak_gb=timed["torch_peak_gb"], loaded_gb=mp.loaded_size() / GB,
                   quant_streamed_gb_per_step=st.bytes["quant"] / a.steps / GB,
                   quant_streamed_fraction=st.bytes["quant"] / a.steps / quant if quant else None,
                   quant_cast_buffer_per_step=st.misses["quant"] / a.steps, quant_casts_per_step=st.casts["quant"] / a.steps,
                   other_streamed_gb_per_step=st.bytes["other"] / a.steps / GB)
        if card is None:
            resident, resident_latent = timed["step_s"], latent
        elif resident_latent is not None:
            row.update(slowdown=timed["step_s"] / resident if resident and timed["step_s"] else None,
                       latent_identical=bool(torch.equal(latent, resident_latent)),
                       latent_rel_l2=float((latent - resident_latent).norm() / resident_latent.norm().clamp_min(1e-12)))
        out.write(**row)
        return resident, resident_latent

    def run_model(self, name, path, cond, lora):
        a, torch, dev, out = self.a, self.torch, self.device, self.out
        cards = sorted({float(c) for c in a.stream_cards.split(",") if c}, reverse=True)
        self.unload()
        self.set_card(None)
        before = vram_used(torch, dev)
        mp, t_build, info = self.load(name, path)
        clip, te = None, {}
        if a.stream_te and name != "flux2":
            sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
            import gpu_stream_models

            clip, te = gpu_stream_models.load_flux1_text_encoders(small=a.small, d_model=cond[0][0].shape[-1])
        elif name == "flux2":
            g = torch.Generator().manual_seed(1)
            cond = [[torch.randn(1, a.tokens, info["context_in_dim"], generator=g), {"guidance": 3.5}]]
        quant = quantized_bytes(mp.model)
        out.write(model=name, event="stream_load", build_s=t_build, patcher=type(mp).__name__, dynamic=mp.is_dynamic(),
                  model_size_gb=mp.model_size() / GB, quantized_gb=quant / GB, cards=cards, **te,
                  **{k: v for k, v in info.items() if k in ("layers",)})
        shape = dict(channels=info["latent_channels"], downscale=info["downscale"])
        resident, resident_latent = None, None
        for card in [None] + cards:
            try:
                resident, resident_latent = self.stream_run(name, mp, clip, cond, card, quant, before, shape,
                                                            resident, resident_latent)
            except Exception as e:  # noqa: BLE001 - an OOM on one card is a result; the next card still runs
                import traceback
                out.write(model=name, event="error", card_gb=card, error=f"{type(e).__name__}: {e}"[:2000],
                          traceback=traceback.format_exc()[-3000:])
        self.set_card(None)
        del mp, clip
        self.unload()


def rss_peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2


def main(argv=None):
    a = parse_args(argv)
    os.makedirs(a.latents, exist_ok=True)
    out = Results(a.results, a.config)
    t0 = time.perf_counter()
    info = setup_comfyui(a.comfyui, a.comfy_args, a.force_dynamic_cpu)
    import torch

    import comfy.model_management as mm

    from comfyui_lowbit.checkpoint import flux
    from safetensors import safe_open

    info["import_s"] = time.perf_counter() - t0
    info["gpu"] = torch.cuda.get_device_name(mm.get_torch_device()) if mm.get_torch_device().type == "cuda" else None
    if a.autotune_first:
        info["autotuners_trimmed"] = autotune_first()
    out.write(event="setup", comfy_args=a.comfy_args, **info)
    runner = (StreamRunner if a.stream_cards else Runner)(a, info, out)
    models = dict(kv.split("=", 1) for kv in a.models.split(","))
    config = None
    for name, path in models.items():
        if name == "flux2":  # built in memory (--stream-cards)
            continue
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            if "lowbit.config" in meta:
                config = json.loads(meta["lowbit.config"])
            elif config is None:
                config = flux.infer_config({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
    cond = conditioning(torch, a.tokens, config["context_in_dim"], config["vec_in_dim"]) if config else None
    lora = make_lora(torch, config, a.lora_rank) if config and not a.stream_cards else None
    for name, path in models.items():
        if a.deadline and time.time() > a.deadline:
            out.write(model=name, event="skipped", reason="deadline")
            continue
        try:
            runner.run_model(name, path, cond, lora)
        except Exception as e:  # noqa: BLE001 - one model failing (OOM in low-VRAM runs) is a result, not the end
            import traceback
            out.write(model=name, event="error", error=f"{type(e).__name__}: {e}"[:2000],
                      traceback=traceback.format_exc()[-3000:])
            runner.unload()
    out.write(event="done", host_rss_peak_gb=rss_peak_gb(), wall_s=time.perf_counter() - t0)


if __name__ == "__main__":
    main()
