"""The ``phonekit`` command. Each verb lives in ``phonekit.export.commands.<verb>``
with ``add_parser(subparsers)`` and ``run(args) -> int``; this file wires them and
turns ``PhonekitError`` into a one-line message and a non-zero exit."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from phonekit import __version__
from phonekit.errors import PhonekitError

VERBS = ["models", "generate", "export", "run", "check", "fit", "eval", "devices", "push"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="phonekit",
        description="Ship small language models to phones: load, quantize, export (ExecuTorch, CoreML, ONNX), check the memory budget.",
        epilog="example: phonekit export smollm2-135m-instruct --target android --quant 8da4w --device pixel-8 --out bundles/smol",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"phonekit {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for verb in VERBS:
        try:
            mod = importlib.import_module(f"phonekit.export.commands.{verb}")
        except ModuleNotFoundError as e:
            if e.name == f"phonekit.export.commands.{verb}":
                continue  # verb not built in this version
            raise
        mod.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "verb", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except PhonekitError as e:
        print(f"phonekit {args.verb}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"phonekit {args.verb}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
