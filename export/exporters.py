"""Format registry: ``format -> exporter`` and what each ``--target`` ships.

An exporter is ``export(lm, plan, context, root, steps) -> Artifact``: it must not
modify ``lm.model`` (deep-copy first) and writes only inside ``root``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from phonekit.errors import ExportError, UsageError

EXPORTERS = {
    "pte": "phonekit.export.pte_export",
    "onnx": "phonekit.export.onnx_export",
    "coreml": "phonekit.export.coreml_export",
}
# The formats each platform's sample app uses.
TARGETS = {"android": ["pte", "onnx"], "ios": ["coreml", "pte"], "all": ["pte", "onnx", "coreml"]}


def get_exporter(fmt: str) -> Callable:
    mod_name = EXPORTERS.get(fmt)
    if mod_name is None:
        raise UsageError(f"--format {fmt!r}: unknown; use pte, onnx or coreml")
    try:
        mod = importlib.import_module(mod_name)
    except ModuleNotFoundError as e:
        if e.name == mod_name:
            raise ExportError(f"--format {fmt}: this phonekit version has no {fmt} exporter yet; use --format pte") from None
        raise
    return mod.export


def formats_for(targets: list[str] | None, formats: list[str] | None) -> list[str]:
    out: list[str] = []
    for t in targets or []:
        if t not in TARGETS:
            raise UsageError(f"--target {t!r}: use android, ios or all")
        out += TARGETS[t]
    for f in formats or []:
        if f not in EXPORTERS:
            raise UsageError(f"--format {f!r}: unknown; use pte, onnx or coreml")
        out.append(f)
    if not out:
        raise UsageError("say what to build: --target android|ios|all or --format pte|onnx|coreml")
    return list(dict.fromkeys(out))
