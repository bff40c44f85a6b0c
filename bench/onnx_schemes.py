"""Benchmark: phonekit's ONNX decoders of the demo model in ONNX Runtime (CPU EP), one
bundle per ``--quant``, run by phonekit's own onnxruntime loop on the same threads, in
one process. Reports model file size (with external data), prefill and decode tokens/s,
so the cost of a weight rounding shows next to its plain symmetric baseline.

    .venv/bin/python bench/onnx_schemes.py --quant 8da4w 8da4w:sym w4 w4:sym --out out/bench-onnx
    .venv/bin/python bench/onnx_schemes.py --quant --bundle out/two-pass out/one-pass   # bundles made elsewhere

Not a test: numbers depend on the machine. Results go to OUT/results.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from pte_vs_executorch import PROMPT  # noqa: E402 - the same prompt as the .pte bench


def export(out: Path, context: int, quant: str) -> Path:
    bundle = out / ("onnx_" + quant.replace(":", "_").replace(",", "_").replace("=", ""))
    if not (bundle / "manifest.json").exists():
        subprocess.run([sys.executable, "-m", "phonekit.export.cli", "export", "smollm2-135m-instruct", "--format", "onnx",
                        "--quant", quant, "--context", str(context), "--out", str(bundle), "--force", "--quiet"],
                       check=True)
    return bundle


def model_bytes(bundle: Path) -> int:
    return sum(p.stat().st_size for p in bundle.glob("model.onnx*"))


def _generate(sess, prompt_ids: list[int], new_tokens: int) -> tuple[float, float]:  # noqa: ANN001 - OnnxSession
    """Prefill and decode tokens/s of one greedy generation through ``phonekit run``'s loop."""
    from phonekit.export.runtime import greedy

    stats = []
    for _ in greedy(sess, prompt_ids, new_tokens, eos_ids=[], stats=stats):
        pass
    return stats[-1].prefill_tps, stats[-1].decode_tps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quant", nargs="*", default=["8da4w", "8da4w:sym"])
    ap.add_argument("--bundle", type=Path, nargs="*", default=[],
                    help="also run these bundles (e.g. exported with other options), labelled by folder name")
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("out/bench-onnx"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    from tokenizers import Tokenizer

    from phonekit.export.bundle import read_manifest
    from phonekit.export.onnx_runtime import OnnxSession

    bundles = [export(args.out, args.context, q) for q in args.quant] + list(args.bundle)
    labels = list(args.quant) + [b.name for b in args.bundle]
    for b in args.bundle:
        if read_manifest(b)["context_length"] != args.context:
            raise SystemExit(f"--bundle {b}: context {read_manifest(b)['context_length']}, not --context {args.context}")
    if not bundles:
        raise SystemExit("nothing to run: give --quant and/or --bundle")
    prompt_ids = Tokenizer.from_file(str(bundles[0] / "tokenizer.json")).encode(PROMPT).ids
    sessions = [OnnxSession(b / "model.onnx", args.context, threads=args.threads) for b in bundles]
    for s in sessions:  # warm-up (prepacking, allocator arenas)
        _generate(s, prompt_ids, args.new_tokens)
    rows: list[list[tuple[float, float]]] = [[] for _ in sessions]
    # The sessions take turns, one generation each per round: this machine's speed drifts.
    for _ in range(args.repeats):
        for i, s in enumerate(sessions):
            rows[i].append(_generate(s, prompt_ids, args.new_tokens))
    results = {"context": args.context, "threads": args.threads, "prompt_tokens": len(prompt_ids),
               "new_tokens": args.new_tokens, "repeats": args.repeats}
    for q, b, rr in zip(labels, bundles, rows):
        med = lambda k: sorted(x[k] for x in rr)[len(rr) // 2]  # noqa: E731
        m = read_manifest(b)["quantization"]
        results[q] = {"weight_method": m["weight_method"], "head": m["head"], "model_bytes": model_bytes(b),
                      "prefill_tok_s": round(med(0), 1), "decode_tok_s": round(med(1), 1)}
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
