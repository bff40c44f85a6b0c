"""``phonekit models``: the presets, with exact parameter counts."""

from __future__ import annotations

import argparse
import json

from phonekit.export.commands import verb_parser


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = verb_parser(sub, "models", "List the named model presets with their parameter counts.", "phonekit models --json")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from phonekit.export.models import build_model, num_params
    from phonekit.export.presets import PRESETS

    import torch

    rows = []
    for p in PRESETS.values():
        with torch.device("meta"):
            n = num_params(build_model(p.args))
        rows.append({"name": p.name, "family": p.args.family, "params": n, "layers": p.args.num_hidden_layers,
                     "layer_sharing": p.args.layer_sharing, "max_context": p.args.max_context,
                     "hub_id": p.hub_id, "license": p.license, "description": p.description})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    t = Table(title="phonekit presets")
    for c in ("name", "family", "params", "layers", "context", "hub id"):
        t.add_column(c, justify="right" if c in ("params", "layers", "context") else "left")
    for r in rows:
        layers = f"{r['layers']}x2" if r["layer_sharing"] else str(r["layers"])
        t.add_row(r["name"], r["family"], f"{r['params']:,}", layers, str(r["max_context"]), r["hub_id"] or "")
    Console().print(t)
    return 0
