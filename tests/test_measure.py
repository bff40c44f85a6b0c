"""The measured footprint: the subprocess harness (on plain sessions with known allocations),
a real tiny ExecuTorch bundle (its memory plan against the estimate's formula, its measured
peak against the estimate), and the acceptance check on the demo model for every format
this machine can run."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from conftest import DEMO_PTE_GROUP, make_tiny_lm, write_hf_checkpoint
from phonekit.errors import BundleError
from phonekit.export.bundle import read_manifest
from phonekit.export.cli import main
from phonekit.export.commands.check import bundle_plans, exact_from_artifact
from phonekit.export.models import args_from_hf_config
from phonekit.profiles.estimate import estimate
from phonekit.profiles.measure import measure, measure_bundle, prompt_ids, runnable_here

HERE = str(Path(__file__).parent)
MB = 1_000_000


class AllocSession:
    """A plain session with known memory: ``hold`` bytes from open to exit, plus ``work``
    bytes of prefill workspace that are freed before prefill returns."""

    def __init__(self, hold: int, work: int, vocab: int, context: int) -> None:
        self.held = np.ones(hold, dtype=np.uint8)  # ones: every page touched
        self.work, self.vocab, self.context = work, vocab, context
        self.calls: list[tuple[int, int]] = []

    def reset(self) -> None:
        self.calls.clear()

    def forward(self, tokens: list[int], start_pos: int) -> np.ndarray:
        self.calls.append((len(tokens), start_pos))
        if len(tokens) > 1:
            scratch = np.ones(self.work, dtype=np.uint8)
            del scratch
        logits = np.zeros(self.vocab, np.float32)
        logits[(start_pos + len(tokens)) % self.vocab] = 1.0
        return logits


def alloc_session(hold: int, work: int, vocab: int, context: int) -> AllocSession:
    return AllocSession(hold, work, vocab, context)


class FragmentingSession(AllocSession):
    """Opens like a runtime loading a model: one large block freed (glibc's dynamic threshold
    would rise to its size), then twenty 2 MB blocks of which only the last is kept."""

    def __init__(self) -> None:
        first = np.ones(4 * MB, dtype=np.uint8)
        del first
        blocks = [np.ones(2 * MB, dtype=np.uint8) for _ in range(20)]
        super().__init__(0, 0, 100, 64)
        self.kept = blocks[-1]
        del blocks


def fragmenting_session() -> FragmentingSession:
    return FragmentingSession()


def failing_session() -> None:
    raise RuntimeError("cannot open the model file\nsecond line")


def slow_session() -> None:
    time.sleep(30)


def measure_alloc(hold: int, work: int):  # noqa: ANN201
    return measure("test_measure:alloc_session", {"hold": hold, "work": work, "vocab": 100, "context": 64},
                   "test", prompt_tokens=20, decode_tokens=4, vocab=100, imports=["numpy"], sys_path=[HERE])


def test_harness_reads_held_and_peak_memory() -> None:
    m = measure_alloc(60 * MB, 40 * MB)
    assert m.peak_source == "VmHWM after clear_refs" and (m.prompt_tokens, m.decode_tokens) == (20, 4)
    # Held memory shows after open; the freed prefill workspace only in the peak.
    assert 60 * MB <= m.loaded_bytes < 66 * MB
    assert 100 * MB <= m.peak_bytes < 108 * MB
    small = measure_alloc(10 * MB, 0)
    assert 10 * MB <= small.peak_bytes < 16 * MB and small.baseline_bytes > 0


def test_harness_counts_freed_large_blocks_as_returned() -> None:
    """The child fixes glibc's mmap threshold, so the 38 MB freed at open are not counted as
    held: with the dynamic threshold, those blocks sit in the heap under the kept one and the
    same session measured 40 MB after open (profiles/measure.py)."""
    m = measure("test_measure:fragmenting_session", {}, "test", 4, 1, 100, imports=["numpy"], sys_path=[HERE])
    assert 2 * MB <= m.loaded_bytes < 5 * MB, m


def test_harness_errors_are_one_line() -> None:
    with pytest.raises(BundleError) as e:
        measure("test_measure:failing_session", {}, "test", 4, 1, 100, sys_path=[HERE])
    assert "RuntimeError: cannot open the model file" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(BundleError, match="took over 3 s"):
        measure("test_measure:slow_session", {}, "test", 4, 1, 100, sys_path=[HERE], timeout=3)


def test_prompt_is_fixed_and_in_range() -> None:
    a = prompt_ids(300, 320)
    assert a == prompt_ids(300, 320) and min(a) >= 0 and max(a) < 320 and len(set(a)) > 150  # ~194 distinct expected from 300 draws of 320


def comparable(est) -> int:  # noqa: ANN001
    """The estimate the harness measures: everything but the tokenizer files (it does not load them)."""
    return est.total - est.components["tokenizer"]


def bundle_estimate(bundle: Path, fmt: str):  # noqa: ANN201
    manifest = read_manifest(bundle)
    config = args_from_hf_config(manifest["model"]["config"])
    art = next(a for a in manifest["artifacts"] if a["format"] == fmt)
    est = estimate(config, bundle_plans(manifest, config)[fmt], manifest["context_length"], fmt)
    return manifest, config, art, est


@pytest.fixture(scope="module")
def tiny_pte(tmp_path_factory) -> Path:
    assert runnable_here("pte") is None
    root = tmp_path_factory.mktemp("measure")
    folder = write_hf_checkpoint(make_tiny_lm("mobilellm"), root / "tiny")
    out = root / "bundle"
    assert main(["export", str(folder), "--format", "pte", "--quant", "8da4w", "--context", "64", "--out", str(out), "--quiet"]) == 0
    return out


def test_pte_memory_plan_matches_the_estimate_formula(tiny_pte: Path) -> None:
    manifest, config, art, est = bundle_estimate(tiny_pte, "pte")
    planned = art["details"]["memory_planned_bytes"]
    # MobileLLM on ExecuTorch's fused ops: cache + new K/V outputs, 2 [S, hidden], 5
    # [S, H * head_dim] and the merged gate/up output [S, 2 x intermediate]. ExecuTorch's
    # greedy planner overlaps that last one with the others, so the formula is an upper bound
    # (here 15% above the plan; 64 bytes are a slot the planner adds).
    kv = 2 * 2 * (2 * 64 * 2 * 16 * 4)  # 2 copies x 2 layers x K+V [1, 64, 2, 16] fp32
    assert (est.components["kv_cache"], est.components["activations"]) == (kv, (2 * 64 * 64 + 5 * 64 * 64 + 2 * 64 * 128) * 4)
    formula = est.components["kv_cache"] + est.components["activations"] + 64
    assert 0 <= formula / planned - 1 < 0.2, (formula, planned)
    exact = estimate(config, bundle_plans(manifest, config)["pte"], 64, "pte")
    exact_from_artifact(exact, config, art)
    assert exact.components["kv_cache"] + exact.components["activations"] == planned


@pytest.mark.demo
# Core ML runs only on macOS/iOS; its NumPy interpreter here says nothing about Core ML's memory,
# so the Core ML measurement is not part of this Linux suite (see README, "Memory budget").
@pytest.mark.parametrize("fmt", [pytest.param("pte", marks=pytest.mark.xdist_group(DEMO_PTE_GROUP)),
                                 pytest.param("onnx", marks=pytest.mark.xdist_group("demo"))])
def test_demo_estimate_within_15_percent_of_measured(fmt: str, request, tmp_path_factory) -> None:
    """Acceptance (issue 4): on the demo model (context 256, tests/conftest.py), every format
    this machine can run is measured with its real runtime (prompt 248 + 8 decode steps) and
    the estimate made before export is within 15% of the measured peak."""
    assert runnable_here(fmt) is None
    from conftest import DEMO_CONTEXT, _export_demo

    bundle = (request.getfixturevalue("demo_pte_bundle") if fmt == "pte"
              else _export_demo(tmp_path_factory, fmt, "w4" if fmt == "coreml" else "8da4w"))
    manifest, config, art, est = bundle_estimate(bundle, fmt)
    m = measure_bundle(bundle, manifest, fmt)
    exact = estimate(config, bundle_plans(manifest, config)[fmt], DEMO_CONTEXT, fmt)
    exact_from_artifact(exact, config, art)
    ratio = m.peak_bytes / comparable(est)
    print(f"\ndemo {fmt} @ context {DEMO_CONTEXT}: estimate {comparable(est) / MB:.1f} MB "
          f"(with the artifact's recorded plan {comparable(exact) / MB:.1f} MB), measured peak {m.peak_bytes / MB:.1f} MB "
          f"(after load {m.loaded_bytes / MB:.1f} MB), measured/estimate {ratio:.3f}")
    assert abs(ratio - 1) < 0.15
