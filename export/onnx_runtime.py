"""phonekit's own onnxruntime loop for a bundle's ``model.onnx`` (both families, PLM included).

The graph takes the cache as explicit inputs and returns it grown by the new tokens
(``present.*``), so the session keeps the last ``present`` arrays as the next ``past``.
Rewinding (``start_pos`` below the cached length) slices the cache; every call asks
for the last position's logits only (``logits_to_keep=1``). This is the loop the
sample apps port to Kotlin/Swift with the ONNX Runtime mobile packages.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from phonekit.errors import BundleError, UsageError

_PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
REQUIRED = ("input_ids", "attention_mask", "position_ids")


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


class OnnxSession:
    """``Session`` (export/runtime.py) over one ONNX decoder with a concat KV cache."""

    def __init__(self, model_path: Path, context: int, threads: int | None = None) -> None:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        if threads:
            so.intra_op_num_threads = threads
        try:
            self.sess = ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types from C++
            raise BundleError(f"{model_path}: onnxruntime cannot load it ({_first_line(e)}); re-export the bundle") from None
        inputs = {i.name: i for i in self.sess.get_inputs()}
        missing = [n for n in REQUIRED if n not in inputs]
        if missing:
            raise BundleError(f"{model_path}: no input {missing[0]!r}; this is not a phonekit ONNX decoder, re-export the bundle")
        slots: dict[int, dict[str, Any]] = {}
        for name, inp in inputs.items():
            m = _PAST.match(name)
            if m:
                heads, dim = inp.shape[1], inp.shape[3]
                if not isinstance(heads, int) or not isinstance(dim, int):
                    raise BundleError(f"{model_path}: input {name} has symbolic heads/dims {inp.shape}; re-export the bundle")
                slots.setdefault(int(m.group(1)), {})[m.group(2)] = (name, heads, dim)
        if not slots or sorted(slots) != list(range(len(slots))) or any(len(s) != 2 for s in slots.values()):
            raise BundleError(f"{model_path}: past_key_values.* inputs are incomplete; re-export the bundle")
        self.cache_specs = [(slots[i][kv][0], slots[i][kv][1], slots[i][kv][2]) for i in range(len(slots)) for kv in ("key", "value")]
        self.present_names = [n.replace("past_key_values.", "present.", 1) for n, _, _ in self.cache_specs]
        have_out = {o.name for o in self.sess.get_outputs()}
        if "logits" not in have_out or any(p not in have_out for p in self.present_names):
            raise BundleError(f"{model_path}: outputs logits/present.* are missing; re-export the bundle")
        overridable = {i.name for i in self.sess.get_overridable_initializers()}
        self.has_keep = "logits_to_keep" in overridable or "logits_to_keep" in inputs
        self.context = int(context)
        self.past: list[np.ndarray] = []
        self.length = 0
        self.reset()

    def reset(self) -> None:
        self.past = [np.zeros((1, h, 0, d), np.float32) for _, h, d in self.cache_specs]
        self.length = 0

    def run(self, tokens: list[int], start_pos: int, logits_to_keep: int = 1) -> np.ndarray:
        """Feed ``tokens`` at ``start_pos..``; returns logits [n, vocab] of the last ``logits_to_keep`` (0 = all)."""
        if not tokens:
            raise UsageError("no tokens to feed; pass at least one token")
        if start_pos < 0 or start_pos > self.length:
            raise UsageError(f"start position {start_pos}: the cache holds {self.length} tokens; feed from 0..{self.length}")
        end = start_pos + len(tokens)
        if end > self.context:
            raise UsageError(f"{end} tokens do not fit the bundle's context of {self.context}; shorten the prompt or --max-new-tokens")
        if start_pos < self.length:  # rewind: drop the cached tokens from start_pos on
            self.past = [p[:, :, :start_pos] for p in self.past]
        feeds: dict[str, np.ndarray] = {
            "input_ids": np.asarray([tokens], dtype=np.int64),
            "attention_mask": np.ones((1, end), dtype=np.int64),
            "position_ids": np.arange(start_pos, end, dtype=np.int64)[None],
        }
        for (name, _, _), arr in zip(self.cache_specs, self.past):
            feeds[name] = arr
        if self.has_keep:
            feeds["logits_to_keep"] = np.asarray(logits_to_keep, dtype=np.int64)
        try:
            outs = self.sess.run(["logits", *self.present_names], feeds)
        except Exception as e:  # onnxruntime's C++ errors (bad token id, corrupt weights)
            raise BundleError(f"onnxruntime failed on the model ({_first_line(e)}); check the token ids and re-export the bundle") from None
        self.past = list(outs[1:])
        self.length = end
        logits = outs[0][0]
        return logits if logits_to_keep == 0 else logits[-logits_to_keep:]

    def forward(self, tokens: list[int], start_pos: int) -> np.ndarray:
        return np.asarray(self.run(tokens, start_pos, 1)[-1], dtype=np.float32)


def open_session(bundle: Path, manifest: dict[str, Any], artifact: dict[str, Any]) -> OnnxSession:
    path = Path(bundle) / artifact["file"]
    if not path.is_file():
        raise BundleError(f"{path}: listed in manifest.json but missing; re-export the bundle")
    return OnnxSession(path, int(manifest["context_length"]))
