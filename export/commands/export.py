"""``phonekit export``: load -> plan quantization -> budget gate -> export each format -> bundle."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from phonekit.errors import PlanOptionError, QuantError, UsageError
from phonekit.export.commands import verb_parser
from phonekit.export.commands.generate import add_model_args


def add_export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", action="append", choices=["android", "ios", "all"],
                   help="platform(s): android = .pte + .onnx, ios = .mlpackage + .pte, all = every format")
    p.add_argument("--format", action="append", choices=["pte", "onnx", "coreml"], help="explicit format(s), repeatable")
    p.add_argument("--quant", default="8da4w",
                   help="scheme: fp32, fp16, w8, w4[-gN], 8da8w, 8da4w[-gN] (default 8da4w), optionally :METHOD for the "
                        "weight rounding: sym, sym-search, hqq, asym, affine, affine-search (default: affine-search for "
                        "int4, sym for int8), e.g. 8da4w:sym")
    p.add_argument("--quant-embedding", default="auto", choices=["auto", "none", "8w", "4w"],
                   help="embedding and tied-head quantization: auto = int8 per row when the weights are quantized and the head is tied (default), none, 8w, 4w")
    p.add_argument("--smooth", action="store_true",
                   help="SmoothQuant activation smoothing for the 8da* schemes: moves activation outliers into the "
                        "weights, calibrated on phonekit's shipped text; helps 8da8w (see README)")
    p.add_argument("--smooth-alpha", type=float, default=None, metavar="ALPHA",
                   help="migration strength for --smooth, between 0 and 1 (default 0.6)")
    p.add_argument("--single-pass-head", action="store_true",
                   help="round the tied 8-bit head's input to int8 once instead of twice (input + rounding residual, "
                        "the default on ONNX; the .pte takes one, Core ML's head input is float): less accurate (see README)")
    p.add_argument("--down-passes", type=int, choices=[1, 2], default=None, metavar="N",
                   help="int8 passes of down_proj's input for the 8da* schemes off the .pte: 2 = the input and its "
                        "rounding residual (default for 8da8w; for 8da4w better quality at up to -8%% decode on ONNX), "
                        "1 = once (see README)")
    p.add_argument("--offsets", choices=["exact", "int8"], default=None,
                   help="how --format onnx stores the float offsets of affine int4 groups (the 4-bit default): exact "
                        "(fp32, default; the demo's 8da4w file +14%% against :sym) or int8 (one byte a group: +4.3%%, "
                        "for +0.3%% perplexity; see README). The .pte always stores them as int8, Core ML as fp16")
    p.add_argument("--no-head-equalization", action="store_true",
                   help="store the tied 8-bit embedding/head as it is instead of column-equalized (the default where the "
                        "head's input is float or in two passes: ONNX, Core ML); see README")
    p.add_argument("--context", type=int, default=None, help="KV-cache length = maximum tokens (default: min(model max, 2048))")
    p.add_argument("--device", action="append", default=[], metavar="PROFILE",
                   help="refuse the export when over budget on this device (repeatable; name, alias or .toml path)")
    p.add_argument("--budget-fraction", type=float, default=0.10, help="budget as a fraction of DRAM (default 0.10)")
    p.add_argument("--allow-over-budget", action="store_true", help="write an over-budget bundle anyway (verdict recorded)")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = verb_parser(sub, "export", "Quantize and export a model into a bundle (manifest + tokenizer + artifacts).",
                    "phonekit export smollm2-135m-instruct --target android --quant 8da4w --context 1024 --device pixel-8 --out bundles/smol")
    add_model_args(p)
    add_export_args(p)
    p.add_argument("--out", required=True, type=Path, help="bundle folder to create")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=run)


def resolve_context(lm: Any, context: int | None) -> int:
    maxc = lm.config.max_context
    if context is None:
        return min(maxc, 2048)
    if context < 2:
        raise UsageError(f"--context {context}: must be at least 2")
    if context > maxc:
        raise UsageError(f"--context {context}: over the model's maximum of {maxc} (max_position_embeddings); use --context {maxc} or less")
    return context


def plans_for(lm: Any, scheme_text: str, emb_text: str, formats: list[str], explicit: set[str],
              head_passes: int | None = None, equalize_head: bool | None = None,
              down_passes: int | None = None, offsets: str | None = None) -> dict[str, Any]:
    """One quantization plan per format. A format named by --target that cannot run the
    scheme gets its documented counterpart (recorded); a format named by --format errors.
    ``head_passes`` / ``equalize_head`` / ``down_passes`` / ``offsets``: overrides of the
    plan's defaults (``make_plan``)."""
    from phonekit.quant import check_format, make_plan, parse_embedding, parse_scheme
    from phonekit.quant.schemes import FORMAT_SCHEMES, Scheme
    from phonekit.quant.source_grid import source_grid_report

    scheme = parse_scheme(scheme_text)
    emb = parse_embedding(emb_text)
    plans = {}
    for fmt in formats:
        s = scheme
        try:
            check_format(scheme, fmt)
        except QuantError:
            if fmt in explicit:
                raise
            counterpart = {"8da4w": "w4", "8da8w": "w8", "w4": "8da4w", "w8": "8da8w", "fp16": "fp32"}[scheme.base]
            if counterpart not in FORMAT_SCHEMES[fmt]:
                raise
            s = Scheme(counterpart, scheme.group_size, scheme.method)
        try:
            plans[fmt] = make_plan(lm.model, s, emb, fmt, head_passes, equalize_head, down_passes, offsets)
        except PlanOptionError as e:  # name the flag that asked for what this plan cannot take
            flag = {"down_passes": f"--down-passes {down_passes}", "offsets": f"--offsets {offsets}"}.get(e.option or "")
            if flag is None:
                raise
            raise PlanOptionError(f"{flag}: {e}", e.option) from None
        source_grid_report(lm.model, plans[fmt], lm.gguf_types)
        if s != scheme:
            plans[fmt].notes.append(f"--quant {scheme.name} is not available on {fmt}; this artifact uses {s.name}")
    return plans


def run(args: argparse.Namespace) -> int:
    from phonekit.export import load_model
    from phonekit.export.bundle import BundleWriter, base_manifest, validate_manifest
    from phonekit.export.exporters import formats_for, get_exporter
    from phonekit.export.progress import Steps

    formats = formats_for(args.target, args.format)
    explicit = set(args.format or [])
    exporters = {f: get_exporter(f) for f in formats}
    if not 0 < args.budget_fraction <= 1:
        raise UsageError(f"--budget-fraction {args.budget_fraction}: must be in (0, 1]")
    if args.out.exists() and not args.force:
        raise UsageError(f"--out {args.out}: already exists; choose a new folder or pass --force to replace it")
    alpha = _smooth_alpha(args)
    steps = Steps(quiet=args.quiet or args.json)
    with steps.step(f"load {args.model}"):
        lm = load_model(args.model, random_weights=args.random_weights)
    context = resolve_context(lm, args.context)
    smoothing = _smooth(lm, args.model, alpha, steps) if alpha is not None else None
    plans = plans_for(lm, args.quant, args.quant_embedding, formats, explicit,
                      head_passes=1 if args.single_pass_head else None,
                      equalize_head=False if args.no_head_equalization else None,
                      down_passes=args.down_passes, offsets=args.offsets)
    for plan in plans.values():
        plan.smoothing = smoothing
        if smoothing and not plan.scheme.dynamic_act:
            plan.notes.append(f"--smooth: the float model was smoothed for the int8 activations of --quant {args.quant}; "
                              f"{plan.scheme.name} has float activations, so here it only moves weights")
    budget = None
    if args.device:
        from phonekit.profiles.gate import check_gate

        budget = check_gate(lm, plans, context, args.device, args.budget_fraction, args.allow_over_budget)
    with BundleWriter(args.out, force=args.force) as writer:
        root = writer.root
        first = plans[formats[0]]
        manifest = base_manifest(lm, context, first.summary(), root)
        for i, fmt in enumerate(formats):
            lm.reusable = i < len(formats) - 1
            with steps.step(f"export {fmt} ({plans[fmt].scheme.name})"):
                art = exporters[fmt](lm, plans[fmt], context, root, steps)
            art.details.setdefault("quantization", plans[fmt].summary())
            manifest["artifacts"].append(art.to_manifest(root))
        manifest["budget"] = budget
        validate_manifest(manifest)
        writer.write_json("manifest.json", manifest)
        _write_card(root, manifest)
    if args.json:
        print(json.dumps(manifest, indent=2))
    else:
        for a in manifest["artifacts"]:
            steps.console.print(f"{a['format']:>7}  {a['file']:<24} {a['bytes'] / 1e6:8.1f} MB  {a['backend']}")
        steps.console.print(f"bundle: {args.out}")
    return 0


def _smooth_alpha(args: argparse.Namespace) -> float | None:
    """The --smooth alpha, None without --smooth; bad combinations fail before the model loads."""
    from phonekit.quant import parse_scheme
    from phonekit.quant.smooth import DEFAULT_ALPHA

    if not args.smooth:
        if args.smooth_alpha is not None:
            raise UsageError(f"--smooth-alpha {args.smooth_alpha}: only means something with --smooth; add --smooth")
        return None
    if not parse_scheme(args.quant).dynamic_act:
        raise UsageError(f"--smooth: smoothing eases int8 activation rounding and --quant {args.quant} has none; "
                         "use it with 8da8w or 8da4w, or drop --smooth")
    alpha = DEFAULT_ALPHA if args.smooth_alpha is None else args.smooth_alpha
    if not 0.0 < alpha < 1.0:
        raise UsageError(f"--smooth-alpha {alpha}: must be between 0 and 1, e.g. {DEFAULT_ALPHA}")
    return alpha


def _smooth(lm: Any, model_name: str, alpha: float, steps: Any) -> dict[str, Any]:
    """Smooth the loaded float model in place (every format then exports the smoothed one)."""
    from phonekit.quant.evaluate import CALIBRATION_TEXT, DEFAULT_CONTEXT, calibration_windows
    from phonekit.quant.smooth import smooth_model

    if lm.tokenizer is None:
        raise UsageError(f"--smooth: {model_name} has no tokenizer (--random-weights), and smoothing calibrates on text; drop --smooth")
    with steps.step(f"smooth activations (alpha {alpha:g})"):
        calib = calibration_windows(lm.tokenizer, min(DEFAULT_CONTEXT, lm.config.max_context))
        info = smooth_model(lm.model, calib, alpha)
    return {**info.summary(), "calibration_text": CALIBRATION_TEXT}


def _write_card(root: Path, manifest: dict[str, Any]) -> None:
    """The bundle's model card, when the card renderer is present."""
    try:
        from phonekit.export.model_card import render_card
    except ModuleNotFoundError as e:
        if e.name == "phonekit.export.model_card":
            return
        raise
    (root / "README.md").write_text(render_card(manifest), encoding="utf-8")
