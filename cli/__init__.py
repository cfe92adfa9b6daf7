"""The `lowbit` command. Each subcommand lives in its own module exposing `add_parser(subparsers)`,
which sets `run=callable(args) -> int` through `set_defaults`."""
import argparse
import importlib
import sys

from .. import __version__

# modules relative to this package, one per subcommand
COMMAND_MODULES = [".quantize", ".inspect", ".convert_nunchaku", ".bench", ".demo"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lowbit", description="comfyui-lowbit: 4-bit and 1.58-bit FLUX tools")
    p.add_argument("--version", action="version", version=f"comfyui-lowbit {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name, __package__).add_parser(sub)
    return p


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        return args.run(args) or 0
    except (ValueError, FileNotFoundError, FileExistsError, OSError) as e:
        # bad input: one line naming the file / key / layer, non-zero exit
        print(f"lowbit {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
