"""One module per CLI verb: ``add_parser(subparsers)`` and ``run(args) -> int``."""

from __future__ import annotations

import argparse


def verb_parser(sub: argparse._SubParsersAction, name: str, help: str, example: str) -> argparse.ArgumentParser:
    """A subparser whose --help ends with a worked example."""
    return sub.add_parser(name, help=help, description=help, epilog=f"example:\n  {example}",
                          formatter_class=argparse.RawDescriptionHelpFormatter)
