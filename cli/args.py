"""Argument types shared by the `lowbit` subcommands, checked when the command line is parsed."""
import argparse


def device(text: str) -> str:
    """`--device`: cpu, cuda or cuda:N that this machine has (other torch devices if a tensor can be made there)."""
    import torch

    try:
        d = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device; expected cpu, cuda or cuda:N") from None
    if d.type == "cpu":
        return text
    if d.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise argparse.ArgumentTypeError(f"{text}: CUDA is not available on this machine; use cpu")
        if d.index is not None and d.index >= n:
            raise argparse.ArgumentTypeError(f"{text}: this machine has {n} CUDA device(s), cuda:0..cuda:{n - 1}")
        return text
    try:
        torch.empty(1, device=d)
    except Exception as e:  # backends raise different types when they are absent
        raise argparse.ArgumentTypeError(f"{text}: not usable on this machine ({e})") from None
    return text
