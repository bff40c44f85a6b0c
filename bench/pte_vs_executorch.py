"""Benchmark: phonekit's 8da4w .pte against ExecuTorch's own export pipeline
(``executorch.extension.llm.export.export_llm``, the ``smollm2`` model class) for
the demo model, all run in ExecuTorch's C++ LLM runner (TextLLMRunner) on the same
threads, in one run. Reports .pte size, prefill and decode tokens/s.

phonekit is exported once per ``--phonekit-quant`` (default: ``8da4w``, phonekit's
default weight rounding, and ``8da4w:sym``, the plain symmetric rounding ExecuTorch's
pipeline uses), so the cost of the better 4-bit weights shows next to their baseline.

    .venv/bin/python bench/pte_vs_executorch.py --context 512 --out out/bench

Not a test: numbers depend on the machine. Results go to OUT/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

# ~150 tokens, so prefill is timed over more than the runner's millisecond resolution.
PROMPT = ("The lighthouse stood at the end of a narrow spit of rock, and for forty years the same family had kept "
          "its lamp burning through every storm the sea could raise. The keeper's daughter knew the sound of each "
          "wind by heart: the low moan of the autumn gales, the sharp whistle of the winter squalls, the soft "
          "breathing of a summer night. One evening, as the fog rolled in from the west and the bell buoy began "
          "to toll, she saw a light where no light should be, far out beyond the reef. "
          "Write a short story about what she did next. Once upon a time")


def meta_checkpoint(out: Path) -> tuple[Path, Path]:
    """The demo's weights in ExecuTorch's llama_transformer names (HF RoPE layout)."""
    from phonekit.export import load_model

    lm = load_model("smollm2-135m-instruct")
    a = lm.config
    names = {"self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk", "self_attn.v_proj": "attention.wv",
             "self_attn.o_proj": "attention.wo", "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2",
             "mlp.up_proj": "feed_forward.w3", "input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm"}
    sd = {}
    for k, v in lm.model.state_dict().items():
        if k.startswith("caches.") or k.startswith("rope."):
            continue
        if k == "embed_tokens.weight":
            sd["tok_embeddings.weight"] = v
            sd["output.weight"] = v
        elif k == "norm.weight":
            sd["norm.weight"] = v
        elif k.startswith("layers."):
            _, i, rest = k.split(".", 2)
            mod, leaf = rest.rsplit(".", 1)
            sd[f"layers.{i}.{names[mod]}.{leaf}"] = v
    ckpt, params = out / "smollm2_meta.pth", out / "params.json"
    torch.save(sd, ckpt)
    params.write_text(json.dumps({
        "dim": a.hidden_size, "hidden_dim": a.intermediate_size, "n_heads": a.num_attention_heads,
        "n_kv_heads": a.num_key_value_heads, "n_layers": a.num_hidden_layers, "norm_eps": a.rms_norm_eps,
        "rope_theta": a.rope_theta, "use_scaled_rope": False, "vocab_size": a.vocab_size, "use_hf_rope": True,
        "attention_qkv_bias": False, "ffn_dim_multiplier": 1,
    }))
    return ckpt, params


def export_executorch(out: Path, context: int) -> tuple[Path, float]:
    ckpt, params = meta_checkpoint(out)
    meta = json.dumps({"get_bos_id": 1, "get_eos_ids": [2]})
    cmd = [sys.executable, "-m", "executorch.extension.llm.export.export_llm",
           "base.model_class=smollm2", f"base.params={params}", f"base.checkpoint={ckpt}",
           "model.use_kv_cache=True", "model.use_sdpa_with_kv_cache=True", "model.enable_dynamic_shape=True",
           "backend.xnnpack.enabled=True", "backend.xnnpack.extended_ops=True",
           "quantization.qmode=8da4w", "quantization.group_size=32",
           f"export.max_seq_length={context}", f"export.max_context_length={context}",
           f"+base.metadata='{meta}'", f"export.output_dir={out}", "export.output_name=executorch_smollm2.pte"]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=out)
    return out / "executorch_smollm2.pte", time.perf_counter() - t0


def export_phonekit(out: Path, context: int, quant: str) -> tuple[Path, float]:
    bundle = out / ("phonekit_" + quant.replace(":", "_"))
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "phonekit.export.cli", "export", "smollm2-135m-instruct", "--format", "pte",
                    "--quant", quant, "--context", str(context), "--out", str(bundle), "--force", "--quiet"], check=True)
    return bundle / "model.pte", time.perf_counter() - t0


def _generate(runner, new_tokens: int) -> tuple[float, float]:  # noqa: ANN001 - TextLLMRunner
    from executorch.extension.llm.runner import GenerationConfig

    stats = []
    runner.reset()
    runner.generate(PROMPT, GenerationConfig(max_new_tokens=new_tokens, temperature=0.0, echo=False),
                    stats_callback=stats.append)
    s = stats[-1]
    prefill_s = (s.prompt_eval_end_ms - s.inference_start_ms) / 1000
    decode_s = (s.inference_end_ms - s.prompt_eval_end_ms) / 1000
    return s.num_prompt_tokens / prefill_s, (s.num_generated_tokens - 1) / decode_s


def run_runners(ptes: list[Path], tokenizer: Path, new_tokens: int, repeats: int) -> list[dict[str, float]]:
    """Median prefill/decode tokens/s per .pte in TextLLMRunner. The programs take turns, one
    generation each per round, so a slow spell of a shared machine hits all of them alike
    (back-to-back blocks of runs differed by up to 30% between two runs of the same files)."""
    import executorch.kernels.quantized  # noqa: F401 - quantized embedding kernels for the runner
    from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401 - llama::custom_sdpa / update_cache
    from executorch.extension.llm.runner import TextLLMRunner

    runners = [TextLLMRunner(str(p), str(tokenizer)) for p in ptes]
    for r in runners:  # warm-up
        _generate(r, new_tokens)
    rows: list[list[tuple[float, float]]] = [[] for _ in runners]
    for _ in range(repeats):
        for i, r in enumerate(runners):
            rows[i].append(_generate(r, new_tokens))
    out = []
    for rr in rows:
        med = lambda k: sorted(x[k] for x in rr)[len(rr) // 2]  # noqa: E731
        out.append({"prefill_tok_s": round(med(0), 1), "decode_tok_s": round(med(1), 1)})
    return out


def label(manifest: dict) -> str:
    q = manifest["quantization"]
    emb = q.get("embedding") or {}
    pte = next(a for a in manifest["artifacts"] if a["format"] == "pte")
    merged = [m.split(" ")[0] for m in pte.get("details", {}).get("fused_projections", [])]
    fused = f", merged {' and '.join(merged)}" if merged else ", projections unfused"
    passes = ", two-pass head input" if "in two passes" in q.get("head", "") else ""
    return f"phonekit {q['scheme']}:{q['weight_method']}, embedding/head {emb.get('bits') or 'float'}-bit{passes}{fused}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("out/bench"))
    ap.add_argument("--phonekit-quant", nargs="+", default=["8da4w", "8da4w:sym"],
                    help="phonekit schemes to export and run (default: 8da4w 8da4w:sym)")
    ap.add_argument("--phonekit-bundle", type=Path, nargs="+", default=[],
                    help="reuse bundles from phonekit export (same --context) instead of exporting")
    ap.add_argument("--executorch-pte", type=Path, help="reuse a .pte from an earlier run's export_llm step")
    ap.add_argument("--no-executorch", action="store_true", help="run phonekit's programs only (no export_llm)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    torch.set_num_threads(args.threads)
    runs: list[tuple[str, Path, float]] = []
    for b in args.phonekit_bundle:
        m = json.loads((b / "manifest.json").read_text())
        if m["context_length"] != args.context:
            raise SystemExit(f"--phonekit-bundle {b} has context {m['context_length']}, not --context {args.context}")
        runs.append((label(m), b / "model.pte", float("nan")))
    if not args.phonekit_bundle:
        for q in args.phonekit_quant:
            pte, t = export_phonekit(args.out, args.context, q)
            runs.append((label(json.loads((pte.parent / "manifest.json").read_text())), pte, t))
    if args.no_executorch:
        pass
    elif args.executorch_pte:
        runs.append(("executorch export_llm", args.executorch_pte, float("nan")))
    else:
        runs.append(("executorch export_llm", *export_executorch(args.out.absolute(), args.context)))
    tok = runs[0][1].parent / "tokenizer.json"
    results = {"context": args.context, "threads": args.threads, "prompt": PROMPT, "new_tokens": args.new_tokens}
    speeds = run_runners([pte for _, pte, _ in runs], tok, args.new_tokens, args.repeats)
    for (name, pte, t), speed in zip(runs, speeds):
        results[name] = {"pte_bytes": pte.stat().st_size, "export_s": round(t, 1), **speed}
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
