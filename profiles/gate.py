"""The budget gate of ``phonekit export --device``: estimate every artifact for every named
device before anything is written, refuse (exit 3) when one is over budget and say what
would fit: a smaller context, a stronger scheme, or a smaller preset."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from phonekit.errors import OverBudgetError, UsageError
from phonekit.profiles.devices import DeviceProfile, resolve_devices
from phonekit.profiles.estimate import Estimate, Estimator, estimate

# Schemes from weakest to strongest compression; the gate suggests the first stronger one that fits.
SCHEME_LADDER = ("fp32", "fp16", "w8", "8da8w", "w4", "8da4w", "w4-g64", "8da4w-g64", "w4-g128", "8da4w-g128")
EMBEDDING_LADDER = ("none", "8w", "4w")


@dataclass
class Verdict:
    device: DeviceProfile
    format: str
    budget_bytes: int
    estimate: Estimate

    @property
    def headroom_bytes(self) -> int:
        return self.budget_bytes - self.estimate.total

    @property
    def fits(self) -> bool:
        return self.estimate.total <= self.budget_bytes

    @property
    def fits_os_limit(self) -> bool | None:
        return self.device.fits_os_limit(self.estimate.total)

    def as_manifest(self) -> dict[str, Any]:
        """One entry of the manifest's ``budget.verdicts`` (bundle-1 schema)."""
        return {"device": self.device.id, "format": self.format, "dram_bytes": self.device.dram_bytes,
                "budget_bytes": self.budget_bytes, "estimate_bytes": self.estimate.total,
                "headroom_bytes": self.headroom_bytes, "fits": self.fits, "fits_os_limit": self.fits_os_limit}


def check_fraction(fraction: float) -> None:
    if not 0 < fraction <= 1:
        raise UsageError(f"--budget-fraction {fraction}: must be in (0, 1], e.g. 0.10 for 10% of DRAM")


def tokenizer_bytes_of(lm: Any) -> int | None:
    tok = getattr(lm, "tokenizer", None)
    if tok is None or not tok.files:
        return None
    return sum(len(b) for b in tok.files.values())


def verdicts(config: Any, plans: dict[str, Any], context: int, devices: list[DeviceProfile], fraction: float,
             tokenizer_bytes: int | None = None, estimates: dict[str, Estimate] | None = None) -> list[Verdict]:
    """One verdict per device and format (device-major order)."""
    ests = dict(estimates or {})
    for fmt, plan in plans.items():
        if fmt not in ests:
            ests[fmt] = estimate(config, plan, context, fmt, tokenizer_bytes=tokenizer_bytes)
    return [Verdict(d, fmt, d.budget_bytes(fraction), ests[fmt]) for d in devices for fmt in plans]


def largest_context(config: Any, plan: Any, fmt: str, budget: int, tokenizer_bytes: int | None = None,
                    lo: int = 2, hi: int | None = None) -> int | None:
    """The largest context in [lo, hi] whose estimate fits ``budget``, or None when not even ``lo`` fits."""
    from phonekit.profiles.advisor import largest_fitting

    est = Estimator(config, plan, fmt, tokenizer_bytes=tokenizer_bytes)
    return largest_fitting(est, budget, config.max_context if hi is None else hi, lo)


def _meta_model(config: Any) -> Any:
    import torch

    from phonekit.export.models import build_model

    with torch.device("meta"):
        return build_model(config)


def suggest(config: Any, plan: Any, context: int, fmt: str, budget: int, tokenizer_bytes: int | None,
            model_id: str | None = None) -> list[str]:
    """What would fit ``budget``: a smaller context, a stronger scheme, a smaller preset."""
    from phonekit.errors import QuantError
    from phonekit.quant import check_format, make_plan, parse_embedding, parse_scheme

    out: list[str] = []
    ctx = largest_context(config, plan, fmt, budget, tokenizer_bytes, hi=context - 1)
    if ctx is not None:
        out.append(f"--context {ctx}")
    model = _meta_model(config)
    here = SCHEME_LADDER.index(plan.scheme.name) if plan.scheme.name in SCHEME_LADDER else -1
    emb_here = EMBEDDING_LADDER.index(plan.embedding_scheme.name)
    # Stronger linears first (embedding as it is), then a quantized embedding with the
    # current or a stronger scheme: the first that fits is the smallest change.
    candidates = [(s, EMBEDDING_LADDER[emb_here]) for s in SCHEME_LADDER[here + 1:]]
    candidates += [(s, e) for e in EMBEDDING_LADDER[emb_here + 1:] for s in SCHEME_LADDER[max(here, 0):]]
    for name, emb in candidates:
        try:
            s = parse_scheme(name)
            check_format(s, fmt)
            p = make_plan(model, s, parse_embedding(emb), fmt)
        except QuantError:
            continue
        if estimate(config, p, context, fmt, tokenizer_bytes=tokenizer_bytes).total <= budget:
            out.append(f"--quant {name}" + ("" if emb == "none" else f" --quant-embedding {emb}"))
            break
    preset = smaller_preset(config, plan, context, fmt, budget, model_id)
    if preset:
        out.append(f"the smaller preset {preset}")
    return out


def smaller_preset(config: Any, plan: Any, context: int, fmt: str, budget: int, model_id: str | None = None) -> str | None:
    """The largest preset of the same family with fewer parameters that fits at ``context``
    with the same scheme (its own tokenizer size assumed)."""
    from phonekit.errors import QuantError
    from phonekit.export.models import num_params
    from phonekit.export.presets import PRESETS
    from phonekit.quant import check_format, make_plan

    mine = num_params(_meta_model(config))
    best: tuple[int, str] | None = None
    for p in PRESETS.values():
        if p.name == model_id or p.args.family != config.family or context > p.args.max_context:
            continue
        m = _meta_model(p.args)
        n = num_params(m)
        if n >= mine:
            continue
        try:
            check_format(plan.scheme, fmt)
            pp = make_plan(m, plan.scheme, plan.embedding_scheme, fmt)
        except QuantError:
            continue
        if estimate(p.args, pp, context, fmt).total <= budget and (best is None or n > best[0]):
            best = (n, p.name)
    return None if best is None else best[1]


def _mb(n: int) -> str:
    return f"{n / 1e6:,.0f} MB"


def check_gate(lm: Any, plans: dict[str, Any], context: int, devices: list[str], fraction: float,
               allow_over: bool) -> dict[str, Any]:
    """The manifest's ``budget`` object; raises ``OverBudgetError`` (exit 3) when an artifact is
    over budget on a device and ``allow_over`` is false. Runs before anything is written."""
    check_fraction(fraction)
    profiles = resolve_devices(devices)
    tok = tokenizer_bytes_of(lm)
    vs = verdicts(lm.config, plans, context, profiles, fraction, tok)
    over = [v for v in vs if not v.fits]
    if over and not allow_over:
        v = max(over, key=lambda x: x.estimate.total - x.budget_bytes)
        fixes = suggest(lm.config, plans[v.format], context, v.format, v.budget_bytes, tok, getattr(lm, "model_id", None))
        what = "; or ".join(fixes) if fixes else "nothing this model offers fits; target a device with more memory"
        others = f" ({len(over) - 1} more over budget)" if len(over) > 1 else ""
        raise OverBudgetError(
            f"{v.format} artifact needs ~{_mb(v.estimate.total)} on {v.device.id} (budget {_mb(v.budget_bytes)} = "
            f"{fraction:.0%} of {v.device.dram_bytes / 1e9:g} GB DRAM){others}; nothing was written. "
            f"What fits: {what}; or pass --allow-over-budget to write it anyway")
    return {"budget_fraction": fraction, "allow_over_budget": bool(allow_over), "verdicts": [v.as_manifest() for v in vs]}
