"""Running a bundle's artifact on this machine: one ``Session`` per format.

A session module (``RUNTIMES[format]``) exposes ``open_session(bundle, manifest, artifact) -> Session``.
``Session.forward(tokens, start_pos)`` feeds tokens at absolute positions
``start_pos..start_pos+len-1`` through the artifact's KV cache and returns the
logits of the last position as a float32 numpy vector; ``reset()`` empties the cache.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from phonekit.errors import BundleError, UsageError

RUNTIMES = {
    "pte": "phonekit.export.pte_runtime",
    "onnx": "phonekit.export.onnx_runtime",
    "coreml": "phonekit.export.coreml_runtime",
}


class Session(Protocol):
    context: int

    def reset(self) -> None: ...

    def forward(self, tokens: list[int], start_pos: int) -> np.ndarray: ...


def pick_artifact(manifest: dict[str, Any], fmt: str | None) -> dict[str, Any]:
    arts = manifest["artifacts"]
    if fmt is None:
        return arts[0]
    for a in arts:
        if a["format"] == fmt:
            return a
    have = ", ".join(a["format"] for a in arts)
    raise UsageError(f"--format {fmt}: the bundle has no {fmt} artifact (it has: {have}); pass one of those")


def open_session(bundle: Path, manifest: dict[str, Any], artifact: dict[str, Any]) -> Session:
    fmt = artifact["format"]
    mod_name = RUNTIMES.get(fmt)
    try:
        mod = importlib.import_module(mod_name) if mod_name else None
    except ModuleNotFoundError as e:
        if e.name != mod_name:
            raise
        mod = None
    if mod is None:
        raise BundleError(f"{artifact['file']}: this phonekit version cannot run {fmt} artifacts here")
    return mod.open_session(Path(bundle), manifest, artifact)


@dataclass
class GenStats:
    prompt_tokens: int
    new_tokens: int
    prefill_s: float
    decode_s: float

    @property
    def prefill_tps(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tps(self) -> float:
        # The first new token comes from the prefill; decode steps make the rest.
        steps = max(self.new_tokens - 1, 0)
        return steps / self.decode_s if self.decode_s > 0 else 0.0


def greedy(session: Session, ids: list[int], max_new_tokens: int, eos_ids: list[int],
           on_token: Callable[[int], Any] | None = None, stats: list[GenStats] | None = None) -> Iterator[int]:
    """Greedy decoding through a session: one prefill call, then one call per token."""
    if len(ids) >= session.context:
        raise UsageError(f"--prompt: {len(ids)} tokens do not fit the bundle's context of {session.context}")
    budget = min(max_new_tokens, session.context - len(ids))
    session.reset()
    t0 = time.perf_counter()
    logits = session.forward(list(ids), 0)
    t1 = time.perf_counter()
    pos, n_new = len(ids), 0
    try:
        while True:
            tok = int(np.argmax(logits))
            n_new += 1
            if on_token is not None:
                on_token(tok)
            yield tok
            if tok in eos_ids or n_new >= budget:
                return
            logits = session.forward([tok], pos)
            pos += 1
    finally:
        if stats is not None:
            stats.append(GenStats(len(ids), n_new, t1 - t0, time.perf_counter() - t1))
