"""Calibration of a FluxTransformer without ComfyUI (tests, scripts): every block linear's input range and row
sample, and a few whole inputs of the first double block for block-wise refinement (FLUX.2: with the raw `vec`
the global modulation reads, not the modulation outputs the blocks take)."""
import torch

from ..checkpoint import BLOCK_INPUT
from ..quant_ops import DEFAULT_TOKENS, InputRecorder, ItemSampler, SAMPLE_DTYPE

BLOCK_PREFIXES = ("double_blocks.", "single_blocks.")
DEFAULT_BLOCK_INPUTS = 4


def block_input_item(img, txt, vec, cos, sin) -> dict:
    """The stored form of one first-block call: hidden states and vec in bf16, the rotary angles float32."""
    return {"img": img.to(SAMPLE_DTYPE), "txt": txt.to(SAMPLE_DTYPE), "vec": vec.to(SAMPLE_DTYPE),
            "pe_cos": cos.float().expand(img.shape[0], *cos.shape[1:]),
            "pe_sin": sin.float().expand(img.shape[0], *sin.shape[1:])}


@torch.no_grad()
def calibrate_flux(model, calls, tokens: int = DEFAULT_TOKENS, block_inputs: int = DEFAULT_BLOCK_INPUTS) -> dict:
    """Run model(**kw) for every kw in `calls` and return the calibration tensors (checkpoint.save_calibration)."""
    rec = InputRecorder(tokens)
    items = ItemSampler(block_inputs)
    handles = rec.attach(model, lambda n: n.startswith(BLOCK_PREFIXES))

    seen = {}

    def first_block(module, args):
        img, txt, vec, pe = args
        items.record(block_input_item(img, txt, seen["vec"] if getattr(model, "flux2", False) else vec, *pe))

    if block_inputs:
        if getattr(model, "flux2", False):
            handles.append(model.double_stream_modulation_img.register_forward_pre_hook(
                lambda module, args: seen.update(vec=args[0])))
        handles.append(model.double_blocks[0].register_forward_pre_hook(first_block))
    try:
        for kw in calls:
            model(**kw)
    finally:
        for h in handles:
            h.remove()
    return {**rec.tensors(), **items.tensors(BLOCK_INPUT)}
