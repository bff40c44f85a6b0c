"""The advisor behind ``phonekit fit``: for one model, the largest context that fits each
device's budget, per backend and scheme, as a table and a PNG heat map.

Everything comes from ``estimate`` on the config (a meta-device model gives the plan), so
it runs in seconds for every preset, 1.8B included, without allocating weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from phonekit.errors import QuantError, UsageError
from phonekit.profiles.devices import DeviceProfile
from phonekit.profiles.estimate import Estimator

# The schemes each format runs (quant.schemes.FORMAT_SCHEMES), in the advisor's column order.
DEFAULT_SCHEMES = ("fp32", "fp16", "w8", "8da8w", "w4", "8da4w")


@dataclass
class FitTable:
    model_id: str
    max_context: int
    fraction: float
    devices: list[DeviceProfile]
    columns: list[tuple[str, str]]  # (format, scheme name)
    cells: dict[tuple[str, str, str], int | None] = field(default_factory=dict)  # (device id, format, scheme) -> context

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": self.model_id, "max_context": self.max_context, "budget_fraction": self.fraction,
            "columns": [{"format": f, "scheme": s} for f, s in self.columns],
            "devices": [
                {"device": d.id, "dram_bytes": d.dram_bytes, "budget_bytes": d.budget_bytes(self.fraction),
                 "largest_context": {f"{f}/{s}": self.cells[(d.id, f, s)] for f, s in self.columns}}
                for d in self.devices
            ],
        }


def largest_fitting(est: Estimator, budget: int, hi: int, lo: int = 2) -> int | None:
    """Binary search on the context (the estimate grows with it)."""
    if hi < lo or est.total(lo) > budget:
        return None
    if est.total(hi) <= budget:
        return hi
    good, bad = lo, hi
    while bad - good > 1:
        mid = (good + bad) // 2
        if est.total(mid) <= budget:
            good = mid
        else:
            bad = mid
    return good


def fit_table(config: Any, model_id: str, devices: list[DeviceProfile], fraction: float,
              formats: list[str], schemes: list[str], embedding: str = "auto",
              tokenizer_bytes: int | None = None) -> FitTable:
    import torch

    from phonekit.export.models import build_model
    from phonekit.quant import check_format, make_plan, parse_embedding, parse_scheme

    with torch.device("meta"):
        model = build_model(config)
    emb = parse_embedding(embedding)
    cols: list[tuple[str, str]] = []
    estimators: dict[tuple[str, str], Estimator] = {}
    for fmt in formats:
        for name in schemes:
            s = parse_scheme(name)
            try:
                check_format(s, fmt)
                plan = make_plan(model, s, emb, fmt)
            except QuantError:
                continue  # not a scheme this format runs, or groups that do not divide the widths
            cols.append((fmt, s.name))
            estimators[(fmt, s.name)] = Estimator(config, plan, fmt, tokenizer_bytes=tokenizer_bytes)
    if not cols:
        raise UsageError(f"--quant {', '.join(schemes)}: none of these schemes runs on {', '.join(formats)} for this model")
    table = FitTable(model_id, config.max_context, fraction, devices, cols)
    for d in devices:
        budget = d.budget_bytes(fraction)
        for key in cols:
            table.cells[(d.id, *key)] = largest_fitting(estimators[key], budget, config.max_context)
    return table


def cell_text(v: int | None, max_context: int) -> str:
    if v is None:
        return "-"
    return f"{v:,}" + ("" if v < max_context else " (max)")


def heat_map(table: FitTable, path: Path) -> Path:
    """A devices x (format, scheme) heat map of the largest fitting context (log2 colour scale)."""
    import math

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows, cols = table.devices, table.columns
    data = np.full((len(rows), len(cols)), np.nan)
    for i, d in enumerate(rows):
        for j, (f, s) in enumerate(cols):
            v = table.cells[(d.id, f, s)]
            data[i, j] = math.log2(v) if v else np.nan
    fig_w = max(6.0, 1.0 + 0.75 * len(cols))
    fig_h = max(4.0, 1.5 + 0.28 * len(rows))
    fig, ax = plt.subplots(figsize=(fig_w, fig_h), dpi=100)
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#d9d9d9")  # grey: nothing fits
    vmax = math.log2(max(2, table.max_context))
    im = ax.imshow(np.ma.masked_invalid(data), aspect="auto", cmap=cmap, vmin=1, vmax=vmax)
    ax.set_xticks(range(len(cols)), [f"{f}\n{s}" for f, s in cols], fontsize=7)
    ax.set_yticks(range(len(rows)), [d.id for d in rows], fontsize=7)
    for i in range(len(rows)):
        for j in range(len(cols)):
            v = table.cells[(rows[i].id, *cols[j])]
            text = "-" if v is None else (f"{v / 1024:.1f}k".replace(".0k", "k") if v >= 1024 else str(v))
            ax.text(j, i, text, ha="center", va="center", fontsize=6,
                    color="black" if v is None or data[i, j] > vmax * 0.6 else "white")
    ticks = [t for t in range(1, int(vmax) + 1) if t % 2 == 1 or t == int(vmax)]
    cb = fig.colorbar(im, ax=ax, ticks=ticks, fraction=0.04)
    cb.ax.set_yticklabels([f"{2 ** t:,}" for t in ticks], fontsize=7)
    cb.set_label("largest context that fits", fontsize=8)
    ax.set_title(f"{table.model_id}: largest context within {table.fraction:.0%} of DRAM (- = none)", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
