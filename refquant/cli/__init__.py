"""Command line: `python3 -m refquant <command>`. Each command lives in its own module and adds
itself to the parser with a `register(subparsers)` function listed in COMMAND_MODULES."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# Modules that define `register(subparsers)`; each sets `func` on its parser.
COMMAND_MODULES = ("refquant.cli.demo", "refquant.cli.recipes", "refquant.cli.quantize", "refquant.cli.which")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="refquant", description="Bit-exact FP8 / NVFP4 quantization after NVIDIA modelopt."
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMAND_MODULES:
        importlib.import_module(module).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        print(f"refquant {args.command}: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # the run failed writing or reading (a full disk, no permission), not its input
        print(f"refquant {args.command}: error: {error}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # The reader went away (`... | head`): not our error. Point stdout at /dev/null so the
        # interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
