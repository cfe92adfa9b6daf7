"""The `lowbit` command. Each subcommand lives in its own module exposing `add_parser(subparsers)`,
which sets `run=callable(args) -> int` through `set_defaults`."""
import argparse
import importlib
import contextlib
import os
import signal
import sys
import threading

from .. import __version__

# modules relative to this package, one per subcommand
COMMAND_MODULES = [".quantize", ".inspect", ".convert_nunchaku", ".bench", ".demo", ".cache"]


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line (argparse prints the usage block first), exit code 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="lowbit", description="comfyui-lowbit: 4-bit and 1.58-bit FLUX tools")
    p.add_argument("--version", action="version", version=f"comfyui-lowbit {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name, __package__).add_parser(sub)
    return p


def _report(line: str) -> None:
    """The error on its own line: on a terminal, first clear what a progress bar left on the current one."""
    prefix = "\r\033[K" if sys.stderr.isatty() else ""
    print(prefix + line, file=sys.stderr)


class _SigintSeen:
    """Remembers a Ctrl-C: a KeyboardInterrupt raised inside a C extension (safetensors, torch) can come out
    as another exception (e.g. a TypeError), which must still read as an interruption, not as bad input."""

    def __init__(self):
        self.seen = False

    def __call__(self, signum, frame):
        self.seen = True
        raise KeyboardInterrupt

    @contextlib.contextmanager
    def installed(self):
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = signal.signal(signal.SIGINT, self)
        try:
            yield self
        finally:
            signal.signal(signal.SIGINT, previous)


def _one_line(e: BaseException) -> str:
    return " ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__


def main(argv=None) -> int:
    """Every error is one line on stderr: bad input exits 1, Ctrl-C 130, usage errors 2 (LOWBIT_DEBUG=1 lets
    unexpected errors through with their traceback)."""
    try:
        return _main(argv)
    except KeyboardInterrupt:  # Ctrl-C while the subcommands import torch (the first second or two)
        return _interrupted("lowbit")


def _main(argv) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # usage error (already printed), --help, --version
        return e.code if isinstance(e.code, int) else 0
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    name = f"lowbit {args.command}"
    sigint = _SigintSeen()
    try:
        with sigint.installed():
            return args.run(args) or 0
    except KeyboardInterrupt:
        return _interrupted(name)
    except (ValueError, OSError) as e:  # bad input: one line naming the file / key / layer
        if sigint.seen:
            return _interrupted(name)
        _report(f"{name}: error: {_one_line(e)}")
        return 1
    except Exception as e:
        if sigint.seen:
            return _interrupted(name)
        if os.environ.get("LOWBIT_DEBUG"):
            raise
        _report(f"{name}: error: {type(e).__name__}: {_one_line(e)} (LOWBIT_DEBUG=1 shows the traceback)")
        return 1


def _interrupted(name: str) -> int:
    _report(f"{name}: interrupted; no output was written")
    return 130


if __name__ == "__main__":
    sys.exit(main())
