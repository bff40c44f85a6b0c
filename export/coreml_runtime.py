"""Running a bundle's Core ML artifact: Core ML itself on macOS, phonekit's MIL interpreter elsewhere.

Both sessions drive the model the way an app does: one ``MLState`` (or the interpreter's
state dict) per conversation, ``inputIds`` = the new tokens, ``causalMask`` = a zeros
``[1, 1, 1, past + q]`` (only its length is read), logits of the last position returned.

On Linux the interpreter (``mil_interpreter``) evaluates the saved ML Program with NumPy:
it is a verification tool, not a fast runtime. Measured for the 135M demo (fp16, context
160) on two cores shared with other jobs (load average ~10): prefill 4.6-6.4 tokens/s,
decode ~1 token/s (every token streams the 540 MB of fp32-widened weights).
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path
from typing import Any

import numpy as np

from phonekit.errors import BundleError, UsageError

FORCE_INTERPRETER_ENV = "PHONEKIT_COREML_INTERPRETER"  # "1": use the interpreter even on macOS


def _max_query(feature_ranges: list[tuple[int, int]], context: int) -> int:
    if feature_ranges and len(feature_ranges) == 2:
        hi = feature_ranges[1][1]
        return context if hi < 0 else min(hi, context)
    return context


class _Base:
    context: int

    def __init__(self, package: Path, context: int) -> None:
        self.package = package
        self.context = context
        self.max_query = context

    def _feeds(self, tokens: list[int], start_pos: int) -> list[dict[str, np.ndarray]]:
        if not tokens:
            raise UsageError("coreml session: forward() needs at least one token")
        end = start_pos + len(tokens)
        if start_pos < 0 or end > self.context:
            raise UsageError(f"coreml session: positions {start_pos}..{end - 1} do not fit the bundle's context of {self.context}")
        feeds = []
        # Longer prompts than one call may take go in chunks; each chunk extends the state.
        for s in range(0, len(tokens), self.max_query):
            chunk = tokens[s : s + self.max_query]
            e = start_pos + s + len(chunk)
            feeds.append({"inputIds": np.asarray([chunk], dtype=np.int32),
                          "causalMask": np.zeros((1, 1, 1, e), dtype=np.float16)})
        return feeds


class InterpreterSession(_Base):
    """The saved ML Program, executed op by op with NumPy (any OS)."""

    backend = "phonekit MIL interpreter (NumPy)"

    def __init__(self, package: Path, context: int) -> None:
        super().__init__(package, context)
        from phonekit.export.mil_interpreter import MILInterpreter

        self.program = MILInterpreter(package)
        if "inputIds" not in self.program.inputs or "causalMask" not in self.program.inputs:
            raise BundleError(f"{package}: the model has no inputIds/causalMask inputs; it was not written by phonekit")
        self.max_query = _max_query(self.program.inputs["inputIds"].ranges, context)
        self.state = self.program.make_state()

    def reset(self) -> None:
        self.state = self.program.make_state()

    def forward(self, tokens: list[int], start_pos: int) -> np.ndarray:
        out = None
        for feed in self._feeds(tokens, start_pos):
            out = self.program.predict(feed, self.state)["logits"]
        return np.asarray(out[0, -1], dtype=np.float32)


class CoreMLSession(_Base):
    """Core ML through coremltools' ``MLModel`` (macOS 15+)."""

    backend = "Core ML (cpuAndGPU)"

    def __init__(self, package: Path, context: int) -> None:
        super().__init__(package, context)
        from phonekit.export.coreml_tools import import_coremltools

        ct = import_coremltools()
        try:
            self.model = ct.models.MLModel(str(package), compute_units=ct.ComputeUnit.CPU_AND_GPU)
        except Exception as e:  # Core ML compile/load errors come as several exception types
            raise BundleError(f"{package}: Core ML cannot load it ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
        spec = self.model.get_spec()
        for f in spec.description.input:
            if f.name == "inputIds" and f.type.multiArrayType.WhichOneof("ShapeFlexibility") == "shapeRange":
                r = f.type.multiArrayType.shapeRange.sizeRanges
                self.max_query = _max_query([(x.lowerBound, x.upperBound) for x in r], context)
        self.state = self.model.make_state()

    def reset(self) -> None:
        self.state = self.model.make_state()

    def forward(self, tokens: list[int], start_pos: int) -> np.ndarray:
        out = None
        for feed in self._feeds(tokens, start_pos):
            out = self.model.predict(feed, state=self.state)["logits"]
        return np.asarray(out[0, -1], dtype=np.float32)


def _use_coreml() -> bool:
    if os.environ.get(FORCE_INTERPRETER_ENV) == "1" or platform.system() != "Darwin":
        return False
    major = int((platform.mac_ver()[0] or "0").split(".")[0])
    return major >= 15


def open_session(bundle: Path, manifest: dict[str, Any], artifact: dict[str, Any]) -> Any:
    package = Path(bundle) / artifact["file"]
    if not package.is_dir():
        raise BundleError(f"{package}: missing; the bundle is incomplete, re-export it")
    context = int(manifest["context_length"])
    states = artifact.get("details", {}).get("states", {})
    for name, st in states.items():
        if st.get("shape", [None] * 4)[3] != context:
            raise BundleError(f"{package}: state {name} holds {st['shape'][3]} positions but the manifest says "
                              f"context {context}; re-export the bundle")
    if _use_coreml():
        return CoreMLSession(package, context)
    print("coreml: running the ML Program in phonekit's NumPy interpreter (no Core ML on this OS; slow)",
          file=sys.stderr)
    return InterpreterSession(package, context)
