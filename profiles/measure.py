"""Measured footprint: run an artifact in a fresh subprocess with its real runtime and record
the peak resident memory above the runtime's own baseline.

The child process imports the runtime (``phonekit.export.runtime.RUNTIMES[format]``, which
pulls in executorch / onnxruntime and their dependencies), resets the kernel's peak-RSS mark
(``/proc/self/clear_refs`` = 5, so import transients do not count), records the RSS as the
baseline, then opens the session, prefills a prompt and decodes a few tokens, and reads the
peak (``VmHWM``). Footprint = peak - baseline: the model's weights as the runtime holds
them, its cache, activations and the runtime's own per-model state, which is what the
estimate (minus tokenizer files, which the harness does not load) describes.

The child runs with glibc's mmap threshold fixed at its default starting value (128 KiB,
``MALLOC_MMAP_THRESHOLD_``), so every large block is its own mapping and goes back to the
system when freed. glibc otherwise raises the threshold after the first large free, and
whether a later freed block stays in the heap then depends on allocation order, which varies
with address randomization: identical runs of the demo's ONNX bundle loaded at 168.9 or
190.8 MiB. Phone allocators (Android's scudo, iOS's libmalloc) map large blocks one by one
and return them on free, as glibc does with the threshold fixed; with it, repeated runs of
each of six demo ONNX bundles measured within 1.5 MiB of each other (one 8da8w run in
twelve loaded 6 MiB lower).

    echo '{"factory": "module:function", ...}' | python -m phonekit.profiles.measure   # the child; prints one JSON line
"""

from __future__ import annotations

import gc
import importlib
import importlib.util
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from phonekit.errors import BundleError, UsageError

MARK = "PHONEKIT-MEASURE "
DEFAULT_DECODE = 8
MMAP_THRESHOLD = 128 * 1024  # glibc's default; fixed, so large frees return to the system
# What each runtime imports before it can load a model: imported before the baseline, so
# import-time memory (mostly torch and the Python bindings, which an app does not carry)
# is not counted as the model's.
RUNTIME_IMPORTS = {
    "pte": ["executorch.runtime", "executorch.extension.pybindings.portable_lib", "executorch.kernels.quantized",
            "executorch.extension.llm.custom_ops.custom_ops"],
    "onnx": ["onnxruntime"],
    "coreml": ["coremltools"],
}


@dataclass
class Measurement:
    format: str
    prompt_tokens: int
    decode_tokens: int
    baseline_bytes: int  # RSS after importing the runtime, before the model
    loaded_bytes: int  # RSS after opening the session, above the baseline
    peak_bytes: int  # peak RSS during load + prefill + decode, above the baseline
    seconds: float
    peak_source: str  # how the peak was read

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------------- child side

def _status() -> dict[str, int]:
    out = {}
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    out[key] = int(rest.split()[0]) * 1024
    except OSError:
        pass
    return out


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _rss_now() -> int:
    st = _status()
    if "VmRSS" in st:
        return st["VmRSS"]
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # no /proc: best available


def _peak(reset_ok: bool) -> tuple[int, str]:
    st = _status()
    if reset_ok and "VmHWM" in st:
        return st["VmHWM"], "VmHWM after clear_refs"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "ru_maxrss (includes import transients)"


def prompt_ids(n: int, vocab: int, seed: int = 0) -> list[int]:
    """A fixed pseudo-random prompt: distinct rows of the embedding, as real text reads them."""
    import numpy as np

    return [int(i) for i in np.random.default_rng(seed).integers(0, vocab, size=n)]


def _resolve(factory: str) -> Any:
    mod, _, attr = factory.partition(":")
    if not attr:
        raise UsageError(f"measure factory {factory!r}: use module:function")
    return getattr(importlib.import_module(mod), attr)


def bundle_session(bundle: str, manifest: dict[str, Any], artifact: dict[str, Any]) -> Any:
    """The factory for bundles: ``phonekit.export.runtime.open_session`` on one artifact (the
    parent read and validated the manifest, so nothing but the model loads after the baseline)."""
    from phonekit.export.runtime import open_session

    return open_session(Path(bundle), manifest, artifact)


def child_main(spec: dict[str, Any]) -> dict[str, Any]:
    import numpy as np

    for p in spec.get("sys_path", []):
        sys.path.insert(0, p)
    for m in spec.get("imports", []):
        importlib.import_module(m)
    factory = _resolve(spec["factory"])
    gc.collect()
    reset_ok = _reset_peak()
    base = _rss_now()
    t0 = time.perf_counter()
    session = factory(**spec.get("kwargs", {}))
    loaded = _rss_now() - base
    ids = prompt_ids(spec["prompt_tokens"], spec["vocab"], spec.get("seed", 0))
    logits = session.forward(ids, 0)
    pos = len(ids)
    for _ in range(spec["decode_tokens"]):
        logits = session.forward([int(np.argmax(logits))], pos)
        pos += 1
    peak, source = _peak(reset_ok)
    return {"baseline_bytes": base, "loaded_bytes": loaded, "peak_bytes": peak - base,
            "seconds": round(time.perf_counter() - t0, 3), "peak_source": source}


# -------------------------------------------------------------------------------- parent side

def run_child(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "2")
    env.setdefault("MALLOC_MMAP_THRESHOLD_", str(MMAP_THRESHOLD))  # see the module docstring
    try:
        proc = subprocess.run([sys.executable, "-m", "phonekit.profiles.measure"], input=json.dumps(spec),
                              capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        raise BundleError(f"measuring {spec.get('label', spec['factory'])}: took over {timeout:.0f} s; "
                          "use a bundle with a smaller --context or pass --measure-timeout") from None
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(MARK):
            return json.loads(line[len(MARK):])
    tail = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    why = tail[-1] if tail else f"exit status {proc.returncode}"
    raise BundleError(f"measuring {spec.get('label', spec['factory'])}: the runtime failed ({why})")


def measure(factory: str, kwargs: dict[str, Any], fmt: str, prompt_tokens: int, decode_tokens: int, vocab: int,
            imports: list[str] | None = None, sys_path: list[str] | None = None, timeout: float = 900,
            label: str | None = None) -> Measurement:
    """Measure any session factory (``module:function`` returning a ``Session``) in a subprocess."""
    if prompt_tokens < 1 or decode_tokens < 0:
        raise UsageError(f"measure: prompt_tokens must be >= 1 and decode_tokens >= 0 (got {prompt_tokens}, {decode_tokens})")
    spec = {"factory": factory, "kwargs": kwargs, "prompt_tokens": prompt_tokens, "decode_tokens": decode_tokens,
            "vocab": vocab, "imports": imports or [], "sys_path": sys_path or [], "label": label or factory}
    r = run_child(spec, timeout)
    return Measurement(fmt, prompt_tokens, decode_tokens, r["baseline_bytes"], r["loaded_bytes"], r["peak_bytes"],
                       r["seconds"], r["peak_source"])


def measure_bundle(bundle: Path, manifest: dict[str, Any], fmt: str, prompt_tokens: int | None = None,
                   decode_tokens: int = DEFAULT_DECODE, timeout: float = 900) -> Measurement:
    """Prefill ``prompt_tokens`` (default: the context minus the decode steps, i.e. a prompt
    that fills the cache) and decode ``decode_tokens`` through the artifact's real runtime."""
    from phonekit.export.runtime import RUNTIMES, pick_artifact

    context = int(manifest["context_length"])
    decode_tokens = max(0, min(decode_tokens, context - 1))
    if prompt_tokens is None:
        prompt_tokens = context - decode_tokens
    if prompt_tokens + decode_tokens > context:
        raise UsageError(f"--measure-prompt {prompt_tokens}: with {decode_tokens} decode steps it passes the bundle's context of {context}")
    kwargs = {"bundle": str(Path(bundle).absolute()), "manifest": manifest, "artifact": pick_artifact(manifest, fmt)}
    return measure("phonekit.profiles.measure:bundle_session", kwargs, fmt, prompt_tokens, decode_tokens,
                   int(manifest["tokenizer"]["vocab_size"]), imports=[*RUNTIME_IMPORTS.get(fmt, []), RUNTIMES[fmt]],
                   timeout=timeout, label=f"{Path(bundle).name} ({fmt})")


def runnable_here(fmt: str) -> str | None:
    """None when ``fmt`` can run on this machine, else why not."""
    from phonekit.export.runtime import RUNTIMES

    if fmt == "coreml" and sys.platform != "darwin":
        return "Core ML runs on macOS/iOS only"
    mod = RUNTIMES.get(fmt)
    if mod is None or importlib.util.find_spec(mod) is None:
        return f"this phonekit has no {fmt} runtime"
    return None


if __name__ == "__main__":
    try:
        result = child_main(json.loads(sys.stdin.read()))
    except Exception as e:  # report the first line to the parent, which raises a PhonekitError
        print(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", file=sys.stderr)
        sys.exit(1)
    sys.stdout.flush()
    print(MARK + json.dumps(result), flush=True)
