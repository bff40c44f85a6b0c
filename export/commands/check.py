"""``phonekit check``: will this model (or bundle) fit these phones?

``phonekit check MODEL --quant S --context N --format F --device D`` estimates each artifact
from the model's config alone (no weights are loaded, no export runs); ``phonekit check
BUNDLE`` reads a bundle's manifest and uses what the artifacts record (ExecuTorch's memory
plan). ``--measure`` also runs each artifact of a bundle here and prints the measured peak
next to the estimate. Exit status 3 when an artifact is over budget on a device.
"""

from __future__ import annotations

import argparse
import copy
import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from phonekit.errors import BundleError, UsageError
from phonekit.export.commands import verb_parser


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = verb_parser(sub, "check", "Estimate the memory of each artifact and check it against device budgets (exit 3 when over).",
                    "phonekit check mobilellm-350m --quant 8da4w --context 1024 --format pte --device iphone-15 --device pixel-8-pro")
    p.add_argument("target", help="a bundle folder (manifest.json), or a model: preset, Hugging Face folder, .gguf file or hub id")
    p.add_argument("--random-weights", action="store_true",
                   help="accepted for symmetry with export; check never loads weights (the config is enough)")
    p.add_argument("--target", dest="platform", action="append", choices=["android", "ios", "all"],
                   help="platform(s) as in export (default: every format)")
    p.add_argument("--format", action="append", choices=["pte", "onnx", "coreml"], help="format(s), repeatable")
    p.add_argument("--quant", default="8da4w", help="scheme (default 8da4w); formats that cannot run it get its counterpart")
    p.add_argument("--quant-embedding", default="auto", choices=["auto", "none", "8w", "4w"], help="embedding and tied-head quantization: auto = int8 per row when the weights are quantized and the head is tied (default), none, 8w, 4w")
    p.add_argument("--context", type=int, default=None, help="KV-cache length (default: min(model max, 2048))")
    p.add_argument("--device", action="append", default=[], metavar="PROFILE",
                   help="device name, alias or .toml path (repeatable; default: the bundle's devices, else all)")
    p.add_argument("--budget-fraction", type=float, default=0.10, help="budget as a fraction of DRAM (default 0.10)")
    p.add_argument("--measure", action="store_true", help="bundle only: run each artifact here and report the measured peak RSS")
    p.add_argument("--measure-prompt", type=int, default=None, help="prompt tokens for --measure (default: context - 8)")
    p.add_argument("--measure-decode", type=int, default=8, help="decode steps for --measure (default 8)")
    p.add_argument("--measure-timeout", type=float, default=900, help="seconds per artifact for --measure (default 900)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)


@dataclass
class ModelSpec:
    """What the estimate needs: the config, the tokenizer's size when known, a name."""

    config: Any
    tokenizer_bytes: int | None
    model_id: str


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "merges.txt", "vocab.json")


def load_spec(spec: str) -> ModelSpec:
    """The config of a preset, HF folder or .gguf without reading any weights (a hub id is fetched)."""
    from phonekit.export.presets import PRESETS, get_preset

    preset = get_preset(spec)
    if preset is not None:
        return ModelSpec(copy.deepcopy(preset.args), None, preset.name)
    path = Path(spec).expanduser()
    if path.is_dir():
        from phonekit.export.loaders import hf

        cfg = hf.read_config(path)
        tok = sum((path / n).stat().st_size for n in _TOKENIZER_FILES if (path / n).is_file()) or None
        return ModelSpec(cfg, tok, path.name)
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise UsageError(f"{path}: a file must be a .gguf; for Hugging Face weights pass the folder that holds config.json")
        from phonekit.export.loaders import gguf_file

        return ModelSpec(gguf_file.read_args(gguf_file.open_reader(path), path), None, path.stem)
    from phonekit.export.loaders import hub

    if hub.looks_like_hub_id(spec):
        from phonekit.export import load_model

        lm = load_model(spec)
        tok = sum(len(b) for b in lm.tokenizer.files.values()) if lm.tokenizer else None
        return ModelSpec(lm.config, tok, lm.model_id)
    raise UsageError(f"{spec!r}: not a bundle, preset, folder, .gguf file or hub id; presets: {', '.join(PRESETS)}")


def meta_model(config: Any) -> Any:
    import torch

    from phonekit.export.models import build_model

    with torch.device("meta"):
        return build_model(config)


def model_plans(config: Any, quant: str, emb: str, formats: list[str], explicit: set[str]) -> dict[str, Any]:
    from phonekit.export.commands.export import plans_for

    return plans_for(SimpleNamespace(model=meta_model(config), gguf_types={}), quant, emb, formats, explicit)


def resolve_context(config: Any, context: int | None) -> int:
    from phonekit.export.commands.export import resolve_context as rc

    return rc(SimpleNamespace(config=config), context)


def bundle_plans(manifest: dict[str, Any], config: Any) -> dict[str, Any]:
    """Rebuild each artifact's ``QuantPlan`` from what the manifest records (scheme, embedding, offsets)."""
    from phonekit.errors import QuantError
    from phonekit.quant import make_plan, parse_embedding
    from phonekit.quant.schemes import scheme_from_manifest

    model = meta_model(config)
    plans = {}
    for art in manifest["artifacts"]:
        q = art.get("details", {}).get("quantization") or manifest["quantization"]
        emb = q.get("embedding") or {}
        bits = emb.get("bits") if isinstance(emb, dict) else None
        try:
            plans[art["format"]] = make_plan(model, scheme_from_manifest(q), parse_embedding(f"{bits}w" if bits else "none"),
                                             art["format"], offsets=q.get("offsets"))
        except (KeyError, QuantError) as e:
            raise BundleError(f"manifest.json: artifact {art['file']}: quantization record unreadable ({e}); re-export the bundle") from None
    return plans


def exact_from_artifact(est: Any, config: Any, art: dict[str, Any]) -> None:
    """Replace estimated parts by what the artifact records: ExecuTorch's memory plan holds the
    KV-cache buffers and every planned activation (the dynamic length at its upper bound)."""
    from phonekit.profiles.estimate import kv_cache_bytes

    planned = art.get("details", {}).get("memory_planned_bytes")
    if art["format"] == "pte" and isinstance(planned, int) and planned > 0:
        kv = kv_cache_bytes(config, est.context, est.layout.cache_bytes)
        est.components["kv_cache"] = min(kv, planned)
        est.components["activations"] = planned - est.components["kv_cache"]
        est.exact["kv_cache+activations"] = f"ExecuTorch memory plan ({planned:,} B, details.memory_planned_bytes)"


def _mb(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e6:,.1f}"


def run(args: argparse.Namespace) -> int:
    from phonekit.profiles.devices import builtin_profiles, resolve_devices
    from phonekit.profiles.estimate import estimate
    from phonekit.profiles.gate import check_fraction, verdicts

    check_fraction(args.budget_fraction)
    target = Path(args.target).expanduser()
    measured: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    if (target / "manifest.json").is_file():
        from phonekit.export.bundle import read_manifest
        from phonekit.export.models import args_from_hf_config

        manifest = read_manifest(target)
        config = args_from_hf_config(manifest["model"]["config"], "manifest.json model.config")
        context = int(manifest["context_length"])
        plans = bundle_plans(manifest, config)
        if args.format:
            missing = [f for f in args.format if f not in plans]
            if missing:
                raise UsageError(f"--format {missing[0]}: the bundle has no {missing[0]} artifact (it has: {', '.join(plans)})")
            plans = {f: plans[f] for f in args.format}
        tok = sum(f["bytes"] for f in manifest["tokenizer"]["files"]) or None
        model_id = manifest["model"]["id"]
        ests = {}
        for art in manifest["artifacts"]:
            if art["format"] in plans:
                ests[art["format"]] = estimate(config, plans[art["format"]], context, art["format"], tokenizer_bytes=tok)
                exact_from_artifact(ests[art["format"]], config, art)
        recorded = [v["device"] for v in (manifest.get("budget") or {}).get("verdicts", [])]
        specs = args.device or list(dict.fromkeys(recorded))
        if args.measure:
            from phonekit.export.bundle import verify_files
            from phonekit.profiles.measure import measure_bundle, runnable_here

            for fmt in plans:
                why = runnable_here(fmt)
                if why:
                    skipped[fmt] = why
                    continue
                verify_files(target, manifest, [fmt])
                measured[fmt] = measure_bundle(target, manifest, fmt, args.measure_prompt, args.measure_decode, args.measure_timeout)
    else:
        if args.measure:
            raise UsageError("--measure needs a bundle folder (phonekit export ... --out DIR; then phonekit check DIR --measure)")
        from phonekit.export.exporters import formats_for

        ms = load_spec(args.target)
        config, tok, model_id = ms.config, ms.tokenizer_bytes, ms.model_id
        context = resolve_context(config, args.context)
        formats = formats_for(args.platform, args.format) if (args.platform or args.format) else ["pte", "onnx", "coreml"]
        plans = model_plans(config, args.quant, args.quant_embedding, formats, set(args.format or []))
        ests = {f: estimate(config, p, context, f, tokenizer_bytes=tok) for f, p in plans.items()}
        specs = args.device
    devices = resolve_devices(specs) if specs else list(builtin_profiles().values())
    vs = verdicts(config, plans, context, devices, args.budget_fraction, tok, ests)
    over = [v for v in vs if not v.fits]
    if args.json:
        out = {"model": model_id, "context": context, "budget_fraction": args.budget_fraction,
               "estimates": {f: e.as_dict() | {"scheme": plans[f].scheme.name} for f, e in ests.items()},
               "verdicts": [v.as_manifest() for v in vs]}
        if args.measure:
            out["measured"] = {f: m.as_dict() | {"estimate_bytes": ests[f].total - ests[f].components["tokenizer"]}
                               for f, m in measured.items()}
            out["not_measured"] = skipped
        print(json.dumps(out, indent=2))
        return 3 if over else 0
    _print(model_id, context, args.budget_fraction, plans, ests, vs, measured, skipped)
    return 3 if over else 0


def _print(model_id: str, context: int, fraction: float, plans: dict[str, Any], ests: dict[str, Any], vs: list[Any],
           measured: dict[str, Any], skipped: dict[str, str]) -> None:
    from rich.console import Console
    from rich.table import Table

    from phonekit.profiles.estimate import COMPONENTS

    console = Console()
    t = Table(title=f"{model_id}: estimated memory at context {context} (MB)")
    t.add_column("component")
    for f in ests:
        t.add_column(f"{f} ({plans[f].scheme.name})", justify="right")
    for c in COMPONENTS:
        t.add_row(c, *(_mb(e.components[c]) for e in ests.values()))
    t.add_row("[bold]total[/bold]", *(f"[bold]{_mb(e.total)}[/bold]" for e in ests.values()))
    console.print(t)
    notes: dict[str, list[str]] = {}
    for f, e in ests.items():
        for k, why in e.exact.items():
            notes.setdefault(f"{k} exact from the artifact: {why}", []).append(f)
        for n in e.notes:
            notes.setdefault(n, []).append(f)
    for n, fmts in notes.items():
        console.print(f"[dim]{', '.join(fmts) if len(fmts) < len(ests) else 'all'}: {n}[/dim]")
    t = Table(title=f"budget = {fraction:.0%} of DRAM (MB)")
    for c, j in (("device", "left"), ("DRAM", "right"), ("format", "left"), ("budget", "right"), ("estimate", "right"),
                 ("headroom", "right"), ("verdict", "left"), ("OS per-app limit", "left")):
        t.add_column(c, justify=j)
    for v in vs:
        lim = v.device.app_limit_bytes
        os_text = "none set (lmkd)" if lim is None and v.device.os == "Android" else (
            "none set" if lim is None else f"{'fits' if v.fits_os_limit else 'OVER'} ({_mb(lim)})")
        t.add_row(v.device.id, f"{v.device.dram_bytes / 1e9:g} GB", v.format, _mb(v.budget_bytes), _mb(v.estimate.total),
                  _mb(v.headroom_bytes), "[green]fits[/green]" if v.fits else "[red]OVER[/red]", os_text)
    console.print(t)
    if measured or skipped:
        t = Table(title="estimate vs measured on this machine (MB; tokenizer files excluded: the harness does not load them)")
        for c in ("format", "estimate", "measured peak", "measured / estimate", "after load", "prompt + decode"):
            t.add_column(c, justify="left" if c == "format" else "right")
        for f, m in measured.items():
            e = ests[f].total - ests[f].components["tokenizer"]
            t.add_row(f, _mb(e), _mb(m.peak_bytes), f"{m.peak_bytes / e:.2f}", _mb(m.loaded_bytes),
                      f"{m.prompt_tokens} + {m.decode_tokens}")
        for f, why in skipped.items():
            t.add_row(f, _mb(ests[f].total - ests[f].components["tokenizer"]), "not measured", why, "", "")
        console.print(t)
