"""``phonekit devices``: the device profiles the budget is checked against."""

from __future__ import annotations

import argparse
import json

from phonekit.export.commands import verb_parser


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = verb_parser(sub, "devices", "List the device profiles (DRAM, OS per-app ceiling, 10%% budget, sources).",
                    "phonekit devices --budget-fraction 0.1 --json")
    p.add_argument("--device", action="append", default=[], metavar="PROFILE",
                   help="show only these (name, alias or a .toml profile path; repeatable)")
    p.add_argument("--budget-fraction", type=float, default=0.10, help="budget as a fraction of DRAM (default 0.10)")
    p.add_argument("--json", action="store_true", help="print JSON, with every figure's source")
    p.set_defaults(func=run)


def _gb(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e9:g}"


def run(args: argparse.Namespace) -> int:
    from phonekit.profiles.devices import builtin_profiles, resolve_devices
    from phonekit.profiles.gate import check_fraction

    check_fraction(args.budget_fraction)
    profiles = resolve_devices(args.device) if args.device else list(builtin_profiles().values())
    if args.json:
        rows = [p.as_dict() | {"budget_bytes": p.budget_bytes(args.budget_fraction)} for p in profiles]
        print(json.dumps({"budget_fraction": args.budget_fraction, "devices": rows}, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"device profiles (budget = {args.budget_fraction:.0%} of DRAM left to apps)")
    for c, j in (("id", "left"), ("name", "left"), ("os", "left"), ("soc", "left"), ("DRAM GB", "right"),
                 ("budget MB", "right"), ("app limit GB", "right"), ("entitled GB", "right"), ("bandwidth GB/s", "right"),
                 ("aliases", "left")):
        t.add_column(c, justify=j)
    for p in profiles:
        t.add_row(p.id, p.name, p.os, p.soc, _gb(p.dram_bytes) + (f" ({_gb(p.reserved_bytes)} reserved)" if p.reserved_bytes else ""),
                  f"{p.budget_bytes(args.budget_fraction) / 1e6:,.0f}", _gb(p.app_limit_bytes), _gb(p.entitled_limit_bytes),
                  "-" if p.peak_bandwidth_gbps is None else f"{p.peak_bandwidth_gbps:g}", ", ".join(p.aliases))
    console = Console()
    console.print(t)
    console.print("app limit: the OS per-app ceiling (iOS jetsam default; Android and Linux set none, the low-memory "
                  "killer decides). Sources: phonekit devices --json. Your own device: --device path/to/profile.toml")
    return 0
