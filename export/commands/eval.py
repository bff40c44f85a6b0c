"""``phonekit eval``: quantization quality against fp32 on the same tokens: perplexity,
its relative change and teacher-forced top-1 agreement, per scheme; optionally a
per-layer sensitivity report at 4 bits."""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

from phonekit.errors import UsageError
from phonekit.export.commands import verb_parser
from phonekit.export.commands.generate import add_model_args

DEFAULT_SCHEMES = ["8da8w", "8da4w"]
DEFAULT_SENSITIVITY_TOKENS = 2048


def add_parser(sub: argparse._SubParsersAction) -> None:
    from phonekit.quant.evaluate import BACKENDS, DEFAULT_CONTEXT, DEFAULT_MAX_TOKENS
    from phonekit.quant.schemes import DEFAULT_METHOD, WEIGHT_METHODS

    p = verb_parser(
        sub, "eval",
        "Measure quantization quality against fp32 on the same tokens: perplexity, its change, top-1 agreement.",
        "phonekit eval smollm2-135m-instruct --quant 8da8w 8da4w 8da4w:affine,emb=8w --max-tokens 4096")
    add_model_args(p)
    p.add_argument("--quant", nargs="+", metavar="SCHEME",
                   help="schemes to compare with fp32 (default: 8da8w 8da4w). Research options after a colon: "
                        f"a weight rounding ({', '.join(WEIGHT_METHODS)}; default {DEFAULT_METHOD[4]} for 4 bits, "
                        f"{DEFAULT_METHOD[8]} for 8, as phonekit export) "
                        "emb=none|8w|4w, and smooth[=ALPHA] (SmoothQuant activation smoothing for 8da*, default alpha "
                        "0.6, calibrated on the shipped text's last 4,096 tokens), head-passes=1|2 (int8 passes of the "
                        "tied 8-bit head's input, default 2 except on the .pte), head-eq=0|1 (the tied 8-bit "
                        "embedding stored column-equalized, default where the head's input is float or in two passes), "
                        "down-passes=1|2 (int8 passes of down_proj's input, default 2 for 8da8w except on the .pte) "
                        "and offsets=exact|int8 (how float offsets are stored; default exact except on the .pte), "
                        "e.g. 8da4w:affine,emb=8w or 8da8w:smooth")
    p.add_argument("--quant-embedding", default="auto", choices=["auto", "none", "8w", "4w"],
                   help="embedding and tied-head quantization: auto = int8 per row when the weights are quantized and the head is tied (default), none, 8w, 4w")
    p.add_argument("--text", type=Path, help="UTF-8 text to score (default: the shipped public-domain text)")
    p.add_argument("--context", type=int, default=DEFAULT_CONTEXT,
                   help=f"tokens per window; windows do not overlap (default {DEFAULT_CONTEXT})")
    p.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                   help=f"use the first N tokens of the text (default {DEFAULT_MAX_TOKENS})")
    p.add_argument("--backend", choices=BACKENDS, default="reference",
                   help="reference = phonekit's fake-quant meaning of the scheme (default); "
                        "torchao = torchao's eager quantize_ (the tensors ExecuTorch lowers)")
    p.add_argument("--format", choices=["pte", "onnx", "coreml"],
                   help="score the plan that format's export applies (pte: bf16 group scales and offsets as an "
                        "int8 correction; onnx/coreml: float zero points); default: the format-free meaning")
    p.add_argument("--sensitivity", nargs="?", const="type", choices=["type", "block", "linear"],
                   help="also rank layers by the perplexity one of them costs at 4 bits while the rest stay float: "
                        "by linear type across blocks (default), by block, or every linear (slow)")
    p.add_argument("--sensitivity-tokens", type=int, default=DEFAULT_SENSITIVITY_TOKENS,
                   help=f"tokens the sensitivity report scores (default {DEFAULT_SENSITIVITY_TOKENS})")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=run)


class _Progress:
    """A progress bar per measured model on stderr (a plain line when not a terminal)."""

    def __init__(self, quiet: bool) -> None:
        from rich.console import Console

        self.quiet = quiet
        self.console = Console(stderr=True)

    def run(self, label: str, total: int, work: Any) -> Any:
        import time

        if self.quiet:
            return work(None)
        t0 = time.perf_counter()
        if not sys.stderr.isatty():
            self.console.print(f"[dim]…[/dim] {label}")
            out = work(None)
        else:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                          console=self.console, transient=True) as prog:
                task = prog.add_task(label, total=total)
                out = work(lambda *_: prog.advance(task))
        self.console.print(f"[green]✓[/green] {label} [dim]({time.perf_counter() - t0:.1f}s)[/dim]")
        return out


def _check_args(args: argparse.Namespace) -> None:
    if args.context < 2:
        raise UsageError(f"--context {args.context}: must be at least 2")
    if args.max_tokens < 2:
        raise UsageError(f"--max-tokens {args.max_tokens}: must be at least 2")
    if args.sensitivity and args.sensitivity_tokens < 2:
        raise UsageError(f"--sensitivity-tokens {args.sensitivity_tokens}: must be at least 2")


def run(args: argparse.Namespace) -> int:
    from phonekit.quant.evaluate import (CALIBRATION_TOKENS, FloatReference, calibration_windows, check_backend,
                                         evaluate_variant, model_logits_fn, parse_variant, plan_for, read_text, tokenize)

    _check_args(args)
    schemes = args.quant if args.quant else ([] if args.sensitivity else DEFAULT_SCHEMES)
    # Everything that can be wrong with the arguments fails before the model loads.
    variants = [parse_variant(s, args.quant_embedding) for s in schemes]
    check_backend(args.backend, args.format)
    if args.format:
        from phonekit.quant.schemes import check_format

        for v in variants:
            check_format(v.scheme, args.format)
    text, text_path = read_text(args.text)

    from phonekit.export import load_model

    lm = load_model(args.model, random_weights=args.random_weights)
    if lm.tokenizer is None:
        raise UsageError(f"{args.model}: no tokenizer with --random-weights; eval scores text, so it needs real weights and a tokenizer")
    if args.context > lm.config.max_context:
        raise UsageError(f"--context {args.context}: over the model's maximum of {lm.config.max_context}; use --context {lm.config.max_context} or less")
    for v in variants:
        plan_for(lm.model, v, args.format)  # a group size that does not fit fails here, before any scoring
    sens_plan = _sensitivity_plan(lm, variants) if args.sensitivity else None
    max_tokens = args.max_tokens if variants else min(args.max_tokens, args.sensitivity_tokens)
    windows = tokenize(lm.tokenizer, text, args.context, max_tokens)
    calibration = None
    if any(v.smooth is not None for v in variants):
        if args.text is None and windows.text_tokens > windows.total_text_tokens - CALIBRATION_TOKENS:
            raise UsageError(f"--max-tokens {args.max_tokens}: smoothing calibrates on the shipped text's last "
                             f"{CALIBRATION_TOKENS} tokens, so score at most {windows.total_text_tokens - CALIBRATION_TOKENS} of its tokens")
        calibration = calibration_windows(lm.tokenizer, args.context)
    ref = FloatReference(model_logits_fn(lm.model), windows)
    progress = _Progress(args.quiet)
    n = len(windows.inputs)
    progress.run(f"fp32 over {windows.text_tokens} tokens ({n} windows of {args.context})", n, ref.scores)
    results = []
    for v in variants:
        results.append(progress.run(f"{v.label} ({args.backend})", n,
                                    lambda cb, v=v: evaluate_variant(lm.model, v, ref, args.backend, cb, args.format, calibration)))
    sens = _run_sensitivity(lm, ref, args, sens_plan, progress) if args.sensitivity else None
    out = {
        "model": lm.model_id,
        "backend": args.backend,
        "format": args.format,
        "text": {"path": str(text_path), "sha256": hashlib.sha256(text_path.read_bytes()).hexdigest(),
                 "tokens_in_text": windows.total_text_tokens, "tokens_used": windows.text_tokens},
        "context": args.context,
        "windows": n,
        "bos_per_window": windows.bos,
        "targets": windows.num_targets,
        "fp32": {"perplexity": round(ref.perplexity, 6), "seconds": round(ref.seconds, 2)},
        "results": [r.as_dict() for r in results],
        "sensitivity": sens,
    }
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        _print(out)
    return 0


def _sensitivity_plan(lm: Any, variants: list) -> tuple[Any, Any, str]:
    """The 4-bit setting the sensitivity probes use: the first 4-bit scheme asked for
    (its group, activations and weight rounding), else 8da4w (group 32, min/max)."""
    from phonekit.quant.evaluate import Variant, plan_for
    from phonekit.quant.schemes import parse_embedding, parse_scheme

    four = next((v for v in variants if v.scheme.weight_bits == 4), None)
    if four is None:
        four = Variant("8da4w", parse_scheme("8da4w"), parse_embedding("none"))
    plan = plan_for(lm.model, Variant(four.text, four.scheme, parse_embedding("none"), four.method))
    lp = next(iter(plan.linears.values()))
    return plan, lp, lp.method


def _run_sensitivity(lm: Any, ref: Any, args: argparse.Namespace, sens_plan: tuple, progress: _Progress) -> dict[str, Any]:
    from phonekit.quant.sensitivity import sensitivity, targets

    plan, lp, method = sens_plan
    sref = ref.subset(args.sensitivity_tokens)
    tmap = targets(plan, lm.model, args.sensitivity)
    label = (f"sensitivity by {args.sensitivity}: {len(tmap)} targets at int4 "
             f"{'per-channel' if lp.group_size is None else f'g{lp.group_size}'} over {sref.windows.text_tokens} tokens")
    rows = progress.run(label, len(tmap), lambda cb: sensitivity(
        lm.model, plan, sref, lp, method, args.sensitivity, None if cb is None else (lambda *_: cb())))
    return {"granularity": args.sensitivity,
            "quant": {"bits": lp.bits, "group_size": lp.group_size, "dynamic_act": lp.dynamic_act, "weights": method},
            "tokens_used": sref.windows.text_tokens, "targets": sref.windows.num_targets,
            "fp32_perplexity": round(sref.perplexity, 6), "rows": [r.as_dict() for r in rows]}


def _pct(x: float, signed: bool = True) -> str:
    return f"{100 * x:+.2f}%" if signed else f"{100 * x:.1f}%"


def _print(out: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    c = Console()
    if not c.is_terminal:  # piped into a file or README: don't wrap the columns at 80
        c = Console(width=140)
    t = Table(title=f"{out['model']}: quantization vs fp32 ({out['backend']} backend)",
              caption=f"{out['targets']} targets, {out['windows']} windows of {out['context']} tokens, "
                      f"{out['text']['tokens_used']}/{out['text']['tokens_in_text']} tokens of {Path(out['text']['path']).name}")
    for col in ("scheme", "weights", "embedding / head", "perplexity", "vs fp32", "top-1 agreement", "time"):
        t.add_column(col, justify="left" if col in ("scheme", "weights", "embedding / head") else "right")
    t.add_row("fp32", "float", "float", f"{out['fp32']['perplexity']:.3f}", "", "", f"{out['fp32']['seconds']:.0f}s")
    for r in out["results"]:
        emb = "float" if r["embedding"] == "none" else r["embedding"]
        emb += {2: ", two-pass input", 1: ", one-pass input"}.get(r["head_int8_passes"], "")
        emb += ", equalized" if r["head_equalized"] else ""
        sm = r.get("smoothing")
        scheme = r["scheme"] + (f", smooth {sm['alpha']:g}" if sm else "")
        scheme += f", {r['two_pass_linears']} two-pass" if r["two_pass_linears"] else ""
        t.add_row(scheme, r["weights"], emb, f"{r['perplexity']:.3f}", _pct(r["ppl_change"]),
                  _pct(r["top1_agreement"], False), f"{r['seconds']:.0f}s")
    c.print(t)
    s = out["sensitivity"]
    if s:
        q = s["quant"]
        st = Table(title=f"sensitivity by {s['granularity']}: one target at int4 "
                         f"{'per-channel' if q['group_size'] is None else 'g' + str(q['group_size'])} ({q['weights']}"
                         f"{', int8 per-token activations' if q['dynamic_act'] else ''}), the rest float",
                   caption=f"fp32 perplexity {s['fp32_perplexity']:.3f} over {s['targets']} targets")
        for col in ("rank", "target", "linears", "perplexity", "vs fp32", "top-1 agreement"):
            st.add_column(col, justify="left" if col == "target" else "right")
        for i, r in enumerate(s["rows"], 1):
            st.add_row(str(i), r["target"], str(r["layers"]), f"{r['perplexity']:.3f}", _pct(r["ppl_change"]),
                       _pct(r["top1_agreement"], False))
        c.print(st)
