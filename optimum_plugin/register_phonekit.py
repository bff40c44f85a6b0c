"""``optimum-cli export phonekit``: phonekit's export as an optimum-cli subcommand.

optimum 2.x imports every module of the ``optimum.commands.register`` namespace
package at each ``optimum-cli`` start and registers its ``REGISTER_COMMANDS``.
pyproject.toml installs this file there (package-dir ``optimum.commands.register``
-> ``optimum_plugin/``; no ``__init__.py``, the namespace is shared with other
optimum plugins). The command builds the same ``argparse.Namespace`` that
``phonekit export`` builds and calls the same ``run``, so both write the same
bundle and fail with the same messages and exit codes.

The model, torch and the exporters are imported only inside ``run``: this module
is loaded by every optimum-cli invocation, including ones that never reach phonekit.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from optimum.commands.base import BaseOptimumCLICommand, CommandInfo
from optimum.commands.export.base import ExportCommand

PROG = "optimum-cli export phonekit"
HELP = "Export a model to a phonekit bundle for phones: ExecuTorch (.pte), ONNX, Core ML + manifest + tokenizer + model card."
EXAMPLE = (f"{PROG} --model smollm2-135m-instruct --target android --quant 8da4w "
           "--context 1024 --device pixel-8 bundles/smol")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """optimum's spelling of ``phonekit export``'s options: ``--model`` and a positional
    output folder (like ``optimum-cli export onnx``); every other option is phonekit's own."""
    # Shared with `phonekit export` so the two commands cannot drift apart.
    from phonekit.export.commands.export import add_export_args

    parser.description = HELP + " Runs the same export as `phonekit export MODEL --out OUTPUT ...`."
    parser.epilog = f"example:\n  {EXAMPLE}"
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("-m", "--model", required=True,
                        help="preset name, Hugging Face folder, .gguf file or hub id (same as `phonekit export MODEL`)")
    parser.add_argument("--random-weights", action="store_true", help="build a preset with random weights (no download)")
    add_export_args(parser)
    parser.add_argument("--force", action="store_true", help="replace OUTPUT if it exists")
    parser.add_argument("--json", action="store_true", help="print the manifest as JSON")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    parser.add_argument("output", type=Path, metavar="OUTPUT",
                        help="bundle folder to create (`phonekit export --out`)")


def phonekit_namespace(ns: argparse.Namespace) -> argparse.Namespace:
    """The Namespace ``phonekit export`` would have parsed for the same request."""
    from phonekit.export.commands import export as export_cmd

    # Every option add_export_args defines, read from a scratch parser so that an
    # option added there later travels without touching this file.
    scratch = argparse.ArgumentParser(add_help=False)
    export_cmd.add_export_args(scratch)
    shared = {dest: getattr(ns, dest) for dest in vars(scratch.parse_args([]))}
    return argparse.Namespace(verb="export", model=ns.model, random_weights=ns.random_weights, **shared,
                              out=ns.output, force=ns.force, json=ns.json, quiet=ns.quiet, func=export_cmd.run)


def execute(ns: argparse.Namespace) -> int:
    """Run the export; a ``PhonekitError`` becomes one line on stderr and its exit code,
    exactly as ``phonekit export`` reports it (only the program name differs)."""
    from phonekit.errors import PhonekitError

    args = phonekit_namespace(ns)
    try:
        return int(args.func(args) or 0)
    except PhonekitError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


class PhonekitExportCommand(BaseOptimumCLICommand):
    COMMAND = CommandInfo(name="phonekit", help=HELP)

    @staticmethod
    def parse_args(parser: argparse.ArgumentParser) -> None:
        add_arguments(parser)

    def run(self) -> None:
        # optimum-cli's main() ignores run()'s return value, so a failure must exit here
        # to give the caller phonekit's exit code (2 bad input, 3 over budget).
        code = execute(self.args)
        if code:
            raise SystemExit(code)


REGISTER_COMMANDS = [(PhonekitExportCommand, ExportCommand)]
