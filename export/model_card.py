"""The bundle's ``README.md``: a Hugging Face model card rendered from ``manifest.json`` alone.

Everything the card states is read from the manifest passed in, so the card cannot
disagree with the bundle it describes (tests parse the card back and compare).
``phonekit export`` writes it next to ``manifest.json``; a bundle uploaded to the
Hugging Face Hub shows it as the model page (YAML front matter: ``library_name``,
``tags``, ``base_model``, ``license``).

The optional manifest field ``eval`` (JSON Schema: object or null) holds the
quantization accuracy exactly as ``phonekit eval MODEL --quant ... --json`` prints it
(``results[].plan`` and ``sensitivity`` may be dropped to keep the manifest small)::

    "eval": {
      "backend": "reference",                                  # how the schemes were simulated
      "text": {"path": ".../eval_text.txt", "sha256": "...", "tokens_in_text": 254723, "tokens_used": 8192},
      "context": 512, "windows": 17, "targets": 8192,         # windows of `context` tokens, scored tokens
      "fp32": {"perplexity": 13.5201},
      "results": [                                             # one per scheme variant
        {"scheme": "8da4w-g32", "variant": "8da4w-g32", "embedding": "none",
         "perplexity": 13.9123,       # of the quantized model
         "fp32_perplexity": 13.5201,  # of fp32 on the same tokens
         "ppl_change": 0.0290,        # perplexity / fp32_perplexity - 1 (0.0290 = +2.90 %)
         "top1_agreement": 0.9412}    # share of positions where the argmax equals fp32's
      ]
    }

The card needs ``results[].scheme`` and ``results[].perplexity``; any other number that is
absent prints as "-".
"""

from __future__ import annotations

import json
import math
from typing import Any

from phonekit.errors import BundleError

# The formats' names as the Hub knows them (tags on huggingface.co filter by library).
FORMAT_TAGS: dict[str, list[str]] = {
    "pte": ["executorch"],
    "onnx": ["onnx"],
    "coreml": ["coreml"],
}
# The manifest's quantization.offsets (quant.plan.QuantPlan.summary), as the card says it.
OFFSET_TEXT = {"exact": "exact (float, as fitted)", "int8": "rounded to int8 (one byte a group of 32, a scale per row and block)"}
FORMAT_NAMES = {"pte": "ExecuTorch", "onnx": "ONNX", "coreml": "Core ML"}
CHAT_PROMPT = "What is the capital of France?"

# The sample apps in this repository (android_app/, ios_app/); tests check these
# against the apps' sources so the card's instructions cannot go stale.
ANDROID_APP_DIR = "android_app"
IOS_APP_DIR = "ios_app"
IOS_PROJECT = "PhonekitChat"  # ios_app/project.yml `name:`, the .xcodeproj XcodeGen writes


def render_card(manifest: dict[str, Any]) -> str:
    """The model card (Markdown with YAML front matter) for one bundle's manifest."""
    try:
        model, arts = manifest["model"], manifest["artifacts"]
        quant, tok, context = manifest["quantization"], manifest["tokenizer"], manifest["context_length"]
    except (KeyError, TypeError) as e:
        raise BundleError(f"manifest.json: field {e} is missing; cannot write the model card, re-export the bundle") from None
    eval_ = manifest.get("eval")
    if eval_ is not None:
        _check_eval(eval_)
    parts = [
        _front_matter(manifest),
        _title(manifest),
        _holds(model, quant, tok, context, arts),
        _artifacts(arts),
        _files(manifest),
        _accuracy(eval_, model, quant),
        _budget(manifest.get("budget")),
        _run(manifest),
    ]
    return "\n".join(p for p in parts if p).rstrip() + "\n"


# -- front matter --------------------------------------------------------------------------------

def _yaml_str(s: str) -> str:
    # A JSON string is a valid YAML double-quoted scalar: safe for any id or license text.
    return json.dumps(s)


def card_tags(manifest: dict[str, Any]) -> list[str]:
    """Hub tags: phonekit, the artifact formats, the platforms, the model family, quantized or not."""
    tags = ["phonekit", "on-device", "text-generation"]
    for a in manifest["artifacts"]:
        tags += FORMAT_TAGS.get(a["format"], [a["format"]])
        tags.append(a["backend"])
    for a in manifest["artifacts"]:
        tags += [p for p in a["platforms"] if p in ("android", "ios")]
    tags.append(manifest["model"]["family"])
    if _is_quantized(manifest["quantization"]):
        tags += ["quantized", manifest["quantization"]["scheme"]]
    return list(dict.fromkeys(tags))


def _is_quantized(quant: dict[str, Any]) -> bool:
    return quant.get("weights") != "float" or quant.get("embedding") is not None


def _front_matter(manifest: dict[str, Any]) -> str:
    model = manifest["model"]
    lines = ["---", "library_name: phonekit"]
    if model.get("hub_id"):
        lines.append(f"base_model: {_yaml_str(model['hub_id'])}")
        if _is_quantized(manifest["quantization"]):
            lines.append("base_model_relation: quantized")
    if model.get("license"):
        lines.append(f"license: {_yaml_str(model['license'])}")
    lines.append("pipeline_tag: text-generation")
    lines.append("tags:")
    lines += [f"- {_yaml_str(t)}" for t in card_tags(manifest)]
    lines.append("---")
    return "\n".join(lines) + "\n"


# -- body ----------------------------------------------------------------------------------------

def _title(manifest: dict[str, Any]) -> str:
    model, quant = manifest["model"], manifest["quantization"]
    formats = ", ".join(FORMAT_NAMES.get(a["format"], a["format"]) for a in manifest["artifacts"])
    base = f"[{model['hub_id']}](https://huggingface.co/{model['hub_id']})" if model.get("hub_id") else f"`{model['id']}`"
    return (f"# {model['id']} for phones ({quant['scheme']}, {manifest['context_length']} tokens)\n\n"
            f"An on-device bundle of {base} written by `phonekit export` (phonekit {manifest['phonekit_version']}): "
            f"{formats}, with the tokenizer and `manifest.json` "
            f"(schema `{manifest['schema']}`), which lists every file with its size and sha256.\n")


def human_bytes(n: int) -> str:
    """Decimal units, one decimal: what the card prints next to exact byte counts."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if round(n / scale, 1) >= 1.0:  # 999_960 bytes reads "1.0 MB", not "1000.0 kB"
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _per_format(arts: list[dict[str, Any]], key: str) -> list[tuple[str, Any]]:
    """(format, value) of ``key`` in each artifact's own quantization record, where it is set."""
    return [(a["format"], q[key]) for a in arts if (q := a.get("details", {}).get("quantization", {}) or {}).get(key)]


def _holds(model: dict[str, Any], quant: dict[str, Any], tok: dict[str, Any], context: int,
           arts: list[dict[str, Any]]) -> str:
    emb = quant.get("embedding")
    emb_text = "float" if emb is None else (
        f"int{emb.get('bits')}" + (f" groups of {emb['group_size']}" if emb.get("group_size") else " per row"))
    rows = [
        ("Model", f"`{model['id']}`"),
        ("Family", model["family"] + (" (layer sharing: each block runs twice)" if model.get("layer_sharing") else "")),
        ("Parameters", f"{model['params']:,}"),
        ("Block applications", str(model["block_applications"])),
        ("Loaded from", str(model.get("source", "-"))),
        ("Context length", f"{context} tokens (the KV cache; the model allows {model['max_context']})"),
        ("Quantization scheme", f"`{quant['scheme']}`"),
        ("Weights", quant["weights"]),
        ("Activations", quant["activations"]),
        ("Embedding", emb_text),
    ]
    if quant.get("head"):
        rows.append(("Output head", quant["head"]))
    sm = quant.get("smoothing")
    if isinstance(sm, dict):
        rows.append(("Activation smoothing", f"SmoothQuant, alpha {sm.get('alpha')}, {sm.get('smoothed_inputs')} linear inputs, "
                                             f"calibrated on {sm.get('calibration_tokens')} tokens"))
    eq = [fmt for fmt, _ in _per_format(arts, "head_equalization")]
    if eq:
        rows.append(("Head equalization", "tied 8-bit embedding stored column-equalized (one multiply after the lookup, "
                                          f"folded into the final norm for the head) in: {', '.join(eq)}"))
    two = _per_format(arts, "two_pass_linears")
    if two:
        rows.append(("Two-pass int8 inputs", "; ".join(
            f"{fmt}: " + ", ".join(f"`{k}` ({n})" for k, n in sorted(lin.items())) for fmt, lin in two)
            + " (the input and its int8 rounding residual through the same int8 weights)"))
    offsets = _per_format(arts, "offsets")
    if offsets:
        rows.append(("Group offsets", "; ".join(f"{fmt}: {OFFSET_TEXT.get(o, o)}" for fmt, o in offsets)))
    rows.append(("Kept float", ", ".join(f"`{k}`" for k in quant["kept_float"]) or "none"))
    files = ", ".join(f"`{f['path']}`" for f in tok["files"]) or "none (random weights: this bundle cannot turn text into tokens)"
    rows.append(("Tokenizer", f"{files}; vocabulary {tok['vocab_size']}, bos {tok['bos_id']}, "
                              f"eos {', '.join(str(e) for e in tok['eos_ids']) or '-'}"))
    rows.append(("Chat template", "yes" if tok.get("chat_template") else "no"))
    out = ["## What this bundle holds", "", "| Field | Value |", "|---|---|"]
    out += [f"| {k} | {_cell(v)} |" for k, v in rows]
    notes = list(quant.get("notes") or [])
    for a in arts:
        for n in (a.get("details", {}).get("quantization", {}) or {}).get("notes", []) or []:
            if n not in notes:
                notes.append(n)
    if notes:
        out += ["", "Quantization notes:", ""] + [f"- {n}" for n in notes]
    return "\n".join(out) + "\n"


def _cell(v: Any) -> str:
    # A pipe inside a cell would split the Markdown table.
    return str(v).replace("|", "\\|").replace("\n", " ")


def _artifact_scheme(a: dict[str, Any], default: str) -> str:
    q = a.get("details", {}).get("quantization")
    return q["scheme"] if isinstance(q, dict) and "scheme" in q else default


def _artifacts(arts: list[dict[str, Any]]) -> str:
    out = ["## Artifacts", "",
           "| Format | File | Backend | Platforms | Runtime | Scheme | Bytes | Size | sha256 |",
           "|---|---|---|---|---|---|---:|---:|---|"]
    for a in arts:
        out.append(f"| {a['format']} | `{a['file']}` | {a['backend']} | {', '.join(a['platforms'])} | {a['runtime']} "
                   f"| {_artifact_scheme(a, '-')} | {a['bytes']} | {human_bytes(a['bytes'])} | `{a['sha256']}` |")
    out += ["", "An artifact made of several files (a folder or external data) has as sha256 the hash of its "
                "files' `path\\0sha256` lines; each file's own hash is below."]
    return "\n".join(out) + "\n"


def _files(manifest: dict[str, Any]) -> str:
    entries = list(manifest["tokenizer"]["files"])
    for a in manifest["artifacts"]:
        entries += a["files"]
    out = ["## Files", "", "| Path | Bytes | sha256 |", "|---|---:|---|"]
    out += [f"| `{f['path']}` | {f['bytes']} | `{f['sha256']}` |" for f in entries]
    out += ["", "phonekit run and the sample apps check every size and sha256 before loading."]
    return "\n".join(out) + "\n"


def _check_eval(ev: Any) -> None:
    where = "manifest.json: field eval"
    if not isinstance(ev, dict) or not isinstance(ev.get("results"), list):
        raise BundleError(f"{where}: must be the object `phonekit eval --json` prints (with a list 'results'), or null")
    for i, r in enumerate(ev["results"]):
        if not isinstance(r, dict) or not isinstance(r.get("scheme"), str) or not _is_number(r.get("perplexity")):
            raise BundleError(f"{where}/results/{i}: needs 'scheme' (text) and 'perplexity' (number); re-run phonekit eval --json")
        for k in ("fp32_perplexity", "ppl_change", "top1_agreement"):
            if r.get(k) is not None and not _is_number(r[k]):
                raise BundleError(f"{where}/results/{i}/{k}: must be a number or absent, got {r[k]!r}")


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def fmt_ppl(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def fmt_pct(x: float | None, signed: bool = False) -> str:
    return "-" if x is None else (f"{x * 100:+.2f} %" if signed else f"{x * 100:.2f} %")


def _accuracy(ev: dict[str, Any] | None, model: dict[str, Any], quant: dict[str, Any]) -> str:
    out = ["## Quantization accuracy", ""]
    if ev is None:
        out.append("Not measured for this bundle. Measure perplexity and top-1 agreement against fp32 with "
                   f"`phonekit eval {model['id']} --quant {quant['scheme']}`.")
        return "\n".join(out) + "\n"
    text = ev.get("text") if isinstance(ev.get("text"), dict) else {}
    how = [f"{text['tokens_used']} tokens of `{text['path'].replace(chr(92), '/').rsplit('/', 1)[-1]}`"
           if text.get("tokens_used") is not None and text.get("path") else None,
           f"windows of {ev['context']} tokens" if ev.get("context") is not None else None,
           f"backend `{ev['backend']}`" if ev.get("backend") else None]
    fp32 = ev.get("fp32", {}).get("perplexity") if isinstance(ev.get("fp32"), dict) else None
    detail = ", ".join(h for h in how if h)
    out.append("Measured by phonekit eval" + (f" ({detail})" if detail else "") +
               (f"; fp32 perplexity {fmt_ppl(fp32)}" if _is_number(fp32) else "") +
               ". Change is the perplexity relative to fp32 on the same tokens; top-1 agreement is how often "
               "the quantized model's most likely next token equals fp32's.")
    out += ["", "| Scheme | Embedding | Perplexity | fp32 perplexity | Change | Top-1 agreement |",
            "|---|---|---:|---:|---:|---:|"]
    for r in ev["results"]:
        out.append(f"| {_cell(r.get('variant') or r['scheme'])} | {_cell(r.get('embedding') or '-')} "
                   f"| {fmt_ppl(r['perplexity'])} | {fmt_ppl(r.get('fp32_perplexity'))} "
                   f"| {fmt_pct(r.get('ppl_change'), signed=True)} | {fmt_pct(r.get('top1_agreement'))} |")
    return "\n".join(out) + "\n"


def _budget(budget: dict[str, Any] | None) -> str:
    out = ["## Memory budget", ""]
    if not budget or not budget.get("verdicts"):
        out.append("No device was checked at export. Check this bundle against a phone with "
                   "`phonekit check . --device pixel-8` (run in this folder; `phonekit devices` lists the profiles).")
        return "\n".join(out) + "\n"
    frac = budget.get("budget_fraction")
    if frac is not None:
        out.append(f"Budget: {frac * 100:g} % of the device's memory (`--budget-fraction {frac:g}`). "
                   "Estimate: phonekit's memory estimate for the artifact at this bundle's context.")
        out.append("")
    out += ["| Device | Format | Memory | Budget | Estimate | Headroom | Fits | Within OS app limit |",
            "|---|---|---:|---:|---:|---:|---|---|"]
    for v in budget["verdicts"]:
        dram = human_bytes(v["dram_bytes"]) if v.get("dram_bytes") is not None else "-"
        head = v.get("headroom_bytes")
        head_s = "-" if head is None else ("-" + human_bytes(-head) if head < 0 else human_bytes(head))
        os_ok = v.get("fits_os_limit")
        out.append(f"| {v['device']} | {v['format']} | {dram} | {human_bytes(v['budget_bytes'])} "
                   f"| {human_bytes(v['estimate_bytes'])} | {head_s} | {'yes' if v['fits'] else '**no**'} "
                   f"| {'-' if os_ok is None else ('yes' if os_ok else '**no**')} |")
    over = sorted({v["device"] for v in budget["verdicts"] if not v["fits"]})
    if over:
        out += ["", f"Over budget on {', '.join(over)}: exported anyway with `--allow-over-budget`."
                    if budget.get("allow_over_budget") else f"Over budget on {', '.join(over)}."]
    return "\n".join(out) + "\n"


def _app_artifacts(arts: list[dict[str, Any]], platform: str) -> list[dict[str, Any]]:
    """The artifacts the platform's sample app loads: its formats (exporters.TARGETS) built for that platform."""
    from phonekit.export.exporters import TARGETS

    return [a for a in arts if a["format"] in TARGETS[platform] and platform in a["platforms"]]


def _genai_incompatible(a: dict[str, Any]) -> bool:
    genai = a.get("details", {}).get("onnxruntime_genai")
    return a["format"] == "onnx" and isinstance(genai, dict) and genai.get("compatible") is False


def _run(manifest: dict[str, Any]) -> str:
    arts = manifest["artifacts"]
    tok = manifest["tokenizer"]
    chat = " --chat" if tok.get("chat_template") else ""
    out = ["## Run it", ""]
    if not tok["files"]:
        out.append("This bundle was exported from random weights and has no tokenizer: it is for sizes and "
                   "memory checks, and cannot generate text.")
        return "\n".join(out) + "\n"
    out += ["### On this computer", "",
            "In this folder, with phonekit installed (it checks every size and sha256 before loading):", "", "```sh"]
    out += [f"phonekit run . --format {a['format']}{chat} --prompt \"{CHAT_PROMPT}\"" for a in arts]
    out += ["```", ""]
    android = _app_artifacts(arts, "android")
    if android:
        runs = ", ".join(f"`{a['file']}` ({FORMAT_NAMES[a['format']]})" for a in android)
        out += ["### Android", "",
                f"The sample app in `{ANDROID_APP_DIR}/` of the phonekit repository runs {runs}. Build and install it "
                "on a phone with USB debugging on (or open the folder in Android Studio and press Run), then copy "
                "this bundle into the app with adb:", "", "```sh",
                "# in a checkout of the phonekit repository (gradle wrapper: once, writes ./gradlew)",
                f"cd {ANDROID_APP_DIR} && gradle wrapper && ./gradlew installDebug",
                "# in this bundle folder: adb push into the app's files folder, then sha256 of every file on the phone",
                "phonekit push android .",
                "```", "",
                "In the app, pick the bundle: it checks the sha256s, shows the memory verdict for this phone "
                f"and chats with streamed tokens. See `{ANDROID_APP_DIR}/README.md` for the requirements."]
        bad = [a for a in android if _genai_incompatible(a)]
        if bad:
            out += ["", f"`{bad[0]['file']}` is not in the form onnxruntime-genai reads "
                        "(`details.onnxruntime_genai.compatible` is false), so the app runs the other artifact."]
        out.append("")
    ios = _app_artifacts(arts, "ios")
    if ios:
        runs = ", ".join(f"`{a['file']}` ({FORMAT_NAMES[a['format']]})" for a in ios)
        out += ["### iOS", "",
                f"The sample app in `{IOS_APP_DIR}/` of the phonekit repository runs {runs}. Generate its Xcode "
                "project with XcodeGen, run it on the iPhone, then copy this bundle into the app:", "", "```sh",
                "# in a checkout of the phonekit repository, on a Mac with Xcode",
                f"cd {IOS_APP_DIR} && xcodegen generate && open {IOS_PROJECT}.xcodeproj",
                "# in this bundle folder, on a Mac with Xcode 15+ (identifier: xcrun devicectl list devices)",
                "phonekit push ios . --device IDENTIFIER",
                "# anywhere else: prints the Finder / Files app steps",
                "phonekit push ios . --manual",
                "```", "",
                f"See `{IOS_APP_DIR}/README.md` for the requirements.", ""]
    if not android and not ios:
        where = ", ".join(sorted({p for a in arts for p in a["platforms"]}))
        out += [f"No artifact in this bundle is one the sample apps load (Android: ExecuTorch or ONNX, "
                f"iOS: Core ML or ExecuTorch); its artifacts are for {where}.", ""]
    return "\n".join(out) + "\n"
