"""``phonekit fit``: devices x schemes, the largest context that fits each budget per backend,
as a table and a PNG heat map. From the config alone: seconds for every preset."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from phonekit.export.commands import verb_parser


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = verb_parser(sub, "fit", "For one model: the largest context that fits each device's budget, per format and scheme (+ PNG heat map).",
                    "phonekit fit plm-1.8b --random-weights --device iphone-15 --device pixel-8-pro --png plm-fit.png")
    p.add_argument("model", help="preset name, Hugging Face folder, .gguf file or hub id")
    p.add_argument("--random-weights", action="store_true",
                   help="accepted for symmetry with export; fit never loads weights (the config is enough)")
    p.add_argument("--format", action="append", choices=["pte", "onnx", "coreml"], help="format(s) (default: all three)")
    p.add_argument("--quant", action="append", metavar="SCHEME",
                   help="scheme(s) to compare (default: fp32 fp16 w8 8da8w w4 8da4w, each where its format runs it)")
    p.add_argument("--quant-embedding", default="auto", choices=["auto", "none", "8w", "4w"], help="embedding and tied-head quantization: auto = int8 per row when the weights are quantized and the head is tied (default), none, 8w, 4w")
    p.add_argument("--device", action="append", default=[], metavar="PROFILE", help="devices (default: every profile)")
    p.add_argument("--budget-fraction", type=float, default=0.10, help="budget as a fraction of DRAM (default 0.10)")
    p.add_argument("--png", type=Path, default=None, help="heat map path (default: <model>-fit.png next to the JSON/table)")
    p.add_argument("--no-png", action="store_true", help="do not write the heat map")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from phonekit.export.commands.check import load_spec
    from phonekit.profiles.advisor import DEFAULT_SCHEMES, cell_text, fit_table, heat_map
    from phonekit.profiles.devices import builtin_profiles, resolve_devices
    from phonekit.profiles.gate import check_fraction
    from phonekit.quant import parse_scheme

    check_fraction(args.budget_fraction)
    schemes = [parse_scheme(s).name for s in args.quant] if args.quant else list(DEFAULT_SCHEMES)
    ms = load_spec(args.model)
    devices = resolve_devices(args.device) if args.device else list(builtin_profiles().values())
    formats = list(dict.fromkeys(args.format)) if args.format else ["pte", "onnx", "coreml"]
    table = fit_table(ms.config, ms.model_id, devices, args.budget_fraction, formats, schemes,
                      args.quant_embedding, ms.tokenizer_bytes)
    png = None
    if not args.no_png:
        png = heat_map(table, args.png or Path(f"{Path(ms.model_id).name}-fit.png"))
    if args.json:
        print(json.dumps(table.as_dict() | {"png": None if png is None else str(png)}, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    console = Console()
    # One table per format keeps each readable in an 80-column terminal.
    for fmt in dict.fromkeys(f for f, _ in table.columns):
        cols = [s for f, s in table.columns if f == fmt]
        t = Table(title=f"{ms.model_id} on {fmt}: largest context within {args.budget_fraction:.0%} of DRAM "
                        f"(- = none fits; model max {table.max_context:,})")
        t.add_column("device")
        t.add_column("budget MB", justify="right")
        for s in cols:
            t.add_column(s, justify="right")
        for d in devices:
            t.add_row(d.id, f"{d.budget_bytes(args.budget_fraction) / 1e6:,.0f}",
                      *(cell_text(table.cells[(d.id, fmt, s)], table.max_context) for s in cols))
        console.print(t)
    if png is not None:
        console.print(f"heat map: {png}")
    return 0
